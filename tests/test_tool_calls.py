"""Tool calls end to end: a real worker (real Redis) on a rigged tiny Llama whose greedy output is a script.

The rig (conftest's save_successor_llama): every script piece is an added token of its own, and the model's
greedy successor of each token is the next piece (other tokens get a fixed pseudo-random successor). The chat
prompt's last token starts the script. The model is saved with save_pretrained and loaded back through
from_pretrained like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer import Client
from producer.protocol import ChatBody, ChatMessage, ErrorCode, EventType, GenerateConfig, Request, TaskKind
from tests.conftest import StepGate, build_worker_thread, save_successor_llama
from tests.test_loop import events_of
from tests.test_outputs import resumed_everywhere, text_of
from worker.engines.base import RequestRejected
from worker.models.tool_parsers import call_id

pytestmark = pytest.mark.redis

QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n"
    "</tools>\nCall a function with <tool_call>\n{\"name\": NAME, \"arguments\": ARGS}\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message.content or '' }}"
    "{%- for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}{{ part.text }}{% endfor %}{% endif %}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
SPECIAL = ("<tool_call>", "</tool_call>")
TWO_CALLS = ["Let me check.", "<tool_call>", '\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n',
             "</tool_call>", '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', " Done soon."]
BAD_JSON = ["<tool_call>", '{"name": "get_weather", "arguments": {city: Paris}}', "</tool_call>"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
MESSAGES = [{"role": "user", "content": "weather in Paris, and the time?"}]
CONTENT = "Let me check.Done soon."  # the space after a call is a separator, not content
EXPECTED_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {})]
MULTIBYTE_LEAD = "😀東京 ∑∞λ"
MARKUP = ("<tool_call>", "</tool_call>", '{"name"', '"arguments"')


def make_script_model(out_dir: Path, script: list[str], lead: str = "") -> tuple[Path, dict[int, int]]:
    """A tiny Llama whose greedy chat reply is `lead` in ordinary tokens (which may split its characters), then
    `script`, then <|im_end|>. Returns its path and successor map."""
    from tokenizers import AddedToken

    from worker.models.tiny import make_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir)
    num_base = len(tokenizer)
    tokenizer.add_tokens([AddedToken(p, special=p in SPECIAL, normalized=False) for p in dict.fromkeys(script)])
    tokenizer.chat_template = QWEN_LIKE_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    ids = tokenizer.convert_tokens_to_ids(script)
    assert len(set(ids)) == len(ids) and min(ids) >= num_base, "each piece must be one new token, once"
    vocab = len(tokenizer)
    trigger = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    trigger = (trigger["input_ids"] if isinstance(trigger, dict) or hasattr(trigger, "keys") else trigger)[-1]
    ids = tokenizer.encode(lead, add_special_tokens=False) + ids
    assert len(set(ids)) == len(ids) and trigger not in ids, "each token of the reply must appear once"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    successor = {t: 5 + (t * 31 + 7) % (num_base - 5) for t in range(vocab)}  # skips the 5 special tokens
    successor.update({trigger: ids[0], **{a: b for a, b in zip(ids, ids[1:])}, ids[-1]: im_end})
    save_successor_llama(out_dir, tokenizer, successor, eos_ids=[tokenizer.eos_token_id, im_end])
    return out_dir, successor


@pytest.fixture(scope="module")
def two_calls(tmp_path_factory, torch_threads):
    from worker.models.loading import load_llm

    path, successor = make_script_model(tmp_path_factory.mktemp("two-calls"), TWO_CALLS)
    return path, load_llm(str(path)), successor


@pytest.fixture(scope="module")
def multibyte_calls(tmp_path_factory, torch_threads):
    """TWO_CALLS with MULTIBYTE_LEAD (characters split across tokens) in place of its first piece."""
    from worker.models.loading import load_llm

    path, successor = make_script_model(tmp_path_factory.mktemp("multibyte-calls"), TWO_CALLS[1:], lead=MULTIBYTE_LEAD)
    return path, load_llm(str(path)), successor


@pytest.fixture(scope="module")
def bad_json(tmp_path_factory, torch_threads):
    from worker.models.loading import load_llm

    path, successor = make_script_model(tmp_path_factory.mktemp("bad-json"), BAD_JSON)
    return path, load_llm(str(path)), successor


@pytest.fixture
def client(redis_server_url, prefix):
    c = Client(redis_server_url, prefix=prefix)
    yield c
    c.close()


@pytest.fixture
def start_worker(redis_server_url, prefix, rds):
    made = []

    def start(rigged, gate_hold: set[int] | None = None, **overrides):
        path, pair, _ = rigged
        handle = build_worker_thread(redis_server_url, prefix, pair, path, model=pair, **overrides)
        gate = StepGate(handle.worker.engine, hold=gate_hold) if gate_hold else None
        made.append(handle)
        return handle.start(), gate

    yield start
    for handle in made:
        if handle.is_alive:
            handle.stop()


def assemble(deltas: list[dict]) -> list[dict]:
    """What an OpenAI-style client builds from delta.tool_calls items."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
        call["id"] = d.get("id") or call["id"]
        call["type"] = d.get("type") or call["type"]
        call["function"]["name"] += (d.get("function") or {}).get("name") or ""
        call["function"]["arguments"] += (d.get("function") or {}).get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def names_args(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def token_events(events):
    return [e for e in events if e.type == EventType.TOKEN]


def assert_streamed_tool_calls(events, request_id: str) -> None:
    tokens, done = token_events(events), events[-1]
    assert [e.seq for e in events] == list(range(len(events))), "gap or duplicate in seq"
    assert done.type == EventType.DONE and done.finish_reason.value == "tool_calls"
    assert all(m not in (e.text or "") for e in tokens for m in MARKUP), "markup leaked into streamed text"
    assert "".join(e.text or "" for e in tokens) == done.text == CONTENT
    deltas = [d for e in tokens for d in (e.tool_calls or [])]
    assert sorted(d["index"] for d in deltas if "id" in d) == [0, 1], "each call announced exactly once"
    assert assemble(deltas) == done.tool_calls
    assert names_args(done.tool_calls) == EXPECTED_CALLS
    assert [c["id"] for c in done.tool_calls] == [call_id(request_id, 0), call_id(request_id, 1)]


# ---------------------------------------------------------------- streamed, non-streamed, client shapes


def test_rigged_model_writes_its_script(two_calls):
    _, (model, tokenizer), _ = two_calls
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=20, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False) == "".join(TWO_CALLS) + "<|im_end|>"


def test_streamed_tool_calls_never_show_markup_and_build_the_final_calls(start_worker, two_calls, client):
    start_worker(two_calls)
    model = client.get_model("tiny")
    request_id = model.submit(TaskKind.CHAT, {"messages": MESSAGES, "tools": TOOLS},
                              {"temperature": 0, "max_tokens": 32, "logprobs": 2})
    events = list(client.events(request_id, timeout_s=60))
    assert_streamed_tool_calls(events, request_id)
    tokens = token_events(events)
    assert sum(len(e.token_ids) for e in tokens) == events[-1].usage.completion_tokens == len(TWO_CALLS) + 1
    assert all(len(e.logprobs) == len(e.token_ids) for e in tokens if e.token_ids)  # logprobs keep working


def test_client_chunks_and_completion_are_openai_shaped(start_worker, two_calls, client):
    start_worker(two_calls)
    model = client.get_model("tiny")
    chunks = list(model.chat(MESSAGES, tools=TOOLS, generate_config={"temperature": 0, "max_tokens": 32}, timeout_s=60))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert names_args(assemble(deltas)) == EXPECTED_CALLS
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == CONTENT
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = model.chat(MESSAGES, tools=TOOLS, generate_config={"temperature": 0, "max_tokens": 32, "stream": False},
                       timeout_s=60)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == CONTENT
    assert names_args(choice["message"]["tool_calls"]) == EXPECTED_CALLS
    assert choice["message"]["tool_calls"][0]["id"] == call_id(whole["id"], 0)


def test_malformed_output_degrades_to_content(start_worker, two_calls, bad_json, client, redis_server_url, prefix):
    start_worker(bad_json)
    model = client.get_model("tiny")
    request_id = model.submit(TaskKind.CHAT, {"messages": MESSAGES, "tools": TOOLS}, {"temperature": 0, "max_tokens": 32})
    events = list(client.events(request_id, timeout_s=60))
    done = events[-1]
    assert done.finish_reason.value == "stop" and done.tool_calls is None
    assert done.text == "".join(BAD_JSON)  # the special tags survive: the parser saw them, and gave them back
    assert "".join(e.text or "" for e in token_events(events)) == done.text
    assert all(not e.tool_calls for e in events)


def test_output_cut_inside_a_call_degrades_to_content(start_worker, two_calls, client):
    start_worker(two_calls)
    request_id = client.get_model("tiny").submit(TaskKind.CHAT, {"messages": MESSAGES, "tools": TOOLS},
                                                 {"temperature": 0, "max_tokens": 3})
    events = list(client.events(request_id, timeout_s=60))
    assert events[-1].finish_reason.value == "length" and events[-1].tool_calls is None
    assert events[-1].text == "".join(TWO_CALLS[:3])
    assert "".join(e.text or "" for e in token_events(events)) == events[-1].text


def test_mixed_batch_tool_plain_and_generate_requests_in_the_same_steps(start_worker, two_calls, client):
    _, (_, tokenizer), successor = two_calls
    worker, _ = start_worker(two_calls, max_num_seqs=8)
    engine = worker.worker.engine
    steps: list[set[str]] = []
    step = engine.step

    def recording_step():
        outputs = step()
        steps.append({o.seq.request_id for o in outputs})
        return outputs

    engine.step = recording_step
    model = client.get_model("tiny")
    cfg = {"temperature": 0, "max_tokens": 32}
    tool_id = model.submit(TaskKind.CHAT, {"messages": MESSAGES, "tools": TOOLS}, cfg)
    plain_id = model.submit(TaskKind.CHAT, {"messages": MESSAGES}, cfg)
    none_id = model.submit(TaskKind.CHAT, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none"}, cfg)
    prompts = [[40, 41, 42], [77], [200, 13]]
    gen_ids = [model.submit(TaskKind.GENERATE, {"prompt_token_ids": p}, {"temperature": 0, "max_tokens": 12,
                                                                          "ignore_eos": True}) for p in prompts]
    tool_events = list(client.events(tool_id, timeout_s=60))
    assert_streamed_tool_calls(tool_events, tool_id)
    plain_text = tokenizer.decode(tokenizer.convert_tokens_to_ids(TWO_CALLS), skip_special_tokens=True)
    for request_id in (plain_id, none_id):  # no parsing: the raw reply, special tokens skipped as always
        events = list(client.events(request_id, timeout_s=60))
        assert events[-1].finish_reason.value == "stop" and events[-1].tool_calls is None
        assert events[-1].text == plain_text and all(not e.tool_calls for e in events)
    for request_id, prompt in zip(gen_ids, prompts):
        events = list(client.events(request_id, timeout_s=60))
        expected, last = [], prompt[-1]
        for _ in range(12):
            last = successor[last]
            expected.append(last)
        assert [t for e in token_events(events) for t in e.token_ids] == expected
    everyone = {tool_id, plain_id, none_id, *gen_ids}
    assert any(everyone <= s for s in steps), "the requests never shared a step"


# ---------------------------------------------------------------- resume after the worker stops mid-call


@pytest.mark.parametrize("held_step", [2, 3, 4, 5, 6])
def test_resume_mid_tool_call_keeps_ids_and_never_repeats_a_delta(start_worker, two_calls, client, held_step):
    """The first worker's `held_step` is its last (no grace): it published held_step - 1 tokens, the raw text
    of which differs from what went out on the wire (held-back tags, whole calls). The second continues."""
    first, gate = start_worker(two_calls, gate_hold={held_step}, grace_s=0, lease_s=1)
    request_id = client.get_model("tiny").submit(TaskKind.CHAT, {"messages": MESSAGES, "tools": TOOLS},
                                                 {"temperature": 0, "max_tokens": 32})
    try:
        gate.wait_entered(held_step)
        first.worker.request_stop()
    finally:
        gate.release_all()
    first.stop()
    published = events_of(client, request_id)
    assert 0 < len(published) <= held_step and not published[-1].is_terminal
    start_worker(two_calls, lease_s=1)
    events = list(client.events(request_id, timeout_s=60))
    assert_streamed_tool_calls(events, request_id)
    assert [t for e in token_events(events) for t in e.token_ids] == \
        two_calls[1][1].convert_tokens_to_ids(TWO_CALLS) + [two_calls[1][1].convert_tokens_to_ids("<|im_end|>")]


def test_content_and_calls_read_across_a_resume_at_every_token_are_the_whole_output(multibyte_calls):
    """Content whose characters split across tokens, then two calls: resumed after each published token,
    the content read is the final content and each call is sent once."""
    from worker.engines.llm import LLMEngine

    _, (model, tokenizer), _ = multibyte_calls
    request = chat_request(MESSAGES, tools=TOOLS)
    request = request.model_copy(update={"body": request.body.model_copy(
        update={"generate_config": GenerateConfig(max_tokens=32, temperature=0)})})
    for k, outputs, seq, _ in resumed_everywhere(LLMEngine(model, tokenizer), request):
        assert text_of(outputs) == seq.text == MULTIBYTE_LEAD + "Done soon.", f"resumed after {k} tokens"
        deltas = [d for out in outputs for d in (out.tool_calls or [])]
        assert [d["index"] for d in deltas] == [0, 1], f"resumed after {k} tokens: a call sent twice or never"
        assert assemble(deltas) == seq.tool_calls
        assert names_args(seq.tool_calls) == EXPECTED_CALLS and seq.finish_reason.value == "tool_calls"


# ---------------------------------------------------------------- chat edge cases at the engine


def chat_request(messages, **body) -> Request:
    chat = ChatBody(messages=[ChatMessage.model_validate(m) for m in messages], generate_config=GenerateConfig(max_tokens=4),
                    **body)
    return Request(id="r1", task=TaskKind.CHAT, body=chat, created_ms=0)


def test_multi_turn_tool_messages_render_arguments_as_objects(two_calls):
    from worker.engines.prompts import chat_ids

    _, (_, tokenizer), _ = two_calls
    as_string = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    as_object = {**as_string, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    texts = []
    for call in (as_string, as_object):
        messages = [{"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
        texts.append(tokenizer.decode(chat_ids(chat_request(messages, tools=TOOLS).body, tokenizer)))
    assert texts[0] == texts[1]
    assert '"arguments": {"city": "Oslo"}' in texts[0]  # not a double-encoded string
    assert "<tool_response>\nsunny\n</tool_response>" in texts[0]


def test_a_model_without_a_chat_template_rejects_chat(two_calls, tmp_path):
    from transformers import AutoTokenizer

    from worker.engines.prompts import chat_ids

    tokenizer = AutoTokenizer.from_pretrained(two_calls[0])
    tokenizer.chat_template = None
    with pytest.raises(RequestRejected) as info:
        chat_ids(chat_request(MESSAGES).body, tokenizer)
    assert info.value.code == ErrorCode.INVALID_REQUEST and "no chat template" in str(info.value)


def test_tool_parser_none_turns_parsing_off(start_worker, two_calls, client):
    worker, _ = start_worker(two_calls, tool_parser="none")
    assert worker.worker.engine.tool_calling.format is None
    request_id = client.get_model("tiny").submit(TaskKind.CHAT, {"messages": MESSAGES, "tools": TOOLS},
                                                 {"temperature": 0, "max_tokens": 32})
    done = list(client.events(request_id, timeout_s=60))[-1]
    assert done.finish_reason.value == "stop" and done.tool_calls is None and '"get_weather"' in done.text


def test_a_resumed_request_whose_published_tokens_end_it_finishes_with_its_calls(two_calls):
    """The old worker published every token, <|im_end|> too, and died before `done`."""
    from worker.engines.llm import LLMEngine
    from worker.request import Resume

    _, (model, tokenizer), _ = two_calls
    engine = LLMEngine(model, tokenizer)
    request = chat_request(MESSAGES, tools=TOOLS)
    request = request.model_copy(update={"body": request.body.model_copy(
        update={"generate_config": GenerateConfig(max_tokens=32, temperature=0)})})
    ids = tokenizer.convert_tokens_to_ids(TWO_CALLS) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    parser_deltas = engine.tool_calling.parser_for(request).feed("".join(TWO_CALLS))[1]
    resume = Resume(output_ids=ids, text="Let me check.", next_seq=len(ids), tool_calls=parser_deltas[:1])
    seq = engine.add(request, resume)
    out = engine.finish_if_complete(seq)
    assert out is not None and out.finish_reason.value == "tool_calls"
    assert out.text == "Done soon." and [d["index"] for d in out.tool_calls] == [1]  # only what was still owed
    assert names_args(seq.tool_calls) == EXPECTED_CALLS and seq.text == "Let me check.Done soon."
