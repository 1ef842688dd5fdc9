"""The worker's Redis I/O: group, read, abort checks, publish, ack, dead letters, heartbeat.

Every per-step operation is one pipelined round trip whatever the number of requests; on a Redis
Cluster, one per node it touches (producer.cluster.NodePipeline: a request's keys share its slot,
the model's keys the model's slot, so no command or script spans two).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis
import redis.exceptions as redis_errors

from producer import cluster
from producer.keys import DEFAULT_PRIORITY, GROUP, PRIORITIES, Keys, Priority
from producer.protocol import (
    TERMINAL_EVENTS,
    Event,
    ModelRegistration,
    dead_letter_fields,
    decode_event,
    encode_event,
    now_ms,
)
from worker.config import WorkerConfig
from worker.event_writes import EVENTS_LUA, events_script_args, is_gap, is_refused
from worker.outbox import Outbox

log = logging.getLogger("redbatch.worker")
MAX_BACKOFF_S = 2.0  # longest wait between retries while Redis is away
EVENT_TTL_REFRESH_EVERY = 64  # events between EXPIREs of a long-running request's stream


class TransientRedisError(redis.RedisError):
    """Redis refused a write for a reason that passes (OOM under noeviction, LOADING, ...): retry later."""


_TRANSIENT_PREFIXES = ("OOM", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY")


_TRANSIENT_TYPES = (redis.ConnectionError, redis.TimeoutError, TransientRedisError, redis_errors.OutOfMemoryError,
                    redis_errors.BusyLoadingError, redis_errors.ReadOnlyError, redis_errors.TryAgainError,
                    # a Redis Cluster moving a slot or failing a master over:
                    redis_errors.MovedError, redis_errors.AskError, redis_errors.ClusterDownError)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_TRANSIENT_PREFIXES)


class EntryRef(NamedTuple):
    """A request-stream entry: the priority level of the stream that holds it, and its id there
    (ids are unique within one stream only)."""

    priority: Priority
    id: str

    def __str__(self) -> str:
        return self.id if self.priority == DEFAULT_PRIORITY else f"{self.priority.value}/{self.id}"


def by_level(refs: list[EntryRef]) -> dict[Priority, list[str]]:
    """Entry ids grouped by the stream that holds them."""
    grouped: dict[Priority, list[str]] = {}
    for ref in refs:
        grouped.setdefault(ref.priority, []).append(ref.id)
    return grouped


class WorkerStreams:
    def __init__(self, client: redis.Redis, config: WorkerConfig):
        self.redis = client
        self.config = config
        self.keys = Keys(config.prefix)
        self.model = config.model_name
        self.request_keys = {p: self.keys.requests(self.model, p) for p in PRIORITIES}  # highest level first
        self.requests_key = self.request_keys[DEFAULT_PRIORITY]
        self.started_ms = now_ms()
        self._reclaim_cursors = {p: "0-0" for p in PRIORITIES}
        self.reclaim_scan_done = False
        self._can_read_uptime = True
        self._tasks: list[str] = []  # what register() announced, for a registry entry someone deleted
        self._is_past_restart_window = False  # Redis has been up long enough; asked again after an error
        self._events_sha = hashlib.sha1(EVENTS_LUA.encode()).hexdigest()
        self.is_cluster = cluster.is_cluster(client)

    def pipeline(self):
        """One round trip on one Redis; one per node touched on a Cluster."""
        return cluster.pipeline(self.redis, {self._events_sha: EVENTS_LUA})

    def _model_node(self):
        """Where the model's keys live: the client itself, or on a Cluster the plain client of the node that
        serves the model's slot (XREADGROUP through the cluster client costs a COMMAND GETKEYS each)."""
        if not self.is_cluster:
            return self.redis
        return self.redis.nodes_manager.get_node_from_slot(cluster.slot_of(self.requests_key)).redis_connection

    # ------------------------------------------------------------ setup

    def ensure_group(self) -> None:
        """Create the consumer group on every level's stream (from the stream's start, so work queued
        before any worker counts)."""
        for key in self.request_keys.values():
            try:
                self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def register(self, tasks: list[str]) -> None:
        info = ModelRegistration(
            tasks=tasks, max_num_seqs=self.config.max_num_seqs, max_queue_len=self.config.max_queue_len,
            model_path=self.config.model_path, last_seen=now_ms(), live_workers=1,
            heartbeat_ttl_s=self.config.heartbeat_ttl_s,
        )
        self._tasks = list(tasks)
        existing = self.redis.hget(self.keys.models(), self.model)
        if existing:
            info.live_workers = max(1, _registration(existing).live_workers)
        self.redis.hset(self.keys.models(), self.model, info.to_json())
        # live from registration on: a producer's live-worker check accepts work before the first heartbeat
        self.redis.zadd(self.keys.model_workers(self.model), {self.config.worker_id: info.last_seen})

    def unregister(self) -> None:
        pipe = self.pipeline()
        pipe.delete(self.keys.worker(self.config.worker_id))
        pipe.zrem(self.keys.model_workers(self.model), self.config.worker_id)
        pipe.execute()

    # ------------------------------------------------------------ per step

    def read(self, free: dict[Priority, int], block_ms: int | None) -> list[tuple[EntryRef, dict[bytes, bytes]]]:
        """New entries for this consumer, highest level first: `free[p]` is how many entries of level p
        or higher the engine can take. Blocks (only when block_ms is given, on every level at once) when
        no level has any. XREADGROUP's COUNT applies per stream, so a blocking read that wakes on
        several levels at once may bring up to free[p] of each."""
        entries: list[tuple[EntryRef, dict[bytes, bytes]]] = []
        for level in PRIORITIES:
            count = free.get(level, 0) - len(entries)  # everything read so far is of this level or higher
            if count > 0:
                entries += self._read_group({level: count}, None)
        if entries or block_ms is None:
            return entries
        return self._read_group({p: n for p, n in free.items() if n > 0}, block_ms)

    def _read_group(self, counts: dict[Priority, int], block_ms: int | None) -> list[tuple[EntryRef, dict]]:
        if not counts:
            return []
        streams = {self.request_keys[p]: ">" for p in PRIORITIES if p in counts}
        level_of = {self.request_keys[p].encode(): p for p in counts}
        try:
            reply = self._model_node().xreadgroup(GROUP, self.config.worker_id, streams, count=max(counts.values()),
                                                  block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            log.warning("request stream or group vanished (%s); recreating it", exc)
            self.ensure_group()
            return []
        entries = []
        for key, stream_entries in sorted(reply or [], key=lambda r: level_of[_bytes(r[0])].rank):
            level = level_of[_bytes(key)]
            for entry_id, fields in stream_entries:
                entries.append((EntryRef(level, _text(entry_id)), fields or {}))
        return entries

    def entry_states(self, items: list[tuple[str, EntryRef, bool]]) -> list["EntryState"]:
        """For (request_id, entry_id, is_redelivery) items, in one round trip: abort key, owning entry, and
        (redeliveries only) the events already published."""
        if not items:
            return []
        pipe = self.pipeline()
        ttl = self.config.result_ttl_s
        for request_id, entry, is_redelivery in items:
            pipe.exists(self.keys.abort(request_id))
            owner = self.keys.request_owner(self.model, request_id)
            pipe.set(owner, entry.id, nx=True, ex=ttl)
            pipe.get(owner)
            if is_redelivery:
                pipe.xrange(self.keys.events(request_id))
        results = iter(pipe.execute(raise_on_error=False))
        states = []
        for _, _, is_redelivery in items:
            aborted, _, owner = _raise_errors(next(results), next(results), next(results))
            state = EntryState(bool(aborted), owner.decode() if owner else None)
            if is_redelivery:
                state.read_published(next(results))
            states.append(state)
        return states

    def renew(self, entries: list[EntryRef]) -> None:
        """Reset the idle time of entries this worker is running, without counting a delivery."""
        grouped = by_level(entries)
        if not grouped:
            return
        pipe = self.pipeline()
        for level, ids in grouped.items():
            pipe.xclaim(self.request_keys[level], GROUP, self.config.worker_id, 0, ids, justid=True)
        pipe.execute()

    def hand_back(self, entries: list[tuple[EntryRef, int]], is_delivery: bool = False) -> None:
        """Mark unfinished (entry, deliveries) idle past the lease so another worker reclaims them at once.

        A graceful hand-back is not a failed delivery: the count is set one lower, so the reclaim
        that follows brings it back to what it was and rolling restarts never dead-letter a request."""
        if not entries:
            return
        idle_ms = int(self.config.lease_s * 1000) + 1
        pipe = self.pipeline()
        for entry, deliveries in entries:
            retrycount = None if is_delivery else max(0, deliveries - 1)
            pipe.xclaim(self.request_keys[entry.priority], GROUP, self.config.worker_id, 0, [entry.id],
                        idle=idle_ms, retrycount=retrycount, justid=True)
        pipe.execute()

    def reclaim(self, free: dict[Priority, int] | int) -> list[tuple[EntryRef, dict[bytes, bytes], int]]:
        """Take over entries idle past the lease, highest level first (`free` as in read(); an int: that
        many of any level); returns (entry, fields, deliveries).

        Sets `reclaim_scan_done` when this call scanned every level's whole pending list and found
        nothing more to take (XAUTOCLAIM scans a window per call and resumes from a cursor)."""
        if isinstance(free, int):
            free = {p: free for p in PRIORITIES}
        if self.redis_restarted_recently():
            self.reclaim_scan_done = True  # nothing may be taken yet: look again at the next lease/4 tick
            return []
        taken: list[tuple[EntryRef, dict[bytes, bytes], int]] = []
        is_done = True
        for level in PRIORITIES:
            count = free.get(level, 0) - len(taken)
            if count <= 0:
                is_done = False
                continue
            claimed, level_done = self._reclaim_level(level, count)
            taken += claimed
            is_done = is_done and level_done
        self.reclaim_scan_done = is_done
        return taken

    def _reclaim_level(self, level: Priority, count: int) -> tuple[list[tuple[EntryRef, dict, int]], bool]:
        key = self.request_keys[level]
        min_idle_ms = int(self.config.lease_s * 1000)
        reply = self.redis.xautoclaim(key, GROUP, self.config.worker_id, min_idle_ms,
                                      start_id=self._reclaim_cursors[level], count=count)
        self._reclaim_cursors[level], claimed = _text(reply[0]), reply[1]
        is_done = self._reclaim_cursors[level] == "0-0" and len(claimed) < count
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:  # deleted while pending: nothing to run, just clear the pending entry
            self.redis.xack(key, GROUP, *deleted)
        claimed = [(_text(i), f) for i, f in claimed if f]
        if not claimed:
            return [], is_done
        pipe = self.pipeline()
        for entry_id, _ in claimed:
            pipe.xpending_range(key, GROUP, min=entry_id, max=entry_id, count=1)
        counts = [rows[0]["times_delivered"] if rows else 1 for rows in pipe.execute()]
        return [(EntryRef(level, entry_id), fields, n) for (entry_id, fields), n in zip(claimed, counts)], is_done

    def redis_restarted_recently(self) -> bool:
        """Whether Redis came up, or a replica took over as master, too recently for live workers to have
        renewed their leases.

        Idle times in the pending list are wall-clock based, so an outage ages every entry by its
        length: right after a restart even the entries of live workers look idle. After a failover
        the promoted replica's uptime says nothing (it has been up all along), and renewals the old
        master acknowledged but had not replicated are lost, so entries look idle there too. Reclaim
        waits a lease, plus the longest retry backoff and a second (uptime is in whole seconds), after
        a restart (INFO server uptime) or after the first worker saw a new master (INFO replication
        master_replid against `redis_master`, the window in `redis_failover`). Asked once, and again
        only after a Redis error (`forget_uptime`)."""
        if self._is_past_restart_window or not self._can_read_uptime:
            return False
        try:  # asked once per Redis error: two round trips are cheap here
            server, replication = self._info("server"), self._info("replication")
        except redis.ResponseError as exc:  # INFO refused (ACL without +info, a proxy): leases alone decide
            log.warning("cannot read Redis uptime (%s); reclaim will not wait out Redis restarts", exc)
            self._can_read_uptime = False
            return False
        uptime_s = server.get("uptime_in_seconds")
        is_recent = uptime_s is not None and float(uptime_s) < self._restart_window_s
        is_recent = self._master_changed_recently(replication.get("master_replid")) or is_recent
        self._is_past_restart_window = not is_recent
        return is_recent

    def _info(self, section: str) -> dict[str, Any]:
        """INFO of one Redis; on a Cluster, of every master at once: the shortest uptime, and the
        replication ids joined (any master replaced by a failover changes them)."""
        if not self.is_cluster:
            return self.redis.info(section)
        per_node = [info for _, info in sorted(self.redis.info(section, target_nodes=self.redis.PRIMARIES).items())]
        uptimes = [float(i["uptime_in_seconds"]) for i in per_node if "uptime_in_seconds" in i]
        replids = [i["master_replid"] for i in per_node if isinstance(i.get("master_replid"), str)]
        out: dict[str, Any] = {}
        if uptimes:
            out["uptime_in_seconds"] = min(uptimes)
        if replids and len(replids) == len(per_node):
            out["master_replid"] = ",".join(replids)
        return out

    def forget_slots(self) -> None:
        """After a Redis error on a Cluster: a slot may have moved or a master failed over; ask for the map again."""
        if self.is_cluster:
            try:
                self.redis.nodes_manager.initialize()
            except redis.RedisError as exc:
                log.warning("cannot read the cluster's slot map yet: %s", exc)

    @property
    def _restart_window_s(self) -> float:
        return self.config.lease_s + MAX_BACKOFF_S + 1

    def _master_changed_recently(self, replid: Any) -> bool:
        """Whether the master's replication id is one the workers first saw less than a window ago.

        A replica promoted by a failover gets a new replication id. The first worker that sees it where
        `redis_master` still holds the old one (the key was replicated with the data) opens the window;
        every worker, new ones too, honours it until it expires."""
        if not isinstance(replid, str):  # a server or proxy that does not tell: uptime alone decides
            return False
        known_key, window_key = self.keys.redis_master(), self.keys.redis_failover()
        pipe = self.pipeline()  # not MGET: in a Cluster the two keys are in different slots
        pipe.get(known_key)
        pipe.get(window_key)
        known, in_window = (_text(v) if v is not None else None for v in pipe.execute())
        if in_window == replid:
            return True
        if known == replid:
            return False
        pipe = self.pipeline()
        pipe.set(known_key, replid)
        if known is not None:  # it replaced the master the workers saw
            log.warning("Redis master changed (replication id %s, was %s): no reclaim for %.0f s while leases "
                        "are renewed", replid, known, self._restart_window_s)
            pipe.set(window_key, replid, px=int(self._restart_window_s * 1000))
        pipe.execute()
        return known is not None

    def forget_uptime(self) -> None:
        """After a Redis error: Redis may have restarted or failed over, so ask again before reclaiming."""
        self._is_past_restart_window = False

    def has_orphans(self) -> bool:
        """Whether any entry has been idle past the lease: its worker stopped renewing it."""
        if self.redis_restarted_recently():
            return False
        pipe = self.pipeline()
        for key in self.request_keys.values():
            pipe.xpending_range(key, GROUP, min="-", max="+", count=1, idle=int(self.config.lease_s * 1000))
        return any(pipe.execute())

    def aborted(self, request_ids: list[str]) -> set[str]:
        """Which of these requests have an abort key, in one round trip."""
        if not request_ids:
            return set()
        pipe = self.pipeline()
        for request_id in request_ids:
            pipe.exists(self.keys.abort(request_id))
        return {rid for rid, hit in zip(request_ids, pipe.execute()) if hit}

    def flush(self, outbox: Outbox) -> set[str]:
        """Write the outbox: events and dead letters in one round trip, then the acks they allow in a second.

        An entry is acked only after its terminal event (or dead letter) is written. Returns the
        requests whose event was refused because that seq already exists: another worker owns them
        now (fencing), so this worker must drop them; none of their later events in this outbox
        landed. The same goes for a request whose previous event is missing (a failover lost it):
        nothing is written after a gap, and the entry is resumed by whoever reclaims it. Raises on transient failures; the caller retries the same outbox, marked as a resend.
        """
        fenced: set[str] = set()
        failed: set[str] = set()
        written_dead: set[str] = set()
        if outbox.events or outbox.dead:
            owners, results = self._write(outbox)
            for owner, result in zip(owners, results):
                kind, name = owner
                if isinstance(result, Exception):
                    if is_transient(result):
                        raise TransientRedisError(str(result))
                    log.warning("write for %s %s failed: %s", kind, name, result)
                    failed.add(name)
                elif kind == "dead":
                    written_dead.add(name)
                elif kind == "events" and is_refused(result):
                    fenced.add(name)
                    if is_gap(result):
                        log.warning("request %s: events before this write are missing (lost in a Redis failover?); "
                                    "its entry will be reclaimed and resumed from the events that exist", name)
        ackable = [entry for entry, rid in outbox.acks if rid is None or (rid not in fenced and rid not in failed)]
        ackable += [entry for entry, _, _, ack in outbox.dead if ack and entry in written_dead]
        if ackable:
            pipe = self.pipeline()
            for level, ids in by_level(ackable).items():
                pipe.xack(self.request_keys[level], GROUP, *ids)
                pipe.xdel(self.request_keys[level], *ids)
            pipe.execute()
        return fenced

    def _write(self, outbox: Outbox) -> tuple[list[tuple[str, str]], list[Any]]:
        pipe = self.pipeline()
        owners: list[tuple[str, str]] = []
        scripts: dict[int, tuple[Any, ...]] = {}  # position in the pipeline -> EVALSHA arguments
        ttl = self.config.result_ttl_s
        for request_id, events in outbox.events_by_request().items():
            is_ending = any(type in TERMINAL_EVENTS for _, type, _ in events)
            needs_ttl = is_ending or any(seq % EVENT_TTL_REFRESH_EVERY == 0 for seq, _, _ in events)
            encoded = [(seq, encode_event(seq, type, **fields)) for seq, type, fields in events]
            scripts[len(owners)] = (self._events_sha, 1, self.keys.events(request_id),
                                    *events_script_args(encoded, outbox.is_resend, ttl if needs_ttl else 0))
            pipe.evalsha(*scripts[len(owners)])
            owners.append(("events", request_id))
            if is_ending:  # duplicates of this id stay refused for the result TTL
                pipe.expire(self.keys.request_owner(self.model, request_id), ttl)
                owners.append(("expire", request_id))
        for entry_id, fields, reason, _ in outbox.dead:
            pipe.xadd(self.keys.dead(self.model), dead_letter_fields(fields, reason, entry_id.id, self.config.worker_id,
                                                                     now_ms(), entry_id.priority))
            owners.append(("dead", entry_id))
        results = self._load_script_if_missing(pipe.execute(raise_on_error=False), scripts)
        for result in results:
            if isinstance(result, (redis.ConnectionError, redis.TimeoutError)):
                raise result
        return owners, results

    def _load_script_if_missing(self, results: list[Any], scripts: dict[int, tuple[Any, ...]]) -> list[Any]:
        """EVALSHA saves a SCRIPT EXISTS round trip per flush; where Redis does not know the script yet
        (first flush, a restarted Redis) it ran nothing, so load it and run those calls again."""
        missing = [i for i in scripts if isinstance(results[i], redis_errors.NoScriptError)]
        if not missing:
            return results
        self.redis.script_load(EVENTS_LUA)
        pipe = self.pipeline()
        for i in missing:
            pipe.evalsha(*scripts[i])
        for i, result in zip(missing, pipe.execute(raise_on_error=False)):
            results[i] = result
        return results

    def heartbeat(self, stats: dict[str, Any]) -> None:
        ms = now_ms()
        key = self.keys.worker(self.config.worker_id)
        fields = {"model": self.model, "host": socket.gethostname(), "pid": os.getpid(), "started": self.started_ms,
                  "last_seen": ms, **stats}
        pipe = self.pipeline()
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(key, self.config.heartbeat_ttl_s)
        workers_key = self.keys.model_workers(self.model)
        pipe.zadd(workers_key, {self.config.worker_id: ms})
        pipe.zremrangebyscore(workers_key, 0, ms - self.config.heartbeat_ttl_s * 1000)
        pipe.zcard(workers_key)
        pipe.hget(self.keys.models(), self.model)
        *_, live, raw = pipe.execute()
        info = _registration(raw) if raw else ModelRegistration(tasks=self._tasks, model_path=self.config.model_path)
        info.last_seen, info.live_workers = ms, int(live)
        info.max_num_seqs, info.max_queue_len = self.config.max_num_seqs, self.config.max_queue_len
        info.heartbeat_ttl_s = self.config.heartbeat_ttl_s
        self.redis.hset(self.keys.models(), self.model, info.to_json())


@dataclass
class EntryState:
    """What Redis knows about an entry's request when the worker picks the entry up."""

    is_aborted: bool
    owner_entry: str | None  # the entry that owns the request id (another one: this entry is a duplicate)
    events: list[Event] = field(default_factory=list)  # already published (redeliveries only)
    unreadable: str | None = None  # why the published events cannot be read (`events` is then empty)
    seq_after_unreadable: int | None = None  # with `unreadable`: the next free seq; None: none can be written

    @property
    def has_ended(self) -> bool:
        return bool(self.events) and self.events[-1].is_terminal

    @property
    def next_seq(self) -> int | None:
        return len(self.events) if self.unreadable is None else self.seq_after_unreadable

    def read_published(self, reply: Any) -> None:
        """Decode the XRANGE of the events stream; a stream this worker cannot read fails its request alone."""
        if isinstance(reply, Exception):  # e.g. WRONGTYPE: the key is not a stream, no event can go there
            if is_transient(reply):
                raise reply
            self.unreadable = str(reply)
            return
        try:
            self.events = [decode_event(fields) for _, fields in reply]
        except Exception as exc:  # noqa: BLE001 - anything a stream holds must fail that request, never the worker
            self.unreadable = f"{type(exc).__name__}: {exc}"[:500]
            self.seq_after_unreadable = _seq_after(reply)


def _seq_after(entries: list[tuple[Any, dict[Any, Any]]]) -> int | None:
    """The seq an event written after these raw entries takes: none after a terminal or a foreign id."""
    last_id, last_fields = entries[-1]
    ms, _, number = _text(last_id).partition("-")
    if ms != "0" or _text(last_fields.get(b"type", b"")) in {t.value for t in TERMINAL_EVENTS}:
        return None
    return int(number)  # event seq N sits at id 0-<N+1>


def _raise_errors(*replies: Any) -> tuple[Any, ...]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _registration(raw: bytes | str) -> ModelRegistration:
    """The model's registry entry; one another writer broke is replaced rather than failing the heartbeat."""
    try:
        return ModelRegistration.parse(raw)
    except ValueError:
        log.warning("replacing an unreadable registry entry: %r", raw[:200])
        return ModelRegistration()


def monotonic_ms() -> float:
    return time.monotonic() * 1000
