"""Turning redbatch events into OpenAI-shaped completions and stream chunks.

Pure functions shared by the sync and async clients.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from producer.errors import RequestAborted, RequestTimeout, error_from_event
from producer.protocol import TERMINAL_EVENTS, Event, EventType, TaskKind, decode_event

READ_BLOCK_MS = 1000
READ_COUNT = 256


class Shaper:
    """Builds the OpenAI-shaped dicts of one request, chunk by chunk or whole."""

    def __init__(self, request_id: str, model: str, task: TaskKind):
        self.request_id = request_id
        self.model = model
        self.task = task
        self.created_s = int(time.time())
        self._sent_role = False
        self._streamed_calls: set[int] = set()  # indices of the tool calls whose deltas were yielded

    @property
    def _is_chat(self) -> bool:
        return self.task == TaskKind.CHAT

    def _envelope(self, object_name: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": object_name, "created": self.created_s, "model": self.model}

    def chunk(self, event: Event) -> dict[str, Any] | None:
        """The stream chunk for one event; None for events with nothing to show. Raises on error/abort."""
        check_terminal(event, self.request_id)
        if event.type == EventType.TOKEN:
            return self._delta_chunk(event.text or "", None, event)
        if event.type == EventType.DONE:
            out = self._delta_chunk("", event.finish_reason.value if event.finish_reason else None, event)
            out["usage"] = event.usage.model_dump() if event.usage else None
            return out
        return None

    def _delta_chunk(self, text: str, finish_reason: str | None, event: Event) -> dict[str, Any]:
        if self._is_chat:
            tool_calls = self._tool_call_deltas(event)
            delta: dict[str, Any] = {"content": text} if text or not (finish_reason or tool_calls) else {}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            out = self._envelope("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            out = self._envelope("text_completion")
        if event.logprobs is not None and event.type == EventType.TOKEN:
            choice["logprobs"] = {"content": event.logprobs}
        out["choices"] = [choice]
        return out

    def _tool_call_deltas(self, event: Event) -> list[dict[str, Any]]:
        """`token` events carry deltas (with `index`); `done` carries whole calls, sent here only when no
        token event streamed them (stream false, or a reader that starts at `done`)."""
        if event.type == EventType.TOKEN:
            deltas = event.tool_calls or []
        elif event.type == EventType.DONE:
            deltas = [{"index": i, **call} for i, call in enumerate(event.tool_calls or []) if i not in self._streamed_calls]
        else:
            return []
        self._streamed_calls.update(d["index"] for d in deltas if isinstance(d.get("index"), int))
        return deltas

    def completion(self, done: Event, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The whole completion from the terminal event. Raises on error/abort."""
        check_terminal(done, self.request_id)
        finish_reason = done.finish_reason.value if done.finish_reason else None
        if self._is_chat:
            message: dict[str, Any] = {"role": "assistant", "content": done.text or ""}
            if done.tool_calls:
                message["content"] = done.text or None  # OpenAI: null content beside tool calls
                message["tool_calls"] = done.tool_calls
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason}
            out = self._envelope("chat.completion")
        else:
            choice = {"index": 0, "text": done.text or "", "finish_reason": finish_reason, "logprobs": None}
            out = self._envelope("text_completion")
        if logprobs:
            choice["logprobs"] = {"content": logprobs}
        out["choices"] = [choice]
        out["usage"] = done.usage.model_dump() if done.usage else None
        return out


def check_terminal(event: Event, request_id: str) -> None:
    """Raise the exception an `error` or `aborted` event stands for."""
    if event.type == EventType.ERROR:
        raise error_from_event(event.code, event.message, request_id)
    if event.type == EventType.ABORTED:
        raise RequestAborted(request_id)


def image_list(request_id: str, events: list[Event]) -> dict[str, Any]:
    """Xinference's text_to_image result from a request's events: {"created", "data": [{"b64_json" | "url"}]},
    images in index order (raw PNG bytes are base64-encoded). Raises on error/abort."""
    import base64

    check_terminal(events[-1], request_id)
    data = []
    for event in sorted((e for e in events if e.type == EventType.IMAGE), key=lambda e: e.index or 0):
        if event.url is not None:
            data.append({"url": event.url})
        else:
            data.append({"b64_json": event.b64 if event.b64 is not None else base64.b64encode(event.data or b"").decode()})
    return {"created": int(time.time()), "data": data}


class EventCursor:
    """Where a reader of one request's events stream is: both clients run XREAD key after COUNT
    READ_COUNT BLOCK block_ms() in a loop and pass each reply to take(), until `is_done`."""

    def __init__(self, key: str, request_id: str, timeout_s: float | None, after: str = "0-0"):
        self.key = key
        self.request_id = request_id
        self.after = after
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.is_done = False

    def block_ms(self) -> int:
        if self.deadline is None:
            return READ_BLOCK_MS
        return max(1, min(READ_BLOCK_MS, int((self.deadline - time.monotonic()) * 1000)))

    def take(self, reply: Any) -> Iterator[Event]:
        """The events of one XREAD reply, in order, up to and including the terminal one.
        Raises RequestTimeout when the deadline passed without a terminal event."""
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.after = entry_id
                event = decode_event(fields)
                yield event
                if event.type in TERMINAL_EVENTS:
                    self.is_done = True
                    return
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise RequestTimeout(f"no result for request {self.request_id} within {self.timeout_s} s")


def has_finished(last_events: list[Any]) -> bool:
    """Whether the request's last event (XREVRANGE events COUNT 1) is terminal: nothing left to abort."""
    return bool(last_events) and decode_event(last_events[0][1]).is_terminal
