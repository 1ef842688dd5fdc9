"""Grammar-constrained decoding: structured output (`response_format`) and enforced `tool_choice`.

A request's constraint becomes a GrammarSpec (its canonical JSON text is the cache key). The
worker compiles each spec once against the model's vocabulary with xgrammar (an LRU of compiled
grammars) and gives each constrained request its own matcher. In a step:

    after the forward is launched   fill one host bitmask [S, ceil(V/32)] int32: the constrained rows
                                    from their matchers (xgrammar's batch fill, threaded), the others
                                    all ones; special tokens stay masked except stop tokens
    before sample()                 one host->device copy, -inf on the masked logits of constrained rows
    after the device->host transfer each constrained row's matcher accepts its sampled token

On CUDA the host fill overlaps the forward that is still running on the device. A matcher never
rejects a token sampled under its own mask; if one ever does, that request fails alone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from producer.protocol import ChatBody, ErrorCode, Request, ResponseFormat
from worker.engines.base import RequestRejected

TOOL_FORMATS = ("hermes", "llama3_json", "mistral", "glm4")
MAX_CACHED_GRAMMARS = 128
MAX_WHITESPACE = 8  # consecutive whitespace chars between JSON elements: a weak model cannot pad forever
# special tokens that delimit tool calls in some vocabularies: they stay sampleable as the grammar's text
_TOOL_MARKERS = frozenset({"<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>",
                           "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"})
_THREADS = min(4, os.cpu_count() or 1)  # xgrammar compile / batch-fill threads
_INSTALL_HINT = "pip install 'redbatch[structured]'"


def is_available() -> bool:
    return importlib.util.find_spec("xgrammar") is not None


def _xgrammar():
    if not is_available():
        raise RequestRejected(ErrorCode.INVALID_REQUEST,
                              f"this worker cannot enforce grammars: xgrammar is not installed ({_INSTALL_HINT})")
    import xgrammar

    return xgrammar


def canonical_json(value: Any) -> str:
    """Compact JSON in the given key order (property order is meaningful: the grammar follows it)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# ---------------------------------------------------------------- what a request asks for


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # "json_schema" | "structural_tag"
    source: str  # canonical JSON of the schema or structural tag
    is_strict: bool = False  # json_schema: properties the schema does not list are forbidden
    max_whitespace: int = MAX_WHITESPACE  # json_schema (structural tags carry theirs in `source`)


def response_format_grammar(response_format: ResponseFormat | None, max_whitespace: int = MAX_WHITESPACE
                            ) -> GrammarSpec | None:
    if response_format is None or not response_format.is_constrained:
        return None
    if response_format.type == "json_object":
        return GrammarSpec("json_schema", canonical_json({"type": "object"}), max_whitespace=max_whitespace)
    spec = response_format.json_schema
    return GrammarSpec("json_schema", canonical_json(spec.schema_), is_strict=bool(spec.strict),
                       max_whitespace=max_whitespace)


def request_grammar(request: Request, tool_format: str | None, max_whitespace: int = MAX_WHITESPACE
                    ) -> GrammarSpec | None:
    """The request's constraint, if any; RequestRejected for a constraint it cannot have.
    `tool_format`: the worker's tool-call format (None: its model has none)."""
    cfg = request.generate_config
    spec = response_format_grammar(cfg.response_format, max_whitespace)
    body = request.body
    if isinstance(body, ChatBody) and body.tool_choice not in _FREE_CHOICES:
        if spec is not None:
            raise RequestRejected(ErrorCode.INVALID_REQUEST,
                                  "response_format cannot be combined with tool_choice 'required' or a named function")
        spec = tool_call_grammar(tool_format, body.tools, body.tool_choice, max_whitespace)
    if spec is not None and cfg.ignore_eos:
        raise RequestRejected(ErrorCode.INVALID_REQUEST,
                              "ignore_eos cannot be combined with a grammar (it ends on a stop token)")
    return spec


# ---------------------------------------------------------------- enforced tool_choice


_FREE_CHOICES = (None, "auto", "none")


def tool_call_grammar(format_name: str | None, tools: list[dict] | None, tool_choice: str | dict | None,
                      max_whitespace: int = MAX_WHITESPACE) -> GrammarSpec | None:
    """A structural tag admitting only valid calls in the worker's tool format (see TOOL_FORMATS), or None
    when tool_choice is not enforced (None, "auto", "none"). `required`: one or more calls of any listed
    tool; a named function: exactly one call of it. Arguments follow each tool's `parameters` schema."""
    if format_name is not None and format_name not in TOOL_FORMATS:
        raise ValueError(f"unknown tool-call format {format_name!r}; expected one of {TOOL_FORMATS}")
    if tool_choice in _FREE_CHOICES:
        return None
    if format_name is None:
        raise RequestRejected(ErrorCode.INVALID_REQUEST, "tool_choice 'required' or a named function needs a tool-call "
                              "format, and this worker's model has none (set --tool-parser)")
    functions = _functions(tools)
    if tool_choice == "required":
        chosen, is_single = functions, False
    elif isinstance(tool_choice, dict):
        name = _named_choice(tool_choice)
        chosen, is_single = [f for f in functions if f[0] == name], True
        if not chosen:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"tool_choice names {name!r}, which is not in tools")
    else:
        raise RequestRejected(ErrorCode.INVALID_REQUEST,
                              f"tool_choice must be 'none', 'auto', 'required' or a named function, not {tool_choice!r}")
    tag = {"type": "structural_tag", "format": _FORMATS[format_name](chosen, is_single)}
    _limit_whitespace(tag, max_whitespace)
    return GrammarSpec("structural_tag", canonical_json(tag))


def _functions(tools: list[dict] | None) -> list[tuple[str, dict]]:
    """(name, parameters schema) of each function tool."""
    if not tools:
        raise RequestRejected(ErrorCode.INVALID_REQUEST, "tool_choice 'required' or a named function needs tools")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"tools[{i}] must be {{'type': 'function', 'function': ...}}")
        name, params = function.get("name"), function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not name:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"tools[{i}].function.name must be a non-empty string")
        if not isinstance(params, dict):
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"tools[{i}].function.parameters must be a JSON schema object")
        out.append((name, params))
    return out


def _named_choice(choice: dict) -> str:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise RequestRejected(ErrorCode.INVALID_REQUEST,
                              "a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
    return name


def _call_schema(name: str, params: dict, arguments_key: str) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, arguments_key: params},
            "required": ["name", arguments_key], "additionalProperties": False}


def _json(schema: dict, style: str = "json") -> dict:
    return {"type": "json_schema", "json_schema": schema, "style": style}


def _limit_whitespace(node: Any, max_whitespace: int) -> None:
    """Set max_whitespace_cnt on every JSON part of a structural tag."""
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and "style" in node:  # ours, not a user schema's "type"
            node["max_whitespace_cnt"] = max_whitespace
        for key, value in node.items():
            if key != "json_schema":
                _limit_whitespace(value, max_whitespace)
    elif isinstance(node, list):
        for value in node:
            _limit_whitespace(value, max_whitespace)


def _one_of(formats: list[dict]) -> dict:
    return formats[0] if len(formats) == 1 else {"type": "or", "elements": formats}


def _tags(tags: list[dict], is_single: bool, separator: str) -> dict:
    if is_single:
        return tags[0]
    return {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True}


def _hermes(functions: list[tuple[str, dict]], is_single: bool) -> dict:
    # <tool_call>\n{"name": N, "arguments": {...}}\n</tool_call>, blocks separated by \n
    tags = [{"type": "tag", "begin": "<tool_call>\n", "content": _json(_call_schema(n, p, "arguments")),
             "end": "\n</tool_call>"} for n, p in functions]
    return _tags(tags, is_single, "\n")


def _llama3_json(functions: list[tuple[str, dict]], is_single: bool) -> dict:
    # bare {"name": N, "parameters": {...}} (the python tag is optional), several separated by "; "
    call = _one_of([_json(_call_schema(n, p, "parameters")) for n, p in functions])
    if is_single:
        return call
    more = {"type": "star", "content": {"type": "sequence", "elements": [{"type": "const_string", "value": "; "}, call]}}
    return {"type": "sequence", "elements": [call, more]}


def _mistral(functions: list[tuple[str, dict]], is_single: bool) -> dict:
    # [TOOL_CALLS][{"name": N, "arguments": {...}}, ...]
    calls = [_call_schema(n, p, "arguments") for n, p in functions]
    array = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if is_single:
        array["maxItems"] = 1
    return {"type": "sequence", "elements": [{"type": "const_string", "value": "[TOOL_CALLS]"}, _json(array)]}


def _glm4(functions: list[tuple[str, dict]], is_single: bool) -> dict:
    # <tool_call>N\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n...</tool_call>
    tags = [{"type": "tag", "begin": f"<tool_call>{n}\n", "content": _glm4_arguments(p), "end": "</tool_call>"}
            for n, p in functions]
    return _tags(tags, is_single, "\n")


def _glm4_arguments(params: dict) -> dict:
    """The declared properties in schema order (optional ones may be left out), each value exactly between its
    tags: xgrammar's own glm_xml style lets whitespace surround a value, which the parser would keep."""
    required = set(params.get("required") or [])
    entries = []
    for key, schema in (params.get("properties") or {}).items():
        entry = {"type": "sequence", "elements": [
            {"type": "tag", "begin": f"<arg_key>{key}</arg_key>\n<arg_value>", "content": _glm4_value(schema),
             "end": "</arg_value>"}, {"type": "const_string", "value": "\n"}]}
        entries.append(entry if key in required else {"type": "optional", "content": entry})
    if not entries:
        return {"type": "const_string", "value": ""}
    return entries[0] if len(entries) == 1 else {"type": "sequence", "elements": entries}


def _glm4_value(schema: Any) -> dict:
    """A string is written raw (as the chat templates write it); any other value as JSON."""
    if not isinstance(schema, dict):
        return _json({})
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values and all(isinstance(v, str) for v in values):
        return _one_of([{"type": "const_string", "value": v} for v in values])
    if schema.get("type") != "string" or values is not None or "format" in schema:
        return _json(schema)
    if "pattern" in schema:
        return {"type": "regex", "pattern": schema["pattern"]}
    return {"type": "any_text"}


_FORMATS = {"hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral, "glm4": _glm4}


# ---------------------------------------------------------------- compiling, once per spec


class GrammarCompiler:
    """The worker's compiler: each spec compiled once against the vocabulary, kept in an LRU."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int], max_cached: int = MAX_CACHED_GRAMMARS,
                 max_threads: int = _THREADS):
        self.xgr = _xgrammar()
        self.vocab_size = vocab_size
        info = self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self._compiler = self.xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self.max_cached = max_cached
        self.num_compiled = 0
        self.num_cache_hits = 0

    def compile(self, spec: GrammarSpec):
        compiled = self._cache.get(spec)
        if compiled is not None:
            self._cache.move_to_end(spec)
            self.num_cache_hits += 1
            return compiled
        try:
            if spec.kind == "json_schema":
                compiled = self._compiler.compile_json_schema(spec.source, any_whitespace=True,
                                                              max_whitespace_cnt=spec.max_whitespace,
                                                              strict_mode=spec.is_strict)
            else:
                compiled = self._compiler.compile_structural_tag(spec.source)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports a bad schema as RuntimeError
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"cannot compile the {_what(spec)}: {_short(exc)}") from None
        self.num_compiled += 1
        self._cache[spec] = compiled
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec, stop_ids: frozenset[int]) -> GrammarState:
        matcher = self.xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=sorted(stop_ids))
        return GrammarState(matcher)


def _what(spec: GrammarSpec) -> str:
    return "response_format schema" if spec.kind == "json_schema" else "tool-call grammar (check the tools' parameters)"


def _short(exc: Exception) -> str:
    # xgrammar's messages start with "[time] /path/file.cc:line: "; keep what follows
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[1][:500] if text.startswith("[") and ": " in text else text[:500]


class GrammarState:
    """One request's matcher: the grammar's position after the request's output tokens."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.num_accepted = 0

    def accept(self, token: int) -> bool:
        if self.matcher.is_terminated() or not self.matcher.accept_token(token):
            return False
        self.num_accepted += 1
        return True

    def replay(self, ids: list[int]) -> bool:
        """Resume: feed the tokens an earlier worker published."""
        return all(self.accept(t) for t in ids)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


# ---------------------------------------------------------------- the step


class GrammarMasks:
    """One bitmask for a step's sampled rows, filled on the host and applied on the logits' device."""

    def __init__(self, xgr, tokenizer, vocab_size: int, stop_ids: frozenset[int], device: torch.device,
                 max_threads: int = _THREADS):
        self.xgr = xgr
        self.vocab_size = vocab_size
        self.device = device
        self.width = math.ceil(vocab_size / 32)
        self._batch = xgr.BatchGrammarMatcher(max_threads)
        self._allowed = _bits(self.width, _sampleable(tokenizer, vocab_size, stop_ids))  # [W] int32
        self._stop_only = _bits(self.width, sorted(i for i in stop_ids if i < vocab_size))
        self._host: torch.Tensor | None = None  # [rows, W] int32, reused (pinned on CUDA)
        self._backend = "cpu" if device.type == "cpu" else (
            "triton" if device.type == "cuda" and is_triton_available() else "torch_native")

    def apply(self, logits: torch.Tensor, states: list[GrammarState | None]) -> None:
        """Mask logits [S, V] in place: row i keeps only the tokens states[i] allows (None: unconstrained)."""
        rows = [i for i, s in enumerate(states) if s is not None]
        if not rows:
            return
        host = self._buffer(len(states))
        host.fill_(-1)
        live = [i for i in rows if not states[i].is_terminated]
        if live:
            self._batch.batch_fill_next_token_bitmask([states[i].matcher for i in live], host, live)
        for i in rows:
            if states[i].is_terminated:  # only a stop token may follow (the request then ends)
                host[i] = self._stop_only
        host[rows] &= self._allowed
        mask = host[: len(states)].to(self.device, non_blocking=True)
        self.xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=min(self.vocab_size, logits.shape[-1]),
                                             indices=rows, backend=self._backend)

    def _buffer(self, num_rows: int) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < num_rows:
            size = max(num_rows, 2 * (0 if self._host is None else self._host.shape[0]), 16)
            host = torch.empty((size, self.width), dtype=torch.int32)
            self._host = host.pin_memory() if self.device.type == "cuda" else host
        return self._host


def is_triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _sampleable(tokenizer, vocab_size: int, stop_ids: frozenset[int]) -> list[int]:
    """Ids a grammar may produce: not special tokens (their text is skipped on output, so the grammar's idea of
    the text would differ), except stop tokens and tool-call markers."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {int(i) for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(added, "special", False)}
    vocab = tokenizer.get_vocab()
    special -= {vocab[m] for m in _TOOL_MARKERS if m in vocab}
    return [i for i in range(vocab_size) if i not in special or i in stop_ids]


def _bits(width: int, ids: list[int]) -> torch.Tensor:
    """[W] int32 with bit (i % 32) of word i // 32 set for each id."""
    words = torch.zeros(width * 32, dtype=torch.bool)
    words[torch.tensor(ids, dtype=torch.long)] = True
    weights = torch.tensor([1 << b for b in range(31)] + [-(1 << 31)], dtype=torch.int64)  # bit 31 is the sign
    packed = (words.view(width, 32).long() * weights).sum(dim=1)
    return packed.to(torch.int32)


class StepGrammars:
    """The engine's side of grammars: a matcher per constrained sequence, the compiler and the step mask
    (both made at the first constrained request, so a worker without xgrammar serves everything else)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int], device: torch.device,
                 tool_format: str | None = "hermes", max_cached: int = MAX_CACHED_GRAMMARS,
                 max_whitespace: int = MAX_WHITESPACE):
        if tool_format is not None and tool_format not in TOOL_FORMATS:
            raise ValueError(f"unknown tool-call format {tool_format!r}; expected one of {TOOL_FORMATS}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device = device
        self.tool_format = tool_format
        self.max_cached = max_cached
        self.max_whitespace = max_whitespace
        self.compiler: GrammarCompiler | None = None
        self.masks: GrammarMasks | None = None
        self.states: dict[Any, GrammarState] = {}  # Sequence -> its matcher

    def admit(self, seq, request: Request, resumed_ids: list[int]) -> None:
        """Give a constrained request its matcher, replaying resumed tokens. Raises RequestRejected."""
        spec = request_grammar(request, self.tool_format, self.max_whitespace)
        if spec is None:
            return
        if self.compiler is None:
            self.compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids, self.max_cached)
            self.masks = GrammarMasks(self.compiler.xgr, self.tokenizer, self.vocab_size, self.eos_ids, self.device)
        state = self.compiler.matcher(spec, self.eos_ids | frozenset(request.generate_config.stop_token_ids or ()))
        if not state.replay(resumed_ids):
            raise RequestRejected(ErrorCode.INVALID_REQUEST, "the published output does not match the request's grammar")
        self.states[seq] = state

    def release(self, seq) -> None:
        self.states.pop(seq, None)

    def mask(self, logits: torch.Tensor, seqs: list) -> None:
        """Before sampling: mask the rows (one per seq, in order) of constrained sequences."""
        if self.states:
            self.masks.apply(logits, [self.states.get(s) for s in seqs])

    def accept(self, seq, token: int) -> str | None:
        """After sampling: advance seq's matcher; an error message when the grammar rejects the token."""
        state = self.states.get(seq)
        if state is None or state.accept(token):
            return None
        return f"the grammar rejected sampled token {token} after {state.num_accepted} tokens"

    def metrics(self) -> dict[str, int]:
        compiler = self.compiler
        return {"grammars_compiled": compiler.num_compiled if compiler else 0,
                "grammar_cache_hits": compiler.num_cache_hits if compiler else 0}
