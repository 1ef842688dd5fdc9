"""OpenAI request bodies (chat, completions, images) and their translation into protocol-v1 requests.

The HTTP models are lenient where OpenAI is (ints for floats) and strict about names: an unknown
field is a 400, as in OpenAI's API. What they carry is then validated once more, by the wire models
(producer.submit.build_body), so the gateway accepts exactly what a worker accepts.

Beyond OpenAI's fields a request may carry the sampling keys redbatch knows (`top_k`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos`), `request_id` (the id to abort it by) and
`deadline_ms` (unix ms: not started by then is a 504), at the top level (the OpenAI SDK's
`extra_body`, or an Xinference client's `generate_config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from producer.gateway.errors import HTTPError
from producer.protocol import TaskKind


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields chat and completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    # redbatch extensions
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    request_id: str | None = None
    deadline_ms: int | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> "_Sampling":
        if self.n not in (None, 1):
            raise HTTPError(400, "n > 1 is not supported: send n requests", param="n", code="unsupported_value")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise HTTPError(400, f"{name} is not supported (use repetition_penalty)", param=name,
                                code="unsupported_value")
        if self.logit_bias:
            raise HTTPError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_value")
        return self

    def sampling_config(self) -> dict[str, Any]:
        names = ("max_tokens", "temperature", "top_p", "stop", "seed", "top_k", "repetition_penalty",
                 "stop_token_ids", "ignore_eos", "request_id")
        config = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        config["stream"] = bool(self.stream)
        return config

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionBody(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; the model may make several calls either way
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionBody":
        if self.top_logprobs is not None and not self.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return self

    def to_request(self) -> "Translated":
        config = self.sampling_config()
        if self.max_completion_tokens is not None:
            config["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            config["logprobs"] = self.top_logprobs or 0
        if self.response_format is not None:
            config["response_format"] = self.response_format
        payload: dict[str, Any] = {"messages": self.messages}
        if self.tools is not None:
            payload["tools"] = self.tools
        if self.tool_choice is not None:
            payload["tool_choice"] = self.tool_choice
        return Translated(TaskKind.CHAT, self.model, payload, config, self)


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None  # the legacy API: an int, the number of alternatives
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_legacy(self) -> "CompletionBody":
        if self.echo:
            raise HTTPError(400, "echo is not supported", param="echo", code="unsupported_value")
        if self.suffix:
            raise HTTPError(400, "suffix is not supported", param="suffix", code="unsupported_value")
        if self.best_of not in (None, 1):
            raise HTTPError(400, "best_of > 1 is not supported", param="best_of", code="unsupported_value")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise HTTPError(400, "a list of prompts is not supported: send one request per prompt", param="prompt",
                            code="unsupported_value")
        return self

    def to_request(self) -> "Translated":
        config = self.sampling_config()
        if self.logprobs is not None:
            config["logprobs"] = self.logprobs
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        payload = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
        return Translated(TaskKind.GENERATE, self.model, payload, config, self)


class ImageBody(_Body):
    """OpenAI's images/generations, plus the diffusion keys (`num_inference_steps`, ...) and Xinference's
    `kwargs` (a JSON string with those keys)."""

    model: str
    prompt: str
    n: int | None = 1
    size: str | None = None  # "1024x1024" (OpenAI) or "1024*1024" (Xinference)
    response_format: Literal["url", "b64_json"] | None = "url"
    quality: str | None = None  # accepted, no effect
    style: str | None = None  # accepted, no effect
    user: str | None = Field(None, max_length=256)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    request_id: str | None = None
    deadline_ms: int | None = None
    kwargs: str | dict[str, Any] | None = None

    def to_request(self) -> "Translated":
        extra = _image_kwargs(self.kwargs)
        payload: dict[str, Any] = {"prompt": self.prompt, "n": self.n or 1, "response_format": "b64_json"}
        if self.size:
            payload["size"] = self.size.replace("x", "*")
        for name in ("num_inference_steps", "guidance_scale", "seed", "negative_prompt"):
            value = extra.pop(name, None) if getattr(self, name) is None else getattr(self, name)
            if value is not None:
                payload[name] = value
        request_id = self.request_id or extra.pop("request_id", None)
        if extra:
            raise HTTPError(400, f"Unrecognized request argument supplied: kwargs.{sorted(extra)[0]}", param="kwargs")
        return Translated(TaskKind.TEXT_TO_IMAGE, self.model, payload, None, self, image_request_id=request_id)


def _image_kwargs(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise HTTPError(400, "kwargs is not valid JSON", param="kwargs", code="invalid_value") from None
    if not isinstance(raw, dict):
        raise HTTPError(400, "kwargs must be a JSON object", param="kwargs", code="invalid_value")
    return dict(raw)


@dataclass
class Translated:
    """One HTTP request as a protocol request: task, model, body payload, generate_config and the HTTP body."""

    task: TaskKind
    model: str
    payload: dict[str, Any]
    generate_config: dict[str, Any] | None
    body: Any = field(repr=False)
    image_request_id: str | None = None  # a text_to_image body has no generate_config to carry its id

    @property
    def request_id(self) -> str | None:
        """The id the client chose, if any."""
        return self.image_request_id or (self.generate_config or {}).get("request_id")

    @property
    def is_stream(self) -> bool:
        return bool(getattr(self.body, "stream", False))

    @property
    def user(self) -> str | None:
        return getattr(self.body, "user", None)

    @property
    def deadline_ms(self) -> int | None:
        return getattr(self.body, "deadline_ms", None)
