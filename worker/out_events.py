"""What an engine's output asks the loop to publish: typed events, in order.

The loop knows nothing of tokens or images: it gives each event the request's next `seq`,
publishes it, and acks the entry after a terminal one. An `error` event fails only its request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from producer.protocol import TERMINAL_EVENTS, ErrorCode, EventType, Priority


@dataclass(frozen=True)
class OutEvent:
    """One event; `fields` are encode_event's keyword fields, in wire order."""

    type: EventType
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def token_event(text: str, token_ids: list[int], logprobs: list[dict] | None = None,
                tool_calls: list[dict] | None = None) -> OutEvent:
    return OutEvent(EventType.TOKEN, {"text": text, "token_ids": token_ids, "logprobs": logprobs,
                                      "tool_calls": tool_calls})


def progress_event(step: int, total: int) -> OutEvent:
    return OutEvent(EventType.PROGRESS, {"step": step, "total": total})


def image_event(index: int, png: bytes, response_format: str, url: str | None = None) -> OutEvent:
    """response_format png: the bytes in `data`; b64_json: base64 in `b64`; url: only `url` (a written file)."""
    import base64

    if response_format == "url":
        payload: dict[str, Any] = {"url": url}
    elif response_format == "b64_json":
        payload = {"b64": base64.b64encode(png).decode("ascii")}
    else:
        payload = {"data": png}
    return OutEvent(EventType.IMAGE, {"index": index, "format": "png", **payload})


def error_event(message: str, code: ErrorCode = ErrorCode.MODEL_ERROR) -> OutEvent:
    return OutEvent(EventType.ERROR, {"code": code, "message": message})


class Tracked(Protocol):
    """What the loop needs of an in-flight request an engine holds (an LLM Sequence, an image job)."""

    request_id: str
    priority: Priority  # the request's level (from the stream it was read from), set by the engine's add()
    # The loop's bookkeeping, set at admission; engines never read them.
    entry_id: Any  # worker.streams.EntryRef
    num_deliveries: int
    next_seq: int
    is_stream: bool
    task: str


class Output(Protocol):
    """One step's result for one request."""

    seq: Tracked
    error: str | None

    @property
    def is_finished(self) -> bool: ...

    @property
    def num_tokens(self) -> int:
        """Tokens produced (0 for outputs that produce none): the heartbeat's and metrics' counter."""

    def events(self) -> Iterator[OutEvent]:
        """The events to publish for this output, in order."""
