"""Grammar-constrained decoding: response_format and enforced tool_choice, in the engine and through a worker."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from producer.protocol import ChatBody, ChatMessage, GenerateConfig, Request, TaskKind
from tests.conftest import make_request
from worker.engines import grammar
from worker.engines.base import RequestRejected
from worker.engines.grammar import GrammarSpec, canonical_json, tool_call_grammar
from worker.engines.llm import LLMEngine, LLMEngineConfig
from worker.request import Resume

pytest.importorskip("xgrammar")

# bounded values only: a random model under a grammar must be able to finish (enums, ranges, booleans)
PERSON = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
}, "required": ["color", "age", "ok", "tags"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
PROMPTS = ["hello world the", "the cat is", "redis stream worker", "one two three", "blue river", "a model queue",
           "fire earth wind", "day night"]


def schema_format(schema: dict = PERSON, name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def make_engine(tiny_llama, **config) -> LLMEngine:
    # one whitespace char between JSON elements: the random model would otherwise pad until max_tokens
    model, tokenizer = tiny_llama
    return LLMEngine(model, tokenizer, LLMEngineConfig(**{"max_num_seqs": 8, "max_json_whitespace": 1, **config}))


@pytest.fixture
def engine(tiny_llama):
    return make_engine(tiny_llama)


def ids_of(engine, text: str) -> list[int]:
    return engine.tokenizer(text).input_ids


def run(engine, requests, resumes=None):
    seqs = [engine.add(r, (resumes or {}).get(r.id)) for r in requests]
    outputs = {}
    while engine.num_active:
        for out in engine.step():
            outputs.setdefault(out.seq.request_id, []).append(out)
    return seqs, outputs


def text_of(seq) -> str:
    return seq.text


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def chat(request_id: str, content: str, tool_choice, tools=TOOLS, **config) -> Request:
    config.setdefault("temperature", 0.0)
    config.setdefault("max_tokens", 200)
    body = ChatBody(messages=[ChatMessage(role="user", content=content)], tools=tools, tool_choice=tool_choice,
                    generate_config=GenerateConfig(**config))
    return Request(id=request_id, task=TaskKind.CHAT, body=body, created_ms=0)


# ---------------------------------------------------------------- structured output


def test_unconstrained_output_is_not_json_so_the_tests_can_fail(engine):
    seqs, _ = run(engine, [make_request(f"u{i}", ids_of(engine, p), max_tokens=40) for i, p in enumerate(PROMPTS)])
    assert not any(is_json(text_of(s)) for s in seqs)


def test_json_object_output_parses_as_an_object(engine):
    requests = [make_request(f"j{i}", ids_of(engine, p), max_tokens=160, response_format={"type": "json_object"})
                for i, p in enumerate(PROMPTS)]
    seqs, _ = run(engine, requests)
    stopped = [s for s in seqs if s.finish_reason.value == "stop"]
    assert len(stopped) >= 3  # a random model may also wander on until max_tokens inside a string
    for seq in stopped:
        assert isinstance(json.loads(text_of(seq)), dict), text_of(seq)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 7, "top_k": 50}])
def test_json_schema_output_validates(engine, sampling):
    requests = [make_request(f"s{i}", ids_of(engine, p), max_tokens=120, response_format=schema_format(), **sampling)
                for i, p in enumerate(PROMPTS)]
    seqs, _ = run(engine, requests)
    for seq in seqs:
        assert seq.finish_reason.value == "stop", text_of(seq)
        jsonschema.validate(json.loads(text_of(seq)), PERSON)
    assert len({text_of(s) for s in seqs}) > 1  # the outputs follow their prompts, not one fixed string


def test_unconstrained_rows_stay_identical_to_their_solo_runs(engine, tiny_llama):
    plain = [make_request(f"p{i}", ids_of(engine, p), max_tokens=30) for i, p in enumerate(PROMPTS[:4])]
    constrained = [make_request(f"c{i}", ids_of(engine, p), max_tokens=120, response_format=schema_format())
                   for i, p in enumerate(PROMPTS[4:])]
    mixed, _ = run(engine, [r for pair in zip(plain, constrained) for r in pair])
    for request in plain:
        solo, _ = run(make_engine(tiny_llama), [request])
        assert next(s for s in mixed if s.request_id == request.id).output_ids == solo[0].output_ids
    for seq in mixed:
        if seq.request_id.startswith("c"):
            jsonschema.validate(json.loads(text_of(seq)), PERSON)


def test_logprobs_are_of_the_masked_distribution(engine):
    request = make_request("lp", ids_of(engine, PROMPTS[0]), max_tokens=3, logprobs=5,
                           response_format={"type": "json_object"})
    _, outputs = run(engine, [request])
    first = outputs["lp"][0].logprobs[0]
    assert first["token"].strip() in ("", "{") and first["token"].count("{") == 1
    assert all(t["token"].strip() in ("", "{") for t in first["top_logprobs"])  # only what the grammar allows
    assert sum(2.718281828 ** t["logprob"] for t in first["top_logprobs"]) <= 1.0001


def test_compiled_once_per_schema(engine):
    other = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    requests = [make_request(f"k{i}", ids_of(engine, p), max_tokens=60, response_format=schema_format())
                for i, p in enumerate(PROMPTS[:3])]
    requests.append(make_request("k-other", ids_of(engine, PROMPTS[3]), max_tokens=60,
                                 response_format=schema_format(other, "other")))
    run(engine, requests)
    run(engine, [make_request("k-again", ids_of(engine, PROMPTS[4]), max_tokens=60, response_format=schema_format())])
    assert engine.metrics()["grammars_compiled"] == 2
    assert engine.metrics()["grammar_cache_hits"] == 3


def test_cache_is_bounded(tiny_llama):
    engine = make_engine(tiny_llama, max_cached_grammars=2)
    for i in range(3):
        schema = {"type": "object", "properties": {f"f{i}": {"type": "boolean"}}, "required": [f"f{i}"]}
        engine.add(make_request(f"b{i}", [5, 6], max_tokens=5, response_format=schema_format(schema)))
    assert len(engine.grammars.compiler._cache) == 2


def test_invalid_schema_is_rejected_alone(engine):
    good = make_request("good", ids_of(engine, PROMPTS[0]), max_tokens=60, response_format=schema_format())
    engine.add(good)
    with pytest.raises(RequestRejected) as info:
        engine.add(make_request("bad", [5, 6], response_format=schema_format({"type": "objekt"})))
    assert info.value.code.value == "invalid_request" and "objekt" in info.value.message
    assert engine.num_active == 1
    run(engine, [])
    assert engine.num_active == 0


def test_resume_replays_the_published_tokens_into_a_fresh_matcher(engine, tiny_llama):
    tokenizer = tiny_llama[1]
    request = make_request("r", ids_of(engine, PROMPTS[1]), max_tokens=80, response_format=schema_format())
    (whole,), _ = run(engine, [request])
    published = whole.output_ids[:7]
    resume = Resume(output_ids=published, text=tokenizer.decode(published, skip_special_tokens=True), next_seq=7)
    fresh = make_engine(tiny_llama)
    (resumed,), _ = run(fresh, [request], {"r": resume})
    assert resumed.output_ids == whole.output_ids
    assert fresh.grammars.compiler.num_compiled == 1


def test_resume_whose_tokens_break_the_grammar_is_rejected(engine, tiny_llama):
    request = make_request("rb", ids_of(engine, PROMPTS[1]), max_tokens=80, response_format=schema_format())
    bad = ids_of(engine, "hello")[1:]  # a JSON object cannot start with a word
    with pytest.raises(RequestRejected):
        engine.add(request, Resume(output_ids=bad, text="hello", next_seq=1))


def test_preemption_keeps_the_matcher(engine, tiny_llama):
    requests = [make_request(f"pr{i}", ids_of(engine, p), max_tokens=80, response_format=schema_format())
                for i, p in enumerate(PROMPTS[:3])]
    reference, _ = run(make_engine(tiny_llama), requests)
    seqs = [engine.add(r) for r in requests]
    for _ in range(5):
        engine.step()
    assert engine.scheduler.preempt_newest(2)
    while engine.num_active:
        engine.step()
    assert engine.num_preemptions >= 2
    assert [s.output_ids for s in seqs] == [s.output_ids for s in reference]


def test_a_token_the_grammar_rejects_fails_only_its_request(engine, monkeypatch):
    monkeypatch.setattr(engine.grammars.masks if engine.grammars.masks else grammar.GrammarMasks, "apply",
                        lambda self, logits, states: None)  # sampling ignores the grammar: the matcher must notice
    plain = make_request("plain", ids_of(engine, PROMPTS[0]), max_tokens=20)
    broken = make_request("broken", ids_of(engine, PROMPTS[0]), max_tokens=20, response_format=schema_format())
    seqs, outputs = run(engine, [plain, broken])
    assert outputs["broken"][-1].error and "rejected" in outputs["broken"][-1].error
    assert seqs[0].finish_reason.value == "length" and len(seqs[0].output_ids) == 20
    assert engine.num_active == 0


def test_without_the_library_a_constrained_request_is_rejected_clearly(engine, monkeypatch):
    monkeypatch.setattr(grammar, "is_available", lambda: False)
    with pytest.raises(RequestRejected) as info:
        engine.add(make_request("nolib", [5, 6], response_format={"type": "json_object"}))
    assert "xgrammar is not installed" in info.value.message
    engine.add(make_request("fine", [5, 6], max_tokens=2))
    assert engine.num_active == 1


def test_text_response_format_is_unconstrained(engine):
    (seq,), _ = run(engine, [make_request("t", ids_of(engine, PROMPTS[0]), max_tokens=20,
                                          response_format={"type": "text"})])
    (plain,), _ = run(engine, [make_request("t2", ids_of(engine, PROMPTS[0]), max_tokens=20)])
    assert seq.output_ids == plain.output_ids and engine.grammars.compiler is None


def test_response_format_shapes_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        GenerateConfig(response_format={"type": "json_schema"})
    with pytest.raises(ValidationError):
        GenerateConfig(response_format={"type": "yaml"})
    with pytest.raises(ValidationError):
        GenerateConfig(response_format={"type": "json_object", "json_schema": {"name": "x", "schema": {}}})
    config = GenerateConfig(response_format=schema_format())
    wire = json.loads(config.model_dump_json(exclude_defaults=True))
    assert wire["response_format"]["json_schema"]["schema"] == PERSON  # the OpenAI key, not the attribute name
    assert GenerateConfig.model_validate(wire) == config


def test_ignore_eos_or_tool_choice_with_response_format_is_rejected(engine):
    with pytest.raises(RequestRejected, match="ignore_eos"):
        engine.add(make_request("ie", [5, 6], ignore_eos=True, response_format={"type": "json_object"}))
    with pytest.raises(RequestRejected, match="cannot be combined"):
        engine.add(chat("both", "hi", "required", response_format={"type": "json_object"}))
    assert engine.num_active == 0


def test_enforced_tool_choice_without_a_tool_format_is_rejected(tiny_llama):
    engine = make_engine(tiny_llama, tool_parser="none")
    with pytest.raises(RequestRejected, match="tool-call format"):
        engine.add(chat("nofmt", "hi", "required"))
    engine.add(chat("auto", "hi", "auto", max_tokens=2))
    assert engine.num_active == 1


# ---------------------------------------------------------------- enforced tool_choice


def parse_calls(format_name: str, text: str) -> list[tuple[str, dict]]:
    """The test's own reading of each format's canonical text (formats.md)."""
    if format_name == "hermes":
        blocks = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.DOTALL)
        assert "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks) == text
        return [(c["name"], c["arguments"]) for c in map(json.loads, blocks)]
    if format_name == "llama3_json":
        calls = [json.loads(part) for part in text.split("; ")]
        return [(c["name"], c["parameters"]) for c in calls]
    if format_name == "mistral":
        assert text.startswith("[TOOL_CALLS]")
        return [(c["name"], c["arguments"]) for c in json.loads(text[len("[TOOL_CALLS]"):])]
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
    assert "\n".join(f"<tool_call>{b}</tool_call>" for b in blocks) == text
    calls = []
    for block in blocks:
        name, _, rest = block.partition("\n")
        pairs = re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", rest, re.DOTALL)
        # a raw value: the grammar lets whitespace surround it, as around JSON values
        calls.append((name, {k: json.loads(v) if is_json(v) else v.strip() for k, v in pairs}))
    return calls


@pytest.mark.parametrize("format_name", grammar.TOOL_FORMATS)
def test_tool_grammars_admit_the_canonical_text_and_nothing_else(tiny_llama, format_name):
    _, tokenizer = tiny_llama
    compiler = grammar.GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    one = {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>',
           "llama3_json": '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}',
           "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}]',
           "glm4": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
                   "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"}[format_name]
    wrong_args = one.replace("Oslo", "Rome")
    named = tool_call_grammar(format_name, TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    other = tool_call_grammar(format_name, TOOLS, {"type": "function", "function": {"name": "get_time"}})
    required = tool_call_grammar(format_name, TOOLS, "required")

    def admits(spec: GrammarSpec, text: str) -> bool:
        matcher = compiler.matcher(spec, frozenset({tokenizer.eos_token_id})).matcher
        return matcher.accept_string(text) and matcher.is_completed()

    assert admits(named, one) and admits(required, one)
    assert not admits(other, one) and not admits(named, wrong_args) and not admits(named, "hello")
    assert parse_calls(format_name, one) == [("get_weather", {"city": "Oslo", "days": 3})]


def test_tool_choice_that_is_not_enforced_has_no_grammar():
    assert tool_call_grammar("hermes", TOOLS, "auto") is None
    assert tool_call_grammar("hermes", TOOLS, "none") is None
    assert tool_call_grammar("hermes", TOOLS, None) is None
    with pytest.raises(RequestRejected, match="not in tools"):
        tool_call_grammar("hermes", TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(RequestRejected, match="needs tools"):
        tool_call_grammar("hermes", None, "required")
    with pytest.raises(RequestRejected):
        tool_call_grammar("hermes", TOOLS, "always")
    with pytest.raises(ValueError):
        tool_call_grammar("xml", TOOLS, "required")


@pytest.mark.parametrize("format_name", grammar.TOOL_FORMATS)
def test_enforced_tool_choice_output_is_a_valid_call(tiny_llama, format_name):
    engine = make_engine(tiny_llama, tool_parser=format_name)
    named = {"type": "function", "function": {"name": "get_time"}}
    requests = [chat(f"n{i}", p, named) for i, p in enumerate(PROMPTS[:3])]
    requests += [chat(f"r{i}", p, "required") for i, p in enumerate(PROMPTS[3:6])]
    requests.append(chat("sampled", PROMPTS[6], "required", temperature=0.9, seed=11))
    seqs, _ = run(engine, requests)
    schemas = {"get_weather": WEATHER, "get_time": CLOCK}
    named_seqs = [s for s in seqs if s.request_id.startswith("n")]
    assert all(s.finish_reason.value == "tool_calls" for s in named_seqs)  # exactly one call: it must end
    ended = [s for s in seqs if s.finish_reason.value == "tool_calls"]
    assert len(ended) >= 5  # `required` admits any number of calls: a random model may go on calling
    for seq in ended:
        assert seq.output_ids[-1] in engine.eos_ids  # the grammar ended with a stop token
        raw = engine.tokenizer.decode(seq.output_ids[:-1], skip_special_tokens=True)
        calls = parse_calls(format_name, raw)  # the raw output is exactly the format's canonical text
        assert calls
        if seq.request_id.startswith("n"):
            assert [name for name, _ in calls] == ["get_time"]
        for name, arguments in calls:
            jsonschema.validate(arguments, schemas[name])
        parsed = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in seq.tool_calls]
        assert parsed == calls  # and the worker's own parser reads the same calls
        assert text_of(seq) == ""  # no markup leaks into content


def test_canonical_json_keeps_property_order():
    assert canonical_json({"b": 1, "a": {"d": 2, "c": 3}}) == '{"b":1,"a":{"d":2,"c":3}}'


# ---------------------------------------------------------------- through a worker


@pytest.mark.redis
def test_structured_requests_through_a_worker(worker_factory, redis_server_url, prefix):
    from producer import Client

    worker_factory(max_num_seqs=4).start()
    client = Client(redis_server_url, prefix=prefix)
    model = client.get_model("tiny")
    flags = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": PERSON["properties"]["color"]},
             "required": ["ok", "color"], "additionalProperties": False}
    good = model.submit(TaskKind.GENERATE, {"prompt": PROMPTS[1]},
                        {"max_tokens": 200, "temperature": 0, "response_format": schema_format(flags)})
    bad = model.submit(TaskKind.GENERATE, {"prompt": PROMPTS[2]},
                       {"max_tokens": 8, "response_format": schema_format({"type": "objekt"})})
    plain = model.submit(TaskKind.GENERATE, {"prompt": PROMPTS[3]}, {"max_tokens": 8, "temperature": 0})
    done = client.wait(good, timeout_s=60)
    assert done.type.value == "done" and done.finish_reason.value == "stop"
    jsonschema.validate(json.loads(done.text), flags)
    failed = client.wait(bad, timeout_s=60)
    assert failed.type.value == "error" and failed.code == "invalid_request" and "objekt" in failed.message
    assert client.wait(plain, timeout_s=60).type.value == "done"
    client.redis.close()


def test_grammar_benchmark_smoke(tmp_path, capsys, torch_threads):
    from bench import grammar as bench_grammar

    rows = bench_grammar.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--num-requests", "4",
                               "--max-tokens", "8", "--prompt-len", "8", "--rounds", "1", "--max-num-seqs", "4",
                               "--threads", str(torch_threads), "--model-dir", str(tmp_path)])
    assert [r["constrained"] for r in rows] == [0.0, 0.5, 1.0]
    assert {r["tokens"] for r in rows} == {4 * 8}  # every mix generates the same tokens
    assert rows[0]["ratio"] == 1.0
    assert "tok/s" in capsys.readouterr().out


def test_glm4_values_sit_exactly_between_their_tags(tiny_llama):
    _, tokenizer = tiny_llama
    stop = frozenset({tokenizer.eos_token_id})
    compiler = grammar.GrammarCompiler(tokenizer, len(tokenizer), stop)
    params = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}, "n": {"type": "integer"},
                                               "note": {"type": "string"}}, "required": ["zone", "n"]}
    spec = tool_call_grammar("glm4", [{"type": "function", "function": {"name": "t", "parameters": params}}], "required")

    def admits(text: str) -> bool:
        matcher = compiler.matcher(spec, stop).matcher
        return matcher.accept_string("<tool_call>t\n" + text) and matcher.is_completed()

    head = "<arg_key>zone</arg_key>\n<arg_value>CET</arg_value>\n<arg_key>n</arg_key>\n"
    assert admits(head + "<arg_value>3</arg_value>\n</tool_call>")
    assert admits(head + "<arg_value>3</arg_value>\n<arg_key>note</arg_key>\n<arg_value>a b</arg_value>\n</tool_call>")
    assert not admits(head + "<arg_value> 3</arg_value>\n</tool_call>")  # the parser would keep the space
    assert not admits(head.replace(">CET<", ">\nCET<") + "<arg_value>3</arg_value>\n</tool_call>")
    assert not admits("<arg_key>zone</arg_key>\n<arg_value>CET</arg_value>\n</tool_call>")  # n is required


@pytest.mark.redis
def test_enforced_tool_choice_through_a_worker(worker_factory, redis_server_url, prefix):
    from producer import Client

    worker_factory(max_num_seqs=4, tool_parser="hermes").start()
    client = Client(redis_server_url, prefix=prefix)
    model = client.get_model("tiny")
    named = {"type": "function", "function": {"name": "get_weather"}}
    ids = [model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": p}], "tools": TOOLS,
                                        "tool_choice": named}, {"max_tokens": 300, "temperature": 0})
           for p in PROMPTS[:2]]
    for request_id in ids:
        done = client.wait(request_id, timeout_s=60)
        assert done.type.value == "done" and done.finish_reason.value == "tool_calls", done
        (call,) = done.tool_calls
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    client.redis.close()
