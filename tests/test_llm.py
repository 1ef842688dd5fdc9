"""LLMEngine behaviour in process: sampling parameters, stops, text, limits, rejections."""

from __future__ import annotations

import pytest
import torch

from producer.protocol import ChatBody, ChatMessage, ErrorCode, FinishReason, GenerateConfig, Request, TaskKind
from tests.conftest import make_request
from worker.engines.base import RequestRejected
from worker.engines.llm import LLMEngine, LLMEngineConfig

PROMPT = [1, 40, 41, 42, 43, 44, 45]


@pytest.fixture
def engine(tiny_llama):
    model, tokenizer = tiny_llama
    return LLMEngine(model, tokenizer, LLMEngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256,
                                                       max_tokens_limit=200))


def drain(engine: LLMEngine) -> dict[str, list]:
    """Run to completion; returns request_id -> list of StepOutputs."""
    outs: dict[str, list] = {}
    for _ in range(2000):
        if not engine.num_active:
            return outs
        for out in engine.step():
            outs.setdefault(out.seq.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def run_one(engine: LLMEngine, prompt=PROMPT, **config) -> tuple[list[int], str, FinishReason, object]:
    seq = engine.add(make_request("one", prompt, **config))
    outs = drain(engine)["one"]
    tokens = [t for o in outs for t in o.token_ids]
    return tokens, "".join(o.text for o in outs), outs[-1].finish_reason, seq


def test_max_tokens_and_usage(engine):
    tokens, _, finish, seq = run_one(engine, max_tokens=5, ignore_eos=True)
    assert len(tokens) == 5 and finish == FinishReason.LENGTH
    assert seq.num_prompt_tokens == len(PROMPT) and seq.num_output_tokens == 5


def test_streamed_text_equals_decode_of_the_tokens(engine, tiny_llama):
    _, tokenizer = tiny_llama
    tokens, text, _, seq = run_one(engine, max_tokens=40, ignore_eos=True)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True) == seq.text


def test_stop_string_is_cut_and_not_emitted(engine, tiny_llama):
    _, tokenizer = tiny_llama
    tokens, text, _, _ = run_one(engine, max_tokens=30, ignore_eos=True)
    assert len(text) > 8
    stop = text[5:8]
    first = text.find(stop)
    stopped_tokens, stopped_text, finish, _ = run_one(engine, max_tokens=30, ignore_eos=True, stop=[stop, "\x00never"])
    assert finish == FinishReason.STOP
    assert stopped_text == text[:first]
    assert stopped_tokens == tokens[: len(stopped_tokens)] and len(stopped_tokens) < len(tokens)


def test_stop_token_ids_and_eos(engine, tiny_llama):
    tokens, _, _, _ = run_one(engine, max_tokens=20, ignore_eos=True)
    stop_at = tokens[3]
    first = tokens.index(stop_at)
    stopped, _, finish, _ = run_one(engine, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_at])
    assert finish == FinishReason.STOP and stopped == tokens[: first + 1]
    engine.eos_ids = frozenset({stop_at})  # the model's own EOS stops too, unless ignore_eos
    eos_stopped, _, finish, _ = run_one(engine, max_tokens=20)
    assert finish == FinishReason.STOP and eos_stopped == tokens[: first + 1]


def test_repetition_penalty_matches_hf_generate(engine, tiny_llama):
    model, _ = tiny_llama
    ids = torch.tensor([PROMPT])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         repetition_penalty=1.8)[0, len(PROMPT):].tolist()
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)[0, len(PROMPT):].tolist()
    assert ref != plain  # the penalty matters for this prompt
    tokens, _, _, _ = run_one(engine, max_tokens=16, repetition_penalty=1.8)
    assert tokens == ref


def test_seeded_sampling_is_independent_of_batch_mates(engine):
    config = dict(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone, _, _, _ = run_one(engine, **config)
    engine.add(make_request("mate-1", [1, 9, 9, 9], max_tokens=20, temperature=0.7, seed=7))
    engine.add(make_request("target", PROMPT, **config))
    engine.add(make_request("mate-2", [1, 5] * 20, max_tokens=3, temperature=1.5))
    together = [t for o in drain(engine)["target"] for t in o.token_ids]
    assert together == alone
    other_seed, _, _, _ = run_one(engine, **{**config, "seed": 99})
    assert other_seed != alone


def test_logprobs_are_reported_per_token(engine, tiny_llama):
    model, _ = tiny_llama
    seq = engine.add(make_request("lp", PROMPT, max_tokens=4, logprobs=3, ignore_eos=True))
    outs = drain(engine)["lp"]
    tokens = [o.token_ids[0] for o in outs]
    with torch.no_grad():  # the oracle: one plain forward over prompt + output
        logits = model(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1 : -1].float()
    reference = logits.log_softmax(-1)  # [4, V]
    for i, out in enumerate(outs):
        (entry,) = out.logprobs
        assert entry["token_id"] == tokens[i]
        assert entry["logprob"] == pytest.approx(reference[i, tokens[i]].item(), abs=1e-4)
        top = reference[i].topk(3)
        assert [e["token_id"] for e in entry["top_logprobs"]] == top.indices.tolist()
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry["top_logprobs"][0]["token_id"] == entry["token_id"]  # greedy: the chosen one is the best
    assert len(seq.logprobs) == 4


def test_chat_uses_the_chat_template(engine, tiny_llama):
    _, tokenizer = tiny_llama
    body = ChatBody(messages=[ChatMessage(role="user", content="hello")], generate_config=GenerateConfig(max_tokens=2))
    seq = engine.add(Request(id="c", task=TaskKind.CHAT, body=body, created_ms=0))
    # what the tiny model's template renders, spelled out: no second BOS, the generation prompt at the end
    expected = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(seq.prompt_ids, skip_special_tokens=False) == expected
    assert seq.prompt_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert seq.prompt_ids.count(tokenizer.bos_token_id) == 0
    drain(engine)


@pytest.mark.parametrize("prompt,config,message", [
    ([1] * 300, {}, "context"),
    ([1] * 100, {"max_tokens": 200}, "exceed"),
    (PROMPT, {"max_tokens": 201}, "limit"),
    ([1, 99999], {}, "vocabulary"),
])
def test_requests_the_engine_cannot_serve_are_rejected(engine, prompt, config, message):
    with pytest.raises(RequestRejected) as err:
        engine.add(make_request("bad", prompt, **config))
    assert err.value.code == ErrorCode.INVALID_REQUEST and message in err.value.message
    assert engine.num_active == 0


def test_image_parts_are_rejected_by_a_text_model(engine):
    message = ChatMessage.model_validate({"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]})
    body = ChatBody(messages=[message])
    with pytest.raises(RequestRejected, match="image"):
        engine.add(Request(id="img", task=TaskKind.CHAT, body=body, created_ms=0))


def test_abort_frees_the_blocks_for_the_next_request(engine):
    total = engine.blocks.num_blocks
    seq = engine.add(make_request("a", PROMPT, max_tokens=50, ignore_eos=True))
    engine.step()
    assert seq.block_table and engine.blocks.num_free_blocks == total - len(seq.block_table)
    assert engine.abort("a") is not None
    assert seq.block_table == [] and engine.blocks.num_free_blocks == total and engine.num_active == 0
    assert engine.abort("a") is None
    tokens, _, _, _ = run_one(engine, max_tokens=3, ignore_eos=True)
    assert len(tokens) == 3


def test_fail_running_drops_only_running_requests(engine):
    for i in range(6):
        engine.add(make_request(f"r{i}", PROMPT, max_tokens=10))
    engine.step()
    failed = engine.fail_running()
    assert len(failed) == 4 and engine.num_active == 2
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert set(drain(engine)) == {"r4", "r5"}


def test_logprobs_of_filtered_tokens_are_left_out_so_events_stay_valid_json(engine):
    import json

    engine.add(make_request("lpk", PROMPT, max_tokens=3, temperature=1.0, top_k=1, logprobs=3, seed=1))
    for out in drain(engine)["lpk"]:
        (entry,) = out.logprobs
        assert [e["token_id"] for e in entry["top_logprobs"]] == [entry["token_id"]]
        json.loads(json.dumps(entry, allow_nan=False))


def test_kv_budget_limits_admission_and_preempts_the_newest(tiny_llama):
    model, tokenizer = tiny_llama
    engine = LLMEngine(model, tokenizer, LLMEngineConfig(max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=1024,
                                                         max_cached_tokens=1024, block_size=16))
    tensors = [t.data_ptr() for t in engine.kv.keys + engine.kv.values]
    with pytest.raises(RequestRejected, match="exceed"):
        engine.add(make_request("huge", [1] * 900, max_tokens=200))
    for i in range(4):  # 4 x (201 + 80) tokens = 4 x 18 blocks > the 64 blocks of the budget
        engine.add(make_request(f"r{i}", [1] + [7 + i] * 200, max_tokens=80, ignore_eos=True))
    first = {o.seq.request_id: [o] for o in engine.step()}
    assert len(engine.scheduler.running) == 4  # 4 x 13 blocks of prompt fit 64
    outs = drain(engine)
    outs = {k: first.get(k, []) + v for k, v in outs.items()}
    assert engine.num_preemptions >= 1  # growing past 64 blocks sent the newest back
    assert all(sum(len(o.token_ids) for o in outs[f"r{i}"]) == 80 for i in range(4))
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # a preempted sequence's blocks came back
    assert [t.data_ptr() for t in engine.kv.keys + engine.kv.values] == tensors  # allocated once, never regrown


def test_kv_budget_below_one_max_length_sequence_is_a_clear_error_at_start(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="kv-cache-tokens"):
        LLMEngine(model, tokenizer, LLMEngineConfig(max_model_len=1024, max_cached_tokens=1000))


def test_the_attention_backend_is_chosen_from_the_config(tiny_llama):
    model, tokenizer = tiny_llama
    small = {"max_num_seqs": 2, "max_model_len": 64}
    assert LLMEngine(model, tokenizer, LLMEngineConfig(**small)).attention_backend == "sdpa"  # auto, off CUDA
    assert LLMEngine(model, tokenizer, LLMEngineConfig(**small, attention_backend="flex")).attention_backend == "flex"
    with pytest.raises(ValueError, match="attention backend"):
        LLMEngine(model, tokenizer, LLMEngineConfig(**small, attention_backend="flash"))


def test_a_step_makes_one_host_to_device_copy_and_one_transfer_back(engine, monkeypatch):
    from worker.engines import batch, sampler

    for i in range(3):
        engine.add(make_request(f"t{i}", PROMPT + [i], max_tokens=3, temperature=0.8, top_k=20, seed=i, logprobs=2))
    engine.add(make_request("g", PROMPT, max_tokens=3))
    counts = {"send": 0, "to_host": 0, "item": 0, "tolist": 0}
    real_send, real_to_host = batch.Staging.send_to, sampler.SampleResult.to_host
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(batch.Staging, "send_to", counted("send", real_send))
    monkeypatch.setattr(sampler.SampleResult, "to_host", counted("to_host", real_to_host))
    monkeypatch.setattr(torch.Tensor, "item", counted("item", real_item))
    monkeypatch.setattr(torch.Tensor, "tolist", counted("tolist", real_tolist))
    outputs = engine.step()  # prefill of all four, one token each
    monkeypatch.undo()
    assert len(outputs) == 4
    assert counts == {"send": 1, "to_host": 1, "item": 0, "tolist": 1}  # to_host's one tolist, nothing per request
