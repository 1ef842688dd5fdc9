"""The small interface every engine (LLM now, image later) offers the worker loop."""

from __future__ import annotations

from typing import Protocol

from producer.protocol import ErrorCode, Request, TaskKind
from worker.request import Resume, Sequence, StepOutput


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

    def sequences(self) -> list[Sequence]:
        """Every queued or running request."""

    def add(self, request: Request, resume: Resume | None = None) -> Sequence:
        """Validate and queue a request; raises RequestRejected. `resume`: what an earlier worker published."""

    def finish_if_complete(self, seq: Sequence) -> StepOutput | None:
        """For a resumed request whose published output already ends it: finish it now."""

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a queued or running request and free what it holds."""

    def step(self) -> list[StepOutput]:
        """Run one scheduling step; returns what each request produced."""

    def fail_running(self) -> list[Sequence]:
        """Drop every running request (after a model error in their step) and return them."""

    def metrics(self) -> dict[str, int | float]:
        """Engine-specific gauges and counters for the heartbeat (e.g. KV blocks free, prefix-cache hits)."""
