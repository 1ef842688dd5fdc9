"""Tool-call parsers: a model's released text in, OpenAI content and `tool_calls` out, as it streams.

One parser per request, fed the text the engine releases (after stop strings). Invariants:

- Markup never reaches content. Text that could still be the start of a call (a prefix of a start
  marker, and the whitespace before it) is held back until it is decided.
- Output depends only on the text, never on how it was split into deltas: feeding it char by char or
  in one piece gives the same concatenated content and deltas. Nothing released is ever taken back.
- A call is released once it is complete and valid (its closing marker, or the end of its JSON
  value): one delta per call with id, type, name and the whole arguments string. A block that turns
  out malformed (bad JSON, wrong shape, unterminated at the end) is released as plain content, markers
  included, so no half call is ever streamed and nothing raises.
- Calls to a name that is not in `tools` are still returned (as vLLM does): the caller sees what the
  model asked for and can answer with a tool error. `tools` only types GLM-4 argument values.
- Whitespace between a call and its neighbours is a separator, not content; so is trailing
  whitespace of an output that made a call.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

FORMATS = ("hermes", "llama3_json", "mistral", "glm4")
Call = tuple[str, dict[str, Any]]  # (function name, arguments)


def call_id(request_id: str, index: int) -> str:
    """Deterministic per request, so a resumed request reproduces the ids it already published."""
    return "call_" + hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:24]


class ToolParser:
    """Content mode scans for a start marker; call mode waits for `_call_end`, then `_parse_call` decides."""

    start_markers: tuple[str, ...] = ()
    delimiters: tuple[str, ...] = ()  # markup that must survive detokenization when it is a special token

    def __init__(self, request_id: str, tools: list[dict[str, Any]] | None = None):
        self.request_id = request_id
        self.schemas = _parameter_schemas(tools or [])
        self.calls: list[dict[str, Any]] = []  # OpenAI tool_calls, in order
        self.content = ""  # all content released so far
        self._buf = ""  # text received and not yet decided
        self._in_call = False  # _buf starts with a call block (leading whitespace, marker, ...)
        self._after_call = False  # the last thing released was a call: leading whitespace is a separator
        self._scan: _JsonEnd | None = None

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """New text in; the content and tool-call deltas that are decided now."""
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
        """End of output: everything held back is decided. Returns (content, deltas, all tool_calls)."""
        content, deltas = self._drain(final=True)
        return content, deltas, [dict(c) for c in self.calls]

    # ------------------------------------------------------------ the scan

    def _drain(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        num_before, deltas = len(self.content), []
        while True:
            if not self._in_call:
                start = self._call_start(self._buf)
                if start is None:
                    self._release(len(self._buf) if final else self._hold_from(self._buf), final)
                    break
                self._release(start, False)
                self._in_call = True
            end = self._call_end(self._buf, final)
            if end is None:
                break
            raw, self._buf = self._buf[:end], self._buf[end:]
            self._in_call, self._scan = False, None
            calls = self._parse_call(raw)
            if calls is None:
                self.content += raw
                self._after_call = False
            else:
                deltas += [self._add_call(name, args) for name, args in calls]
                self._after_call = True
        return self.content[num_before:], deltas

    def _release(self, upto: int, final: bool) -> None:
        text, self._buf = self._buf[:upto], self._buf[upto:]
        if self._after_call:
            text = text.lstrip()
        if final and self.calls:
            text = text.rstrip()
        if text:
            self.content += text
            self._after_call = False

    def _add_call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        index = len(self.calls)
        function = {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}
        call = {"id": call_id(self.request_id, index), "type": "function", "function": function}
        self.calls.append(call)
        return {"index": index, **call, "function": dict(function)}

    # ------------------------------------------------------------ format hooks

    def _call_start(self, buf: str) -> int | None:
        """Where a call block starts in content text (its leading whitespace included), or None."""
        hits = [i for m in self.start_markers if (i := buf.find(m)) >= 0]
        if not hits:
            return None
        return _ws_start(buf, min(hits))

    def _hold_from(self, buf: str) -> int:
        """Content text from here on might still start a call: hold it back."""
        longest = 0
        for marker in self.start_markers:
            for k in range(min(len(marker) - 1, len(buf)), longest, -1):
                if buf.endswith(marker[:k]):
                    longest = k
                    break
        return _ws_start(buf, len(buf) - longest)

    def _call_end(self, buf: str, final: bool) -> int | None:
        """End of the call block at the start of buf; None while it may still grow. At the end of
        output an unterminated block ends where the text does (and then fails to parse)."""
        raise NotImplementedError

    def _parse_call(self, raw: str) -> list[Call] | None:
        """The calls in one block, or None when it is malformed (then it becomes content)."""
        raise NotImplementedError

    def _json_end(self, buf: str, start: int, final: bool) -> int | None:
        if self._scan is None:
            self._scan = _JsonEnd(start)
        end = self._scan.end(buf)
        if end is None and final:
            return len(buf)
        return end


class HermesParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call (Qwen, Hermes)."""

    start_markers = ("<tool_call>",)
    end_marker = "</tool_call>"
    delimiters = ("<tool_call>", "</tool_call>")

    def _call_end(self, buf: str, final: bool) -> int | None:
        i = buf.find(self.end_marker)
        if i >= 0:
            return i + len(self.end_marker)
        return len(buf) if final else None

    def _block_body(self, raw: str) -> str | None:
        raw = raw.lstrip()
        if not (raw.startswith(self.start_markers[0]) and raw.endswith(self.end_marker)):
            return None
        return raw[len(self.start_markers[0]) : -len(self.end_marker)]

    def _parse_call(self, raw: str) -> list[Call] | None:
        body = self._block_body(raw)
        call = _call_from_json(body) if body is not None else None
        return None if call is None else [call]


class Llama3JsonParser(ToolParser):
    """`<|python_tag|>{"name": ..., "parameters": {...}}`, calls separated by `;`. Without the tag, a JSON
    object is a call only when the whole output starts with it."""

    tag = "<|python_tag|>"
    start_markers = (tag,)
    delimiters = (tag,)
    _SEPARATOR = re.compile(r"\s*;\s*\{")
    _SEPARATOR_PREFIX = re.compile(r"\s*(;\s*)?")

    def _at_output_start(self) -> bool:
        return not self.content and not self.calls

    def _call_start(self, buf: str) -> int | None:
        if self._at_output_start() and buf.lstrip().startswith("{"):
            return 0
        if self._after_call and self._SEPARATOR.match(buf):
            return 0
        return super()._call_start(buf)

    def _hold_from(self, buf: str) -> int:
        if (self._at_output_start() and not buf.strip()) or (self._after_call and self._SEPARATOR_PREFIX.fullmatch(buf)):
            return 0
        return super()._hold_from(buf)

    def _call_end(self, buf: str, final: bool) -> int | None:
        i = _skip_ws(buf, 0)
        if buf.startswith(";", i):
            i = _skip_ws(buf, i + 1)
        if buf.startswith(self.tag, i):
            i = _skip_ws(buf, i + len(self.tag))
        if i == len(buf):
            return len(buf) if final else None
        if buf[i] != "{":
            return i  # a tag not followed by JSON (e.g. python code): the tag is content
        return self._json_end(buf, i, final)

    def _parse_call(self, raw: str) -> list[Call] | None:
        body = raw.strip()
        if body.startswith(";"):
            body = body[1:].lstrip()
        if body.startswith(self.tag):
            body = body[len(self.tag) :]
        call = _call_from_json(body, args_keys=("parameters", "arguments"))
        return None if call is None else [call]


class MistralParser(ToolParser):
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer `[TOOL_CALLS]NAME[ARGS]{...}`."""

    marker = "[TOOL_CALLS]"
    start_markers = (marker,)
    delimiters = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
    _NAME = re.compile(r"[A-Za-z0-9_.-]+")

    def _call_end(self, buf: str, final: bool) -> int | None:
        i = _skip_ws(buf, _skip_ws(buf, 0) + len(self.marker))
        if i == len(buf):
            return len(buf) if final else None
        if buf[i] == "[":
            return self._json_end(buf, i, final)
        args_at = buf.find("[ARGS]", i)
        if args_at < 0:
            return len(buf) if final else None
        j = _skip_ws(buf, args_at + len("[ARGS]"))
        if j == len(buf):
            return len(buf) if final else None
        if buf[j] != "{":
            return j
        return self._json_end(buf, j, final)

    def _parse_call(self, raw: str) -> list[Call] | None:
        body = raw.strip()[len(self.marker) :].strip()
        if body.startswith("["):
            items = _loads(body)
            if not isinstance(items, list) or not items:
                return None
            calls = [_call_from_obj(item) for item in items]
            return None if any(c is None for c in calls) else calls  # type: ignore[return-value]
        name, sep, args_text = body.partition("[ARGS]")
        name = name.partition("[CALL_ID]")[0].strip()
        args = _loads(args_text)
        if not sep or not self._NAME.fullmatch(name) or not isinstance(args, dict):
            return None
        return [(name, args)]


class Glm4Parser(HermesParser):
    """`<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...</tool_call>` (GLM-4.5/4.6/4.7);
    also `<tool_call>NAME\\n{json}</tool_call>`. A value is JSON when it parses (and its parameter is not
    typed `string` in the tool's schema), else the raw text."""

    delimiters = ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
    _PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
    _NAME = re.compile(r"[^\s<>{}]+")

    def _parse_call(self, raw: str) -> list[Call] | None:
        body = self._block_body(raw)
        if body is None:
            return None
        key_at = body.find("<arg_key>")
        if key_at >= 0:
            name, args = body[:key_at].strip(), self._pairs(body[key_at:], body[:key_at].strip())
        else:
            name, _, rest = body.strip().partition("\n")
            name, rest = name.strip(), rest.strip()
            args = _loads(rest) if rest else {}
        if not self._NAME.fullmatch(name) or not isinstance(args, dict):
            return None
        return [(name, args)]

    def _pairs(self, text: str, name: str) -> dict[str, Any] | None:
        args, pos = {}, 0
        while (match := self._PAIR.match(text, pos)) is not None:
            key, value = match.group(1).strip(), match.group(2)
            args[key] = self._value(name, key, value)
            pos = match.end()
        return args if text[pos:].strip() == "" else None

    def _value(self, name: str, key: str, value: str) -> Any:
        props = self.schemas.get(name, {}).get("properties")
        prop = props.get(key) if isinstance(props, dict) else None
        if isinstance(prop, dict) and prop.get("type") == "string":
            return value
        parsed = _loads(value)
        return value if parsed is _INVALID else parsed


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser, "glm4": Glm4Parser,
}


def make_parser(name: str, request_id: str, tools: list[dict[str, Any]] | None = None) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call format {name!r}; use one of {', '.join(FORMATS)}")
    return PARSERS[name](request_id, tools)


def detect_parser(tokenizer, model_config=None) -> str | None:
    """The format the model's chat template (or, without one, its vocabulary) writes tool calls in."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates (e.g. "default", "tool_use")
        template = "\n".join(str(t) for t in template.values())
    elif isinstance(template, list):
        template = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    for needle, name in (("<arg_key>", "glm4"), ("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
                         ("<|python_tag|>", "llama3_json"), ("ipython", "llama3_json")):
        if needle in template:
            return name
    vocab = set(getattr(tokenizer, "get_vocab", dict)())
    for needle, name in (("<arg_key>", "glm4"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3_json")):
        if needle in vocab:
            return name
    return None


def kept_special_ids(tokenizer, name: str) -> frozenset[int]:
    """Ids of the special tokens that spell this format's markup: they must survive skip_special_tokens."""
    delimiters = set(PARSERS[name].delimiters)
    return frozenset(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
                     if getattr(tok, "special", False) and getattr(tok, "content", str(tok)) in delimiters)


# ---------------------------------------------------------------- helpers

_INVALID = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _INVALID


def _call_from_json(text: str, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> Call | None:
    return _call_from_obj(_loads(text.strip()), args_keys)


def _call_from_obj(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = _loads(args)
    return (obj["name"], args) if isinstance(args, dict) else None


def _parameter_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    schemas = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            params = function.get("parameters")
            schemas[function["name"]] = params if isinstance(params, dict) else {}
    return schemas


def _ws_start(text: str, end: int) -> int:
    """Start of the whitespace run that ends at `end`."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


class _JsonEnd:
    """Where the JSON object or array starting at `start` ends, scanning a growing buffer once."""

    def __init__(self, start: int):
        self.pos, self.depth, self.in_string, self.escaped = start, 0, False, False

    def end(self, buf: str) -> int | None:
        for i in range(self.pos, len(buf)):
            c = buf[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = i + 1
                    return i + 1
        self.pos = len(buf)
        return None


class ToolCalling:
    """A worker's tool-call setup: the format its model writes (or None) and the special tokens of its markup."""

    def __init__(self, tokenizer, choice: str = "auto", model_config=None):
        if choice not in ("auto", "none", *FORMATS):
            raise ValueError(f"tool parser must be auto, none or one of {', '.join(FORMATS)}; got {choice!r}")
        self.format = detect_parser(tokenizer, model_config) if choice == "auto" else None if choice == "none" else choice
        self.keep_ids = kept_special_ids(tokenizer, self.format) if self.format else frozenset()

    def parser_for(self, request) -> ToolParser | None:
        """A parser for chat requests with tools whose tool_choice is not "none"; None for the rest."""
        body = request.body
        if self.format is None or not getattr(body, "tools", None) or getattr(body, "tool_choice", None) == "none":
            return None
        return make_parser(self.format, request.id, body.tools)
