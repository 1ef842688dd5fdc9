"""Minimal Redis ACL rules for each role, built from the key names in producer.keys.

producer: enqueue (the enqueue script or a plain XADD), read its events, set abort keys, read the model
  registry and its workers' heartbeat times; it may not read or claim the request stream, nor touch worker keys.
worker: everything its loop does, nothing more.
bulk: what `redbatch bulk` and the rq bulk worker do: rq's own keys (`rq:*`, every data command, nothing
  dangerous), the producer's request keys, the bulk job's lease and cancel keys, and reads of the request
  stream and worker hashes (the lost-request check and the in-flight window). No consumer-group command.
gateway: the producer's commands plus the reads of the status page (`/status.json`): worker heartbeats,
  XINFO GROUPS / XPENDING / XLEN of the request streams, the dead-letter length.
Redis 7.0+ (selectors in parentheses, %R~ / %W~ read-only / write-only key patterns). All keys of one
command must match one selector.
"""

from __future__ import annotations

from producer.keys import RQ_CHANNEL_PATTERN, RQ_KEY_PATTERN, Keys

CONNECTION = "+ping +hello +auth +client|setname +select +script|load"  # CLIENT SETINFO is 7.2+
# what a Redis Cluster client sends besides: the slot map, the command table (and key positions of commands
# whose keys move, XREADGROUP), READONLY for replica reads, ASKING during a slot migration
CLUSTER_CONNECTION = "+cluster|slots +cluster|shards +cluster|info +command +readonly +asking"
ROLES = ("producer", "worker", "bulk", "gateway")


def acl_rules(keys: Keys, role: str) -> str:
    k, connection = keys.patterns(), f"{CONNECTION} {CLUSTER_CONNECTION}"
    if role == "producer":
        selectors = _producer(k)
    elif role == "worker":
        connection += " +info"  # INFO server/replication: reclaim waits out a lease after a restart or failover
        selectors = _worker(k)
    elif role == "bulk":
        connection += " +script|exists"  # redis-py checks a pipeline's scripts before it sends their EVALSHAs
        selectors = _bulk(k)
    elif role == "gateway":
        selectors = _producer(k) + _status(k)
    else:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return " ".join(["resetkeys", "resetchannels", "-@all", connection] + [f"({s})" for s in selectors])


def acl_file_line(keys: Keys, role: str, username: str, password: str) -> str:
    return f"user {username} on >{password} {acl_rules(keys, role)}"


def _producer(k: dict[str, str]) -> list[str]:
    return [
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


def _worker(k: dict[str, str]) -> list[str]:
    return [
        f"+xgroup|create +xreadgroup +xack +xdel +xclaim +xautoclaim +xpending ~{k['requests']} ~{k['requests_level']}",
        f"+xadd ~{k['dead']}",
        f"+xadd +xrange +expire +evalsha ~{k['events']}",  # evalsha: the fenced event writes (one key each)
        f"+exists %R~{k['abort']}",
        f"+set +get +expire ~{k['owner']}",
        f"+hset +hget %RW~{k['models']}",
        f"+hset +expire +del ~{k['worker']}",
        f"+zadd +zrem +zremrangebyscore +zcard ~{k['workers']}",
        f"+get +set ~{k['redis_master']} ~{k['redis_failover']}",
    ]


def _bulk(k: dict[str, str]) -> list[str]:
    return [
        # rq keeps queues, jobs, registries and workers under rq:* and talks to its workers on rq:* channels
        ("+@read +@write +@keyspace +@transaction +@scripting +@pubsub -@dangerous"
         f" ~{RQ_KEY_PATTERN} &{RQ_CHANNEL_PATTERN}"),
        f"+hget +hgetall %R~{k['models']}",
        f"+zcount +zrange +zrangebyscore %R~{k['workers']}",  # live workers: the default in-flight window
        f"+hget %R~{k['worker']}",  # their max_num_seqs
        f"+xread +xrange %R~{k['events']}",
        f"+exists %R~{k['events']} %R~{k['owner']}",  # a resumed job: did an earlier run enqueue this line?
        f"+set %W~{k['abort']}",  # a cancelled job aborts what it has in flight
        f"+xadd +xlen ~{k['requests']} ~{k['requests_level']}",
        f"+xrange %R~{k['requests']} %R~{k['requests_level']}",  # is a quiet request still queued?
        f"+get +exists +set ~{k['owner']}",
        f"+evalsha +eval ~{k['requests']} ~{k['requests_level']} ~{k['owner']}",
        f"+set +get +pexpire +pttl +exists +del +evalsha +eval ~{k['bulk_lease']}",  # one runner per job (scripts)
        f"+set +exists +del ~{k['bulk_cancel']}",
    ]


def _status(k: dict[str, str]) -> list[str]:
    return [  # what producer.admin.system_status reads (the gateway's /status.json, `redbatch status`)
        f"+xlen +xinfo|groups +xinfo|stream +xpending %R~{k['requests']} %R~{k['requests_level']}",
        f"+xlen %R~{k['dead']}",
        f"+hgetall %R~{k['worker']}",
    ]
