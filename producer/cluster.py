"""Redis Cluster URLs: clients that route each key to the node that holds its slot.

    redis+cluster://[user:password@]host:port[,host:port...][?option=value...]
    rediss+cluster://...  TLS to every node

The hosts are startup nodes (port 6379 when left out): any one that answers tells the client the
whole slot map. Options: `socket_timeout`, `socket_connect_timeout` (seconds), and with
rediss+cluster `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`. A Cluster has no
databases: a path is an error.

What stays within one slot: a model's keys share the `{<model>}` hash tag, a request's keys the
`{<id>}` tag, so the enqueue script, a worker's XREADGROUP over its levels and each events script
touch one slot. What spans slots is split here: `NodePipeline` sends one plain pipeline per node
(not redis-py's ClusterPipeline, which asks `COMMAND GETKEYS` for every XREAD or EVALSHA it routes),
and `read_streams` reads many events streams slot by slot.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
import redis.exceptions as redis_errors
from redis import cluster as sync_cluster
from redis.crc import key_slot

SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
DEFAULT_PORT = 6379
BLOCK_TURN_MS = 50  # a blocking read over many slots blocks on one slot at a time, this long at most
MAX_REDIRECTS = 5
_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_DROPPED_OPTIONS = ("single_connection_client", "db")  # per-connection-pool ideas a Cluster client has no use for


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SCHEMES


def is_cluster(client: Any) -> bool:
    return isinstance(client, (sync_cluster.RedisCluster, acluster.RedisCluster))


@dataclass
class ClusterTarget:
    nodes: list[tuple[str, int]]
    is_tls: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # credentials, timeouts, TLS


def parse_cluster_url(url: str) -> ClusterTarget:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"not a Cluster URL: {_redacted(url)!r} (redis+cluster:// or rediss+cluster://)")
    if parts.path.strip("/"):
        raise ValueError(f"Cluster URL {_redacted(url)!r}: a Redis Cluster has no databases, drop the path")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    target = ClusterTarget(nodes=[_host_port(item.strip(), url) for item in hosts.split(",")], is_tls=SCHEMES[scheme])
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        if user:
            target.options["username"] = unquote(user)
        if has_password:
            target.options["password"] = unquote(password)
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _FLOAT_OPTIONS:
            try:
                target.options[name] = float(value)
            except ValueError:
                raise ValueError(f"Cluster URL option {name}={value!r} is not a number of seconds") from None
        elif name in _SSL_OPTIONS and target.is_tls:
            target.options[name] = value
        else:
            known = ", ".join(list(_FLOAT_OPTIONS) + list(_SSL_OPTIONS) * target.is_tls)
            raise ValueError(f"unknown Cluster URL option {name!r} in {_redacted(url)!r} (known: {known})")
    if target.is_tls:
        target.options["ssl"] = True
    return target


def _host_port(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ValueError(f"Cluster URL {_redacted(url)!r}: an empty node address")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid cluster node port {port_text!r} in {item!r}")
    return host, int(port_text)


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    _, at, hosts = rest.rpartition("@")
    return f"{scheme}{sep}***@{hosts}" if at else url


def connect_cluster(url: str, **options: Any) -> sync_cluster.RedisCluster:
    target = parse_cluster_url(url)
    nodes = [sync_cluster.ClusterNode(host, port) for host, port in target.nodes]
    return sync_cluster.RedisCluster(startup_nodes=nodes, **_options(target, options))


def connect_cluster_async(url: str, *, max_connections: int | None = None, **options: Any) -> acluster.RedisCluster:
    """max_connections bounds the connections to each node (the gateway's command pool)."""
    target = parse_cluster_url(url)
    nodes = [acluster.ClusterNode(host, port) for host, port in target.nodes]
    if max_connections is not None:
        options["max_connections"] = max_connections
    return acluster.RedisCluster(startup_nodes=nodes, **_options(target, options))


def _options(target: ClusterTarget, options: dict[str, Any]) -> dict[str, Any]:
    return {**target.options, **{k: v for k, v in options.items() if k not in _DROPPED_OPTIONS}}


def slot_of(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


COLOCATE_TRIES = 1024  # a cluster of n masters needs about n draws; past this many, any node will do


def colocated_id(client: Any, anchor_key: str, new_id: Callable[[], str]) -> str:
    """A fresh id (drawn from `new_id`) whose `{<id>}` keys land on the node that serves `anchor_key`'s
    slot, when the client's slot map knows it: a request's events and abort keys then sit on its model's
    node, so a worker's step (read, abort check, publish, ack) touches that one node. An id is only an
    id: with a slot map that changed since, or any id at all, everything still works, one node further."""
    try:
        target = primary_of(client, slot_of(anchor_key)).name
        for _ in range(COLOCATE_TRIES):
            candidate = new_id()
            if primary_of(client, slot_of(candidate)).name == target:
                return candidate
    except (redis_errors.SlotNotCoveredError, LookupError):  # a slot map not read yet, or being rebuilt
        pass
    return new_id()


def id_source(client: Any, anchor_key: str, new_id: Callable[[], str], colocate: bool = True) -> Callable[[], str]:
    """Where a client draws the id of a request that names none: `new_id`, or on a Cluster (with
    `colocate`) ids colocated with `anchor_key` (the model's request stream)."""
    if colocate and is_cluster(client):
        return lambda: colocated_id(client, anchor_key, new_id)
    return new_id


def primary_of(client: Any, slot: int) -> Any:
    """The master serving `slot` in the client's slot map (sync or async client). Read straight from the map:
    get_node_from_slot's locking and argument checks cost more than the rest of routing a command."""
    nodes = client.nodes_manager.slots_cache.get(slot)
    return nodes[0] if nodes else client.nodes_manager.get_node_from_slot(slot)  # raises SlotNotCoveredError


def by_slot(keys: list[str]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = defaultdict(list)
    for key in keys:
        grouped[slot_of(key)].append(key)
    return grouped


# ------------------------------------------------------------ one plain pipeline per node


@dataclass
class _Call:
    slot: int
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class NodePipeline:
    """A pipeline over a Redis Cluster shaped like redis-py's plain one (`pipe.xadd(...)`, `execute()`):
    commands are grouped by the node that serves their key's slot and sent as one plain pipeline per
    node, so a batch costs one round trip per node it touches (written to every node before any reply is
    read: in wall time about one). Each command must keep to one slot
    (its first argument is the key; EVALSHA's is its first key). A command answered MOVED or ASK is
    sent again to the node named (the slot map refreshed after MOVED); one answered NOSCRIPT gets its
    script loaded there first when the script was named in `scripts` (sha1 -> source)."""

    def __init__(self, cluster: sync_cluster.RedisCluster, scripts: dict[str, str] | None = None):
        self.cluster = cluster
        self.scripts = {hashlib.sha1(s.encode()).hexdigest(): s for s in (scripts or {}).values()}
        self.scripts.update(scripts or {})
        self._calls: list[_Call] = []

    def __len__(self) -> int:
        return len(self._calls)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def add(*args: Any, **kwargs: Any) -> NodePipeline:
            key = args[2] if method == "evalsha" else args[0]
            key = next(iter(key)) if isinstance(key, dict) else key  # XREAD's {key: id}
            self._calls.append(_Call(slot_of(key), method, args, kwargs))
            return self

        self.__dict__[method] = add  # the next pipe.<method> finds it without coming here
        return add

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        calls, self._calls = self._calls, []
        results: list[Any] = [None] * len(calls)
        todo = {i: self._node_of(call.slot) for i, call in enumerate(calls)}
        asking: set[int] = set()
        for _ in range(MAX_REDIRECTS):
            if not todo:
                break
            todo, asking = self._round(calls, todo, asking, results)
        for i, node in todo.items():
            results[i] = redis_errors.ClusterError(f"slot {calls[i].slot}: still redirected after {MAX_REDIRECTS} "
                                                   f"tries (last: {node.name})")
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    def _round(self, calls: list[_Call], todo: dict[int, Any], asking: set[int],
               results: list[Any]) -> tuple[dict[int, Any], set[int]]:
        """One pipeline per node for the calls in `todo`; returns the calls to send again, and where."""
        per_node: dict[str, list[int]] = defaultdict(list)
        nodes = {}
        for i, node in todo.items():
            per_node[node.name].append(i)
            nodes[node.name] = node
        again: dict[int, Any] = {}
        again_asking: set[int] = set()
        needs_refresh = False
        loaded: set[tuple[str, str]] = set()
        sent = {name: self._send(nodes[name], [calls[i] for i in indices], [i in asking for i in indices])
                for name, indices in per_node.items()}  # every node's batch on the wire before any reply is read
        received = {name: _receive(*batch) for name, batch in sent.items()}  # all read: no connection left dirty
        for name, indices in per_node.items():
            for i, reply in zip(indices, received[name]):
                if isinstance(reply, (redis_errors.MovedError, redis_errors.AskError)):
                    again[i] = self.cluster.nodes_manager.get_node(reply.host, reply.port) or self._node_at(reply)
                    needs_refresh = needs_refresh or isinstance(reply, redis_errors.MovedError)
                    if isinstance(reply, redis_errors.AskError):
                        again_asking.add(i)
                elif isinstance(reply, redis_errors.NoScriptError) and calls[i].args[0] in self.scripts:
                    if (name, calls[i].args[0]) not in loaded:
                        nodes[name].redis_connection.script_load(self.scripts[calls[i].args[0]])
                        loaded.add((name, calls[i].args[0]))
                    again[i] = nodes[name]
                elif isinstance(reply, (redis.ConnectionError, redis.TimeoutError)):
                    self.cluster.nodes_manager.initialize()  # the node may have failed over: ask for the map again
                    raise reply
                else:
                    results[i] = reply
        if needs_refresh:
            self.cluster.nodes_manager.initialize()
        return again, again_asking

    def _send(self, node: Any, calls: list[_Call], is_asking: list[bool]) -> tuple[Any, ...]:
        """Write the calls to one node as one packed batch; `_receive` reads the replies."""
        client = node.redis_connection
        pipe = client.pipeline(transaction=False)  # builds the commands and parses their replies, as redis-py's own
        for call, ask in zip(calls, is_asking):
            if ask:
                pipe.execute_command("ASKING")
            getattr(pipe, call.method)(*call.args, **call.kwargs)
        conn = client.connection_pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands([args for args, _ in pipe.command_stack]))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            conn.disconnect()
            client.connection_pool.release(conn)
            return client, pipe, None, is_asking, exc
        return client, pipe, conn, is_asking, None

    def _node_of(self, slot: int) -> Any:
        return primary_of(self.cluster, slot)

    def _node_at(self, error: Any) -> Any:
        self.cluster.nodes_manager.initialize()
        return self.cluster.nodes_manager.get_node(error.host, error.port) or self._node_of(error.slot_id)


def _receive(client: Any, pipe: Any, conn: Any, is_asking: list[bool], error: Exception | None) -> list[Any]:
    """The replies of one node's batch, in order, errors as values (ASKING's OKs left out)."""
    if error is not None:
        return [error] * len(is_asking)
    replies: list[Any] = []
    try:
        for args, options in pipe.command_stack:
            try:
                replies.append(pipe.parse_response(conn, args[0], **options))
            except redis.ResponseError as exc:
                replies.append(exc)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        conn.disconnect()  # the rest of the replies is lost with the connection
        replies += [exc] * (len(pipe.command_stack) - len(replies))
    finally:
        client.connection_pool.release(conn)
    out, it = [], iter(replies)
    for ask in is_asking:
        if ask:
            next(it)
        out.append(next(it))
    return out


def pipeline(client: Any, scripts: dict[str, str] | None = None) -> Any:
    """A non-transactional pipeline: redis-py's own on one Redis, a NodePipeline on a Cluster."""
    if isinstance(client, sync_cluster.RedisCluster):
        return NodePipeline(client, scripts)
    return client.pipeline(transaction=False)


# ------------------------------------------------------------ reading many streams


def read_streams(client: Any, streams: dict[str, Any], count: int | None = None,
                 block_ms: int | None = None, first_turn: int = 0) -> list[Any]:
    """XREAD over `streams` (key -> last id), as one XREAD on one Redis. On a Cluster an XREAD over
    keys of different slots is refused (CROSSSLOT, even on one node), so: one non-blocking XREAD per
    slot, pipelined per node; when none has anything and block_ms is given, block on one slot at a
    time (at most BLOCK_TURN_MS each, in turn, starting with the `first_turn`-th) and sweep all slots
    again between turns."""
    if not isinstance(client, sync_cluster.RedisCluster):
        return client.xread(streams, count=count, block=block_ms) or []
    slots = by_slot(list(streams))
    if len(slots) == 1:  # one slot: one XREAD on its node, blocking as long as asked
        node = client.nodes_manager.get_node_from_slot(next(iter(slots)))
        return _xread_node(client, node, streams, count, block_ms)
    deadline = None if block_ms is None else time.monotonic() + block_ms / 1000
    order = sorted(slots)
    turn = first_turn
    while True:
        pipe = NodePipeline(client)
        for keys in slots.values():
            pipe.xread({k: streams[k] for k in keys}, count=count)
        reply = [r for result in pipe.execute() for r in (result or [])]
        left_ms = 0 if deadline is None else int((deadline - time.monotonic()) * 1000)
        if reply or left_ms <= 0 or not order:
            return reply
        keys = slots[order[turn % len(order)]]
        turn += 1
        node = client.nodes_manager.get_node_from_slot(order[(turn - 1) % len(order)])
        reply = _xread_node(client, node, {k: streams[k] for k in keys}, count, max(1, min(BLOCK_TURN_MS, left_ms)))
        if reply:
            return reply


def _xread_node(client: sync_cluster.RedisCluster, node: Any, streams: dict[str, Any], count: int | None,
                block_ms: int | None) -> list[Any]:
    """An XREAD sent to a node directly; a slot that moved refreshes the map and reads as a ConnectionError,
    which every reader here retries."""
    try:
        return node.redis_connection.xread(streams, count=count, block=block_ms) or []
    except (redis_errors.MovedError, redis_errors.AskError) as exc:
        client.nodes_manager.initialize()
        raise redis.ConnectionError(f"slot moved ({exc}); read again") from exc


async def read_streams_async(client: Any, streams: dict[str, Any], count: int | None = None,
                             block_ms: int | None = None, node_clients: dict[str, aredis.Redis] | None = None,
                             single_connection: bool = True, first_turn: int = 0) -> list[Any]:
    """The asyncio twin of read_streams. `node_clients` caches a plain client per node (the caller
    owns and closes them: see close_node_clients), each with one connection (a gateway lane) or a pool
    (a client whose many readers block at once)."""
    if not isinstance(client, acluster.RedisCluster):
        return await client.xread(streams, count=count, block=block_ms) or []
    import asyncio

    await client.initialize()  # a no-op once the slot map is known
    node_clients = {} if node_clients is None else node_clients
    slots = by_slot(list(streams))
    order = sorted(slots)
    if len(order) == 1:
        conn = _node_client(client, _async_node(client, order[0]).name, node_clients, single_connection)
        try:
            return await conn.xread(streams, count=count, block=block_ms) or []
        except (redis_errors.MovedError, redis_errors.AskError) as exc:
            await client.nodes_manager.initialize()
            raise redis.ConnectionError(f"slot moved ({exc}); read again") from exc
    deadline = None if block_ms is None else time.monotonic() + block_ms / 1000
    turn = first_turn
    while True:
        per_node: dict[str, list[int]] = defaultdict(list)
        for slot in order:
            per_node[_async_node(client, slot).name].append(slot)
        try:
            results = await asyncio.gather(*(_xread_slots(_node_client(client, name, node_clients, single_connection), slots, group,
                                                          streams, count) for name, group in per_node.items()))
        except (redis_errors.MovedError, redis_errors.AskError) as exc:
            await client.nodes_manager.initialize()
            raise redis.ConnectionError(f"slot moved ({exc}); read again") from exc  # callers retry these
        reply = [r for result in results for r in result]
        left_ms = 0 if deadline is None else int((deadline - time.monotonic()) * 1000)
        if reply or left_ms <= 0 or not order:
            return reply
        slot = order[turn % len(order)]
        turn += 1
        conn = _node_client(client, _async_node(client, slot).name, node_clients, single_connection)
        reply = await conn.xread({k: streams[k] for k in slots[slot]}, count=count,
                                 block=max(1, min(BLOCK_TURN_MS, left_ms)))
        if reply:
            return reply


async def _xread_slots(conn: aredis.Redis, slots: dict[int, list[str]], group: list[int], streams: dict[str, Any],
                       count: int | None) -> list[Any]:
    pipe = conn.pipeline(transaction=False)
    for slot in group:
        pipe.xread({k: streams[k] for k in slots[slot]}, count=count)
    replies = await pipe.execute(raise_on_error=False)
    out = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        out += reply or []
    return out


def _async_node(client: acluster.RedisCluster, slot: int) -> Any:
    return client.nodes_manager.get_node_from_slot(slot)


def _node_client(client: acluster.RedisCluster, name: str, cache: dict[str, aredis.Redis],
                 single_connection: bool) -> aredis.Redis:
    if name not in cache:
        node = client.get_node(node_name=name)
        kwargs = {k: v for k, v in node.connection_kwargs.items()
                  if k in ("host", "port", "username", "password", "socket_timeout", "socket_connect_timeout",
                           "client_name") or k.startswith("ssl")}
        connection_class = node.connection_kwargs.get("connection_class")
        if isinstance(connection_class, type) and issubclass(connection_class, aredis.SSLConnection):
            kwargs["ssl"] = True
        cache[name] = aredis.Redis(single_connection_client=single_connection, **kwargs)
    return cache[name]


async def close_node_clients(cache: dict[str, aredis.Redis]) -> None:
    for conn in cache.values():
        await conn.aclose()
    cache.clear()
