"""Turning redbatch events into OpenAI-shaped completions and stream chunks.

Pure functions shared by the sync and async clients.
"""

from __future__ import annotations

import time
from typing import Any

from producer.errors import RequestAborted, error_from_event
from producer.protocol import Event, EventType, TaskKind


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
