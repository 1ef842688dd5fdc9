"""What the sync and async clients share: building entries and the enqueue script.

Everything here is free of I/O: a client prepares a Submission, runs its two Redis calls (the
live-worker count, the enqueue script) with its own connection, sync or async, and hands the
replies back to the helpers here.
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from producer.errors import (
    DuplicateRequest,
    InvalidRequest,
    NoLiveWorker,
    NoLiveWorkerWarning,
    QueueFull,
    UnknownModel,
    UnsupportedTask,
)
from producer.keys import DEFAULT_PRIORITY, Keys, Priority, check_model_name, check_priority, check_request_id
from producer.protocol import (  # noqa: F401 - the TTL defaults are re-exported for the clients
    DEFAULT_HEARTBEAT_TTL_S,
    DEFAULT_RESULT_TTL_S,
    Body,
    ChatBody,
    GenerateBody,
    GenerateConfig,
    ModelRegistration,
    TaskKind,
    TextToImageBody,
    encode_request,
)

RECONNECT_DELAY_S = 0.25  # a reader's wait before it asks a Redis that went away again
NO_LIVE_WORKER_POLICIES = ("error", "warn", "ignore")

# Enqueue in one atomic step: refuse an id that is queued, running or finished within the result
# TTL, refuse when the stream holds max_len entries, else XADD and record which entry owns the id.
# KEYS[1] = request stream, KEYS[2] = the id's owner key (same slot)
# ARGV[1] = max_len (0 = unbounded), ARGV[2] = owner TTL in seconds, ARGV[3..] = field, value, ...
ENQUEUE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {err = 'DUPLICATE ' .. KEYS[2]}
end
local max_len = tonumber(ARGV[1])
if max_len > 0 and redis.call('XLEN', KEYS[1]) >= max_len then
  return {err = 'QUEUEFULL ' .. KEYS[1]}
end
local args = {}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(args))
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[2]))
return id
"""


@dataclass(frozen=True)
class ModelInfo:
    """What a model's workers registered in the models hash (Keys.models())."""

    name: str
    registration: ModelRegistration

    @classmethod
    def parse(cls, name: str, raw_json: bytes | str | None) -> "ModelInfo":
        if raw_json is None:
            raise UnknownModel(f"no worker has ever registered model {name!r}; start one with `redbatch worker --model-name {name} ...`")
        return cls(name=name, registration=ModelRegistration.parse(raw_json))

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.registration.tasks)

    @property
    def max_queue_len(self) -> int:
        return self.registration.max_queue_len

    @property
    def heartbeat_ttl_s(self) -> int:
        return self.registration.heartbeat_ttl_s

    def live_since_ms(self, now_ms: int | None = None) -> int:
        """Heartbeats at or after this time (unix ms) count as live: the model's workers zset ZCOUNT lower bound."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now - self.heartbeat_ttl_s * 1000

    def check_task(self, task: TaskKind) -> None:
        if self.tasks and task.value not in self.tasks:
            raise UnsupportedTask(f"model {self.name!r} serves {list(self.tasks)}, not {task.value!r}")


def check_no_live_worker_policy(policy: str) -> str:
    if policy not in NO_LIVE_WORKER_POLICIES:
        raise ValueError(f"on_no_live_worker must be one of {', '.join(NO_LIVE_WORKER_POLICIES)}, not {policy!r}")
    return policy


def handle_live_workers(policy: str, model: str, live: int) -> None:
    """Act on a submit to a model with `live` live workers under the client's on_no_live_worker policy."""
    if live > 0 or policy == "ignore":
        return
    message = (f"model {model!r} has no live worker (none heartbeated within its heartbeat TTL); "
               f"the request would wait until one starts: `redbatch worker --model-name {model} ...`")
    if policy == "error":
        raise NoLiveWorker(message)
    warnings.warn(message, NoLiveWorkerWarning, stacklevel=4)


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Submission:
    """One request ready to enqueue: the enqueue script's keys and arguments, and where to count live workers."""

    model: str
    request_id: str
    script_keys: list[str]
    script_args: list[str]
    workers_key: str  # the model's workers zset: ZCOUNT workers_key live_since +inf = live workers
    live_since_ms: int
    max_queue_len: int

    @classmethod
    def prepare(cls, keys: Keys, info: ModelInfo, task: TaskKind, payload: dict[str, Any],
                generate_config: dict[str, Any] | None, deadline_ms: int | None, owner_ttl_s: int,
                request_id: str | None = None, user: str | None = None,
                priority: Priority | str = DEFAULT_PRIORITY,
                new_id: Callable[[], str] = new_request_id) -> "Submission":
        """request_id: a text_to_image request's id (generate/chat carry theirs in generate_config); `new_id`
        draws the id of a request that names none."""
        info.check_task(task)
        priority = request_priority(priority)
        request_id, body = build_body(task, payload, generate_config, request_id, new_id)
        return cls(model=info.name, request_id=request_id,
                   script_keys=[keys.requests(info.name, priority), keys.request_owner(info.name, request_id)],
                   script_args=enqueue_args(request_id, task, body, info.max_queue_len, deadline_ms, owner_ttl_s, user),
                   workers_key=keys.model_workers(info.name), live_since_ms=info.live_since_ms(),
                   max_queue_len=info.max_queue_len)

    def refusal(self, exc: Exception) -> Exception:
        """The typed error for the enqueue script's refusal `exc` (or `exc` itself)."""
        return enqueue_error(exc, self.model, self.request_id, self.max_queue_len)


def chat_payload(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 tool_choice: str | dict[str, Any] | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"messages": messages}
    if tools is not None:
        payload["tools"] = tools
    if tool_choice is not None:
        payload["tool_choice"] = tool_choice
    return payload


def wants_stream(generate_config: dict[str, Any] | None) -> bool:
    return (generate_config or {}).get("stream", True) is not False


def decode_models(raw: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """The models hash (HGETALL Keys.models()) as name -> registration dict."""
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def build_body(task: TaskKind, payload: dict[str, Any], generate_config: dict[str, Any] | None,
               request_id: str | None = None, new_id: Callable[[], str] = new_request_id) -> tuple[str, Body]:
    """Validate a call's arguments into a wire body; returns (request_id, body). A text_to_image body has
    no generate_config: its id comes from `request_id`. A generate/chat id comes from either
    `generate_config["request_id"]` or `request_id` (both given, they must agree)."""
    try:
        if task == TaskKind.TEXT_TO_IMAGE:
            if generate_config:
                raise InvalidRequest("text_to_image takes no generate_config")
            return (request_key_id(request_id) if request_id else new_id()), TextToImageBody.model_validate(payload)
        generate_config = dict(generate_config or {})
        if request_id is not None:
            named = generate_config.setdefault("request_id", request_id)
            if named != request_id:
                raise InvalidRequest(f"request_id {request_id!r} differs from generate_config's {named!r}")
        config = GenerateConfig.model_validate(generate_config)
        request_id = config.request_id or new_id()
        if task == TaskKind.GENERATE:
            body: Body = GenerateBody.model_validate({**payload, "generate_config": config})
        elif task == TaskKind.CHAT:
            body = ChatBody.model_validate({**payload, "generate_config": config})
        else:
            raise InvalidRequest(f"task {task.value!r} is not built by this helper")
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidRequest(str(exc)) from None
    return request_id, body


def image_payload(prompt: str, n: int, size: str, response_format: str, **options: Any) -> dict[str, Any]:
    """A text_to_image body from Xinference-style arguments (options left None are left out)."""
    return {"prompt": prompt, "n": n, "size": size, "response_format": response_format,
            **{k: v for k, v in options.items() if v is not None}}


def prompt_payload(prompt: str | list[int]) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"prompt_token_ids": list(prompt)}


def enqueue_args(request_id: str, task: TaskKind, body: Body, max_queue_len: int, deadline_ms: int | None,
                 owner_ttl_s: int = DEFAULT_RESULT_TTL_S, user: str | None = None) -> list[str]:
    fields = encode_request(request_id, task, body, deadline_ms=deadline_ms, user=user)
    args: list[str] = [str(max_queue_len), str(owner_ttl_s)]
    for name, value in fields.items():
        args += [name, value]
    return args


def model_key_name(name: str) -> str:
    try:
        return check_model_name(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def enqueue_error(exc: Exception, model: str, request_id: str, max_queue_len: int) -> Exception:
    """The typed error for a refusal by the enqueue script, or the exception itself."""
    message = str(exc)
    if message.startswith("QUEUEFULL"):
        return QueueFull(f"model {model!r} has {max_queue_len} queued requests; retry later")
    if message.startswith("DUPLICATE"):
        return DuplicateRequest(f"request id {request_id!r} is already queued, running or recently finished")
    return exc


def request_priority(priority: Priority | str) -> Priority:
    try:
        return check_priority(priority)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def request_key_id(request_id: str) -> str:
    try:
        return check_request_id(request_id)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
