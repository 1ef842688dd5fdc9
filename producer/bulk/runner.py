"""The bulk job itself: read an OpenAI Batch file, keep a bounded window of requests in flight, write results.

No rq here (producer.bulk wires it into an rq job). One runner holds a job at a time (a lease key in
Redis); the output file is the record of what is done, so a re-run skips what it holds, picks up results
that finished meanwhile from their events streams and submits only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer import cluster
from producer.bulk.openai_batch import (
    BatchLine,
    LineError,
    error_line,
    line_key,
    output_id,
    parse_json_line,
    read_custom_id,
    result_line,
    translate,
)
from producer.bulk.state import JobInputError, JobSpec, Lease, Progress
from producer.errors import RedbatchError
from producer.keys import Keys
from producer.protocol import Event, EventType, decode_event
from producer.submit import ENQUEUE_LUA, ModelInfo, enqueue_args

log = logging.getLogger("redbatch.bulk")

MIN_IN_FLIGHT = 8  # the window when no live worker reports its max_num_seqs
IN_FLIGHT_PER_SLOT = 2  # default window: this many requests per running-batch slot of the live workers
MAX_ATTEMPTS = 5  # a line whose request is lost (result expired, aborted by a cancel) is resubmitted this often
SUBMIT_BATCH = 256  # enqueue calls per pipeline
READ_BLOCK_MS = 1000
MAINTAIN_EVERY_S = 0.5
CAPACITY_EVERY_S = 10.0
LOST_CHECK_AFTER_S = 10.0  # a watched request with no event this long is checked for being lost
QUEUE_FULL_PAUSE_S = 0.2


@dataclass
class Slot:
    """One line whose request is in flight (or that this run watches: submitted by an earlier run)."""

    line: BatchLine
    line_id: str
    request_id: str
    attempt: int
    is_inherited: bool  # enqueued by an earlier run of this job, not by this one
    since_s: float
    after: str = "0-0"
    events: list[Event] = field(default_factory=list)


def request_id_for(job_id: str, custom_id: str, attempt: int) -> str:
    digest = hashlib.sha256(custom_id.encode()).hexdigest()[:20]
    return f"bulk.{job_id}.{digest}" + (f".{attempt}" if attempt else "")


class BulkRunner:
    def __init__(self, rds: redis.Redis, job_id: str, spec: JobSpec, previous_runs: int,
                 save_progress: Callable[[dict[str, Any]], None], input_sha256: str | None = None,
                 control: redis.Redis | None = None):
        """rds: where the requests go (a Redis Cluster too); control: the job's lease and cancel flag, beside
        rq's queue (default: rds)."""
        self.rds = rds
        self.control = rds if control is None else control
        self.job_id = job_id
        self.spec = spec
        self.keys = Keys(spec.prefix)
        self.is_resuming = previous_runs > 0
        self.expected_input_sha256 = input_sha256
        self.save_progress = save_progress
        self.progress = Progress(runs=previous_runs + 1)
        self._enqueue = rds.register_script(ENQUEUE_LUA)
        self._slots: dict[str, Slot] = {}  # events key -> slot
        self._backlog: deque[BatchLine] = deque()
        self._lines: Iterator[BatchLine] | None = None
        self._is_exhausted = False
        self._queue_full_until = 0.0
        self._next_maintain = self._next_capacity = 0.0
        self._max_in_flight = spec.max_in_flight or MIN_IN_FLIGHT
        # the lease is renewed between reads: block and upkeep well within it
        self._block_ms = int(min(READ_BLOCK_MS, spec.lease_s * 1000 / 4))
        self._maintain_every_s = min(MAINTAIN_EVERY_S, spec.lease_s / 4)
        self._out = None

    # ------------------------------------------------------------ the job

    def run(self) -> dict[str, Any]:
        lease = Lease(self.control, self.keys.bulk_lease(self.job_id), self.spec.lease_s)
        lease.acquire(wait_s=2 * self.spec.lease_s)
        try:
            self._prepare()
            with open(self.spec.output_path, "a", encoding="utf-8") as self._out:
                self._loop(lease)
        finally:
            lease.release()
        self.progress.finish(self._cancelled_state())
        self._save()
        return self.progress.as_dict()

    def _loop(self, lease: Lease) -> None:
        while True:
            if self._maintain(lease):
                self._cancel_in_flight()
                return
            self._fill()
            if not self._slots and self._is_exhausted and not self._backlog:
                return
            self._collect()

    def _prepare(self) -> None:
        self.info = ModelInfo.parse(self.spec.model, self.rds.hget(self.keys.models(), self.spec.model))
        written, num_failed = recover_output(Path(self.spec.output_path), self.job_id)
        if written and not self.is_resuming:
            raise JobInputError(f"output {self.spec.output_path} already holds lines this job did not write; "
                                "choose another output path")
        total, sha = scan_input(Path(self.spec.input_path))
        if self.expected_input_sha256 and sha != self.expected_input_sha256:
            raise JobInputError(f"input {self.spec.input_path} changed since this job started (sha256 differs); "
                                "its output could not be matched to it")
        self.progress.input_sha256 = sha
        self.progress.start(total=total, done=len(written), failed=num_failed)
        self._lines = self._pending_lines(written)
        self._cancelled = False

    def _cancelled_state(self) -> str:
        return "cancelled" if self._cancelled else "complete"

    # ------------------------------------------------------------ reading the input

    def _pending_lines(self, written: set[str]) -> Iterator[BatchLine]:
        """The input's lines not yet in the output; bad lines are written as error lines on the way."""
        seen: set[str] = set()
        with open(self.spec.input_path, "rb") as f:
            index = -1
            for text in f:
                if not text.strip():
                    continue
                index += 1
                line = self._read_line(text, index, seen, written)
                if line is not None:
                    yield line
        self._is_exhausted = True

    def _read_line(self, text: bytes, index: int, seen: set[str], written: set[str]) -> BatchLine | None:
        raw, error = None, None
        try:
            raw = parse_json_line(text)
        except LineError as exc:
            error = exc
        custom_id = read_custom_id(raw)
        shown_id = custom_id
        if custom_id is not None and custom_id in seen:
            error = LineError(f"duplicate custom_id {custom_id!r}: the first line with it is served")
            custom_id = None  # keyed by position: the first line owns the custom_id
        elif custom_id is not None:
            seen.add(custom_id)
        line_id = output_id(self.job_id, line_key(custom_id, index))
        if line_id in written:
            return None
        if error is None:
            try:
                line = translate(raw, index)
                self.info.check_task(line.task)
                return line
            except LineError as exc:
                error = exc
            except RedbatchError as exc:  # UnsupportedTask: the model does not serve this url's task
                error = LineError(str(exc), getattr(exc, "code", "invalid_request"))
        self._write(error_line(line_id, shown_id, error.code, f"line {index + 1}: {error.message}"))
        return None

    # ------------------------------------------------------------ submitting

    def _fill(self) -> None:
        room = self._max_in_flight - len(self._slots)
        if room <= 0 or time.monotonic() < self._queue_full_until:
            return
        batch = self._take(min(room, SUBMIT_BATCH))
        if batch:
            self._start([(line, 0) for line in batch])

    def _take(self, count: int) -> list[BatchLine]:
        out: list[BatchLine] = []
        while len(out) < count and self._backlog:
            out.append(self._backlog.popleft())
        while len(out) < count and not self._is_exhausted:
            line = next(self._lines, None)  # bad lines are written while this advances
            if line is None:
                break
            out.append(line)
        return out

    def _start(self, batch: list[tuple[BatchLine, int]]) -> None:
        """Enqueue each (line, attempt), or watch it where an earlier run already did."""
        if self.is_resuming:
            batch = self._watch_existing(batch)
        pipe = cluster.pipeline(self.rds, {self._enqueue.sha: ENQUEUE_LUA})
        ids = []
        for line, attempt in batch:
            request_id = request_id_for(self.job_id, line.custom_id, attempt)
            ids.append(request_id)
            args = enqueue_args(request_id, line.task, line.body, self.info.max_queue_len, None, self.spec.result_ttl_s)
            self._enqueue(keys=[self.keys.requests(self.spec.model, self.spec.priority), self.keys.request_owner(self.spec.model, request_id)],
                          args=args, client=pipe)
        replies = pipe.execute(raise_on_error=False) if batch else []
        for (line, attempt), request_id, reply in zip(batch, ids, replies):
            message = str(reply) if isinstance(reply, Exception) else ""
            if not message:
                self._add_slot(line, request_id, attempt, is_inherited=False)
                self.progress.num_submitted += 1
            elif message.startswith("DUPLICATE"):
                self._add_slot(line, request_id, attempt, is_inherited=True)
            elif message.startswith("QUEUEFULL"):
                self._backlog.append(line) if attempt == 0 else self._backlog.appendleft(line)
                self._queue_full_until = time.monotonic() + QUEUE_FULL_PAUSE_S
            else:
                raise reply

    def _watch_existing(self, batch: list[tuple[BatchLine, int]]) -> list[tuple[BatchLine, int]]:
        """Lines whose request an earlier run enqueued become slots; the rest is returned for enqueueing."""
        pipe = cluster.pipeline(self.rds)
        for line, attempt in batch:
            request_id = request_id_for(self.job_id, line.custom_id, attempt)
            pipe.exists(self.keys.events(request_id))  # two EXISTS: the keys are in different Cluster slots
            pipe.exists(self.keys.request_owner(self.spec.model, request_id))
        rest = []
        replies = pipe.execute()
        for (line, attempt), has_events, has_owner in zip(batch, replies[::2], replies[1::2]):
            if has_events or has_owner:
                self._add_slot(line, request_id_for(self.job_id, line.custom_id, attempt), attempt, is_inherited=True)
            else:
                rest.append((line, attempt))
        return rest

    def _add_slot(self, line: BatchLine, request_id: str, attempt: int, is_inherited: bool) -> None:
        line_id = output_id(self.job_id, line_key(line.custom_id, line.index))
        slot = Slot(line, line_id, request_id, attempt, is_inherited, since_s=time.monotonic())
        self._slots[self.keys.events(request_id)] = slot

    # ------------------------------------------------------------ results

    def _collect(self) -> None:
        """One XREAD over every in-flight request's events stream (on a Cluster: slot by slot)."""
        if not self._slots:
            time.sleep(QUEUE_FULL_PAUSE_S)
            return
        can_submit = (len(self._slots) < self._max_in_flight and (self._backlog or not self._is_exhausted)
                      and time.monotonic() >= self._queue_full_until)
        streams = {key: slot.after for key, slot in self._slots.items()}
        try:
            reply = cluster.read_streams(self.rds, streams, block_ms=None if can_submit else self._block_ms)
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("redis unreachable; retrying")
            time.sleep(QUEUE_FULL_PAUSE_S)
            return
        for key, entries in reply or []:
            slot = self._slots.get(key.decode() if isinstance(key, bytes) else key)
            for entry_id, fields in entries:
                slot.after = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                event = decode_event(fields)
                slot.events.append(event)
                if event.is_terminal:
                    self._finish(slot)
                    break
        self._out.flush()

    def _finish(self, slot: Slot) -> None:
        del self._slots[self.keys.events(slot.request_id)]
        terminal = slot.events[-1]
        if terminal.type == EventType.ABORTED and slot.is_inherited:  # aborted by a cancelled earlier run
            self._retry(slot, "was aborted by an earlier cancel")
            return
        out = result_line(slot.line_id, slot.line, slot.request_id, self.spec.model, slot.events)
        if terminal.type == EventType.DONE and terminal.usage is not None:
            self.progress.num_tokens += terminal.usage.completion_tokens
        self._write(out)

    def _retry(self, slot: Slot, why: str) -> None:
        if slot.attempt + 1 >= MAX_ATTEMPTS:
            self._write(error_line(slot.line_id, slot.line.custom_id, "unrecoverable",
                                   f"request {slot.request_id} {why}; gave up after {MAX_ATTEMPTS} attempts"))
            return
        self._slots.pop(self.keys.events(slot.request_id), None)
        log.warning("line %s: request %s %s; resubmitting as attempt %d", slot.line.custom_id, slot.request_id, why,
                    slot.attempt + 1)
        self.progress.num_recomputed += 1
        self._start([(slot.line, slot.attempt + 1)])

    def _write(self, out: dict[str, Any]) -> None:
        self._out.write(json.dumps(out, ensure_ascii=False) + "\n")
        self.progress.num_done += 1
        if out["error"] is not None:
            self.progress.num_failed += 1

    # ------------------------------------------------------------ upkeep

    def _maintain(self, lease: Lease) -> bool:
        """Lease, cancel flag, window size, lost requests, progress; True when the job is cancelled."""
        now = time.monotonic()
        if now < self._next_maintain:
            return False
        self._next_maintain = now + self._maintain_every_s
        lease.renew()
        if self.control.exists(self.keys.bulk_cancel(self.job_id)):
            self._cancelled = True
            return True
        if now >= self._next_capacity:
            self._next_capacity = now + CAPACITY_EVERY_S
            self._max_in_flight = self.spec.max_in_flight or self._default_window()
        self._check_lost(now)
        self.progress.num_in_flight = len(self._slots)
        self.progress.max_in_flight = self._max_in_flight
        self._save()
        return False

    def _default_window(self) -> int:
        live = self.rds.zrangebyscore(self.keys.model_workers(self.spec.model), self.info.live_since_ms(), "+inf")
        pipe = cluster.pipeline(self.rds)
        for worker_id in live:
            pipe.hget(self.keys.worker(worker_id.decode()), "max_num_seqs")
        fallback = self.info.registration.max_num_seqs  # a worker's hash appears at its first heartbeat
        slots = sum(fallback if v is None else int(v) for v in (pipe.execute() if live else []))
        return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_SLOT * slots)

    def _check_lost(self, now: float) -> None:
        """Inherited requests with no event: gone from the stream and with no events means lost (their
        result expired before an earlier run wrote it): resubmit."""
        quiet = [s for s in self._slots.values() if s.is_inherited and not s.events and now - s.since_s > LOST_CHECK_AFTER_S]
        if not quiet:
            return
        pipe = cluster.pipeline(self.rds)
        for slot in quiet:
            pipe.get(self.keys.request_owner(self.spec.model, slot.request_id))
        owners = pipe.execute()
        pipe = cluster.pipeline(self.rds)
        for slot, owner in zip(quiet, owners):
            entry = owner.decode() if owner else "0-0"
            pipe.xrange(self.keys.requests(self.spec.model, self.spec.priority), entry, entry)
            pipe.exists(self.keys.events(slot.request_id))
        replies = pipe.execute()
        for slot, owner, queued, has_events in zip(quiet, owners, replies[::2], replies[1::2]):
            slot.since_s = now
            if not queued and not has_events:
                self._retry(slot, "is neither queued nor has a result (it expired before it was written)")

    def _cancel_in_flight(self) -> None:
        """Abort what is in flight; those lines stay out of the output (a resume submits them again)."""
        pipe = cluster.pipeline(self.rds)
        for slot in self._slots.values():
            pipe.set(self.keys.abort(slot.request_id), b"1", ex=self.spec.result_ttl_s)
        pipe.execute()
        self._slots.clear()

    def _save(self) -> None:
        self.progress.num_in_flight = len(self._slots)
        self.save_progress(self.progress.as_dict())


# ---------------------------------------------------------------- files


def scan_input(path: Path) -> tuple[int, str]:
    """(number of non-blank lines, sha256 of the file)."""
    if not path.is_file():
        raise JobInputError(f"input {path} not found (paths are read by the bulk worker: same machine or a shared volume)")
    digest, total = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for text in f:
            digest.update(text)
            total += bool(text.strip())
    return total, digest.hexdigest()


def recover_output(path: Path, job_id: str) -> tuple[set[str], int]:
    """The ids of the lines the output already holds and how many are errors; a torn last line is cut."""
    if not path.exists():
        return set(), 0
    written: set[str] = set()
    num_failed = 0
    good_bytes = 0
    with open(path, "rb") as f:
        for text in f:
            if not text.endswith(b"\n"):
                break  # a line cut by a crash mid-write: dropped, its request is picked up again
            good_bytes += len(text)
            try:
                out = json.loads(text)
            except ValueError:
                continue
            if isinstance(out, dict) and isinstance(out.get("id"), str):
                written.add(out["id"])
                num_failed += out.get("error") is not None
    if good_bytes != path.stat().st_size:
        os.truncate(path, good_bytes)
    return written, num_failed


def runner_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
