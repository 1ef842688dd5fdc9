"""paged_attention: the packed step's attention equals per-sequence SDPA; without step metadata it is SDPA."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from producer.protocol import GenerateConfig
from worker.engines import attention
from worker.engines.batch import build_step
from worker.engines.kv_cache import KVShape, PagedKVCache
from worker.request import Sequence
from worker.scheduler import ScheduledChunk

CPU = torch.device("cpu")
BLOCK_SIZE = 4
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8  # GQA: two query heads per KV head
SCALING = 0.3  # not SDPA's default 1/sqrt(D), so a dropped scale shows


class FakeAttention(nn.Module):
    """What an HF attention module exposes to its attention function."""

    def __init__(self, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_key_value_groups = NUM_HEADS // NUM_KV_HEADS
        self.is_causal = True


@dataclass
class Case:
    """One sequence's keys/values for every position and queries for the positions computed in the step."""

    chunk: ScheduledChunk
    keys: torch.Tensor  # [P, Hkv, D], P = num_computed + num_tokens
    values: torch.Tensor  # [P, Hkv, D]
    queries: torch.Tensor  # [T, H, D]


def make_case(gen: torch.Generator, request_id: str, num_computed: int, num_tokens: int,
              block_table: list[int]) -> Case:
    total = num_computed + num_tokens
    seq = Sequence(request_id=request_id, prompt_ids=list(range(total)), params=GenerateConfig(), max_tokens=8,
                   num_computed=num_computed, block_table=block_table)
    return Case(ScheduledChunk(seq, num_tokens), torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen),
                torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen),
                torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, generator=gen))


def slots_of(case: Case, positions) -> torch.Tensor:
    table = case.chunk.seq.block_table
    return torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions], dtype=torch.long)


def mixed_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    return [
        make_case(gen, "fresh", 0, 7, [3, 8]),  # a prompt from position 0
        make_case(gen, "decode_long", 9, 1, [0, 5, 11]),
        make_case(gen, "cached", 5, 6, [1, 9, 12]),  # queries 5..10 after a cached prefix
        make_case(gen, "decode_short", 8, 1, [2, 6, 13]),
        make_case(gen, "decode_other", 3, 1, [4]),  # far shorter: a decode group of its own
    ]


def run_paged(cases: list[Case], sliding_window: int | None = None, contiguous_query: bool = False,
              layer_window: int | None | str = "model", flex_blocks: tuple[int, int] | None = None,
              softcap: float | None = None):
    """The packed step (built for a model with `sliding_window`) through paged_attention in a layer whose own
    window is `layer_window` (the model's unless given); returns (output [N, H, D] per case, cache, step)."""
    if layer_window == "model":
        layer_window = sliding_window
    cache = PagedKVCache(KVShape(1, NUM_KV_HEADS, HEAD_DIM, torch.float32), num_blocks=16, block_size=BLOCK_SIZE,
                         device=CPU)
    for case in cases:  # the cached prefix is already in the cache
        computed = range(case.chunk.seq.num_computed)
        cache.keys[0][slots_of(case, computed)] = case.keys[: len(computed)]
        cache.values[0][slots_of(case, computed)] = case.values[: len(computed)]
    step = build_step([c.chunk for c in cases], cache, sliding_window, flex_blocks=flex_blocks)
    by_seq = {id(c.chunk.seq): c for c in cases}
    packed = [by_seq[id(chunk.seq)] for chunk in step.chunks]
    new = [slice(c.chunk.seq.num_computed, None) for c in packed]
    query = torch.cat([c.queries for c in packed]).transpose(0, 1)[None]  # [1, H, N, D], a view as q_proj gives
    if contiguous_query:  # as after an elementwise op that lays it out afresh
        query = query.contiguous()
    key = torch.cat([c.keys[s] for c, s in zip(packed, new)]).transpose(0, 1)[None]  # [1, Hkv, N, D]
    value = torch.cat([c.values[s] for c, s in zip(packed, new)]).transpose(0, 1)[None]

    extra = {"softcap": softcap} if softcap is not None else {}
    out, weights = attention.paged_attention(FakeAttention(), query, key, value, None, scaling=SCALING,
                                             sliding_window=layer_window, **extra,
                                             **{attention.STEP_KWARG: step.attention})

    assert weights is None
    assert out.shape == (1, query.shape[2], NUM_HEADS, HEAD_DIM)
    outputs, start = {}, 0
    for case in packed:
        outputs[case.chunk.seq.request_id] = out[0, start : start + case.chunk.num_tokens]
        start += case.chunk.num_tokens
    return outputs, cache, step


def reference(case: Case, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """transformers' SDPA attention on this sequence alone (eager attention when softcapped): [T, H, D]."""
    start = case.chunk.seq.num_computed
    total = start + case.chunk.num_tokens
    query = case.queries.transpose(0, 1)[None]  # [1, H, T, D]
    key, value = case.keys.transpose(0, 1)[None], case.values.transpose(0, 1)[None]  # [1, Hkv, P, D]
    q_pos = torch.arange(start, total)[:, None]
    k_pos = torch.arange(total)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    if softcap is not None:
        rep = NUM_HEADS // NUM_KV_HEADS
        scores = query @ key.repeat_interleave(rep, dim=1).transpose(-1, -2) * SCALING  # [1, H, T, P]
        scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~allowed, float("-inf"))
        out = scores.softmax(-1) @ value.repeat_interleave(rep, dim=1)  # [1, H, T, D]
        return out[0].transpose(0, 1)
    out, _ = sdpa_attention_forward(FakeAttention(), query, key, value, allowed[None, None], scaling=SCALING)
    return out[0]  # [T, H, D]


def by_hand(case: Case) -> torch.Tensor:
    """Plain SDPA with the KV heads repeated and an explicit causal mask: [T, H, D]."""
    start = case.chunk.seq.num_computed
    total = start + case.chunk.num_tokens
    rep = NUM_HEADS // NUM_KV_HEADS
    key = case.keys.repeat_interleave(rep, dim=1).transpose(0, 1)  # [H, P, D]
    value = case.values.repeat_interleave(rep, dim=1).transpose(0, 1)
    allowed = torch.arange(total)[None, :] <= torch.arange(start, total)[:, None]  # [T, P]
    out = torch.nn.functional.scaled_dot_product_attention(case.queries.transpose(0, 1), key, value,
                                                           attn_mask=allowed, scale=SCALING)
    return out.transpose(0, 1)


@pytest.mark.parametrize("contiguous_query", [False, True])
def test_packed_step_equals_sdpa_per_sequence(contiguous_query):
    cases = mixed_cases()
    outputs, _, step = run_paged(cases, contiguous_query=contiguous_query)

    assert len(step.attention.groups) == 4  # two decode groups, two prefills
    for case in cases:
        got = outputs[case.chunk.seq.request_id]
        torch.testing.assert_close(got, reference(case), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, by_hand(case), rtol=1e-5, atol=1e-5)


def test_packed_step_writes_the_new_keys_and_values_at_their_slots():
    cases = mixed_cases()
    _, cache, _ = run_paged(cases)

    for case in cases:
        seq = case.chunk.seq
        every = slots_of(case, range(seq.num_computed + case.chunk.num_tokens))
        assert torch.equal(cache.keys[0][every], case.keys)
        assert torch.equal(cache.values[0][every], case.values)
    held = torch.cat([slots_of(c, range(c.chunk.seq.num_tokens)) for c in cases])
    untouched = torch.ones(cache.num_slots, dtype=torch.bool)
    untouched[held] = False
    assert not cache.keys[0][untouched].any() and not cache.values[0][untouched].any()


@pytest.mark.parametrize("window", [2, 4])
def test_sliding_window_layers_equal_windowed_sdpa(window):
    cases = mixed_cases()
    outputs, _, _ = run_paged(cases, sliding_window=window)
    for case in cases:
        torch.testing.assert_close(outputs[case.chunk.seq.request_id], reference(case, window), rtol=1e-5, atol=1e-5)


def test_full_attention_layers_of_a_sliding_model_read_every_key():
    cases = mixed_cases()
    cache = PagedKVCache(KVShape(1, NUM_KV_HEADS, HEAD_DIM, torch.float32), 16, BLOCK_SIZE, CPU)
    step = build_step([c.chunk for c in cases], cache, sliding_window=2)
    block_ids, groups = step.attention.layout_for(None)  # a layer without a window
    assert block_ids is step.attention.block_ids and groups is step.attention.groups
    assert step.attention.layout_for(2) is step.attention.sliding

    outputs, _, _ = run_paged(cases, sliding_window=2, layer_window=None)
    for case in cases:
        torch.testing.assert_close(outputs[case.chunk.seq.request_id], reference(case), rtol=1e-5, atol=1e-5)


def unmasked_decode_cases() -> list[Case]:
    """Decodes whose groups need no mask: equal lengths (12 keys), and, with a window of 4, reads of exactly
    one whole block (keys 8..11)."""
    gen = torch.Generator().manual_seed(2)
    return [make_case(gen, "a", 11, 1, [7, 2, 14]), make_case(gen, "b", 11, 1, [3, 10, 5])]


@pytest.mark.parametrize("window", [None, 4])
def test_decode_groups_without_a_mask_equal_sdpa(window):
    cases = unmasked_decode_cases()
    outputs, _, step = run_paged(cases, sliding_window=window)
    _, groups = step.attention.layout_for(window)
    assert [g.mask for g in groups] == [None]  # the path under test
    for case in cases:
        torch.testing.assert_close(outputs[case.chunk.seq.request_id], reference(case, window), rtol=1e-5, atol=1e-5)


def test_without_step_metadata_it_is_transformers_sdpa():
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(2, NUM_HEADS, 5, HEAD_DIM, generator=gen)
    key = torch.randn(2, NUM_KV_HEADS, 5, HEAD_DIM, generator=gen)
    value = torch.randn(2, NUM_KV_HEADS, 5, HEAD_DIM, generator=gen)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, 0] = False  # a left-padded row
    mask[1, :, 0, 0] = True

    for attention_mask in (None, mask):
        got, got_weights = attention.paged_attention(FakeAttention(), query, key, value, attention_mask,
                                                     scaling=SCALING)
        want, want_weights = sdpa_attention_forward(FakeAttention(), query, key, value, attention_mask,
                                                    scaling=SCALING)
        assert torch.equal(got, want)
        assert got_weights is None and want_weights is None


def test_softcapping_is_refused_with_step_metadata():
    cases = mixed_cases()[:1]
    cache = PagedKVCache(KVShape(1, NUM_KV_HEADS, HEAD_DIM, torch.float32), 16, BLOCK_SIZE, CPU)
    step = build_step([c.chunk for c in cases], cache, None)
    query = cases[0].queries.transpose(0, 1)[None]
    key = cases[0].keys.transpose(0, 1)[None]
    with pytest.raises(ValueError, match="softcap"):
        attention.paged_attention(FakeAttention(), query, key, key, None, softcap=30.0,
                                  **{attention.STEP_KWARG: step.attention})


def test_register_is_idempotent_and_names_the_function():
    assert attention.register() == attention.ATTENTION_NAME
    assert attention.register() == attention.ATTENTION_NAME
    assert AttentionInterface()[attention.ATTENTION_NAME] is attention.paged_attention


@pytest.mark.parametrize("window", [None, 3])
def test_random_packed_steps_equal_sdpa_per_sequence(window):
    gen = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    for _ in range(10):
        blocks = list(range(16))
        rng.shuffle(blocks)
        cases = []
        for i in range(rng.randint(1, 4)):
            computed = rng.randint(0, 10)
            num_tokens = 1 if computed and rng.random() < 0.5 else rng.randint(1, 5)
            needed = -(-(computed + num_tokens) // BLOCK_SIZE)
            table, blocks = blocks[:needed], blocks[needed:]
            cases.append(make_case(gen, f"s{i}", computed, num_tokens, table))
        outputs, _, _ = run_paged(cases, sliding_window=window)
        for case in cases:
            torch.testing.assert_close(outputs[case.chunk.seq.request_id], reference(case, window), rtol=1e-5,
                                       atol=1e-5)


# ---------------------------------------------------------------- the flex-attention backend

FLEX_BLOCKS = [(4, 4), (8, 16), (16, 16)]  # BlockMask blocks smaller and larger than a cache block and a row


@pytest.mark.parametrize("flex_blocks", FLEX_BLOCKS)
@pytest.mark.parametrize("window", [None, 2, 4])
def test_flex_packed_step_equals_sdpa_per_sequence(flex_blocks, window):
    cases = mixed_cases()
    outputs, _, step = run_paged(cases, sliding_window=window, flex_blocks=flex_blocks)

    assert step.attention.flex is not None and step.attention.groups == []  # the path under test
    for case in cases:
        torch.testing.assert_close(outputs[case.chunk.seq.request_id], reference(case, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flex_blocks", FLEX_BLOCKS)
def test_flex_full_attention_layers_of_a_sliding_model_read_every_key(flex_blocks):
    cases = mixed_cases()
    outputs, _, step = run_paged(cases, sliding_window=2, layer_window=None, flex_blocks=flex_blocks)
    assert step.attention.flex_sliding is not None
    for case in cases:
        torch.testing.assert_close(outputs[case.chunk.seq.request_id], reference(case), rtol=1e-5, atol=1e-5)


def test_flex_applies_logit_softcapping():
    cases = mixed_cases()
    outputs, _, _ = run_paged(cases, flex_blocks=(4, 4), softcap=0.5)
    for case in cases:
        got = outputs[case.chunk.seq.request_id]
        torch.testing.assert_close(got, reference(case, softcap=0.5), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, reference(case), rtol=1e-3, atol=1e-3)  # the cap changed something


@pytest.mark.parametrize("window", [None, 3])
def test_flex_random_packed_steps_equal_sdpa_per_sequence(window):
    gen = torch.Generator().manual_seed(4)
    rng = random.Random(4)
    for _ in range(10):
        blocks = list(range(16))
        rng.shuffle(blocks)
        cases = []
        for i in range(rng.randint(1, 5)):
            computed = rng.randint(0, 10)
            num_tokens = 1 if computed and rng.random() < 0.5 else rng.randint(1, 5)
            needed = -(-(computed + num_tokens) // BLOCK_SIZE)
            if needed > len(blocks):
                break
            table, blocks = blocks[:needed], blocks[needed:]
            cases.append(make_case(gen, f"s{i}", computed, num_tokens, table))
        outputs, _, _ = run_paged(cases, sliding_window=window, flex_blocks=rng.choice(FLEX_BLOCKS))
        for case in cases:
            torch.testing.assert_close(outputs[case.chunk.seq.request_id], reference(case, window), rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("flex_blocks", FLEX_BLOCKS)
@pytest.mark.parametrize("window", [None, 2])
def test_flex_block_mask_lists_every_key_block_a_query_block_can_see(flex_blocks, window):
    """The eager reference applies mask_mod densely, so the block lists are checked here: a key block left out
    would be skipped by the CUDA kernel."""
    cases = mixed_cases()
    cache = PagedKVCache(KVShape(1, NUM_KV_HEADS, HEAD_DIM, torch.float32), 16, BLOCK_SIZE, CPU)
    step = build_step([c.chunk for c in cases], cache, window, flex_blocks=flex_blocks)
    layout = step.attention.flex_sliding if window else step.attention.flex
    mask = layout.block_mask
    num_q, num_kv = mask.seq_lengths
    q_idx, kv_idx = torch.arange(num_q)[:, None], torch.arange(num_kv)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    visible = mask.mask_mod(zero, zero, q_idx, kv_idx)  # [N, L]
    q_block, kv_block = flex_blocks
    needed = torch.zeros(-(-num_q // q_block), -(-num_kv // kv_block), dtype=torch.bool)
    for q, kv in visible.nonzero().tolist():
        needed[q // q_block, kv // kv_block] = True
    listed = mask.to_dense()[0, 0].bool()[: needed.shape[0], : needed.shape[1]]
    assert needed.any()
    assert not (needed & ~listed).any()
    if needed.shape[0] > 1:  # several query blocks: each lists only its own rows' key blocks
        assert listed.sum() < listed.numel()
    assert sum(visible.sum(1) == 0) == 0  # every query sees at least itself


def shared_prefix_cases() -> list[Case]:
    """Four decodes whose first two blocks (8 keys) are the same cached blocks 4, 5 (a shared system prompt),
    then blocks of their own, at different lengths (11..14 keys: the group pads and masks), and a fifth that
    shares nothing."""
    gen = torch.Generator().manual_seed(3)
    prefix_k = torch.randn(8, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    prefix_v = torch.randn(8, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    cases = []
    for request_id, computed, own in (("a", 10, [6, 7]), ("b", 13, [8, 9]), ("c", 11, [10]), ("d", 12, [11, 12])):
        case = make_case(gen, request_id, computed, 1, [4, 5, *own])
        case.keys[:8], case.values[:8] = prefix_k, prefix_v
        cases.append(case)
    cases.append(make_case(gen, "alone", 12, 1, [0, 1, 2, 3]))
    return cases


@pytest.mark.parametrize("elementwise", [True, False])
@pytest.mark.parametrize("window", [None, 6])
def test_decodes_sharing_cached_blocks_equal_sdpa_per_sequence(window, elementwise, monkeypatch):
    """Both ways of computing a row's own part: the CPU's product-and-sum and the matmul used elsewhere."""
    if not elementwise:
        monkeypatch.setattr(attention, "ELEMENTWISE_MAX", 0)
    calls = []
    real = attention._shared_prefix_attention
    monkeypatch.setattr(attention, "_shared_prefix_attention", lambda *args: calls.append(args[3]) or real(*args))
    cases = shared_prefix_cases()
    outputs, _, step = run_paged(cases, sliding_window=window)
    if window is None:  # the sharers' group reads blocks 4, 5 once; a windowed layer reads per row
        assert [(g.num_rows, g.shared_blocks) for g in calls] == [(4, 2)]
    else:
        assert calls == []
    for case in cases:
        torch.testing.assert_close(outputs[case.chunk.seq.request_id], reference(case, window), rtol=1e-5, atol=1e-5)
