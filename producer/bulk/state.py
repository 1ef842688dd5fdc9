"""A bulk job's parameters, its progress record (the rq job's meta) and the lease one runner holds."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from producer.errors import RedbatchError
from producer.keys import DEFAULT_PREFIX, Priority, check_model_name
from producer.submit import DEFAULT_RESULT_TTL_S

DEFAULT_LEASE_S = 30.0


class JobSpec(BaseModel):
    """What `bulk submit` stores as the rq job's keyword arguments (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_path: str
    output_path: str
    model: str
    max_in_flight: int | None = Field(None, ge=1, le=100_000)  # None: 2 x the live workers' max_num_seqs
    prefix: str = DEFAULT_PREFIX
    result_ttl_s: int = Field(DEFAULT_RESULT_TTL_S, ge=60)
    lease_s: float = Field(DEFAULT_LEASE_S, gt=0.5, le=3600)
    priority: Priority = Priority.BULK  # the request stream level: below interactive traffic by default
    # where the requests go when not to rq's own Redis (a redis+cluster:// URL: rq itself needs a plain Redis)
    serving_url: str | None = None

    def model_post_init(self, _context: Any) -> None:
        check_model_name(self.model)


@dataclass
class Progress:
    """Counts of one job; `done` and `failed` include lines written by earlier runs."""

    runs: int
    state: str = "running"
    total: int = 0
    num_done: int = 0
    num_failed: int = 0
    num_done_before: int = 0  # lines the output held when this run started
    num_submitted: int = 0
    num_in_flight: int = 0
    max_in_flight: int = 0
    num_tokens: int = 0  # completion tokens of this run
    num_recomputed: int = 0
    started_s: float = 0.0
    ended_s: float | None = None
    input_sha256: str | None = None  # of the input when the job first ran; a resume refuses a changed input

    def start(self, total: int, done: int, failed: int) -> None:
        self.total, self.num_done, self.num_failed, self.num_done_before = total, done, failed, done
        self.started_s = time.time()

    def finish(self, state: str) -> None:
        self.state = state
        self.ended_s = time.time()

    def as_dict(self) -> dict[str, Any]:
        elapsed_s = max((self.ended_s or time.time()) - self.started_s, 1e-6) if self.started_s else 0.0
        lines_per_s = (self.num_done - self.num_done_before) / elapsed_s if elapsed_s else 0.0
        remaining = self.total - self.num_done
        eta_s = remaining / lines_per_s if lines_per_s > 0 and self.state == "running" else None
        return {
            "state": self.state, "runs": self.runs, "total": self.total, "done": self.num_done,
            "failed": self.num_failed, "submitted": self.num_submitted, "in_flight": self.num_in_flight,
            "max_in_flight": self.max_in_flight, "tokens": self.num_tokens, "recomputed": self.num_recomputed,
            "elapsed_s": round(elapsed_s, 3),
            "tokens_per_s": round(self.num_tokens / elapsed_s, 2) if elapsed_s else 0.0,
            "lines_per_s": round(lines_per_s, 2), "eta_s": None if eta_s is None else round(eta_s, 1),
            "updated": time.time(), "input_sha256": self.input_sha256,
        }


# Renew or release only while the key still holds our token: a runner that stalled past its lease
# must not extend (or delete) the lease of the runner that took the job over.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobBusy(RedbatchError):
    """Another runner holds the job's lease."""


class JobInputError(RedbatchError):
    """The job cannot run on these files (missing input, changed input, a foreign output)."""


class LeaseLost(RedbatchError):
    """Another runner took the job: this one must stop writing its output."""


class Lease:
    """At most one runner works on a job: a key holding the runner's token, renewed while it runs."""

    def __init__(self, rds: redis.Redis, key: str, lease_s: float, token: str | None = None):
        self.rds = rds
        self.key = key
        self.lease_ms = int(lease_s * 1000)
        self.token = token or uuid.uuid4().hex
        self._renew = rds.register_script(_RENEW_LUA)
        self._release = rds.register_script(_RELEASE_LUA)
        self._valid_until = 0.0

    def acquire(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not self.rds.set(self.key, self.token, nx=True, px=self.lease_ms):
            if time.monotonic() >= deadline:
                raise JobBusy(f"another runner holds this job (lease {self.key}); it may still be running")
            time.sleep(min(0.5, self.lease_ms / 4000))
        self._valid_until = time.monotonic() + self.lease_ms / 1000

    def renew(self) -> None:
        if not self._renew(keys=[self.key], args=[self.token, self.lease_ms]):
            raise LeaseLost(f"lease {self.key} was lost: another runner took the job")
        self._valid_until = time.monotonic() + self.lease_ms / 1000

    def release(self) -> None:
        try:
            self._release(keys=[self.key], args=[self.token])
        except redis.RedisError:
            pass  # it expires by itself

    def holder_ttl_ms(self) -> int:
        return int(self.rds.pttl(self.key))
