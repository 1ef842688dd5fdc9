"""The worker loop: read → admit → step → abort check → publish → ack → leases → heartbeat."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from producer.protocol import ErrorCode, EventType, Usage
from worker.config import WorkerConfig
from worker.engines.base import Engine
from worker.intake import Entry, Intake
from worker.request import Sequence, StepOutput
from worker.streams import MAX_BACKOFF_S, Outbox, WorkerStreams, is_transient

log = logging.getLogger("redbatch.worker")
BURST_BLOCK_MS = 50


@dataclass
class Stats:
    num_steps: int = 0
    num_tokens: int = 0
    step_ms_total: float = 0.0
    num_finished: int = 0
    num_reclaimed: int = 0


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, streams: WorkerStreams):
        self.config = config
        self.engine = engine
        self.streams = streams
        self.intake = Intake(config, engine, streams, self._retry)
        self.stats = Stats()
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the group exists and the model is registered
        self._drain_deadline: float | None = None
        self._last = {"heartbeat": 0.0, "renew": time.monotonic(), "reclaim": 0.0, "redis_error": float("-inf")}
        self._orphans_waiting = False

    # ------------------------------------------------------------ lifecycle

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.request_stop())

    def request_stop(self) -> None:
        """Stop reading; running requests get grace_s to finish."""
        if not self._stop.is_set():
            log.info("stopping: no new requests; %d running get %.0f s", self.engine.num_active, self.config.grace_s)
            self._drain_deadline = time.monotonic() + self.config.grace_s
            self._stop.set()

    def run(self, burst: bool = False) -> None:
        """Serve until stopped. burst=True: return once the stream is empty and nothing runs (tests)."""
        self._retry(self.streams.ensure_group)
        self._retry(self.streams.register, [t.value for t in self.engine.tasks])
        self.ready.set()
        is_clean_exit = False
        try:
            while not self._should_exit():
                if self._iterate_once(burst) and burst:
                    break
            is_clean_exit = True
        finally:
            self._hand_back_unfinished(is_clean_exit)
            self._safe(self.streams.unregister)

    def _iterate_once(self, burst: bool) -> bool:
        try:
            return self.iterate(burst)
        except redis.RedisError as exc:
            if not is_transient(exc):
                raise
            log.warning("redis unavailable (%s); retrying", exc)
            self._note_redis_error()
            time.sleep(0.2)
            return False

    def _should_exit(self) -> bool:
        if not self._stop.is_set():
            return False
        return self.engine.num_active == 0 or time.monotonic() >= (self._drain_deadline or 0)

    # ------------------------------------------------------------ one iteration

    def iterate(self, burst: bool = False) -> bool:
        """One pass of the loop. Returns True when there was nothing to do."""
        outbox = Outbox()
        self._maybe_renew_leases()  # before any reclaim, so this worker never takes back its own entries
        num_read = 0 if self._stop.is_set() else self._read_and_admit(outbox, burst)
        started = time.monotonic()
        outputs = self.intake.finished_on_resume + self._step(outbox)
        self.intake.finished_on_resume = []
        self._record_step(started, outputs)
        self._publish(outputs, outbox)
        self._flush(outbox)
        self._maybe_heartbeat()
        return num_read == 0 and self.engine.num_active == 0 and not outputs

    def _read_and_admit(self, outbox: Outbox, burst: bool) -> int:
        free = self.engine.max_num_seqs - self.engine.num_active
        entries = [Entry(i, f, n, reclaimed=True) for i, f, n in self._maybe_reclaim(free)]
        if free <= 0:
            return 0
        if len(entries) < free:
            idle = not self.engine.num_active and not entries
            block_ms = (BURST_BLOCK_MS if burst else self.config.read_block_ms) if idle else None
            entries += [Entry(i, f) for i, f in self.streams.read(free - len(entries), block_ms)]
        self.intake.admit(entries, outbox)
        return len(entries)

    def _step(self, outbox: Outbox) -> list[StepOutput]:
        if self.engine.num_active == 0:
            return []
        try:
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a model error fails this step's requests, never the worker
            log.exception("model error; failing the running requests")
            for seq in self.engine.fail_running():
                outbox.fail(seq.request_id, seq.meta["entry_id"], self._next_seq(seq), ErrorCode.MODEL_ERROR,
                            f"{type(exc).__name__}: {exc}")
            return []

    def _publish(self, outputs: list[StepOutput], outbox: Outbox) -> None:
        """Abort check for every active request, then this step's tokens and terminal events."""
        active = {o.seq.request_id: o.seq for o in outputs}
        for seq in self.engine.sequences():
            active.setdefault(seq.request_id, seq)
        aborted = self._retry(self.streams.aborted, list(active))
        for request_id in aborted:
            seq = active[request_id]
            self.engine.abort(request_id)
            outbox.event(request_id, self._next_seq(seq), EventType.ABORTED)
            outbox.ack(seq.meta["entry_id"], request_id)
        for out in outputs:
            if out.seq.request_id not in aborted:
                self._emit(out, outbox)

    def _emit(self, out: StepOutput, outbox: Outbox) -> None:
        seq = out.seq
        if seq.meta["stream"] and (out.token_ids or out.text):
            outbox.event(seq.request_id, self._next_seq(seq), EventType.TOKEN, text=out.text, token_ids=out.token_ids,
                         logprobs=out.logprobs)
        if out.is_finished:
            usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                          total_tokens=seq.num_tokens)
            outbox.event(seq.request_id, self._next_seq(seq), EventType.DONE, finish_reason=out.finish_reason,
                         text=seq.meta.get("text", ""), usage=usage,
                         logprobs=None if seq.meta["stream"] else seq.meta.get("logprobs"))
            outbox.ack(seq.meta["entry_id"], seq.request_id)
            self.stats.num_finished += 1

    def _flush(self, outbox: Outbox) -> None:
        """Write the step's output, retrying through Redis outages: the engine keeps its state meanwhile."""
        fenced = self._retry(self.streams.flush, outbox, on_retry=lambda: setattr(outbox, "is_resend", True))
        for request_id in fenced:  # another worker owns it now: stop without publishing anything more
            log.warning("request %s is owned by another worker; dropping it here", request_id)
            self.engine.abort(request_id)

    # ------------------------------------------------------------ leases

    def _maybe_reclaim(self, free: int) -> list[tuple[str, dict, int]]:
        """Take over entries whose worker stopped renewing them, ahead of any new entry.

        Every lease/4 s a worker looks for such orphans (with a cheap probe while it is full).
        While it knows some wait, it reclaims at every iteration with a free slot, so requests
        that had started streaming resume before requests that have not started.
        """
        now = time.monotonic()
        due = now - self._last["reclaim"] >= self.config.lease_s / 4
        if self._stop.is_set() or not (due or (self._orphans_waiting and free > 0)):
            return []
        if now - self._last["redis_error"] < self.config.lease_s + MAX_BACKOFF_S:
            return []  # an outage (or a partition) aged every lease: give live workers time to renew
        self._last["reclaim"] = now
        if free <= 0:
            self._orphans_waiting = self._orphans_waiting or self._retry(self.streams.has_orphans)
            return []
        claimed = self._retry(self.streams.reclaim, free)
        self._orphans_waiting = bool(claimed) or not self.streams.reclaim_scan_done
        running = {s.meta["entry_id"] for s in self.engine.sequences()}
        claimed = [c for c in claimed if c[0] not in running]  # a late renewal of our own: keep running it once
        self.stats.num_reclaimed += len(claimed)
        return claimed

    def _maybe_renew_leases(self) -> None:
        if time.monotonic() - self._last["renew"] < self.config.lease_s / 3:
            return
        self._last["renew"] = time.monotonic()
        self._retry(self.streams.renew, [s.meta["entry_id"] for s in self.engine.sequences()])

    def _hand_back_unfinished(self, is_clean_exit: bool) -> None:
        """On exit, unfinished entries are marked idle so another worker resumes them at once.

        After a clean stop the hand-back does not count as a delivery; after a crash it does,
        so a request that kills workers still reaches the dead letters."""
        unfinished = [(s.meta["entry_id"], s.meta.get("deliveries", 1)) for s in self.engine.sequences()]
        if unfinished:
            log.info("handing back %d unfinished requests for another worker to resume", len(unfinished))
            self._safe(lambda: self.streams.hand_back(unfinished, is_delivery=not is_clean_exit))

    # ------------------------------------------------------------ helpers

    def _retry(self, fn, *args, on_retry=None):
        """Call fn until it gets past transient Redis failures (outage, OOM under noeviction, loading)."""
        backoff_s = 0.05
        while True:
            try:
                return fn(*args)
            except redis.RedisError as exc:
                if not is_transient(exc) or (self._stop.is_set() and time.monotonic() >= (self._drain_deadline or 0)):
                    raise
                log.warning("redis unavailable or refusing writes (%s); retrying in %.2f s", exc, backoff_s)
                self._note_redis_error()
            time.sleep(backoff_s)
            backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
            if on_retry is not None:
                on_retry()

    def _note_redis_error(self) -> None:
        """Renew the leases as soon as Redis answers (the outage aged them) and hold off reclaiming."""
        self._last["renew"] = 0.0
        self._last["redis_error"] = time.monotonic()
        self.streams.forget_uptime()

    @staticmethod
    def _next_seq(seq: Sequence) -> int:
        value = seq.meta["next_seq"]
        seq.meta["next_seq"] = value + 1
        return value

    def _record_step(self, started: float, outputs: list[StepOutput]) -> None:
        if outputs:
            self.stats.num_steps += 1
            self.stats.num_tokens += sum(len(o.token_ids) for o in outputs)
            self.stats.step_ms_total += (time.monotonic() - started) * 1000

    def _maybe_heartbeat(self) -> None:
        if time.monotonic() - self._last["heartbeat"] < self.config.heartbeat_interval_s:
            return
        self._last["heartbeat"] = time.monotonic()
        try:
            self.streams.heartbeat(self._heartbeat_fields())
        except redis.RedisError as exc:  # a missed heartbeat is not worth a request: the next one comes soon
            if not is_transient(exc):
                raise
            log.warning("heartbeat failed: %s", exc)

    def _heartbeat_fields(self) -> dict[str, Any]:
        s = self.stats
        return {
            "active": self.engine.num_active, "waiting": self.engine.num_waiting, "steps": s.num_steps,
            "tokens": s.num_tokens, "finished": s.num_finished, "reclaimed": s.num_reclaimed,
            "step_ms": round(s.step_ms_total / s.num_steps, 2) if s.num_steps else 0,
            "max_num_seqs": self.engine.max_num_seqs, "draining": int(self._stop.is_set()),
        }

    def _safe(self, fn) -> None:
        try:
            fn()
        except redis.RedisError as exc:
            log.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)
