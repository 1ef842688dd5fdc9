"""The small interface every engine (LLM, image) offers the worker loop.

An engine holds in-flight requests (anything with the fields of out_events.Tracked) and returns typed
outputs whose events() the loop publishes without knowing what a token or an image is.
"""

from __future__ import annotations

from typing import Protocol

from producer.protocol import ErrorCode, Request, TaskKind
from worker.out_events import Output, Tracked
from worker.request import Resume


class RequestRejected(Exception):
    """A request the engine cannot serve: it fails alone, with this code and message."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Engine(Protocol):
    tasks: tuple[TaskKind, ...]
    max_num_seqs: int

    @property
    def num_active(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_free(self) -> int:
        """How many new entries the worker may read for this engine now."""

    def sequences(self) -> list[Tracked]:
        """Every queued or running request."""

    def add(self, request: Request, resume: Resume | None = None) -> Tracked:
        """Validate and queue a request; raises RequestRejected. `resume`: what an earlier worker published."""

    def finish_if_complete(self, seq: Tracked) -> Output | None:
        """For a resumed request whose published output already ends it: finish it now."""

    def abort(self, request_id: str) -> Tracked | None:
        """Drop a queued or running request and free what it holds."""

    def step(self) -> list[Output]:
        """Run one scheduling step; returns what each request produced."""

    def fail_running(self) -> list[Tracked]:
        """Drop every running request (after a model error in their step) and return them."""

    def metrics(self) -> dict[str, int | float]:
        """Engine-specific gauges and counters for the heartbeat (e.g. KV blocks free, prefix-cache hits)."""
