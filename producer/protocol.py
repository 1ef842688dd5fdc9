"""Wire protocol v1: the flat stream fields of requests and events, as pydantic models.

A request is one entry of `<prefix>:{<model>}:requests`; its events are entries of
`<prefix>:req:{<id>}:events` (key names live in producer.keys). Every field value on the
wire is a string (JSON where it is structured), so any language can XADD and XREAD
them. See docs/protocol.md.
"""

from __future__ import annotations

import json
import math
import re
import time
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from producer.keys import DEFAULT_PRIORITY, PRIORITIES, Priority, check_request_id  # noqa: F401 - re-exported

PROTOCOL_VERSION = "1"
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_RESULT_TTL_S = 3600  # events streams, abort keys and id owners live this long (worker and client default)
DEFAULT_HEARTBEAT_TTL_S = 15  # a worker whose heartbeat is older is gone (also for registrations without the field)
_INT_RE = re.compile(r"-?[0-9]{1,19}")  # ASCII digits only; "--5" or "+5" must be a BadEntry, not a crash
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_USER_CHARS = 256  # the optional `user` entry field: who asked (OpenAI's `user`), for accounting; workers ignore it


class TaskKind(str, Enum):
    GENERATE = "generate"
    CHAT = "chat"
    TEXT_TO_IMAGE = "text_to_image"


class EventType(str, Enum):
    TOKEN = "token"
    IMAGE = "image"
    PROGRESS = "progress"
    DONE = "done"
    ERROR = "error"
    ABORTED = "aborted"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR, EventType.ABORTED})



class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"


class ErrorCode(str, Enum):
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_MODEL = "unknown_model"
    EXPIRED = "expired"
    MODEL_ERROR = "model_error"
    DEAD_LETTER = "dead_letter"
    UNSUPPORTED_TASK = "unsupported_task"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


# ---------------------------------------------------------------- per-request parameters


class JsonSchemaSpec(_Strict):
    """OpenAI's `response_format.json_schema`: the schema itself is checked by the worker's grammar compiler."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, serialize_by_alias=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} accepts any JSON value
    strict: bool | None = None  # true: properties the schema does not list are not allowed


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def model_post_init(self, _context: Any) -> None:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema' and allowed only there")

    @property
    def is_constrained(self) -> bool:
        return self.type != "text"


class GenerateConfig(_Strict):
    """Sampling and output parameters. Unknown keys are an error."""

    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=100.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)  # 0 = disabled
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=256)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = True
    request_id: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # None: none; N: chosen token + top N
    ignore_eos: bool = False  # extension: keep going past EOS (benchmarks, load tests)
    response_format: ResponseFormat | None = None  # structured output, enforced by a grammar (docs/protocol.md)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be 1-{MAX_STOP_CHARS} characters")
        return value

    @field_validator("request_id")
    @classmethod
    def _check_request_id(cls, value: str | None) -> str | None:
        return None if value is None else check_request_id(value)

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class ImageUrl(_Strict):
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None

    def model_post_init(self, _context: Any) -> None:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url'")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI shape; function.arguments a JSON string or an object
    tool_call_id: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _check_tool_calls(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, call in enumerate(value or []):
            _check_tool_call(call, f"tool_calls[{i}]")
        return value

    @model_validator(mode="after")
    def _check_roles(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        return self

    @property
    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.type == "image_url" for p in self.content)

    def as_template_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, mode="json")


class GenerateBody(_Strict):
    prompt: str | None = None
    prompt_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    generate_config: GenerateConfig = GenerateConfig()

    def model_post_init(self, _context: Any) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("exactly one of prompt and prompt_token_ids is required")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")


class ChatBody(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools, passed to the chat template as `tools`
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | {"type": "function", "function": {"name"}}
    generate_config: GenerateConfig = GenerateConfig()

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        names = [_check_tool(tool, f"tools[{i}]") for i, tool in enumerate(value or [])]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function")
        if isinstance(value, dict):
            function = value.get("function")
            if (set(value) != {"type", "function"} or value["type"] != "function" or not isinstance(function, dict)
                    or set(function) != {"name"} or not isinstance(function["name"], str)):
                raise ValueError('a named tool_choice is {"type": "function", "function": {"name": NAME}}')
        return value

    @model_validator(mode="after")
    def _check_choice_against_tools(self) -> "ChatBody":
        names = {t["function"]["name"] for t in self.tools or []}
        if self.tool_choice == "required" and not names:
            raise ValueError('tool_choice "required" needs tools')
        if isinstance(self.tool_choice, dict) and self.tool_choice["function"]["name"] not in names:
            raise ValueError(f"tool_choice names {self.tool_choice['function']['name']!r}, which is not in tools")
        return self


TOOL_CHOICES = ("none", "auto", "required")
_TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_tool(tool: Any, where: str) -> str:
    """An OpenAI function tool; returns its name."""
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ValueError(f'{where} must be {{"type": "function", "function": {{...}}}}')
    if set(tool) - {"type", "function"}:
        raise ValueError(f"{where} has unknown keys {sorted(set(tool) - {'type', 'function'})}")
    function = tool["function"]
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise ValueError(f"{where}.function has unknown keys {sorted(unknown)}")
    name = function.get("name")
    if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
        raise ValueError(f"{where}.function.name must be 1-64 characters of [A-Za-z0-9_.-]")
    if "description" in function and not isinstance(function["description"], str):
        raise ValueError(f"{where}.function.description must be a string")
    if "parameters" in function and not isinstance(function["parameters"], dict):
        raise ValueError(f"{where}.function.parameters must be a JSON schema object")
    if "strict" in function and not isinstance(function["strict"], bool):
        raise ValueError(f"{where}.function.strict must be a boolean")
    return name


def _check_tool_call(call: Any, where: str) -> None:
    """An assistant message's tool call: {"id", "type": "function", "function": {"name", "arguments"}}."""
    if not isinstance(call, dict) or set(call) != {"id", "type", "function"}:
        raise ValueError(f'{where} must have exactly "id", "type" and "function"')
    function = call["function"]
    if not isinstance(call["id"], str) or not call["id"] or call["type"] != "function" or not isinstance(function, dict):
        raise ValueError(f'{where} needs a string id, type "function" and a function object')
    if set(function) != {"name", "arguments"} or not isinstance(function["name"], str) or not function["name"]:
        raise ValueError(f"{where}.function must have exactly a non-empty name and arguments")
    arguments = function["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ValueError(f"{where}.function.arguments is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object (or a string holding one)")


class TextToImageBody(_Strict):
    prompt: str
    n: int = Field(1, ge=1, le=16)
    size: str = "1024*1024"
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    negative_prompt: str | None = None
    response_format: Literal["b64_json", "png", "url"] = "b64_json"  # url: a worker with an image output dir


Body = Union[GenerateBody, ChatBody, TextToImageBody]
_BODY_FOR_TASK: dict[TaskKind, type[_Strict]] = {
    TaskKind.GENERATE: GenerateBody,
    TaskKind.CHAT: ChatBody,
    TaskKind.TEXT_TO_IMAGE: TextToImageBody,
}


# ---------------------------------------------------------------- requests


class Request(_Strict):
    """One decoded entry of a model's request stream."""

    id: str
    task: TaskKind
    body: Body
    created_ms: int
    deadline_ms: int | None = None
    priority: Priority = DEFAULT_PRIORITY  # not a field of the entry: the level of the stream it was read from

    @property
    def generate_config(self) -> GenerateConfig:
        return getattr(self.body, "generate_config", GenerateConfig())

    @property
    def is_streamed(self) -> bool:
        """Whether events come before the terminal one: generate/chat follow `stream`; an image request
        always publishes its progress and image events (it has no generate_config)."""
        if isinstance(self.body, TextToImageBody):
            return True
        return self.generate_config.stream


class BadEntry(Exception):
    """A stream entry that cannot become a Request. `request_id` is set when it was readable."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_request(
    request_id: str,
    task: TaskKind,
    body: Body,
    *,
    created_ms: int | None = None,
    deadline_ms: int | None = None,
    user: str | None = None,
) -> dict[str, str]:
    fields = {
        "v": PROTOCOL_VERSION,
        "id": check_request_id(request_id),
        "task": TaskKind(task).value,
        "body": body.model_dump_json(exclude_defaults=True),
        "created": str(now_ms() if created_ms is None else created_ms),
    }
    if deadline_ms is not None:
        fields["deadline"] = str(deadline_ms)
    if user is not None:
        if len(user) > MAX_USER_CHARS:
            raise ValueError(f"user must be at most {MAX_USER_CHARS} characters")
        fields["user"] = user
    return fields


def _text(fields: dict[Any, Any], name: str) -> str | None:
    raw = fields.get(name.encode(), fields.get(name))
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadEntry(f"field {name!r} is not valid UTF-8") from exc
    return str(raw)


def _int_field(fields: dict[Any, Any], name: str, required: bool) -> int | None:
    raw = _text(fields, name)
    if raw is None:
        if required:
            raise BadEntry(f"missing field {name!r}")
        return None
    if not _INT_RE.fullmatch(raw):
        raise BadEntry(f"field {name!r} must be an integer (unix ms), got {raw[:40]!r}")
    return int(raw)


def read_request_id(fields: dict[Any, Any]) -> str | None:
    """The entry's id if it is present and valid, else None (such entries are dead-lettered)."""
    try:
        raw = _text(fields, "id")
        return None if raw is None else check_request_id(raw)
    except (BadEntry, ValueError):
        return None


def decode_request(fields: dict[Any, Any], max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                   priority: Priority = DEFAULT_PRIORITY) -> Request:
    """Validate a raw stream entry read from the stream of level `priority`. Raises BadEntry (with the id
    when it is readable)."""
    request_id = read_request_id(fields)
    if request_id is None:
        raise BadEntry("missing or invalid field 'id'")
    try:
        return _decode_fields(fields, request_id, max_body_bytes).model_copy(update={"priority": priority})
    except BadEntry as exc:
        exc.request_id = request_id
        raise


def _decode_fields(fields: dict[Any, Any], request_id: str, max_body_bytes: int) -> Request:
    version = _text(fields, "v")
    if version != PROTOCOL_VERSION:
        raise BadEntry(f"unsupported protocol version {str(version)[:16]!r}; this worker speaks v{PROTOCOL_VERSION}")
    task_name = _text(fields, "task")
    try:
        task = TaskKind(task_name)
    except ValueError:
        raise BadEntry(f"unknown task {str(task_name)[:40]!r}") from None
    raw_body = fields.get(b"body", fields.get("body"))
    if raw_body is None:
        raise BadEntry("missing field 'body'")
    num_body_bytes = len(raw_body.encode("utf-8", "surrogatepass") if isinstance(raw_body, str) else raw_body)
    if num_body_bytes > max_body_bytes:
        raise BadEntry(f"body is {num_body_bytes} bytes; the limit is {max_body_bytes}")
    body_text = _text(fields, "body")
    try:
        payload = json.loads(body_text)
    except json.JSONDecodeError as exc:
        raise BadEntry(f"body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except ValueError as exc:  # e.g. an integer literal past Python's digit limit
        raise BadEntry(f"body is not acceptable JSON: {exc}") from None
    except RecursionError:
        raise BadEntry("body JSON is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadEntry("body must be a JSON object")
    try:
        body = _BODY_FOR_TASK[task].model_validate(payload)
    except ValidationError as exc:
        raise BadEntry(f"invalid {task.value} body: {_short_errors(exc)}") from None
    except (ValueError, RecursionError) as exc:
        raise BadEntry(f"invalid {task.value} body: {exc}") from None
    config_id = getattr(body, "generate_config", GenerateConfig()).request_id
    if config_id is not None and config_id != request_id:
        raise BadEntry("generate_config.request_id differs from the entry's id")
    created = _int_field(fields, "created", required=True)
    deadline = _int_field(fields, "deadline", required=False)
    return Request(id=request_id, task=task, body=body, created_ms=created, deadline_ms=deadline)


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------- events


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Event(BaseModel):
    """One decoded event. Only the fields of its `type` are set."""

    model_config = ConfigDict(frozen=True)

    seq: int
    type: EventType
    text: str | None = None
    token_ids: list[int] | None = None
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: FinishReason | None = None
    tool_calls: list[dict[str, Any]] | None = None
    usage: Usage | None = None
    code: str | None = None
    message: str | None = None
    index: int | None = None
    format: str | None = None
    data: bytes | None = None
    b64: str | None = None
    url: str | None = None
    step: int | None = None
    total: int | None = None

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


_JSON_EVENT_FIELDS = ("token_ids", "logprobs", "tool_calls", "usage")
_INT_EVENT_FIELDS = ("index", "step", "total")


def encode_event(seq: int, type: EventType, **fields: Any) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = {"seq": str(seq), "type": EventType(type).value}
    for name, value in fields.items():
        if value is None:
            continue
        if name in _JSON_EVENT_FIELDS:
            out[name] = json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)
        elif isinstance(value, Enum):
            out[name] = value.value
        elif isinstance(value, bytes):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def decode_event(fields: dict[Any, Any]) -> Event:
    values: dict[str, Any] = {}
    for raw_key, raw_value in fields.items():
        key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        if key == "data":
            values[key] = raw_value if isinstance(raw_value, bytes) else str(raw_value).encode()
            continue
        text = raw_value.decode("utf-8", "replace") if isinstance(raw_value, bytes) else str(raw_value)
        if key in _JSON_EVENT_FIELDS:
            values[key] = json.loads(text)
        elif key in _INT_EVENT_FIELDS or key == "seq":
            values[key] = int(text)
        elif key in Event.model_fields:
            values[key] = text
    return Event.model_validate(values)


def event_stream_id(seq: int) -> str:
    """Explicit stream id of event `seq`: Redis refuses a second write of the same seq (fencing)."""
    return f"0-{seq + 1}"


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


# ---------------------------------------------------------------- the model registry and dead letters


class ModelRegistration(BaseModel):
    """One model's JSON in the `models` hash (docs/protocol.md §3), written by workers, read by producers.

    Unknown fields are kept (a newer worker may add some) and defaults stand in for fields an
    older worker did not write.
    """

    model_config = ConfigDict(extra="allow")

    tasks: list[str] = Field(default_factory=list)
    max_num_seqs: int = 0
    max_queue_len: int = 0  # 0: unbounded
    model_path: str = ""
    last_seen: int = 0  # unix ms of the latest heartbeat of any worker of the model
    live_workers: int = 0
    heartbeat_ttl_s: int = DEFAULT_HEARTBEAT_TTL_S

    @classmethod
    def parse(cls, raw: bytes | str) -> "ModelRegistration":
        return cls.model_validate_json(raw)

    def to_json(self) -> str:
        return self.model_dump_json()


# The metadata fields a worker adds to a dead-lettered entry (its other fields are the entry's own;
# an entry field that clashes with one of these is stored as orig_<name>).
DEAD_LETTER_META = ("reason", "entry_id", "worker", "ts", "priority")


def dead_letter_fields(entry: dict[Any, Any], reason: str, entry_id: str, worker: str, ts_ms: int,
                       priority: Priority = DEFAULT_PRIORITY) -> dict[str, bytes]:
    """The fields of a `dead` stream entry: the original entry's fields plus why, which entry (and the level
    of its stream), who and when."""
    out: dict[str, bytes] = {}
    for key, value in entry.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        out[f"orig_{name}" if name in DEAD_LETTER_META else name] = value if isinstance(value, bytes) else str(value).encode()
    out.update(reason=reason.encode(), entry_id=entry_id.encode(), worker=worker.encode(), ts=str(ts_ms).encode(),
               priority=Priority(priority).value.encode())
    return out


def split_dead_letter(raw: dict[Any, Any]) -> tuple[dict[str, str], dict[str, bytes]]:
    """(metadata, the original entry's fields) of a `dead` stream entry: dead_letter_fields reversed."""
    meta: dict[str, str] = {}
    fields: dict[str, bytes] = {}
    for key, value in raw.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        data = value if isinstance(value, bytes) else str(value).encode()
        if name in DEAD_LETTER_META:
            meta[name] = data.decode("utf-8", "replace")
        elif name.startswith("orig_") and name[len("orig_"):] in DEAD_LETTER_META:
            fields[name[len("orig_"):]] = data
        else:
            fields[name] = data
    return meta, fields
