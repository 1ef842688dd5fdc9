"""Operations on a model's dead letters (list, requeue, purge) and the system status `status`/`top` show."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from producer.keys import DEFAULT_PRIORITY, GROUP, PRIORITIES, Keys, check_request_id
from producer.protocol import ModelRegistration, read_request_id, split_dead_letter


@dataclass
class DeadLetter:
    dead_id: str
    request_id: str | None
    reason: str
    worker: str
    fields: dict[str, bytes]  # the original entry's fields
    priority: str = DEFAULT_PRIORITY.value  # the level of the stream it came from (older letters: the default)

    def summary(self) -> str:
        return f"{self.dead_id}  id={self.request_id or '?'}  worker={self.worker}  reason: {self.reason}"


def list_dead(client: redis.Redis, keys: Keys, model: str, count: int = 1000) -> list[DeadLetter]:
    return [_parse(_text(dead_id), fields) for dead_id, fields in client.xrange(keys.dead(model), count=count)]


def requeue_dead(client: redis.Redis, keys: Keys, model: str, dead_ids: list[str] | None = None) -> int:
    """Put dead letters back on the request stream of their level as fresh requests (their old events are cleared)."""
    letters = [d for d in list_dead(client, keys, model, count=100_000) if not dead_ids or d.dead_id in dead_ids]
    for letter in letters:
        if letter.request_id is not None:  # the request's slot first: a retry after a failure here redoes both
            client.delete(keys.events(letter.request_id), keys.abort(letter.request_id))
        pipe = client.pipeline(transaction=True)  # the model's slot: atomic on a Redis Cluster too
        if letter.request_id is not None:
            pipe.delete(keys.request_owner(model, letter.request_id))
        pipe.xadd(keys.requests(model, letter.priority), letter.fields)
        pipe.xdel(keys.dead(model), letter.dead_id)
        pipe.execute()
    return len(letters)


def purge_dead(client: redis.Redis, keys: Keys, model: str) -> int:
    count = client.xlen(keys.dead(model))
    client.delete(keys.dead(model))
    return count


def _parse(dead_id: str, raw: dict[bytes, bytes]) -> DeadLetter:
    meta, fields = split_dead_letter(raw)
    request_id = read_request_id(fields)
    if request_id is not None:
        check_request_id(request_id)
    priority = meta.get("priority", DEFAULT_PRIORITY.value)
    if priority not in {p.value for p in PRIORITIES}:
        priority = DEFAULT_PRIORITY.value
    return DeadLetter(dead_id, request_id, meta.get("reason", ""), meta.get("worker", ""), fields, priority)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# ---------------------------------------------------------------- status: what `redbatch status` and `top` show

_WORKER_INTS = ("active", "waiting", "steps", "tokens", "finished", "reclaimed", "max_num_seqs", "draining",
                "kv_blocks", "kv_blocks_free", "kv_blocks_cached", "preemptions", "started", "last_seen", "pid")


def system_status(client: redis.Redis, keys: Keys, now_ms: int | None = None) -> dict[str, Any]:
    """Every registered model: its queue, consumer group, dead letters and workers (live or stale).

    A worker is live when its heartbeat in the model's workers zset is younger than the model's
    heartbeat_ttl_s and its heartbeat hash still exists; a zset entry without either is stale (the
    worker died without unregistering). Rates are averaged since the worker started.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    models = {_text(name): ModelRegistration.parse(raw) for name, raw in client.hgetall(keys.models()).items()}
    return {"ts": now, "models": {name: _model_status(client, keys, name, info, now) for name, info in sorted(models.items())}}


def _model_status(client: redis.Redis, keys: Keys, model: str, info: ModelRegistration, now: int) -> dict[str, Any]:
    ttl_ms = info.heartbeat_ttl_s * 1000
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.dead(model))
    pipe.zrange(keys.model_workers(model), 0, -1, withscores=True)
    dead, members = pipe.execute()
    levels = {level.value: _queue_status(client, keys.requests(model, level)) for level in PRIORITIES}
    lags = [q["lag"] for q in levels.values()]
    pipe = client.pipeline(transaction=False)
    for worker_id, _ in members:
        pipe.hgetall(keys.worker(_text(worker_id)))
    hashes = pipe.execute() if members else []
    workers = []
    for (worker_id, score), raw in zip(members, hashes):
        workers.append(_worker_status(_text(worker_id), int(score), raw, now, ttl_ms))
    num_live = sum(1 for w in workers if w["live"])
    return {
        "tasks": info.tasks, "queue_len": sum(q["queue_len"] for q in levels.values()),
        "pending": sum(q["pending"] for q in levels.values()),
        "lag": None if None in lags else sum(lags), "priorities": levels, "dead_letters": int(dead), "live_workers": num_live,
        "has_live_worker": num_live > 0, "workers": workers,
    }


def _queue_status(client: redis.Redis, key: str) -> dict[str, Any]:
    """One priority level's stream: its length, and its `workers` group's pending count and lag."""
    out: dict[str, Any] = {"queue_len": int(client.xlen(key)), "pending": 0, "lag": None}
    try:
        for group in client.xinfo_groups(key):
            if _text(group["name"]) == GROUP:
                lag = group.get("lag")
                out.update(pending=int(group["pending"]), lag=None if lag is None else int(lag))
    except redis.ResponseError:  # no stream yet
        pass
    return out


def _worker_status(worker_id: str, heartbeat_ms: int, raw: dict[bytes, bytes], now: int, ttl_ms: int) -> dict[str, Any]:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    out: dict[str, Any] = {"worker_id": worker_id, "host": fields.get("host"), "heartbeat_age_s": round((now - heartbeat_ms) / 1000, 1)}
    out["live"] = bool(fields) and now - heartbeat_ms < ttl_ms
    for name in _WORKER_INTS:
        if name in fields:
            out[name] = int(float(fields[name]))
    out["step_ms"] = float(fields.get("step_ms", 0) or 0)
    uptime_s = max((now - out["started"]) / 1000, 1e-3) if "started" in out else None
    out["uptime_s"] = None if uptime_s is None else round(uptime_s, 1)
    out["steps_per_s"] = round(out.get("steps", 0) / uptime_s, 2) if uptime_s else 0.0
    out["tokens_per_s"] = round(out.get("tokens", 0) / uptime_s, 2) if uptime_s else 0.0
    blocks = out.get("kv_blocks", 0)
    out["kv_used"] = round((blocks - out.get("kv_blocks_free", 0)) / blocks, 3) if blocks else None
    return out
