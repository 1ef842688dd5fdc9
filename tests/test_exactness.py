"""Greedy output of the continuous-batching engine equals per-request `model.generate` (fp32).

Requests arrive at different steps, outnumber max_num_seqs, mix prompt lengths and
max_tokens, prefill in chunks, and some are aborted mid-flight. The first tests show
that the comparison can fail: the model is sensitive to its input and to its KV cache,
and deliberately broken engines (shifted positions, a leaking mask) are caught.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import make_request
from worker.engines import batch as batch_module
from worker.engines.llm import LLMEngine, LLMEngineConfig

NUM_REQUESTS = 36
ABORTED = {"r3", "r11", "r20", "r29"}


def _workload(vocab_size: int, seed: int = 0) -> list[tuple[str, list[int], int, int]]:
    """(request_id, prompt_ids, max_tokens, arrival_step) for a mixed workload."""
    rng = random.Random(seed)
    work = []
    for i in range(NUM_REQUESTS):
        prompt = [1] + [rng.randrange(5, vocab_size) for _ in range(rng.choice([2, 5, 17, 40, 90]) + rng.randrange(8))]
        work.append((f"r{i}", prompt, rng.choice([1, 3, 8, 16, 24]), rng.randrange(0, 40)))
    return work


def run_engine(model, tokenizer, work, aborts=frozenset(), max_num_seqs=6, max_num_batched_tokens=40,
               max_cached_tokens=None, stats=None):
    engine = LLMEngine(model, tokenizer, LLMEngineConfig(max_num_seqs=max_num_seqs,
                                                         max_num_batched_tokens=max_num_batched_tokens,
                                                         max_cached_tokens=max_cached_tokens))
    outputs: dict[str, list[int]] = {}
    pending = sorted(work, key=lambda w: w[3])
    step = 0
    while pending or engine.num_active:
        while pending and pending[0][3] <= step:
            request_id, prompt, max_tokens, _ = pending.pop(0)
            engine.add(make_request(request_id, prompt, max_tokens=max_tokens + (30 if request_id in aborts else 0)))
        for out in engine.step():
            outputs.setdefault(out.seq.request_id, []).extend(out.token_ids)
        for request_id in aborts:  # abort once it has produced two tokens, while still running
            if len(outputs.get(request_id, [])) == 2 and engine.abort(request_id):
                outputs[request_id].append(-1)
        step += 1
        assert step < 5000, "engine made no progress"
    if stats is not None:
        stats.update(preemptions=engine.num_preemptions, steps=step)
    return outputs


def reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def mismatches(model, work, outputs, skip=frozenset()) -> list[str]:
    return [rid for rid, prompt, max_tokens, _ in work
            if rid not in skip and outputs.get(rid) != reference(model, prompt, max_tokens)]


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def test_model_is_sensitive_to_one_early_prompt_token(tiny_model):
    model, _ = tiny_model
    rng = random.Random(1)
    num_changed = 0
    for _ in range(8):
        prompt = [1] + [rng.randrange(5, 500) for _ in range(12)]
        changed = list(prompt)
        changed[1] = (changed[1] + 1) % 500 + 5
        num_changed += reference(model, prompt, 8) != reference(model, changed, 8)
    assert num_changed >= 7


def test_model_is_sensitive_to_a_dropped_kv_row(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    work = _workload(500)[:8]
    real_mask = batch_module._additive_mask

    def drop_key_one(position_ids, valid, kv_len, dtype, window):
        mask = real_mask(position_ids, valid, kv_len, dtype, window)
        if kv_len > 2:
            mask[..., 1] = torch.finfo(dtype).min  # no query may read position 1
        return mask

    monkeypatch.setattr(batch_module, "_additive_mask", drop_key_one)
    outputs = run_engine(model, tokenizer, work)
    assert len(mismatches(model, work, outputs)) >= 4


def test_shifted_positions_fail_the_comparison(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    work = _workload(500)[:8]
    real_build = batch_module.build_group

    def shifted(*args, **kwargs):
        # decode tokens one position late (RoPE is relative: a shift of every position would be harmless)
        inputs = real_build(*args, **kwargs)
        if inputs.position_ids.shape[1] == 1:
            inputs.position_ids = inputs.position_ids + 1
        return inputs

    monkeypatch.setattr("worker.engines.llm.build_group", shifted)
    assert len(mismatches(model, work, run_engine(model, tokenizer, work))) >= 4


def test_leaking_mask_fails_the_comparison(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    work = _workload(500)
    real_mask = batch_module._additive_mask

    def leaky(position_ids, valid, kv_len, dtype, window):
        mask = real_mask(position_ids, valid, kv_len, dtype, window)
        mask.zero_()  # every query reads every key of its slot: padding, stale rows, the future
        return mask

    monkeypatch.setattr(batch_module, "_additive_mask", leaky)
    assert len(mismatches(model, work, run_engine(model, tokenizer, work))) >= NUM_REQUESTS // 2


def test_greedy_output_equals_generate_per_request(tiny_model):
    model, tokenizer = tiny_model
    work = _workload(500)
    outputs = run_engine(model, tokenizer, work, aborts=ABORTED)
    for request_id in ABORTED:  # aborted mid-flight: two tokens, then nothing
        assert outputs[request_id][-1] == -1 and len(outputs[request_id]) == 3
    assert mismatches(model, work, outputs, skip=ABORTED) == []
    assert len({tuple(v) for k, v in outputs.items() if k not in ABORTED}) > NUM_REQUESTS // 2  # not one answer for all


def test_exact_without_chunking_and_at_one_seq(tiny_model):
    model, tokenizer = tiny_model
    work = _workload(500, seed=3)[:12]
    assert mismatches(model, work, run_engine(model, tokenizer, work, max_num_seqs=1, max_num_batched_tokens=4096)) == []
    assert mismatches(model, work, run_engine(model, tokenizer, work, max_num_seqs=12, max_num_batched_tokens=4096)) == []


def test_exact_under_kv_pressure_with_preemption(tiny_model):
    model, tokenizer = tiny_model
    rng = random.Random(5)
    work = [(f"p{i}", [1] + [rng.randrange(5, 500) for _ in range(rng.randrange(180, 240))], rng.choice([40, 70]),
             rng.randrange(0, 6)) for i in range(10)]
    stats: dict = {}
    # 1536 tokens: six rows of 256, but only three once a sequence passes 256 tokens
    outputs = run_engine(model, tokenizer, work, max_num_seqs=6, max_num_batched_tokens=512, max_cached_tokens=1536,
                         stats=stats)
    assert stats["preemptions"] > 0
    assert mismatches(model, work, outputs) == []
