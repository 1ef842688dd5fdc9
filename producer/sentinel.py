"""Redis Sentinel URLs: a client that asks the sentinels where the master is, and follows a failover.

    redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE_NAME[/DB][?option=value...]
    rediss+sentinel://...  TLS to the sentinels and to the master

The hosts are the sentinels (port 26379 when left out). `user:password` authenticates to the master
(and so to any replica promoted in its place: they share the ACL). Sentinels that require a password
of their own (`requirepass` in sentinel.conf) take it from the options `sentinel_username` and
`sentinel_password`: sentinels often run without one, and an AUTH to a server without a password is an
error. Other options: `socket_timeout`, `socket_connect_timeout` (seconds, both sentinels and master),
and with rediss+sentinel `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`.

The client asks a sentinel for the master's address when it opens a connection; a connection that fails,
or finds the old master demoted (READONLY), is dropped and the next one asks again. So a failover looks to
a caller like a Redis outage of a few seconds: the callers' existing retry on ConnectionError carries
them over to the promoted replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
from redis import sentinel as sync_sentinel

SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379
_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_SENTINEL_AUTH = {"sentinel_username": "username", "sentinel_password": "password"}
_CLIENT_OPTIONS = ("single_connection_client",)  # the Redis object's, not its connections'


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SCHEMES


@dataclass
class SentinelTarget:
    """What a Sentinel URL names: where the sentinels are, which service, and how to connect."""

    sentinels: list[tuple[str, int]]
    service_name: str
    db: int = 0
    is_tls: bool = False
    master_options: dict[str, Any] = field(default_factory=dict)  # credentials, timeouts, TLS: master connections
    sentinel_options: dict[str, Any] = field(default_factory=dict)  # the same for the sentinel connections


def parse_sentinel_url(url: str) -> SentinelTarget:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"not a Sentinel URL: {_redacted(url)!r} (redis+sentinel:// or rediss+sentinel://)")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    target = SentinelTarget(sentinels=_hosts(hosts, url), service_name="", is_tls=SCHEMES[scheme])
    target.service_name, target.db = _path(parts.path, url)
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        if user:
            target.master_options["username"] = unquote(user)
        if has_password:
            target.master_options["password"] = unquote(password)
    _apply_query(target, parts.query, url)
    return target


def _hosts(text: str, url: str) -> list[tuple[str, int]]:
    hosts = []
    for item in text.split(","):
        host, port = _host_port(item.strip())
        if not host:
            raise ValueError(f"Sentinel URL {_redacted(url)!r}: an empty sentinel address")
        hosts.append((host, port))
    return hosts


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid sentinel port {port_text!r} in {item!r}")
    return host, int(port_text)


def _path(path: str, url: str) -> tuple[str, int]:
    parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    if not parts or len(parts) > 2 or not parts[0]:
        raise ValueError(f"Sentinel URL {_redacted(url)!r} must name the service: .../SERVICE_NAME[/DB]")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"Sentinel URL {_redacted(url)!r}: the database must be a number, not {parts[1]!r}")
    return parts[0], int(parts[1]) if len(parts) == 2 else 0


def _apply_query(target: SentinelTarget, query: str, url: str) -> None:
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _SENTINEL_AUTH:
            target.sentinel_options[_SENTINEL_AUTH[name]] = value
        elif name in _FLOAT_OPTIONS:
            try:
                target.master_options[name] = target.sentinel_options[name] = float(value)
            except ValueError:
                raise ValueError(f"Sentinel URL option {name}={value!r} is not a number of seconds") from None
        elif name in _SSL_OPTIONS and target.is_tls:
            target.master_options[name] = target.sentinel_options[name] = value
        else:
            known = ", ".join(list(_SENTINEL_AUTH) + list(_FLOAT_OPTIONS) + (list(_SSL_OPTIONS) * target.is_tls))
            raise ValueError(f"unknown Sentinel URL option {name!r} in {_redacted(url)!r} (known: {known})")
    if target.is_tls:
        target.master_options["ssl"] = target.sentinel_options["ssl"] = True


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    _, at, hosts = rest.rpartition("@")
    return f"{scheme}{sep}***@{hosts}" if at else url


# ------------------------------------------------------------ clients


class SentinelRedis(redis.Redis):
    """A client of the service's master that also closes its connections to the sentinels."""

    sentinel_manager: sync_sentinel.Sentinel

    def close(self) -> None:
        super().close()
        self.sentinel_manager.close()


class AsyncSentinelRedis(aredis.Redis):
    sentinel_manager: asentinel.Sentinel

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await self.sentinel_manager.aclose()


class _BlockingSentinelPool(asentinel.SentinelConnectionPool, aredis.BlockingConnectionPool):
    """A bounded pool of master connections: a command waits for a free one (the gateway)."""


def connect_sentinel(url: str, **options: Any) -> redis.Redis:
    target = parse_sentinel_url(url)
    client_options = {k: options.pop(k) for k in _CLIENT_OPTIONS if k in options}
    manager = sync_sentinel.Sentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, options))
    pool = sync_sentinel.SentinelConnectionPool(target.service_name, manager, **_master_kwargs(target, options))
    client = SentinelRedis(connection_pool=pool, **client_options)
    client.auto_close_connection_pool = True  # the client owns its pool, as with Redis.from_url
    client.sentinel_manager = manager
    return client


def connect_sentinel_async(url: str, *, max_connections: int | None = None, **options: Any) -> aredis.Redis:
    target = parse_sentinel_url(url)
    client_options = {k: options.pop(k) for k in _CLIENT_OPTIONS if k in options}
    manager = asentinel.Sentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, options))
    kwargs = _master_kwargs(target, options)
    if max_connections is None:
        pool = asentinel.SentinelConnectionPool(target.service_name, manager, **kwargs)
    else:
        pool = _BlockingSentinelPool(target.service_name, manager, max_connections=max_connections, **kwargs)
    client = AsyncSentinelRedis(connection_pool=pool, **client_options)
    client.auto_close_connection_pool = True
    client.sentinel_manager = manager
    return client


def _master_kwargs(target: SentinelTarget, options: dict[str, Any]) -> dict[str, Any]:
    return {"db": target.db, **target.master_options, **options, "is_master": True}


def _sentinel_kwargs(target: SentinelTarget, options: dict[str, Any]) -> dict[str, Any]:
    """The sentinel connections take the URL's sentinel options and the caller's timeouts (not its db,
    client name or credentials: those are the master's)."""
    timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
    return {**timeouts, **target.sentinel_options}
