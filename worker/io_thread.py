"""Redis off the critical path: a thread that publishes step N while the engine computes step N+1.

The loop thread hands over one round after each step and collects it after the next step:

    abort check → publish (events, dead letters, then the acks they allow) → renew leases
    → reclaim orphans / read new entries, with their states → heartbeat

Only the loop thread touches the engine (it is not thread-safe); this thread touches only Redis,
through the worker's client (redis-py takes a connection of its own from the pool). One round is
in flight at a time, so the loop never builds an outbox before it knows what the previous round
saw aborted or fenced.

The abort check runs here, right before the writes: the tokens of a request whose abort key is
set are replaced by its `aborted` event, so no token is published once an abort is seen, and the
loop drops the tokens its overlapping step computed for it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import redis

from worker.config import WorkerConfig
from worker.intake import Entry, entry_states
from worker.outbox import Outbox
from producer.keys import PRIORITIES, Priority
from worker.streams import MAX_BACKOFF_S, EntryRef, EntryState, WorkerStreams, is_transient

log = logging.getLogger("redbatch.worker")


@dataclass(frozen=True)
class Held:
    """A request the engine holds, as the loop thread saw it when it handed a round over."""

    request_id: str
    entry_id: EntryRef
    next_seq: int


@dataclass
class Round:
    """What the loop thread hands over after a step."""

    outbox: Outbox
    held: list[Held]
    is_reading: bool  # False while stopping: no reclaim, no read
    free: dict[Priority, int]  # per level: entries of that level or higher the engine can take (it preempts lower)
    block_ms: int | None  # how long the read may block (the engine is idle); None: not at all
    heartbeat: dict[str, Any]

    @property
    def num_free(self) -> int:
        """Entries of the highest level the engine can take: whether this round reads at all."""
        return max(self.free.values(), default=0)


def free_slots(capacity: int, held: list[Priority]) -> dict[Priority, int]:
    """For each level, how many more entries of it (or higher) fit: the engine's capacity (what it may hold)
    less what is held at that level or above. Work held at lower levels does not count: the engine preempts
    it for higher work."""
    return {level: max(0, capacity - sum(1 for p in held if p.rank <= level.rank)) for level in PRIORITIES}


def left_after(free: dict[Priority, int], taken: list[EntryRef]) -> dict[Priority, int]:
    """`free` once `taken` are admitted too."""
    return {level: max(0, n - sum(1 for e in taken if e.priority.rank <= level.rank)) for level, n in free.items()}


@dataclass
class Seen:
    """What a round saw, for the loop thread to act on between steps."""

    aborted: set[str] = field(default_factory=set)  # `aborted` is written: drop them
    fenced: set[str] = field(default_factory=set)  # another worker owns them: drop them
    entries: list[tuple[Entry, EntryState | None]] = field(default_factory=list)  # to admit
    has_read: bool = False  # the round asked for new entries (so none came when `entries` is empty)

    @property
    def dropped(self) -> set[str]:
        return self.aborted | self.fenced


class RedisIO:
    def __init__(self, config: WorkerConfig, streams: WorkerStreams, stats, is_giving_up: Callable[[], bool]):
        self.config = config
        self.streams = streams
        self.stats = stats
        self._is_giving_up = is_giving_up  # stopping and past the drain deadline: stop retrying
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redbatch-io")
        self._in_flight: Future | None = None
        self._last = {"heartbeat": 0.0, "renew": time.monotonic(), "reclaim": 0.0, "redis_error": float("-inf")}
        self._orphans_waiting = False
        self.health = None  # worker.health.HealthFile with --health-file: told of every heartbeat that landed
        self.on_written: Callable[[Outbox, set[str]], None] | None = None  # told of every outbox written

    # ------------------------------------------------------------ the loop thread's side

    def submit(self, job: Round) -> None:
        if self._in_flight is not None:
            raise RuntimeError("a Redis round is already in flight")
        self._in_flight = self._pool.submit(self.run_round, job)

    def wait(self) -> Seen:
        """What the round in flight saw (nothing in flight: nothing seen); raises what it raised."""
        future, self._in_flight = self._in_flight, None
        return Seen() if future is None else future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ the I/O thread's side

    def run_round(self, job: Round) -> Seen:
        seen = Seen(has_read=job.is_reading and job.num_free > 0)
        self._maybe_renew_leases(job.held)  # before any reclaim, so this worker never takes back its own entries
        seen.aborted = self._check_aborts(job)
        seen.fenced = self.retry(self.streams.flush, job.outbox,
                                 on_retry=lambda: setattr(job.outbox, "is_resend", True))
        if self.on_written is not None:
            self.on_written(job.outbox, seen.fenced)
        for request_id in seen.fenced:
            log.warning("request %s is owned by another worker; dropping it here", request_id)
        if job.is_reading:
            seen.entries = self._take_entries(job)
        self._maybe_heartbeat(job.heartbeat)
        return seen

    def _check_aborts(self, job: Round) -> set[str]:
        """Abort keys of every request held or streamed in this round; their tokens become `aborted`."""
        held = {h.request_id: h for h in job.held}
        streamed = job.outbox.streamed_requests()
        aborted = self.retry(self.streams.aborted, sorted(held.keys() | streamed))
        for request_id in aborted:
            h = held.get(request_id)
            job.outbox.abort(request_id, h.next_seq if h else None, h.entry_id if h else None)
        return aborted

    def _take_entries(self, job: Round) -> list[tuple[Entry, EntryState | None]]:
        """Orphans first, then new entries for the slots left; with what Redis knows about each."""
        held = {h.entry_id for h in job.held}
        entries = [Entry(i, f, n, reclaimed=True) for i, f, n in self._maybe_reclaim(job.free, held)]
        free = left_after(job.free, [e.entry_id for e in entries])
        if any(free.values()):
            block_ms = None if entries else job.block_ms
            entries += [Entry(i, f) for i, f in self.retry(self.streams.read, free, block_ms)]
        return list(zip(entries, self.retry(entry_states, self.streams, entries)))

    # ------------------------------------------------------------ leases

    def _maybe_reclaim(self, free: dict[Priority, int], held: set[EntryRef]) -> list[tuple[EntryRef, dict, int]]:
        """Take over entries whose worker stopped renewing them, ahead of any new entry.

        Every lease/4 s a worker looks for such orphans (with a cheap probe while it is full).
        While it knows some wait, it reclaims at every round with a free slot, so requests
        that had started streaming resume before requests that have not started.
        """
        now = time.monotonic()
        num_free = max(free.values(), default=0)
        due = now - self._last["reclaim"] >= self.config.lease_s / 4
        if not (due or (self._orphans_waiting and num_free > 0)):
            return []
        if now - self._last["redis_error"] < self.config.lease_s + MAX_BACKOFF_S:
            return []  # an outage (or a partition) aged every lease: give live workers time to renew
        self._last["reclaim"] = now
        if num_free <= 0:
            self._orphans_waiting = self._orphans_waiting or self.retry(self.streams.has_orphans)
            return []
        claimed = self.retry(self.streams.reclaim, free)
        self._orphans_waiting = bool(claimed) or not self.streams.reclaim_scan_done
        claimed = [c for c in claimed if c[0] not in held]  # a late renewal of our own: keep running it once
        self.stats.num_reclaimed += len(claimed)
        return claimed

    def _maybe_renew_leases(self, held: list[Held]) -> None:
        if time.monotonic() - self._last["renew"] < self.config.lease_s / 3:
            return
        self._last["renew"] = time.monotonic()
        self.retry(self.streams.renew, [h.entry_id for h in held])

    def _maybe_heartbeat(self, fields: dict[str, Any]) -> None:
        if time.monotonic() - self._last["heartbeat"] < self.config.heartbeat_interval_s:
            return
        self._last["heartbeat"] = time.monotonic()
        try:
            self.streams.heartbeat(fields)
        except redis.RedisError as exc:  # a missed heartbeat is not worth a request: the next one comes soon
            if not is_transient(exc):
                raise
            log.warning("heartbeat failed: %s", exc)
            return
        if self.health is not None:
            self.health.heartbeat_written(draining=bool(fields.get("draining")))

    # ------------------------------------------------------------ retries

    def retry(self, fn, *args, on_retry=None):
        """Call fn until it gets past transient Redis failures (outage, OOM under noeviction, loading)."""
        backoff_s = 0.05
        while True:
            try:
                return fn(*args)
            except redis.RedisError as exc:
                if not is_transient(exc) or self._is_giving_up():
                    raise
                log.warning("redis unavailable or refusing writes (%s); retrying in %.2f s", exc, backoff_s)
                self.note_redis_error()
            time.sleep(backoff_s)
            backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
            if on_retry is not None:
                on_retry()

    def note_redis_error(self) -> None:
        """Renew the leases as soon as Redis answers (the outage aged them) and hold off reclaiming."""
        self._last["renew"] = 0.0
        self._last["redis_error"] = time.monotonic()
        self.streams.forget_uptime()
        self.streams.forget_slots()
