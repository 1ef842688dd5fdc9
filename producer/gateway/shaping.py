"""Events into OpenAI response bodies and SSE bytes, on top of producer.results.Shaper."""

from __future__ import annotations

import base64
import json
import time
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

    def chunks(self, event: Event) -> list[dict[str, Any]]:
        """The chunks for one event (often one, none for an empty delta). Raises on error/aborted events."""
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


class ImageCollector:
    """The `image` events of a text_to_image request, as OpenAI's (and Xinference's) images response."""

    def __init__(self, response_format: str):
        self.response_format = response_format  # url (a data: URL, the gateway keeps no files) | b64_json
        self.images: dict[int, str] = {}  # index -> base64 PNG

    def add(self, event: Event) -> None:
        if event.type != EventType.IMAGE:
            return
        b64 = event.b64 if event.b64 is not None else base64.b64encode(event.data or b"").decode("ascii")
        self.images[event.index or 0] = b64

    def response(self) -> dict[str, Any]:
        data = []
        for index in sorted(self.images):
            b64 = self.images[index]
            data.append({"b64_json": b64} if self.response_format == "b64_json" else {"url": f"data:image/png;base64,{b64}"})
        return {"created": int(time.time()), "data": data}
