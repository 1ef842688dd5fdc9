"""What one loop iteration leaves for Redis: events, acks and dead letters, flushed together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from producer.protocol import ErrorCode, EventType

_ABORTABLE = frozenset(set(EventType) - {EventType.ERROR, EventType.ABORTED})  # output an abort replaces


@dataclass
class Outbox:
    """Events, acks and dead letters gathered during one loop iteration, flushed together."""

    events: list[tuple[str, int, EventType, dict[str, Any]]] = field(default_factory=list)
    acks: list[tuple[str, str | None]] = field(default_factory=list)  # (entry id, request whose terminal event gates it)
    dead: list[tuple[str, dict[Any, Any], str, bool]] = field(default_factory=list)  # (entry, fields, reason, ack)
    is_resend: bool = False  # a retry after a failed flush: its own events already written are not a conflict
    tasks: dict[str, str] = field(default_factory=dict)  # request id -> task kind, for the metrics of how it ended

    def note_task(self, request_id: str, task: str) -> None:
        """Label a request ending in this outbox with its task (the `task` label of redbatch_requests_total)."""
        self.tasks[request_id] = task

    def event(self, request_id: str, seq: int, type: EventType, **fields: Any) -> None:
        self.events.append((request_id, seq, type, fields))

    def streamed_requests(self) -> set[str]:
        """Requests with output (tokens, `done`) in this outbox: what an abort seen now must still stop."""
        return {rid for rid, _, type, _ in self.events if type in _ABORTABLE}

    def abort(self, request_id: str, next_seq: int | None, entry_id: str | None) -> None:
        """An abort seen before the writes: the request's output here becomes one `aborted` event, at the
        first seq of that output (or at next_seq when it has none), and its entry is acked after it."""
        seqs = [seq for rid, seq, type, _ in self.events if rid == request_id and type in _ABORTABLE]
        self.events = [e for e in self.events if not (e[0] == request_id and e[2] in _ABORTABLE)]
        self.event(request_id, min(seqs, default=next_seq), EventType.ABORTED)
        if entry_id is not None and all(rid != request_id for _, rid in self.acks):
            self.ack(entry_id, request_id)

    def discard(self, request_ids: set[str]) -> None:
        """Drop everything of these requests (another round already ended them, or another worker owns them)."""
        self.events = [e for e in self.events if e[0] not in request_ids]
        self.acks = [(entry, rid) for entry, rid in self.acks if rid not in request_ids]

    def events_by_request(self) -> dict[str, list[tuple[int, EventType, dict[str, Any]]]]:
        """Each request's events in seq order (the order they were added)."""
        grouped: dict[str, list[tuple[int, EventType, dict[str, Any]]]] = {}
        for request_id, seq, type, fields in self.events:
            grouped.setdefault(request_id, []).append((seq, type, fields))
        return grouped

    def ack(self, entry_id: str, request_id: str | None) -> None:
        """Ack once request_id's events of this flush are written (None: ack unconditionally)."""
        self.acks.append((entry_id, request_id))

    def fail(self, request_id: str, entry_id: str, seq: int, code: ErrorCode, message: str) -> None:
        self.event(request_id, seq, EventType.ERROR, code=code, message=message[:2000])
        self.ack(entry_id, request_id)

    def dead_letter(self, entry_id: str, fields: dict[Any, Any], reason: str, ack: bool = True) -> None:
        """Copy the entry to the dead stream; ack it once the copy is written (unless an event gates the ack)."""
        self.dead.append((entry_id, fields, reason, ack))

    @property
    def is_empty(self) -> bool:
        return not (self.events or self.acks or self.dead)
