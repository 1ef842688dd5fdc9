"""Operations on a model's dead letters: list, requeue, purge."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from producer.keys import Keys, check_request_id
from producer.protocol import read_request_id

_DEAD_META = ("reason", "entry_id", "worker", "ts")


@dataclass
class DeadLetter:
    dead_id: str
    request_id: str | None
    reason: str
    worker: str
    fields: dict[str, bytes]  # the original entry's fields

    def summary(self) -> str:
        return f"{self.dead_id}  id={self.request_id or '?'}  worker={self.worker}  reason: {self.reason}"


def list_dead(client: redis.Redis, keys: Keys, model: str, count: int = 1000) -> list[DeadLetter]:
    return [_parse(_text(dead_id), fields) for dead_id, fields in client.xrange(keys.dead(model), count=count)]


def requeue_dead(client: redis.Redis, keys: Keys, model: str, dead_ids: list[str] | None = None) -> int:
    """Put dead letters back on the request stream as fresh requests (their old events are cleared)."""
    letters = [d for d in list_dead(client, keys, model, count=100_000) if not dead_ids or d.dead_id in dead_ids]
    for letter in letters:
        pipe = client.pipeline(transaction=True)
        if letter.request_id is not None:
            pipe.delete(keys.events(letter.request_id), keys.abort(letter.request_id))
            pipe.delete(keys.request_owner(model, letter.request_id))
        pipe.xadd(keys.requests(model), letter.fields)
        pipe.xdel(keys.dead(model), letter.dead_id)
        pipe.execute()
    return len(letters)


def purge_dead(client: redis.Redis, keys: Keys, model: str) -> int:
    count = client.xlen(keys.dead(model))
    client.delete(keys.dead(model))
    return count


def _parse(dead_id: str, raw: dict[bytes, bytes]) -> DeadLetter:
    fields: dict[str, bytes] = {}
    meta: dict[str, str] = {}
    for key, value in raw.items():
        name = _text(key)
        if name in _DEAD_META:
            meta[name] = _text(value)
        else:  # fields that clashed with the metadata names were stored as orig_<name>
            original = name[len("orig_"):] if name.startswith("orig_") and name[len("orig_"):] in _DEAD_META else name
            fields[original] = value
    request_id = read_request_id(fields)
    if request_id is not None:
        check_request_id(request_id)
    return DeadLetter(dead_id, request_id, meta.get("reason", ""), meta.get("worker", ""), fields)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
