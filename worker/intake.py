"""Turning stream entries (new or reclaimed) into engine requests, or into their terminal event.

For each entry, one pipelined round trip tells: is it aborted, which entry owns its
request id (duplicates), and, for a redelivery, what was already published. Then:

    unreadable id          → dead letter
    bad entry              → error invalid_request
    already ended          → ack (a redelivery whose terminal event was written)
    another entry's id     → ack, never executed (duplicate)
    unreadable events      → dead letter + error dead_letter (when a seq can follow them)
    aborted                → aborted
    delivered too often    → dead letter + error dead_letter
    deadline passed        → error expired (unless it had already started)
    images to fetch        → parked until a thread has fetched them (--allow-image-urls/-files), then
    otherwise              → engine.add, resuming after the published tokens
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from producer.protocol import (BadEntry, ErrorCode, Event, EventType, Request, TaskKind, decode_request, now_ms,
                               read_request_id)
from worker.config import WorkerConfig
from worker.engines.base import Engine, RequestRejected
from worker.models.images import ImageError, ImageFetcher
from worker.out_events import Output
from worker.request import Resume
from worker.outbox import Outbox
from worker.streams import EntryRef, EntryState, WorkerStreams

_TASK_NAMES = frozenset(t.value for t in TaskKind)

log = logging.getLogger("redbatch.worker")


@dataclass
class Entry:
    entry_id: EntryRef  # which level's stream holds it, and its id there
    fields: dict[Any, Any]
    deliveries: int = 1
    reclaimed: bool = False  # taken over from another worker (or handed back): it may have published tokens

    @property
    def request_id(self) -> str | None:
        return read_request_id(self.fields)


def entry_states(streams: WorkerStreams, entries: list[Entry]) -> list[EntryState | None]:
    """What Redis knows about each entry (one round trip); None for an entry whose id cannot be read."""
    readable = [e for e in entries if e.request_id is not None]
    states = streams.entry_states([(e.request_id, e.entry_id, e.reclaimed) for e in readable])
    by_entry = {e.entry_id: s for e, s in zip(readable, states)}
    return [by_entry.get(e.entry_id) for e in entries]


@dataclass
class Parked:
    """An entry whose images are being fetched off the loop thread; the loop holds (renews) it meanwhile."""

    entry: Entry
    request: Request
    state: EntryState
    fetched: Future  # of the request with its images inlined


class Intake:
    """Admits entries into the engine (loop thread only: the engine is not thread-safe)."""

    def __init__(self, config: WorkerConfig, engine: Engine):
        self.config = config
        self.engine = engine
        self._finished_on_resume: list[Output] = []  # resumed requests that were already complete
        policy = config.image_policy
        self.fetcher = ImageFetcher(policy) if policy.allow_urls or policy.allow_files else None
        self.parked: list[Parked] = []

    def drop(self, request_ids: set[str]) -> None:
        """Parked requests aborted (or owned by another worker) meanwhile: forget them."""
        self.parked = [p for p in self.parked if p.request.id not in request_ids]

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()

    def admit(self, taken: list[tuple[Entry, EntryState | None]], outbox: Outbox) -> None:
        for parked in [p for p in self.parked if p.fetched.done()]:
            self.parked.remove(parked)
            try:
                self._add_fetched(parked, outbox)
            except Exception as exc:  # noqa: BLE001 - an unforeseen bad entry fails alone, never the worker
                log.exception("unexpected error admitting entry %s", parked.entry.entry_id)
                self._reject(parked.entry, ErrorCode.INVALID_REQUEST, f"{type(exc).__name__}: {exc}", outbox, 0)
        for entry, state in taken:
            try:
                self._admit(entry, state, outbox)
            except Exception as exc:  # noqa: BLE001 - an unforeseen bad entry fails alone, never the worker
                log.exception("unexpected error admitting entry %s", entry.entry_id)
                self._reject(entry, ErrorCode.INVALID_REQUEST, f"{type(exc).__name__}: {exc}", outbox, 0)

    def take_finished_on_resume(self) -> list[Output]:
        done, self._finished_on_resume = self._finished_on_resume, []
        return done

    def _admit(self, entry: Entry, state: EntryState | None, outbox: Outbox) -> None:
        if state is None:
            outbox.dead_letter(entry.entry_id, entry.fields, "missing or invalid field 'id'")
            return
        if state.has_ended:
            outbox.ack(entry.entry_id, None)  # a redelivery of a request whose terminal event is written
            return
        if state.owner_entry not in (None, entry.entry_id.id):
            log.warning("entry %s reuses request id %s of entry %s: not executed", entry.entry_id, entry.request_id,
                        state.owner_entry)
            outbox.ack(entry.entry_id, None)
            return
        if state.unreadable is not None:
            self._fail_unreadable_events(entry, state, outbox)
            return
        try:
            request = decode_request(entry.fields, self.config.max_body_bytes, entry.entry_id.priority)
        except BadEntry as exc:
            self._reject(entry, ErrorCode.INVALID_REQUEST, exc.message, outbox, state.next_seq)
            return
        self._start(entry, request, state, outbox)

    def _start(self, entry: Entry, request: Request, state: EntryState, outbox: Outbox) -> None:
        if state.is_aborted:
            outbox.note_task(request.id, request.task.value)
            outbox.event(request.id, state.next_seq, EventType.ABORTED)
            outbox.ack(entry.entry_id, request.id)
        elif entry.deliveries > self.config.max_deliveries:
            reason = f"delivered {entry.deliveries} times (max_deliveries {self.config.max_deliveries})"
            outbox.dead_letter(entry.entry_id, entry.fields, reason, ack=False)
            self._reject(entry, ErrorCode.DEAD_LETTER, reason, outbox, state.next_seq)
        elif not state.events and request.deadline_ms is not None and now_ms() > request.deadline_ms:
            self._reject(entry, ErrorCode.EXPIRED, "the request's deadline passed before it started", outbox, 0)
        else:
            self._add(entry, request, state, outbox)

    def _add_fetched(self, parked: Parked, outbox: Outbox) -> None:
        try:
            request = parked.fetched.result()
        except ImageError as exc:
            self._reject(parked.entry, ErrorCode.INVALID_REQUEST, str(exc), outbox, parked.state.next_seq)
            return
        self._add(parked.entry, request, parked.state, outbox, may_park=False)

    def _add(self, entry: Entry, request: Request, state: EntryState, outbox: Outbox, may_park: bool = True) -> None:
        if may_park and self.fetcher is not None and self.fetcher.needs_fetch(request):
            self.parked.append(Parked(entry, request, state, self.fetcher.submit(request)))
            return
        resume = resume_from(state.events) if request.is_streamed else None
        try:
            seq = self.engine.add(request, resume)
        except RequestRejected as exc:
            self._reject(entry, exc.code, exc.message, outbox, state.next_seq)
            return
        seq.entry_id, seq.num_deliveries, seq.next_seq = entry.entry_id, entry.deliveries, state.next_seq
        seq.is_stream, seq.task = request.is_streamed, request.task.value
        if resume is not None:
            log.info("resuming request %s after %d published tokens", request.id, len(resume.output_ids))
            done = self.engine.finish_if_complete(seq)
            if done is not None:
                self._finished_on_resume.append(done)

    def _fail_unreadable_events(self, entry: Entry, state: EntryState, outbox: Outbox) -> None:
        """A reclaimed request whose published events cannot be read cannot resume: it is dead-lettered,
        with an `error` event after those events when a seq can be written there."""
        reason = f"its published events cannot be read ({state.unreadable})"
        log.warning("entry %s (request %s): %s", entry.entry_id, entry.request_id, reason)
        if state.next_seq is None:
            outbox.dead_letter(entry.entry_id, entry.fields, reason)
        else:
            outbox.dead_letter(entry.entry_id, entry.fields, reason, ack=False)
            self._reject(entry, ErrorCode.DEAD_LETTER, reason, outbox, state.next_seq)

    def _reject(self, entry: Entry, code: ErrorCode, message: str, outbox: Outbox, seq: int) -> None:
        request_id = entry.request_id
        if request_id is None:
            outbox.dead_letter(entry.entry_id, entry.fields, message)
        else:
            outbox.note_task(request_id, entry_task(entry.fields))
            outbox.fail(request_id, entry.entry_id, seq, code, message)


def entry_task(fields: dict[Any, Any]) -> str:
    """The task an entry names, as a metrics label: one of the task kinds, else "unknown"."""
    raw = fields.get(b"task", fields.get("task"))
    task = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return task if task in _TASK_NAMES else "unknown"


def resume_from(events: list[Event]) -> Resume | None:
    """What a reclaimed request had published: its tokens, their text, its images, and the next seq."""
    tokens = [e for e in events if e.type == EventType.TOKEN]
    num_images = sum(1 for e in events if e.type == EventType.IMAGE)
    if not tokens and not num_images:
        return None
    return Resume(output_ids=[t for e in tokens for t in (e.token_ids or [])], text="".join(e.text or "" for e in tokens),
                  next_seq=len(events), tool_calls=[d for e in tokens for d in (e.tool_calls or [])],
                  num_images=num_images)
