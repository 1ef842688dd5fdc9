"""The worker loop: read → validate → admit → step → abort check → publish → ack → heartbeat."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from producer.protocol import BadEntry, ErrorCode, EventType, Usage, decode_request, now_ms, read_request_id
from worker.config import WorkerConfig
from worker.engines.base import Engine, RequestRejected
from worker.request import Sequence, StepOutput
from worker.streams import Outbox, WorkerStreams, is_transient

log = logging.getLogger("redbatch.worker")
BURST_BLOCK_MS = 50
MAX_BACKOFF_S = 5.0


@dataclass
class Stats:
    num_steps: int = 0
    num_tokens: int = 0
    step_ms_total: float = 0.0
    num_finished: int = 0


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, streams: WorkerStreams):
        self.config = config
        self.engine = engine
        self.streams = streams
        self.stats = Stats()
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the group exists and the model is registered
        self._drain_deadline: float | None = None
        self._last_heartbeat = 0.0

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
        backoff_s = 0.1
        try:
            while not self._should_exit():
                try:
                    is_idle = self.iterate(burst)
                    backoff_s = 0.1
                except redis.RedisError as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("redis unavailable (%s); retrying in %.1f s", exc, backoff_s)
                    time.sleep(backoff_s)
                    backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
                    continue
                if burst and is_idle:
                    break
        finally:
            self._safe(self.streams.unregister)

    def _should_exit(self) -> bool:
        if not self._stop.is_set():
            return False
        return self.engine.num_active == 0 or time.monotonic() >= (self._drain_deadline or 0)

    # ------------------------------------------------------------ one iteration

    def iterate(self, burst: bool = False) -> bool:
        """One pass of the loop. Returns True when there was nothing to do."""
        outbox = Outbox()
        num_read = 0 if self._stop.is_set() else self._read_and_admit(outbox, burst)
        started = time.monotonic()
        outputs = self._step(outbox)
        self._record_step(started, outputs)
        self._publish(outputs, outbox)
        self._flush(outbox)
        self._maybe_heartbeat()
        return num_read == 0 and self.engine.num_active == 0 and not outputs

    def _flush(self, outbox: Outbox) -> None:
        """Write the step's output, retrying through Redis outages: the engine keeps its state meanwhile."""
        fenced = self._retry(self.streams.flush, outbox, on_retry=lambda: setattr(outbox, "is_resend", True))
        for request_id in fenced:  # another worker owns it now: stop without publishing anything more
            log.warning("request %s is owned by another worker; dropping it here", request_id)
            self.engine.abort(request_id)

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
            time.sleep(backoff_s)
            backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
            if on_retry is not None:
                on_retry()

    def _read_and_admit(self, outbox: Outbox, burst: bool) -> int:
        free = self.engine.max_num_seqs - self.engine.num_active
        if free <= 0:
            return 0
        block_ms = None if self.engine.num_active else (BURST_BLOCK_MS if burst else self.config.read_block_ms)
        entries = self.streams.read(free, block_ms)
        ids = [read_request_id(fields) for _, fields in entries]
        aborted = self._retry(self.streams.aborted, [i for i in ids if i is not None])
        for (entry_id, fields), request_id in zip(entries, ids):
            self._admit(entry_id, fields, request_id in aborted, outbox)
        return len(entries)

    def _admit(self, entry_id: str, fields: dict[Any, Any], is_aborted: bool, outbox: Outbox) -> None:
        try:
            self._admit_entry(entry_id, fields, is_aborted, outbox)
        except Exception as exc:  # noqa: BLE001 - an unforeseen bad entry fails alone, never the worker
            log.exception("unexpected error admitting entry %s", entry_id)
            request_id = read_request_id(fields)
            if request_id is None:
                outbox.dead_letter(entry_id, fields, f"{type(exc).__name__}: {exc}")
            else:
                self._fail(request_id, entry_id, 0, ErrorCode.INVALID_REQUEST, f"{type(exc).__name__}: {exc}", outbox)

    def _admit_entry(self, entry_id: str, fields: dict[Any, Any], is_aborted: bool, outbox: Outbox) -> None:
        try:
            request = decode_request(fields, self.config.max_body_bytes)
        except BadEntry as exc:
            if exc.request_id is None:
                outbox.dead_letter(entry_id, fields, exc.message)
            else:
                self._fail(exc.request_id, entry_id, 0, ErrorCode.INVALID_REQUEST, exc.message, outbox)
            return
        if is_aborted:
            outbox.event(request.id, 0, EventType.ABORTED)
            outbox.ack(entry_id, request.id)
        elif request.deadline_ms is not None and now_ms() > request.deadline_ms:
            self._fail(request.id, entry_id, 0, ErrorCode.EXPIRED, "the request's deadline passed before it started", outbox)
        else:
            try:
                seq = self.engine.add(request)
            except RequestRejected as exc:
                self._fail(request.id, entry_id, 0, exc.code, exc.message, outbox)
                return
            seq.meta.update(entry_id=entry_id, next_seq=0, stream=request.generate_config.stream)

    def _step(self, outbox: Outbox) -> list[StepOutput]:
        if self.engine.num_active == 0:
            return []
        try:
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a model error fails this step's requests, never the worker
            log.exception("model error; failing the running requests")
            for seq in self.engine.fail_running():
                self._fail(seq.request_id, seq.meta["entry_id"], seq.meta["next_seq"], ErrorCode.MODEL_ERROR,
                           f"{type(exc).__name__}: {exc}", outbox)
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
        if seq.meta["stream"]:
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

    # ------------------------------------------------------------ helpers

    def _fail(self, request_id: str, entry_id: str, seq: int, code: ErrorCode, message: str, outbox: Outbox) -> None:
        outbox.event(request_id, seq, EventType.ERROR, code=code, message=message[:2000])
        outbox.ack(entry_id, request_id)

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
        if time.monotonic() - self._last_heartbeat < self.config.heartbeat_interval_s:
            return
        self._last_heartbeat = time.monotonic()
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
            "tokens": s.num_tokens, "finished": s.num_finished,
            "step_ms": round(s.step_ms_total / s.num_steps, 2) if s.num_steps else 0,
            "max_num_seqs": self.engine.max_num_seqs, "draining": int(self._stop.is_set()),
        }

    def _safe(self, fn) -> None:
        try:
            fn()
        except redis.RedisError as exc:
            log.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)
