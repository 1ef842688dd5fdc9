"""Events into OpenAI response bodies and SSE bytes, on top of producer.results.Shaper."""

from __future__ import annotations

import json
from typing import Any

from producer.protocol import Event, EventType, TaskKind
from producer.results import Shaper

DONE_LINE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event the way OpenAI writes them: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class StreamShaper:
    """The SSE chunks of one streamed chat or completion: OpenAI's chunk objects, usage as it sends it."""

    def __init__(self, shaper: Shaper, include_usage: bool):
        self.shaper = shaper
        self.include_usage = include_usage
        self._saw_tokens = False

    def chunks(self, event: Event) -> list[dict[str, Any]]:
        """The chunks for one event (often one, none for an empty delta). Raises on error/aborted events."""
        if event.type == EventType.DONE and not self._saw_tokens and event.text:
            # a stream that follows a request sent without stream (a retry by id): the text comes whole with `done`
            whole = Event(seq=event.seq, type=EventType.TOKEN, text=event.text)
            return self._one(whole) + self._one(event)
        return self._one(event)

    def _one(self, event: Event) -> list[dict[str, Any]]:
        self._saw_tokens = self._saw_tokens or event.type == EventType.TOKEN
        chunk = self.shaper.chunk(event)
        if chunk is None or _is_empty(chunk, event):
            return []
        usage = chunk.pop("usage", None)
        if self.shaper.task == TaskKind.GENERATE:
            _legacy_logprobs(chunk["choices"][0])
        if not self.include_usage:
            return [chunk]
        chunk["usage"] = None
        if event.type != EventType.DONE:
            return [chunk]
        # OpenAI's stream_options.include_usage: one more chunk, no choices, the request's usage
        return [chunk, {**{k: chunk[k] for k in ("id", "object", "created", "model")}, "choices": [], "usage": usage}]


def _is_empty(chunk: dict[str, Any], event: Event) -> bool:
    """A token event that adds nothing a client sees (held-back text): no chunk, as OpenAI sends none."""
    if event.type != EventType.TOKEN or event.logprobs:
        return False
    choice = chunk["choices"][0]
    return choice.get("delta", {"content": ""}) == {"content": ""} and not choice.get("text")


def completion(shaper: Shaper, done: Event) -> dict[str, Any]:
    out = shaper.completion(done, done.logprobs)
    if shaper.task == TaskKind.GENERATE:
        _legacy_logprobs(out["choices"][0])
    return out


def _legacy_logprobs(choice: dict[str, Any]) -> None:
    """/v1/completions has the legacy logprobs shape: parallel lists of tokens, logprobs, alternatives, offsets."""
    items = (choice.get("logprobs") or {}).get("content")
    if not items:
        return
    offsets, position = [], 0
    for item in items:
        offsets.append(position)
        position += len(item.get("token", ""))
    choice["logprobs"] = {
        "tokens": [item.get("token", "") for item in items],
        "token_logprobs": [item.get("logprob") for item in items],
        "top_logprobs": [{alt.get("token", ""): alt.get("logprob") for alt in item.get("top_logprobs", [])} for item in items],
        "text_offset": offsets,
    }


def with_data_urls(images: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `response_format: url` without files on the gateway: each image as a `data:` URL."""
    data = [{"url": f"data:image/png;base64,{d['b64_json']}"} if "b64_json" in d else d for d in images["data"]]
    return {**images, "data": data}
