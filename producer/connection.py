"""One place where every component turns a Redis URL into a client.

The worker, both clients, the CLI, bulk jobs and the gateway all connect through `connect` (sync) or
`connect_async` (asyncio), so a new URL scheme (Cluster, Sentinel) is added here once and every component
accepts it wherever it accepts `redis://`.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aredis

from producer import cluster, sentinel

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def connect(url: str | None = None, **options: Any) -> redis.Redis:
    """A synchronous client for `url` (`redis://`, `rediss://`, `unix://`, `redis+sentinel://`: see
    producer/sentinel.py, `redis+cluster://`: see producer/cluster.py); options go to redis-py."""
    if cluster.is_cluster_url(url or ""):
        return cluster.connect_cluster(url, **options)
    if sentinel.is_sentinel_url(url or ""):
        return sentinel.connect_sentinel(url, **options)
    return redis.Redis.from_url(url or DEFAULT_REDIS_URL, **options)


def connect_async(url: str | None = None, *, max_connections: int | None = None, **options: Any) -> aredis.Redis:
    """An asyncio client for `url`, with the same schemes as `connect`. With `max_connections` the pool is
    bounded: a command waits for a free connection instead of opening one more (the HTTP gateway)."""
    if cluster.is_cluster_url(url or ""):
        return cluster.connect_cluster_async(url, max_connections=max_connections, **options)
    if sentinel.is_sentinel_url(url or ""):
        return sentinel.connect_sentinel_async(url, max_connections=max_connections, **options)
    if max_connections is not None:
        pool = aredis.BlockingConnectionPool.from_url(url or DEFAULT_REDIS_URL, max_connections=max_connections,
                                                      **options)
        return aredis.Redis.from_pool(pool)
    return aredis.Redis.from_url(url or DEFAULT_REDIS_URL, **options)
