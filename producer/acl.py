"""Minimal Redis ACL rules for the two roles, built from the key names in producer.keys.

A producer may enqueue (through the enqueue script or a plain XADD), read its events,
set abort keys and read the model registry and its workers' heartbeat times; it may not read or claim the request
stream, nor touch worker keys. A worker may do everything its loop does, nothing more.
Redis 7.0+ (selectors in parentheses, %R~ / %W~ read-only / write-only key patterns).
"""

from __future__ import annotations

from producer.keys import Keys

CONNECTION = "+ping +hello +auth +client|setname +select +script|load"  # CLIENT SETINFO is 7.2+
# what a Redis Cluster client sends besides: the slot map, the command table (and key positions of commands
# whose keys move, XREADGROUP), READONLY for replica reads, ASKING during a slot migration
CLUSTER_CONNECTION = "+cluster|slots +cluster|shards +cluster|info +command +readonly +asking"


def acl_rules(keys: Keys, role: str) -> str:
    k, connection = keys.patterns(), f"{CONNECTION} {CLUSTER_CONNECTION}"
    if role == "producer":
        selectors = [
            f"+hget +hgetall %R~{k['models']}",
            f"+zcount +zrange %R~{k['workers']}",  # the live-worker check on submit
            f"+xread +xrange +xrevrange %R~{k['events']}",
            f"+set %W~{k['abort']}",
            f"+xadd +xlen ~{k['requests']} ~{k['requests_level']}",
            f"+exists +set ~{k['owner']}",
            f"+evalsha +eval ~{k['requests']} ~{k['requests_level']} ~{k['owner']}",
            # the HTTP gateway: one XREAD over many events streams and its own wake stream (one selector: all keys of
            # a command must match the same one), and the wake-up XADD
            f"+xread %R~{k['events']} %R~{k['gateway_wake']}",
            f"+xadd +expire ~{k['gateway_wake']}",
        ]
    elif role == "worker":
        connection += " +info"  # INFO server/replication: reclaim waits out a lease after a restart or failover
        selectors = [
            f"+xgroup|create +xreadgroup +xack +xdel +xclaim +xautoclaim +xpending ~{k['requests']} "
            f"~{k['requests_level']}",
            f"+xadd ~{k['dead']}",
            f"+xadd +xrange +expire +evalsha ~{k['events']}",  # evalsha: the fenced event writes (one key each)
            f"+exists %R~{k['abort']}",
            f"+set +get +expire ~{k['owner']}",
            f"+hset +hget %RW~{k['models']}",
            f"+hset +expire +del ~{k['worker']}",
            f"+zadd +zrem +zremrangebyscore +zcard ~{k['workers']}",
            f"+get +set ~{k['redis_master']} ~{k['redis_failover']}",
        ]
    else:
        raise ValueError(f"unknown role {role!r}; use producer or worker")
    return " ".join(["resetkeys", "resetchannels", "-@all", connection] + [f"({s})" for s in selectors])


def acl_file_line(keys: Keys, role: str, username: str, password: str) -> str:
    return f"user {username} on >{password} {acl_rules(keys, role)}"
