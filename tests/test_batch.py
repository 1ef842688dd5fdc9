"""The packed step: staging in one copy, chunk order, and the blocks each attention group reads and its mask."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

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
    assert step.attention.sliding is None
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


# ---------------------------------------------------------------- what an attention group reads


@dataclass
class RowRead:
    """One row of an attention group as paged_attention sees it: key j is the key at position base + j (whole
    blocks from the block that holds the row's first visible key), read from `slots[j]`."""

    positions: list[int]
    slots: list[int]
    visible: list[list[bool]]  # [T][L]: may query t attend key j (the group's mask, or SDPA's causal one)

    def visible_positions(self, query: int = 0) -> list[int]:
        return [p for p, v in zip(self.positions, self.visible[query]) if v]

    def visible_slots(self, query: int = 0) -> list[int]:
        return [s for s, v in zip(self.slots, self.visible[query]) if v]

    def hidden_slots(self) -> list[int]:
        """Slots no query of the row may attend (padding, or keys outside the row's range)."""
        return [s for j, s in enumerate(self.slots) if not any(row[j] for row in self.visible)]


def reads(block_ids: torch.Tensor, group, first_keys: list[int], num_cache_blocks: int = 16) -> list[RowRead]:
    """Derive, from the flat block ids and one group, the slot of every key each row reads and what its mask
    leaves visible. `first_keys[r]` is the position of row r's first visible key (the test's expectation):
    the row's reads start at the block that holds it."""
    rows, queries, nb, width = group.num_rows, group.num_queries, group.num_blocks, group.num_keys
    shared = group.shared_blocks
    assert len(first_keys) == rows
    assert block_ids.dtype == torch.int64 and block_ids.dim() == 1
    assert 0 <= group.block_offset and group.block_offset + shared + rows * nb <= block_ids.numel()
    first = group.block_offset + shared
    ids = block_ids[first : first + rows * nb].view(rows, nb)
    assert bool(((ids >= 0) & (ids < num_cache_blocks)).all()), "every block read (padding too) is a real block"
    assert 0 < width <= nb * BLOCK_SIZE
    slots = (ids[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(rows, nb * BLOCK_SIZE)[:, :width]
    if group.mask is None:
        if group.is_causal:
            assert queries == width, "SDPA's causal mask is top-left aligned: only right for T == L"
            visible = torch.ones(queries, width, dtype=torch.bool).tril().expand(rows, queries, width)
        else:
            visible = torch.ones(rows, queries, width, dtype=torch.bool)
    else:
        assert not group.is_causal
        assert group.mask.dtype == torch.bool and group.mask.dim() == 4
        assert group.mask.shape[0] in (1, rows) and group.mask.shape[1] == 1
        assert group.mask.shape[2] == queries and group.mask.shape[3] == width
        visible = group.mask.expand(rows, 1, queries, width)[:, 0]
    out = []
    shared_ids = block_ids[group.block_offset : group.block_offset + shared]  # read once, by every row, all visible
    shared_slots = (shared_ids[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(-1).tolist()
    assert not shared or (queries == 1 and all(k == 0 for k in first_keys))
    for r in range(rows):
        base = first_keys[r] // BLOCK_SIZE * BLOCK_SIZE
        seen = [[True] * len(shared_slots) + v for v in visible[r].tolist()]
        out.append(RowRead(list(range(base, base + shared * BLOCK_SIZE + width)), shared_slots + slots[r].tolist(),
                           seen))
    return out


def assert_row_sees(read: RowRead, table: list[int], query_positions: list[int], window: int | None = None) -> None:
    """Query p of the row sees exactly the keys 0 .. p (max(0, p - window + 1) .. p with a window), each read
    from its slot through the block table; nothing else the row reads is visible to it."""
    assert len(read.visible) == len(query_positions)
    for t, p in enumerate(query_positions):
        low = 0 if window is None else max(0, p - window + 1)
        expected = list(range(low, p + 1))
        assert read.visible_positions(t) == expected, (t, p)
        assert read.visible_slots(t) == [slot(table, k) for k in expected], (t, p)


# ---------------------------------------------------------------- build_step: attention groups


def test_groups_cover_the_packed_tokens_in_order():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    groups = step.attention.groups
    assert [(g.start, g.num_rows, g.num_queries, g.end) for g in groups] == [(0, 2, 1, 2), (2, 1, 6, 8), (8, 1, 3, 11)]
    # the groups' block rows lie back to back in the one flat tensor gathered per layer
    assert [(g.block_offset, g.num_blocks) for g in groups] == [(0, 2), (4, 2), (6, 2)]
    assert step.attention.block_ids.numel() == 8


def test_decode_group_reads_each_row_through_its_block_table():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    group = step.attention.groups[0]  # d1 (keys 0..5) and d2 (keys 0..3)
    d1, d2 = reads(step.attention.block_ids, group, [0, 0])

    assert group.num_keys == 6 and group.num_blocks == 2
    assert d1.slots == [slot(D1_TABLE, p) for p in range(6)]
    assert d2.slots[:4] == [slot(D2_TABLE, p) for p in range(4)]
    assert d1.visible_slots() == [slot(D1_TABLE, p) for p in range(6)]
    assert d2.visible_slots() == [slot(D2_TABLE, p) for p in range(4)]
    # d2's table has one block: its second block is padding, a real slot (checked by reads) and masked out
    assert set(d2.hidden_slots()) == set(d2.slots[4:]) and len(d2.hidden_slots()) == 2
    assert group.mask is not None and group.mask.shape == (2, 1, 1, 6)
    assert group.mask[:, 0, 0].tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert not group.is_causal


def test_decode_group_of_equal_lengths_has_no_mask():
    a, b = decode("a", 6, [4, 0]), decode("b", 6, [1, 2])
    step = build_step([a, b], make_cache(), sliding_window=None)

    (group,) = step.attention.groups
    assert group.mask is None and not group.is_causal
    ra, rb = reads(step.attention.block_ids, group, [0, 0])
    assert ra.slots == [16, 17, 18, 19, 0, 1, 2] and rb.slots == [4, 5, 6, 7, 8, 9, 10]
    assert_row_sees(ra, [4, 0], [6])  # no mask: every key read is one the row may see
    assert_row_sees(rb, [1, 2], [6])


def test_fresh_prefill_is_causal_without_a_mask():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    group = step.attention.groups[1]
    assert group.is_causal and group.mask is None
    assert group.num_keys == group.num_queries == 6
    (row,) = reads(step.attention.block_ids, group, [0])
    assert row.slots == [slot(P1_TABLE, p) for p in range(6)]
    assert_row_sees(row, P1_TABLE, list(range(6)))


def test_prefill_after_a_cached_prefix_masks_key_j_for_query_p_unless_j_le_p():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    group = step.attention.groups[2]  # queries at 4, 5, 6 over keys 0..6

    assert not group.is_causal
    (row,) = reads(step.attention.block_ids, group, [0])
    assert row.slots == [slot(P2_TABLE, p) for p in range(7)]
    assert group.mask.shape == (1, 1, 3, 7)
    assert group.mask[0, 0].tolist() == band([4, 5, 6], list(range(7)))
    assert_row_sees(row, P2_TABLE, [4, 5, 6])


def test_no_sliding_window_means_no_sliding_layout():
    step = build_step(mixed_chunks(), make_cache(), sliding_window=None)
    assert step.attention.sliding is None
    for window in (None, 3):
        block_ids, groups = step.attention.layout_for(window)
        assert block_ids is step.attention.block_ids and groups is step.attention.groups


def test_sliding_decode_reads_only_the_last_window_keys():
    window = 3
    step = build_step(mixed_chunks(), make_cache(), sliding_window=window)
    sliding_ids, sliding_groups = step.attention.sliding
    assert step.attention.layout_for(window) is step.attention.sliding
    full_ids, full_groups = step.attention.layout_for(None)
    assert full_ids is step.attention.block_ids and full_groups is step.attention.groups
    full, sliding = full_groups[0], sliding_groups[0]

    # the full-attention layers still read everything
    full_d1, full_d2 = reads(full_ids, full, [0, 0])
    assert full.num_keys == 6
    assert_row_sees(full_d1, D1_TABLE, [5])
    assert_row_sees(full_d2, D2_TABLE, [3])
    # d1 sees keys 3..5 (reading from block 0, which holds key 3), d2 keys 1..3
    d1, d2 = reads(sliding_ids, sliding, [3, 1])
    assert d1.visible_slots() == [slot(D1_TABLE, p) for p in (3, 4, 5)]
    assert d2.visible_slots() == [slot(D2_TABLE, p) for p in (1, 2, 3)]
    assert_row_sees(d1, D1_TABLE, [5], window)
    assert_row_sees(d2, D2_TABLE, [3], window)
    assert sliding.mask is not None  # neither row's first key starts a block: the keys before it are hidden


def test_sliding_decode_reading_whole_blocks_exactly_needs_no_mask():
    window = 4
    a, b = decode("a", 7, [5, 2]), decode("b", 11, [6, 3, 9])  # keys 4..7 and 8..11: one whole block each
    step = build_step([a, b], make_cache(), sliding_window=window)

    sliding_ids, (group,) = step.attention.sliding
    assert group.mask is None and not group.is_causal
    assert group.num_keys == window and group.num_blocks == 1
    rb, ra = reads(sliding_ids, group, [8, 4])  # the longer row first
    assert rb.slots == [slot([6, 3, 9], p) for p in range(8, 12)] and ra.slots == [slot([5, 2], p) for p in range(4, 8)]
    assert_row_sees(rb, [6, 3, 9], [11], window)
    assert_row_sees(ra, [5, 2], [7], window)
    (full,) = step.attention.groups  # 12 and 8 keys: padded and masked
    assert full.mask is not None
    fb, fa = reads(step.attention.block_ids, full, [0, 0])
    assert_row_sees(fb, [6, 3, 9], [11])
    assert_row_sees(fa, [5, 2], [7])


def test_sliding_decode_rows_shorter_than_the_window_are_padded():
    long, short = decode("long", 7, [0, 1]), decode("short", 6, [3, 2])  # 8 and 7 keys, all inside the window
    step = build_step([long, short], make_cache(), sliding_window=8)

    sliding_ids, (group,) = step.attention.sliding
    rl, rs = reads(sliding_ids, group, [0, 0])
    assert rl.slots == [slot([0, 1], p) for p in range(8)]
    assert rs.slots[:7] == [slot([3, 2], p) for p in range(7)]
    assert group.mask[:, 0, 0].tolist() == [[True] * 8, [True] * 7 + [False]]
    assert_row_sees(rl, [0, 1], [7], 8)
    assert_row_sees(rs, [3, 2], [6], 8)


def test_sliding_prefill_masks_a_band():
    window = 3
    step = build_step(mixed_chunks(), make_cache(), sliding_window=window)
    sliding_ids, sliding_groups = step.attention.sliding
    fresh, cached = sliding_groups[1], sliding_groups[2]

    assert not fresh.is_causal  # a causal mask alone would read beyond the window
    (row,) = reads(sliding_ids, fresh, [0])
    assert fresh.mask[0, 0].tolist() == band(list(range(6)), list(range(6)), window)
    assert_row_sees(row, P1_TABLE, list(range(6)), window)
    # queries 4..6: the first reads back to 4 - window + 1 = 2, so keys 2..6, read from block 0 (keys 0..3)
    (row,) = reads(sliding_ids, cached, [2])
    assert row.positions == list(range(7))
    assert row.slots == [slot(P2_TABLE, p) for p in range(7)]
    assert cached.mask[0, 0].tolist() == band([4, 5, 6], list(range(7)), window)
    assert row.visible_positions(0) == [2, 3, 4]
    assert_row_sees(row, P2_TABLE, [4, 5, 6], window)


def test_sliding_prefill_starting_mid_table_reads_through_the_right_blocks():
    prompt = list(range(40))
    table = [10, 4, 12, 3, 8, 1, 7, 9, 2, 5]
    long = chunk("long", prompt, [], num_computed=29, num_tokens=5, block_table=table)  # queries 29..33
    step = build_step([long], make_cache(), sliding_window=6)

    sliding_ids, (group,) = step.attention.sliding
    (row,) = reads(sliding_ids, group, [24])  # keys from 29 - 6 + 1 = 24: blocks 6, 7, 8
    assert sliding_ids[group.block_offset : group.block_offset + group.num_blocks].tolist() == table[6:9]
    assert row.slots == [slot(table, p) for p in range(24, 34)]
    assert group.mask[0, 0].tolist() == band(list(range(29, 34)), list(range(24, 34)), 6)
    assert_row_sees(row, table, list(range(29, 34)), 6)
    (full,) = step.attention.groups
    (row,) = reads(step.attention.block_ids, full, [0])
    assert row.slots == [slot(table, p) for p in range(34)]
    assert full.mask[0, 0].tolist() == band(list(range(29, 34)), list(range(34)))
    assert_row_sees(row, table, list(range(29, 34)))


@pytest.mark.parametrize("window", [None, 5])
def test_every_decode_key_slot_follows_the_block_table(window):
    tables = {"a": [9, 3, 14, 0, 6], "b": [11, 2, 5, 8, 13], "c": [1, 4, 7, 10, 12]}
    chunks = [decode("a", 17, tables["a"]), decode("b", 15, tables["b"]), decode("c", 13, tables["c"])]
    step = build_step(chunks, make_cache(), sliding_window=window)

    block_ids, groups = step.attention.layout_for(window)
    assert sum(g.num_rows for g in groups) == 3
    for group in groups:  # decode groups: one packed token per row
        rows = step.chunks[group.start : group.end]
        firsts = [max(0, c.seq.num_computed - window + 1) if window else 0 for c in rows]
        for r, (c, read) in enumerate(zip(rows, reads(block_ids, group, firsts))):
            pos, table = c.seq.num_computed, tables[c.seq.request_id]
            assert_row_sees(read, table, [pos], window)
            for key, s in zip(read.positions, read.slots):  # the blocks read are the table's, from the first one
                if key < len(table) * BLOCK_SIZE:
                    assert s == slot(table, key)
            num_hidden = len(read.slots) - len(read.visible_slots())
            if group.mask is None:
                assert num_hidden == 0
            else:
                assert group.mask[r, 0, 0].tolist() == [firsts[r] <= p <= pos for p in read.positions]


def test_a_decode_row_with_fewer_blocks_than_the_group_reads_masked_padding_blocks():
    long, short = decode("long", 11, [7, 8, 9]), decode("short", 7, [4, 5])  # 12 and 8 keys: 3 and 2 blocks
    step = build_step([long, short], make_cache(), sliding_window=None)
    (group,) = step.attention.groups
    assert group.num_blocks == 3 and group.num_keys == 12
    rl, rs = reads(step.attention.block_ids, group, [0, 0])
    assert_row_sees(rl, [7, 8, 9], [11])
    assert_row_sees(rs, [4, 5], [7])
    assert len(rs.hidden_slots()) == 4 and not rl.hidden_slots()  # padding: real slots (see reads), masked


@pytest.mark.parametrize("window", [None, 1, 3, 4, 9])
def test_random_steps_every_row_sees_exactly_its_keys(window):
    rng = random.Random(window or 0)
    for _ in range(40):
        blocks = list(range(64))
        rng.shuffle(blocks)
        chunks = []
        for i in range(rng.randint(1, 6)):
            computed = rng.randint(0, 30)
            num_tokens = 1 if computed and rng.random() < 0.6 else rng.randint(1, 9)
            needed = -(-(computed + num_tokens) // BLOCK_SIZE) + rng.randint(0, 1)  # sometimes a block ahead
            table, blocks = blocks[:needed], blocks[needed:]
            prompt = list(range(computed + num_tokens))
            chunks.append(chunk(f"s{i}", prompt, [], computed, num_tokens, table))
        step = build_step(chunks, make_cache(64), sliding_window=window)

        block_ids, groups = step.attention.layout_for(window)
        assert [(g.start, g.end) for g in groups] == list(zip([0] + [g.end for g in groups[:-1]],
                                                              [g.end for g in groups]))
        assert groups[-1].end == step.input_ids.shape[1]
        for group in groups:
            rows = [c for c in step.chunks if _packed_start(step, c) in
                    range(group.start, group.end, group.num_queries)]
            assert len(rows) == group.num_rows
            firsts = [max(0, c.seq.num_computed - window + 1) if window else 0 for c in rows]
            for c, read in zip(rows, reads(block_ids, group, firsts, num_cache_blocks=64)):
                queries = list(range(c.seq.num_computed, c.seq.num_computed + c.num_tokens))
                assert_row_sees(read, c.seq.block_table, queries, window)


def _packed_start(step, target: ScheduledChunk) -> int:
    start = 0
    for c in step.chunks:
        if c is target:
            return start
        start += c.num_tokens
    raise AssertionError("chunk not packed")


def test_decode_rows_sharing_cached_blocks_read_them_once():
    """Three decodes that start with the same two cached blocks (a shared system prompt) and one that does not:
    the sharers' group stages those blocks once, then each row's own blocks; every row still sees exactly its
    keys 0 .. p, from the right slots."""
    tables = {"a": [4, 5, 6], "b": [4, 5, 8, 9], "c": [4, 5, 10], "x": [1, 2, 3]}
    computed = {"a": 10, "b": 13, "c": 11, "x": 10}
    chunks = [decode(r, computed[r], tables[r]) for r in ("a", "b", "c", "x")]
    step = build_step(chunks, make_cache(), None)
    groups = step.attention.groups
    rows = [c.seq.request_id for c in step.chunks]
    sharing = [g for g in groups if g.shared_blocks]
    assert len(sharing) <= 1
    for group in groups:
        ids = rows[group.start : group.end]
        if set(ids) >= {"a", "b", "c"} and "x" not in ids:
            assert group.shared_blocks == 2
            assert step.attention.block_ids[group.block_offset : group.block_offset + 2].tolist() == [4, 5]
        elif len(ids) < 2 or "x" in ids:
            assert group.shared_blocks == 0  # x shares nothing with the others: no shared part
        for read, request_id in zip(reads(step.attention.block_ids, group, [0] * group.num_rows, 16), ids):
            assert_row_sees(read, tables[request_id], [computed[request_id]])


def test_decode_rows_share_only_blocks_before_each_rows_newest_key():
    """Two rows with the same table up to the block that holds one's newest key: that block is its own part."""
    chunks = [decode("a", 8, [4, 5, 6]), decode("b", 9, [4, 5, 6])]  # both write into block 6 (positions 8, 9)
    step = build_step(chunks, make_cache(), None)
    (group,) = step.attention.groups
    assert group.shared_blocks == 2  # blocks 4, 5; block 6 holds keys being written this step: read per row
    for read, c in zip(reads(step.attention.block_ids, group, [0, 0], 16), step.chunks):
        assert_row_sees(read, c.seq.block_table, [c.seq.num_computed])
