"""OpenAI Batch lines in, OpenAI batch output lines out: parsing, body translation, result shaping.

Pure functions (no Redis, no rq). An input line is `{"custom_id", "method", "url", "body"}`; every
problem with one line is a LineError that becomes that line's output `error`, never a failed job.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from producer.protocol import (
    ChatBody,
    Event,
    EventType,
    GenerateBody,
    GenerateConfig,
    TaskKind,
    TextToImageBody,
)
from producer.results import Shaper

URL_TASKS = {
    "/v1/chat/completions": TaskKind.CHAT,
    "/v1/completions": TaskKind.GENERATE,
    "/v1/images/generations": TaskKind.TEXT_TO_IMAGE,
}
MAX_CUSTOM_ID_CHARS = 512
# redbatch generate_config keys an OpenAI body may also carry (extensions, passed through)
_EXTENSIONS = ("top_k", "repetition_penalty", "stop_token_ids", "ignore_eos")
# OpenAI fields with no effect on a batch result: accepted and dropped
_IGNORED = ("model", "user", "metadata", "store", "service_tier", "stream_options")
# OpenAI fields accepted only at their neutral value: (field, values that mean "off")
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "stream": (None, False), "n": (None, 1), "parallel_tool_calls": (None, True),
}
_CHAT_FIELDS = {"messages", "max_completion_tokens", "max_tokens", "logprobs", "top_logprobs", "response_format",
                "tools", "tool_choice", "stop", "seed", "temperature", "top_p", *_EXTENSIONS, *_IGNORED, *_NEUTRAL}
_COMPLETION_NEUTRAL = {"best_of": (None, 1), "echo": (None, False), "suffix": (None,)}
_COMPLETION_FIELDS = {"prompt", "max_tokens", "logprobs", "stop", "seed", "temperature", "top_p",
                      *_EXTENSIONS, *_IGNORED, *_NEUTRAL, *_COMPLETION_NEUTRAL} - {"parallel_tool_calls"}
_IMAGE_FIELDS = {"prompt", "n", "size", "response_format", "quality", "style", "seed", "num_inference_steps",
                 "guidance_scale", "negative_prompt", "model", "user"}


class LineError(Exception):
    """One input line that cannot be served; `code` and `message` go into its output line's `error`."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BatchLine:
    """One valid input line, translated into a redbatch request body."""

    index: int  # 0-based among the file's non-blank lines
    custom_id: str
    url: str
    task: TaskKind
    body: GenerateBody | ChatBody | TextToImageBody


def line_key(custom_id: str | None, index: int) -> str:
    """What identifies a line across runs: its custom_id, or its position when it has no usable one."""
    return custom_id if custom_id is not None else f"#line:{index}"


def output_id(job_id: str, key: str) -> str:
    return "batch_req_" + hashlib.sha256(f"{job_id}\0{key}".encode()).hexdigest()[:24]


def read_custom_id(raw: Any) -> str | None:
    custom_id = raw.get("custom_id") if isinstance(raw, dict) else None
    if isinstance(custom_id, str) and 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        return custom_id
    return None


def parse_json_line(text: str | bytes) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise LineError(f"line is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise LineError("line must be a JSON object")
    return raw


def translate(raw: dict[str, Any], index: int) -> BatchLine:
    """A parsed input line as a redbatch request. Raises LineError naming what is wrong."""
    unknown = sorted(set(raw) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise LineError(f"unknown line field(s) {unknown}; a line has custom_id, method, url, body")
    custom_id = read_custom_id(raw)
    if custom_id is None:
        raise LineError(f"custom_id must be a string of 1-{MAX_CUSTOM_ID_CHARS} characters")
    if raw.get("method", "POST") != "POST":
        raise LineError(f"method must be POST, not {raw.get('method')!r}")
    url = raw.get("url")
    if url not in URL_TASKS:
        raise LineError(f"unknown url {url!r}; served: {', '.join(URL_TASKS)}")
    body = raw.get("body")
    if not isinstance(body, dict):
        raise LineError("body must be a JSON object")
    task = URL_TASKS[url]
    try:
        translated = _TRANSLATORS[task](body)
    except ValidationError as exc:
        raise LineError(f"invalid body: {_short(exc)}") from None
    except ValueError as exc:
        raise LineError(str(exc)) from None
    return BatchLine(index=index, custom_id=custom_id, url=url, task=task, body=translated)


def _check_fields(body: dict[str, Any], allowed: set[str], neutral: dict[str, tuple[Any, ...]]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise LineError(f"unknown body field(s) {unknown}")
    for name, off in neutral.items():
        if name in body and not any(_same(body[name], v) for v in off):
            raise LineError(f"body field {name!r}={json.dumps(body[name])} is not supported (allowed: "
                            f"{', '.join(json.dumps(v) for v in off)})")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # True is not 1 here


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """The generate_config keys common to chat and completions."""
    config = {k: body[k] for k in ("stop", "seed", "temperature", "top_p", *_EXTENSIONS) if body.get(k) is not None}
    config["stream"] = False  # one terminal event per request: all a batch needs
    return config


def _chat(body: dict[str, Any]) -> ChatBody:
    _check_fields(body, _CHAT_FIELDS, _NEUTRAL)
    config = _sampling(body)
    max_tokens = _max_tokens(body.get("max_completion_tokens"), body.get("max_tokens"))
    if max_tokens is not None:
        config["max_tokens"] = max_tokens
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs not in (None, True, False):
        raise LineError("logprobs must be a boolean")
    if top is not None and logprobs is not True:
        raise LineError("top_logprobs needs logprobs: true")
    if logprobs:
        config["logprobs"] = 0 if top is None else top
    if body.get("response_format") is not None:
        config["response_format"] = body["response_format"]
    payload: dict[str, Any] = {"messages": body.get("messages"), "generate_config": GenerateConfig.model_validate(config)}
    for name in ("tools", "tool_choice"):
        if body.get(name) is not None:
            payload[name] = body[name]
    return ChatBody.model_validate(payload)


def _completion(body: dict[str, Any]) -> GenerateBody:
    _check_fields(body, _COMPLETION_FIELDS, {**_NEUTRAL, **_COMPLETION_NEUTRAL})
    config = _sampling(body)
    if body.get("max_tokens") is not None:
        config["max_tokens"] = body["max_tokens"]
    if body.get("logprobs") is not None:  # completions: an int, the number of top logprobs per token
        config["logprobs"] = body["logprobs"]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise LineError(f"prompt holds {len(prompt)} prompts; one line serves one prompt")
        prompt = prompt[0]
    key = "prompt_token_ids" if isinstance(prompt, list) else "prompt"
    return GenerateBody.model_validate({key: prompt, "generate_config": GenerateConfig.model_validate(config)})


def _image(body: dict[str, Any]) -> TextToImageBody:
    _check_fields(body, _IMAGE_FIELDS, {"response_format": (None, "b64_json"), "quality": (None, "standard", "auto"),
                                        "style": (None,)})
    payload = {k: body[k] for k in ("prompt", "n", "seed", "num_inference_steps", "guidance_scale", "negative_prompt")
               if body.get(k) is not None}
    size = body.get("size")
    if size is not None:
        if not isinstance(size, str) or size.count("x") != 1 or not all(p.isdigit() for p in size.split("x")):
            raise LineError(f"size must be 'WIDTHxHEIGHT', not {size!r}")
        payload["size"] = size.replace("x", "*")
    return TextToImageBody.model_validate(payload)


def _max_tokens(max_completion_tokens: Any, max_tokens: Any) -> Any:
    if max_completion_tokens is not None and max_tokens is not None and max_completion_tokens != max_tokens:
        raise LineError("max_completion_tokens and max_tokens differ; give one")
    return max_completion_tokens if max_completion_tokens is not None else max_tokens


_TRANSLATORS = {TaskKind.CHAT: _chat, TaskKind.GENERATE: _completion, TaskKind.TEXT_TO_IMAGE: _image}


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------- output lines


def error_line(line_id: str, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": line_id, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


def result_line(line_id: str, line: BatchLine, request_id: str, model: str, events: list[Event]) -> dict[str, Any]:
    """The output line of a request from its events (the terminal one last)."""
    terminal = events[-1]
    if terminal.type == EventType.ERROR:
        return error_line(line_id, line.custom_id, terminal.code or "error", terminal.message or "request failed")
    if terminal.type == EventType.ABORTED:
        return error_line(line_id, line.custom_id, "aborted", f"request {request_id} was aborted")
    if line.task == TaskKind.TEXT_TO_IMAGE:
        body = _image_body(events)
    else:
        body = _completion_body(line, request_id, model, terminal)
    return {"id": line_id, "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def _completion_body(line: BatchLine, request_id: str, model: str, done: Event) -> dict[str, Any]:
    out = Shaper(request_id, model, line.task).completion(done)
    choice = out["choices"][0]
    rows = done.logprobs
    if line.task == TaskKind.CHAT:
        out["id"] = f"chatcmpl-{request_id}"
        choice["message"].setdefault("refusal", None)
        choice["logprobs"] = None if rows is None else {"content": [_chat_logprob(r) for r in rows], "refusal": None}
    else:
        out["id"] = f"cmpl-{request_id}"
        choice["logprobs"] = None if rows is None else _completion_logprobs(rows)
    out["system_fingerprint"] = None
    return out


def _chat_logprob(row: dict[str, Any]) -> dict[str, Any]:
    token = row.get("token", "")
    tops = [{"token": t.get("token", ""), "logprob": t["logprob"], "bytes": list(t.get("token", "").encode())}
            for t in row.get("top_logprobs", [])]
    return {"token": token, "logprob": row["logprob"], "bytes": list(token.encode()), "top_logprobs": tops}


def _completion_logprobs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Legacy completions shape: parallel lists, text_offset counted in characters of the output."""
    offsets, at = [], 0
    for row in rows:
        offsets.append(at)
        at += len(row.get("token", ""))
    return {"tokens": [r.get("token", "") for r in rows], "token_logprobs": [r["logprob"] for r in rows],
            "top_logprobs": [{t.get("token", ""): t["logprob"] for t in r.get("top_logprobs", [])} for r in rows],
            "text_offset": offsets}


def _image_body(events: list[Event]) -> dict[str, Any]:
    images = sorted((e for e in events if e.type == EventType.IMAGE), key=lambda e: e.index or 0)
    data = [{"b64_json": e.b64 if e.b64 is not None else base64.b64encode(e.data or b"").decode()} for e in images]
    return {"created": int(time.time()), "data": data}
