"""The packed step: staging in one copy, chunk order, and each attention group's key slots and mask."""

from __future__ import annotations

import math

import pytest
import torch

from producer.protocol import GenerateConfig
from worker.engines.batch import DECODE_PAD_RATIO, Staging, build_step, order_chunks
from worker.engines.kv_cache import KVShape, PagedKVCache
from worker.request import Sequence
from worker.scheduler import ScheduledChunk

CPU = torch.device("cpu")
BLOCK_SIZE = 4


def make_cache(num_blocks: int = 16) -> PagedKVCache:
    return PagedKVCache(KVShape(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32), num_blocks,
                        BLOCK_SIZE, CPU)


def chunk(request_id: str, prompt_ids, output_ids, num_computed: int, num_tokens: int,
          block_table: list[int]) -> ScheduledChunk:
    seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=GenerateConfig(), max_tokens=8,
                   output_ids=list(output_ids), num_computed=num_computed, block_table=list(block_table))
    return ScheduledChunk(seq, num_tokens)


def decode(request_id: str, num_computed: int, block_table: list[int] | None = None) -> ScheduledChunk:
    """A sequence with num_computed tokens in the cache and one sampled token pending at position num_computed."""
    prompt = list(range(100, 100 + num_computed))
    table = block_table if block_table is not None else list(range(-(-(num_computed + 1) // BLOCK_SIZE)))
    return chunk(request_id, prompt, [900], num_computed, 1, table)


def slot(table: list[int], pos: int) -> int:
    return table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE


def band(queries: list[int], keys: list[int], window: int | None = None) -> list[list[bool]]:
    return [[k <= q and (window is None or k > q - window) for k in keys] for q in queries]


# ---------------------------------------------------------------- the mixed step used below

D1_TABLE, D2_TABLE, P1_TABLE, P2_TABLE = [3, 7], [2], [5, 9], [1, 6]


def mixed_chunks() -> list[ScheduledChunk]:
    d1 = chunk("d1", range(10, 15), [15], num_computed=5, num_tokens=1, block_table=D1_TABLE)  # decodes at 5
    d2 = chunk("d2", range(20, 23), [23], num_computed=3, num_tokens=1, block_table=D2_TABLE)  # decodes at 3
    p1 = chunk("p1", range(30, 36), [], num_computed=0, num_tokens=6, block_table=P1_TABLE)  # a fresh prompt
    p2 = chunk("p2", range(40, 50), [], num_computed=4, num_tokens=3, block_table=P2_TABLE)  # 4..6 after a cached block
    return [p1, d2, p2, d1]  # the scheduler's order does not matter


# ---------------------------------------------------------------- Staging


def test_staging_round_trips_ints_exactly_with_their_shapes():
    staging = Staging()
    big = [2**62 + 1, -(2**63), 2**63 - 1, -1, 0]
    staging.add("big", big)
    staging.add("grid", list(range(6)), (2, 3))
    staging.add("empty", [])

    out = staging.send(CPU)

    assert out["big"].dtype == torch.int64 and out["big"].tolist() == big
    assert out["grid"].shape == (2, 3) and out["grid"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out["empty"].shape == (0,)


def test_staging_round_trips_floats_bit_exactly():
    values = [0.1, -0.0, 0.0, -2.5, 1e-45, -1e-40, 3.4028234663852886e38, math.inf, -math.inf, math.nan, 1 / 3]
    staging = Staging()
    staging.add("before", [5, 6])
    staging.add_floats("f", values)
    staging.add("after", [7])

    out = staging.send(CPU)

    expected = torch.tensor(values, dtype=torch.float32)
    assert out["f"].dtype == torch.float32
    assert torch.equal(out["f"].view(torch.int32), expected.view(torch.int32))  # every bit, NaN and -0.0 included
    assert out["before"].tolist() == [5, 6] and out["after"].tolist() == [7]


def test_staging_sends_in_one_copy(monkeypatch):
    calls = []
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    staging = Staging()
    staging.add("a", [1, 2, 3])
    staging.add("b", [4], (1, 1))
    staging.add_floats("c", [0.5, 0.25])

    out = staging.send(CPU)

    assert len(calls) == 1
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()  # views of one buffer


# ---------------------------------------------------------------- order_chunks


def test_decodes_go_first_grouped_longest_first_then_prefills_in_order():
    p1 = chunk("p1", range(8), [], 0, 8, [0, 1])
    p2 = chunk("p2", range(8), [], 4, 2, [2, 3])
    lengths = {"a": 99, "b": 89, "c": 49, "d": 9, "e": 8}  # KV lengths 100, 90, 50, 10, 9 after the decode
    decodes = {name: decode(name, n) for name, n in lengths.items()}
    chunks = [p1, decodes["d"], decodes["a"], p2, decodes["e"], decodes["c"], decodes["b"]]

    groups = order_chunks(chunks)

    names = [[c.seq.request_id for c in g] for g in groups]
    # 3 * 100 padded keys == 1.25 * 240 real ones: c just fits; d (4 * 100 > 1.25 * 250) starts a new group
    assert names == [["a", "b", "c"], ["d", "e"], ["p1"], ["p2"]]


def test_decode_groups_keep_padding_within_the_ratio():
    lengths = [700, 3, 64, 65, 200, 180, 1, 17, 16, 15, 90, 512, 511, 300]
    groups = order_chunks([decode(f"s{i}", n) for i, n in enumerate(lengths)])

    assert sorted(c.seq.num_computed for g in groups for c in g) == sorted(lengths)
    flat = [c.seq.num_computed for g in groups for c in g]
    assert flat == sorted(lengths, reverse=True)
    for group in groups:
        kv = [c.seq.num_computed + 1 for c in group]
        assert len(group) * max(kv) <= DECODE_PAD_RATIO * sum(kv)


def test_single_decode_and_no_chunks():
    assert order_chunks([]) == []
    one = decode("a", 5)
    assert order_chunks([one]) == [[one]]


# ---------------------------------------------------------------- build_step: the packed tokens


def test_build_step_packs_decodes_then_prefill_chunks():
    chunks = mixed_chunks()
    p1, d2, p2, d1 = chunks

    step = build_step(chunks, make_cache(), sliding_window=None)

    assert [c.seq.request_id for c in step.chunks] == ["d1", "d2", "p1", "p2"]
    assert step.input_ids.tolist() == [[15, 23, 30, 31, 32, 33, 34, 35, 44, 45, 46]]
    assert step.position_ids.tolist() == [[5, 3, 0, 1, 2, 3, 4, 5, 4, 5, 6]]
    assert step.attention.write_slots.tolist() == (
        [slot(D1_TABLE, 5), slot(D2_TABLE, 3)] + [slot(P1_TABLE, p) for p in range(6)]
        + [slot(P2_TABLE, p) for p in range(4, 7)])
    assert step.attention.write_slots.tolist()[:4] == [29, 11, 20, 21]
    assert step.logits_rows.tolist() == [0, 1, 7]  # p2's chunk does not finish its prompt: nothing sampled
    assert step.sampled == [d1, d2, p1]
    assert step.attention.sliding_groups is None
    assert step.extra == {}


def test_build_step_stages_extras_for_the_sampled_chunks_in_the_same_copy(monkeypatch):
    calls = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    seen = []

    def add_extra(staging: Staging, sampled: list[ScheduledChunk]) -> None:
        seen.append([c.seq.request_id for c in sampled])
        staging.add_floats("temperature", [0.5 * (i + 1) for i in range(len(sampled))])
        staging.add("top_k", [len(c.seq.prompt_ids) for c in sampled])

    step = build_step(mixed_chunks(), make_cache(), sliding_window=2, add_extra=add_extra)

    assert len(calls) == 1
    assert seen == [["d1", "d2", "p1"]]
    assert set(step.extra) == {"temperature", "top_k"}
    assert step.extra["temperature"].tolist() == [0.5, 1.0, 1.5]
    assert step.extra["top_k"].tolist() == [5, 3, 6]


def test_output_tokens_of_a_recomputed_sequence_are_packed_after_its_prompt():
    resumed = chunk("r", [1, 2], [3, 4], num_computed=0, num_tokens=4, block_table=[8])
    step = build_step([resumed], make_cache(), sliding_window=None)
    assert step.input_ids.tolist() == [[1, 2, 3, 4]]
    assert step.attention.write_slots.tolist() == [32, 33, 34, 35]
    assert step.logits_rows.tolist() == [3]


# ---------------------------------------------------------------- build_step: attention groups


def test_groups_cover_the_packed_tokens_in_order():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    groups = step.attention.groups
    assert [(g.start, g.num_rows, g.num_queries, g.end) for g in groups] == [(0, 2, 1, 2), (2, 1, 6, 8), (8, 1, 3, 11)]


def test_decode_group_reads_each_row_through_its_block_table():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    group = step.attention.groups[0]  # d1 (keys 0..5) and d2 (keys 0..3)

    assert group.slots.shape == (2, 6)
    assert group.slots[0].tolist() == [slot(D1_TABLE, p) for p in range(6)]
    assert group.slots[1, :4].tolist() == [slot(D2_TABLE, p) for p in range(4)]
    assert bool(((group.slots >= 0) & (group.slots < make_cache().num_slots)).all())  # padding reads a real slot
    assert group.mask is not None and group.mask.dtype == torch.bool
    assert group.mask.shape == (2, 1, 1, 6)
    assert group.mask[:, 0, 0].tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert not group.is_causal


def test_decode_group_of_equal_lengths_has_no_mask():
    a, b = decode("a", 6, [4, 0]), decode("b", 6, [1, 2])
    step = build_step([a, b], make_cache(), sliding_window=None)

    (group,) = step.attention.groups
    assert group.mask is None and not group.is_causal
    assert group.slots.tolist() == [[16, 17, 18, 19, 0, 1, 2], [4, 5, 6, 7, 8, 9, 10]]


def test_fresh_prefill_is_causal_without_a_mask():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    group = step.attention.groups[1]
    assert group.is_causal and group.mask is None
    assert group.slots.tolist() == [[slot(P1_TABLE, p) for p in range(6)]]


def test_prefill_after_a_cached_prefix_masks_key_j_for_query_p_unless_j_le_p():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    group = step.attention.groups[2]  # queries at 4, 5, 6 over keys 0..6

    assert not group.is_causal
    assert group.slots.tolist() == [[slot(P2_TABLE, p) for p in range(7)]]
    assert group.mask.shape == (1, 1, 3, 7)
    assert group.mask[0, 0].tolist() == band([4, 5, 6], list(range(7)))


def test_no_sliding_window_means_no_sliding_groups():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    assert step.attention.groups_for(None) is step.attention.groups
    assert step.attention.groups_for(3) is step.attention.groups


def test_sliding_decode_reads_only_the_last_window_keys():
    window = 3
    step = build_step(mixed_chunks(), make_cache(), sliding_window=window)
    assert step.attention.groups_for(window) is step.attention.sliding_groups
    assert step.attention.groups_for(None) is step.attention.groups
    full, sliding = step.attention.groups[0], step.attention.sliding_groups[0]

    assert full.slots.shape == (2, 6)  # the full-attention layers still read everything
    assert sliding.slots.tolist() == [[slot(D1_TABLE, p) for p in (3, 4, 5)], [slot(D2_TABLE, p) for p in (1, 2, 3)]]
    assert sliding.mask is None  # both rows read exactly window keys


def test_sliding_decode_rows_shorter_than_the_window_are_padded():
    long, short = decode("long", 7, [0, 1]), decode("short", 6, [3, 2])  # 8 and 7 keys, all inside the window
    step = build_step([long, short], make_cache(), sliding_window=8)

    (group,) = step.attention.sliding_groups
    assert group.slots[0].tolist() == [slot([0, 1], p) for p in range(8)]
    assert group.slots[1, :7].tolist() == [slot([3, 2], p) for p in range(7)]
    assert group.mask[:, 0, 0].tolist() == [[True] * 8, [True] * 7 + [False]]


def test_sliding_prefill_masks_a_band():
    window = 3
    step = build_step(mixed_chunks(), make_cache(), sliding_window=window)
    fresh, cached = step.attention.sliding_groups[1], step.attention.sliding_groups[2]

    assert not fresh.is_causal  # a causal mask alone would read beyond the window
    assert fresh.mask[0, 0].tolist() == band(list(range(6)), list(range(6)), window)
    # queries 4..6: the first reads back to 4 - window + 1 = 2, so keys 2..6
    assert cached.slots.tolist() == [[slot(P2_TABLE, p) for p in range(2, 7)]]
    assert cached.mask[0, 0].tolist() == band([4, 5, 6], list(range(2, 7)), window)


def test_sliding_prefill_starting_mid_table_reads_through_the_right_blocks():
    prompt = list(range(40))
    table = [10, 4, 12, 3, 8, 1, 7, 9, 2, 5]
    long = chunk("long", prompt, [], num_computed=29, num_tokens=5, block_table=table)  # queries 29..33
    step = build_step([long], make_cache(), sliding_window=6)

    (group,) = step.attention.sliding_groups
    assert group.slots.tolist() == [[slot(table, p) for p in range(24, 34)]]
    assert group.mask[0, 0].tolist() == band(list(range(29, 34)), list(range(24, 34)), 6)
    (full,) = step.attention.groups
    assert full.slots.tolist() == [[slot(table, p) for p in range(34)]]
    assert full.mask[0, 0].tolist() == band(list(range(29, 34)), list(range(34)))


@pytest.mark.parametrize("window", [None, 5])
def test_every_decode_key_slot_follows_the_block_table(window):
    tables = {"a": [9, 3, 14, 0, 6], "b": [11, 2, 5, 8, 13], "c": [1, 4, 7, 10, 12]}
    chunks = [decode("a", 17, tables["a"]), decode("b", 15, tables["b"]), decode("c", 13, tables["c"])]
    step = build_step(chunks, make_cache(), sliding_window=window)

    groups = step.attention.sliding_groups if window else step.attention.groups
    assert sum(g.num_rows for g in groups) == 3
    for group in groups:  # decode groups: one packed token per row
        for row, c in enumerate(step.chunks[group.start : group.end]):
            pos = c.seq.num_computed
            first = 0 if window is None else max(0, pos - window + 1)
            expected = [slot(tables[c.seq.request_id], p) for p in range(first, pos + 1)]
            assert group.slots[row, : len(expected)].tolist() == expected
            num_padding = group.slots.shape[1] - len(expected)
            if group.mask is None:
                assert num_padding == 0
            else:
                assert group.mask[row, 0, 0].tolist() == [True] * len(expected) + [False] * num_padding
