"""The worker loop: step → (Redis round of the previous step) → drop aborted → admit → emit → hand over.

The Redis side of each iteration (abort check, publish, ack, leases, reclaim, read, heartbeat)
runs on the I/O thread (worker/io_thread.py) while the engine computes the next step.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from producer.protocol import ErrorCode, EventType
from worker.config import WorkerConfig
from worker.engines.base import Engine
from worker.intake import Entry, Intake
from worker.io_thread import Held, RedisIO, Round, free_slots
from worker.out_events import Output, Tracked
from worker.outbox import Outbox
from worker.streams import WorkerStreams, is_transient

log = logging.getLogger("redbatch.worker")
BURST_BLOCK_MS = 50


class EngineFailed(Exception):
    """Steps failed max_consecutive_step_failures times in a row (a broken device, an OOM that preempting
    does not clear): the worker hands its requests back and exits for a supervisor to restart it."""


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
        self.intake = Intake(config, engine)
        self.stats = Stats()
        self.metrics = None  # worker.metrics.WorkerMetrics when --metrics-port is set: on_step, on_written
        self.io = RedisIO(config, streams, self.stats, is_giving_up=self._is_past_drain_deadline)
        self.io.on_written = self._count_ended
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the group exists and the model is registered
        self._drain_deadline: float | None = None
        self._num_failed_steps = 0  # consecutive
        self.health = None
        if config.health_file:
            from worker.health import HealthFile

            self.health = self.io.health = HealthFile(config.health_file)

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
        """Serve until stopped. burst=True: return once the stream is empty and nothing runs (tests).

        Raises EngineFailed after max_consecutive_step_failures failed steps in a row."""
        self.io.retry(self.streams.ensure_group)
        self.io.retry(self.streams.register, [t.value for t in self.engine.tasks])
        self.ready.set()
        is_clean_exit = False
        try:
            while not self._should_exit():
                if self._iterate_once(burst) and burst:
                    break
            is_clean_exit = True
        finally:
            unadmitted, is_io_clean = self._finish_io()
            self._hand_back_unfinished(is_clean_exit and is_io_clean, unadmitted)
            self._safe(self.streams.unregister)
            close = getattr(self.engine, "close", None)  # an engine with its own thread (sequential) stops it
            if close is not None:
                close()
            self.intake.close()
            self.io.close()

    def _iterate_once(self, burst: bool) -> bool:
        if self.health is not None:
            self.health.loop_turned()
        try:
            return self.iterate(burst)
        except redis.RedisError as exc:
            if not is_transient(exc):
                raise
            log.warning("redis unavailable (%s); retrying", exc)
            self.io.note_redis_error()
            time.sleep(0.2)
            return False

    def _should_exit(self) -> bool:
        if not self._stop.is_set():
            return False
        return self.engine.num_active == 0 or self._is_past_drain_deadline()

    def _is_past_drain_deadline(self) -> bool:
        return self._stop.is_set() and time.monotonic() >= (self._drain_deadline or 0)

    # ------------------------------------------------------------ one iteration

    def iterate(self, burst: bool = False) -> bool:
        """One pass of the loop. Returns True when there was nothing to do (then, in burst mode, nothing
        is left in flight)."""
        outbox = Outbox()
        outputs = self._step(outbox)  # meanwhile the I/O thread runs the previous step's Redis round
        seen = self.io.wait()
        outputs = self._drop(seen.dropped, outputs, outbox)  # aborted or fenced meanwhile: drop this step's output
        self.intake.admit(seen.entries, outbox)  # between steps: only this thread touches the engine
        outputs += self.intake.take_finished_on_resume()
        for out in outputs:
            self._emit(out, outbox)
        is_idle = (seen.has_read and not seen.entries and not outputs and self.engine.num_active == 0
                   and not self.intake.parked)
        if burst and is_idle and outbox.is_empty:
            return True
        self.io.submit(self._round(outbox, burst))
        return is_idle

    def _step(self, outbox: Outbox) -> list[Output]:
        """One engine step. A failed step fails its running requests; too many in a row stop the worker."""
        if self.engine.num_active == 0:
            return []
        started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a model error fails this step's requests, not the worker
            self._num_failed_steps += 1
            if self._num_failed_steps >= self.config.max_consecutive_step_failures:
                raise EngineFailed(f"{self._num_failed_steps} steps in a row failed; the last with "
                                   f"{type(exc).__name__}: {exc}") from exc
            log.exception("model error; failing the running requests")
            for seq in self.engine.fail_running():
                outbox.note_task(seq.request_id, seq.task)
                outbox.fail(seq.request_id, seq.entry_id, self._next_seq(seq), ErrorCode.MODEL_ERROR,
                            f"{type(exc).__name__}: {exc}")
            return []
        self._num_failed_steps = 0
        self._record_step(started, outputs)
        return outputs

    def _drop(self, request_ids: set[str], outputs: list[Output], outbox: Outbox) -> list[Output]:
        """Requests whose `aborted` event is written, or that another worker owns: gone from the engine,
        and nothing more of them is published (not this step's tokens, nor its model_error)."""
        for request_id in request_ids:
            self.engine.abort(request_id)
        self.intake.drop(request_ids)
        outbox.discard(request_ids)
        return [o for o in outputs if o.seq.request_id not in request_ids]

    def _emit(self, out: Output, outbox: Outbox) -> None:
        """Publish the output's events in order; a terminal one ends the request and lets its entry be acked."""
        job = out.seq
        outbox.note_task(job.request_id, job.task)
        for event in out.events():
            if event.type == EventType.ERROR:  # this request failed alone; its batch mates go on
                outbox.fail(job.request_id, job.entry_id, self._next_seq(job),
                            event.fields.get("code", ErrorCode.MODEL_ERROR), event.fields["message"])
                return
            outbox.event(job.request_id, self._next_seq(job), event.type, **event.fields)
            if event.is_terminal:
                outbox.ack(job.entry_id, job.request_id)
                self.stats.num_finished += 1
                return

    def _round(self, outbox: Outbox, burst: bool) -> Round:
        """The Redis work this iteration leaves for the I/O thread, with a snapshot of what the engine holds."""
        held = [Held(s.request_id, s.entry_id, s.next_seq) for s in self.engine.sequences()]
        held += [Held(p.request.id, p.entry.entry_id, p.state.next_seq) for p in self.intake.parked]
        is_idle = self.engine.num_active == 0
        block_ms = (BURST_BLOCK_MS if burst else self.config.read_block_ms) if is_idle else None
        if is_idle and self.intake.parked:  # images are being fetched: come back soon to admit them
            block_ms = BURST_BLOCK_MS
        # the engine's room for new entries, per level: work held at lower levels does not take a slot from higher;
        # parked entries (images being fetched) will take theirs
        capacity = self.engine.num_free + self.engine.num_active
        priorities = [s.priority for s in self.engine.sequences()] + [p.request.priority for p in self.intake.parked]
        free = free_slots(capacity, priorities)
        return Round(outbox, held, is_reading=not self._stop.is_set(), free=free, block_ms=block_ms,
                     heartbeat=self._heartbeat_fields())

    # ------------------------------------------------------------ exit

    def _finish_io(self) -> tuple[list[Entry], bool]:
        """Let the round in flight land before anything is handed back (a resuming worker must see its
        events). Returns the entries it read, which no step will run, and whether it succeeded."""
        try:
            seen = self.io.wait()
        except Exception:  # noqa: BLE001 - exiting anyway: hand back what is held, as after a crash
            log.exception("the last Redis round failed")
            return [], False
        self._drop(seen.dropped, [], Outbox())
        return [entry for entry, _ in seen.entries], True

    def _hand_back_unfinished(self, is_clean_exit: bool, unadmitted: list[Entry]) -> None:
        """On exit, unfinished entries are marked idle so another worker resumes them at once.

        After a clean stop the hand-back does not count as a delivery; after a crash (or a broken
        engine) it does, so a request that kills workers still reaches the dead letters. Entries
        read but never admitted did not run here: they never count."""
        unfinished = [(s.entry_id, s.num_deliveries) for s in self.engine.sequences()]
        never_run = [(e.entry_id, e.deliveries) for e in unadmitted + [p.entry for p in self.intake.parked]]
        if unfinished or never_run:
            log.info("handing back %d unfinished requests for another worker to resume", len(unfinished + never_run))
            self._safe(lambda: self.streams.hand_back(unfinished, is_delivery=not is_clean_exit))
            self._safe(lambda: self.streams.hand_back(never_run))

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _next_seq(seq: Tracked) -> int:
        value = seq.next_seq
        seq.next_seq = value + 1
        return value

    def _record_step(self, started: float, outputs: list[Output]) -> None:
        if outputs:
            self.stats.num_steps += 1
            self.stats.num_tokens += sum(o.num_tokens for o in outputs)
            self.stats.step_ms_total += (time.monotonic() - started) * 1000
        if self.metrics is not None:
            self.metrics.on_step(time.monotonic() - started, outputs)

    def _count_ended(self, outbox: Outbox, fenced: set[str]) -> None:
        """On the I/O thread, once an outbox is written: the metrics count the requests it ended."""
        if self.metrics is None:
            return
        try:
            self.metrics.on_written(outbox, fenced)
        except Exception:  # noqa: BLE001 - metrics never break the Redis round
            log.exception("metrics: cannot count the requests a round ended")

    def _heartbeat_fields(self) -> dict[str, Any]:
        s = self.stats
        return {
            "active": self.engine.num_active, "waiting": self.engine.num_waiting, "steps": s.num_steps,
            "tokens": s.num_tokens, "finished": s.num_finished, "reclaimed": s.num_reclaimed,
            "step_ms": round(s.step_ms_total / s.num_steps, 2) if s.num_steps else 0,
            "max_num_seqs": self.engine.max_num_seqs, "draining": int(self._stop.is_set()),
            **self.engine.metrics(),
        }

    def _safe(self, fn) -> None:
        try:
            fn()
        except redis.RedisError as exc:
            log.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)
