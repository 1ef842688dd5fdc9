"""Greedy output of the continuous-batching engine equals per-request `model.generate` (fp32).

Requests arrive at different steps, outnumber max_num_seqs, mix prompt lengths and
max_tokens, prefill in chunks, share prefixes through the prefix cache, get preempted
under KV pressure (with eviction), and some are aborted mid-flight. The first tests show
that the comparison can fail: the model is sensitive to its input, its KV cache and its
window, and deliberately broken engines (late positions, a leaking mask, a dropped key, a
prefix cache that matches too loosely) are caught.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import make_request
from worker.engines import attention as attention_module
from worker.engines import batch as batch_module
from worker.engines import blocks as blocks_module
from worker.engines.llm import LLMEngine, LLMEngineConfig

NUM_REQUESTS = 36
ABORTED = {"r3", "r11", "r20", "r29"}
SYSTEM_PROMPT_LEN = 50  # three full blocks of 16 and a partial one


def _workload(vocab_size: int, seed: int = 0) -> list[tuple[str, list[int], int, int]]:
    """(request_id, prompt_ids, max_tokens, arrival_step) for a mixed workload."""
    rng = random.Random(seed)
    work = []
    for i in range(NUM_REQUESTS):
        prompt = [1] + [rng.randrange(5, vocab_size) for _ in range(rng.choice([2, 5, 17, 40, 90]) + rng.randrange(8))]
        work.append((f"r{i}", prompt, rng.choice([1, 3, 8, 16, 24]), rng.randrange(0, 40)))
    return work


def _shared_prefix_workload(vocab_size: int, seed: int = 0, num: int = 24) -> list[tuple[str, list[int], int, int]]:
    """A system prompt shared by every request, different user turns; some prompts repeat exactly."""
    rng = random.Random(seed)
    system = [1] + [rng.randrange(5, vocab_size) for _ in range(SYSTEM_PROMPT_LEN - 1)]
    work = []
    for i in range(num):
        turn = [rng.randrange(5, vocab_size) for _ in range(rng.choice([3, 14, 30, 47]))]
        if i % 6 == 5:
            turn = work[i - 1][1][SYSTEM_PROMPT_LEN:]  # the same prompt again: served from the cache but its last block
        work.append((f"s{i}", system + turn, rng.choice([4, 12, 20]), rng.randrange(0, 30)))
    return work


def run_engine(model, tokenizer, work, aborts=frozenset(), stats=None, **config):
    config = {"max_num_seqs": 6, "max_num_batched_tokens": 40, **config}
    engine = LLMEngine(model, tokenizer, LLMEngineConfig(**config))
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
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # every block came back
    if stats is not None:
        stats.update(preemptions=engine.num_preemptions, steps=step, hit_tokens=engine.blocks.num_hit_tokens,
                     evicted=engine.blocks.num_evicted_blocks)
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


@pytest.fixture(scope="module")
def tiny_sliding(tmp_path_factory, torch_threads):
    """Qwen2 whose second layer attends through an 8-token sliding window (the first one sees everything)."""
    from worker.models.loading import load_llm
    from worker.models.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("tiny-sliding"), arch="qwen2", seed=2, sliding_window=8)
    return load_llm(str(path))


# ---------------------------------------------------------------- the comparison can fail


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


def _patch_groups(monkeypatch, edit):
    real = batch_module._device_variant

    def patched(*args, **kwargs):
        block_ids, groups = real(*args, **kwargs)
        for group in groups:
            edit(group)
        return block_ids, groups

    monkeypatch.setattr(batch_module, "_device_variant", patched)


def test_model_is_sensitive_to_a_dropped_key(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    work = _workload(500)[:8]
    real_rows = attention_module._rows_keys

    def key_zero_for_key_one(blocks, group):
        keys = real_rows(blocks, group).clone()  # [G, Hkv, L, D]
        if keys.shape[2] > 2:
            keys[:, :, 1] = keys[:, :, 0]  # position 1's key/value replaced by position 0's
        return keys

    monkeypatch.setattr(attention_module, "_rows_keys", key_zero_for_key_one)
    assert len(mismatches(model, work, run_engine(model, tokenizer, work))) >= 4


def test_late_decode_positions_fail_the_comparison(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    work = _workload(500)[:8]
    real_build = batch_module.build_step

    def shifted(*args, **kwargs):
        # decode tokens one position late (RoPE is relative: a shift of every position would be harmless)
        inputs = real_build(*args, **kwargs)
        num_decodes = sum(1 for c in inputs.chunks if c.num_tokens == 1)
        inputs.position_ids[0, :num_decodes] += 1
        return inputs

    monkeypatch.setattr("worker.engines.llm.build_step", shifted)
    assert len(mismatches(model, work, run_engine(model, tokenizer, work))) >= 4


def test_leaking_mask_fails_the_comparison(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    work = _workload(500)

    def leak(group):
        group.mask = None  # every query reads every key of its rows: padding, and the future of a chunk
        group.is_causal = False

    _patch_groups(monkeypatch, leak)
    assert len(mismatches(model, work, run_engine(model, tokenizer, work))) >= NUM_REQUESTS // 2


def test_a_prefix_cache_that_matches_too_loosely_fails_the_comparison(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    work = _shared_prefix_workload(500)
    for i, (rid, prompt, max_tokens, arrival) in enumerate(work):  # same first 8 tokens of every block's user turn...
        work[i] = (rid, prompt[:SYSTEM_PROMPT_LEN] + [7] * 8 + prompt[SYSTEM_PROMPT_LEN:], max_tokens, arrival)
    real_tokens = blocks_module.BlockManager._block_tokens

    def first_half_only(self, seq, index):
        return real_tokens(self, seq, index)[: self.block_size // 2]  # ...and a cache that only looks at those

    monkeypatch.setattr(blocks_module.BlockManager, "_block_tokens", first_half_only)
    assert len(mismatches(model, work, run_engine(model, tokenizer, work))) >= 4


def test_model_is_sensitive_to_its_sliding_window(tiny_sliding, monkeypatch):
    model, tokenizer = tiny_sliding
    work = [(rid, prompt, max_tokens, arrival) for rid, prompt, max_tokens, arrival in _workload(500)[:12]
            if len(prompt) > 16]
    monkeypatch.setattr("worker.engines.llm._sliding_window", lambda *_: None)  # an engine that ignores the window
    assert len(mismatches(model, work, run_engine(model, tokenizer, work))) >= len(work) // 2


# ---------------------------------------------------------------- exactness


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


def test_exact_with_shared_prefixes_and_an_aborted_sharer(tiny_model, monkeypatch):
    from worker.engines import attention

    model, tokenizer = tiny_model
    work = _shared_prefix_workload(500)
    aborted = {"s2", "s9"}
    stats: dict = {}
    shared_calls = []
    real = attention._shared_prefix_attention
    monkeypatch.setattr(attention, "_shared_prefix_attention",
                        lambda *args: shared_calls.append(args[3].num_rows) or real(*args))
    outputs = run_engine(model, tokenizer, work, aborts=aborted, stats=stats, block_size=16)
    assert stats["hit_tokens"] >= 16 * 3 * (len(work) // 2)  # most requests found the system prompt cached
    assert shared_calls and max(shared_calls) >= 3  # decode groups read the cached system prompt once
    assert mismatches(model, work, outputs, skip=aborted) == []
    no_cache = run_engine(model, tokenizer, work, aborts=aborted, block_size=16, enable_prefix_caching=False)
    assert {k: v for k, v in no_cache.items() if k not in aborted} == {k: v for k, v in outputs.items() if k not in aborted}


def test_exact_under_kv_pressure_with_preemption_and_eviction(tiny_model):
    model, tokenizer = tiny_model
    rng = random.Random(5)
    system = [1] + [rng.randrange(5, 500) for _ in range(63)]
    work = [(f"p{i}", system + [rng.randrange(5, 500) for _ in range(rng.randrange(120, 180))], rng.choice([40, 70]),
             rng.randrange(0, 6)) for i in range(10)]
    stats: dict = {}
    # 1024 tokens = 64 blocks of 16: about four of these sequences at a time, fewer as they grow
    outputs = run_engine(model, tokenizer, work, max_num_seqs=6, max_num_batched_tokens=512, max_cached_tokens=1024,
                         max_model_len=1024, stats=stats)
    assert stats["preemptions"] > 0 and stats["evicted"] > 0 and stats["hit_tokens"] > 0
    assert mismatches(model, work, outputs) == []


def test_exact_with_a_sliding_window(tiny_sliding):
    model, tokenizer = tiny_sliding
    work = _workload(500, seed=4)[:16]
    assert mismatches(model, work, run_engine(model, tokenizer, work, max_num_batched_tokens=24)) == []


def test_the_flex_backend_is_exact_with_chunking_prefix_reuse_and_preemption(tiny_model):
    model, tokenizer = tiny_model
    rng = random.Random(6)
    system = [1] + [rng.randrange(5, 500) for _ in range(63)]
    work = _workload(500, seed=6)[:6] + [
        (f"p{i}", system + [rng.randrange(5, 500) for _ in range(rng.randrange(100, 140))], 40, rng.randrange(0, 6))
        for i in range(6)]
    stats: dict = {}
    engine_config = {"attention_backend": "flex", "max_cached_tokens": 640, "max_model_len": 512,
                     "max_num_batched_tokens": 96}
    outputs = run_engine(model, tokenizer, work, aborts={"r3"}, stats=stats, **engine_config)
    assert stats["hit_tokens"] > 0 and stats["preemptions"] > 0, stats
    assert mismatches(model, work, outputs, skip={"r3"}) == []


def test_the_flex_backend_honours_a_sliding_window(tiny_sliding):
    model, tokenizer = tiny_sliding
    work = _workload(500, seed=7)[:10]
    assert mismatches(model, work, run_engine(model, tokenizer, work, max_num_batched_tokens=24,
                                              attention_backend="flex")) == []


def test_an_out_of_memory_step_preempts_retries_and_stays_exact(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    work = _workload(500, seed=6)[:12]
    real_forward = type(model).forward
    state = {"failures": 0, "limit": 4}

    def forward_that_runs_out_of_memory(self, *args, **kwargs):
        if kwargs["input_ids"].shape[1] > 20 and state["failures"] < state["limit"]:  # big steps fail, a few times
            state["failures"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward_that_runs_out_of_memory)
    stats: dict = {}
    outputs = run_engine(model, tokenizer, work, stats=stats)
    monkeypatch.undo()
    assert state["failures"] == 4 and stats["preemptions"] > 0
    assert mismatches(model, work, outputs) == []


def test_an_out_of_memory_that_preempting_does_not_clear_fails_the_step(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    engine = LLMEngine(model, tokenizer, LLMEngineConfig(max_num_seqs=4, max_num_batched_tokens=64))
    for i in range(4):
        engine.add(make_request(f"o{i}", [1] + [9 + i] * 20, max_tokens=5))

    def always_out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(model), "forward", always_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()
    monkeypatch.undo()
    assert engine.num_preemptions >= 2  # it preempted before giving up
    assert engine.num_active == 4 and all(s.num_output_tokens == 0 for s in engine.sequences())


def test_interactive_requests_preempt_bulk_ones_and_every_output_stays_exact(tiny_model):
    """A saturating bulk load, then interactive requests arriving one by one: each interactive request
    samples its first token in the step it arrives (a bulk request is preempted for it) and every
    output, bulk ones recomputed after preemption included, equals `generate`."""
    from producer.protocol import Priority

    model, tokenizer = tiny_model
    rng = random.Random(11)
    bulk = [(f"b{i}", [1] + [rng.randrange(5, 500) for _ in range(rng.randrange(10, 40))], 30, 0) for i in range(8)]
    chats = [(f"i{i}", [1] + [rng.randrange(5, 500) for _ in range(rng.randrange(4, 20))], 8, step)
             for i, step in enumerate((3, 9, 10, 22))]
    engine = LLMEngine(model, tokenizer, LLMEngineConfig(max_num_seqs=4, max_num_batched_tokens=64))
    outputs: dict[str, list[int]] = {}
    first_step: dict[str, int] = {}
    pending = sorted(bulk + chats, key=lambda w: w[3])
    step = 0
    while pending or engine.num_active:
        while pending and pending[0][3] <= step:
            request_id, prompt, max_tokens, _ = pending.pop(0)
            level = Priority.INTERACTIVE if request_id.startswith("i") else Priority.BULK
            engine.add(make_request(request_id, prompt, max_tokens=max_tokens).model_copy(update={"priority": level}))
        for out in engine.step():
            outputs.setdefault(out.seq.request_id, []).extend(out.token_ids)
            first_step.setdefault(out.seq.request_id, step)
        step += 1
        assert step < 2000, "engine made no progress"
    assert engine.num_preemptions >= len(chats)  # the engine was full of bulk work each time a chat came
    assert {rid: first_step[rid] - arrival for rid, _, _, arrival in chats} == {rid: 0 for rid, *_ in chats}
    assert mismatches(model, bulk + chats, outputs) == []
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
