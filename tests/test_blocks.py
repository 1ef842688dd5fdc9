"""BlockManager: block tables, growth, release order, and the prefix cache. Plain Python, no torch."""

from __future__ import annotations

import pytest

from producer.protocol import GenerateConfig
from worker.engines import blocks as blocks_module
from worker.engines.blocks import BlockManager
from worker.request import Sequence

BLOCK_SIZE = 4


def make_seq(request_id: str, prompt_ids: list[int]) -> Sequence:
    return Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=GenerateConfig(), max_tokens=16)


def prefill(manager: BlockManager, seq: Sequence, budget: int = 1000) -> int:
    """Admit seq and compute its whole first chunk, as the scheduler and engine would."""
    take = manager.admit(seq, budget)
    assert take is not None
    seq.num_computed += take
    manager.register_computed(seq)
    return take


def ref_counts(manager: BlockManager) -> list[int]:
    return [block.ref_count for block in manager.blocks]


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_constructor_rejects_empty_cache(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_blocks_for_rounds_up():
    manager = BlockManager(8, BLOCK_SIZE)
    assert [manager.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# ---------------------------------------------------------------- admission


def test_admission_without_hits_takes_blocks_for_the_chunk_only():
    manager = BlockManager(8, BLOCK_SIZE)
    seq = make_seq("a", range(10))

    take = manager.admit(seq, max_new_tokens=6)

    assert take == 6
    assert seq.block_table == [0, 1]  # room for positions 0..5, not the whole prompt
    assert (seq.num_computed, seq.num_cached_tokens) == (0, 0)
    assert manager.num_free_blocks == 6
    assert ref_counts(manager)[:3] == [1, 1, 0]
    assert manager.num_hit_tokens == 0


def test_admission_that_does_not_fit_takes_nothing():
    manager = BlockManager(2, BLOCK_SIZE)
    seq = make_seq("a", range(9))

    assert manager.admit(seq, max_new_tokens=100) is None
    assert seq.block_table == []
    assert manager.num_free_blocks == 2
    assert ref_counts(manager) == [0, 0]


def test_admission_with_prefix_hits_reuses_the_cached_blocks():
    manager = BlockManager(8, BLOCK_SIZE)
    first = make_seq("first", range(10))  # blocks [0..3] [4..7] full, [8, 9] partial
    prefill(manager, first)
    assert manager.num_cached_blocks == 2
    second = make_seq("second", list(range(8)) + [50, 51, 52])

    take = manager.admit(second, max_new_tokens=100)

    assert take == 3  # only the tokens after the two cached blocks
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] not in first.block_table
    assert (second.num_computed, second.num_cached_tokens) == (8, 8)
    assert [manager.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    assert manager.num_hit_tokens == 8


def test_admission_counts_hits_on_free_blocks_against_the_free_list():
    manager = BlockManager(3, BLOCK_SIZE)
    first = make_seq("first", range(9))  # three blocks, two of them full and cached
    prefill(manager, first)
    manager.free(first)
    assert manager.num_free_blocks == 3
    # reuses the two cached blocks (leaving the free list) and needs one more: exactly fits
    again = make_seq("again", range(9))
    assert manager.admit(again, 100) == 1
    assert manager.num_free_blocks == 0
    manager.free(again)
    # two hits plus two new blocks do not fit in three free blocks: nothing is taken
    longer = make_seq("longer", range(13))
    assert manager.admit(longer, 100) is None
    assert longer.block_table == [] and manager.num_free_blocks == 3 and ref_counts(manager) == [0, 0, 0]


def test_hit_budget_caps_the_chunk_after_the_cached_prefix():
    manager = BlockManager(8, BLOCK_SIZE)
    prefill(manager, make_seq("first", range(9)))
    second = make_seq("second", range(20))

    assert manager.admit(second, max_new_tokens=2) == 2
    assert second.num_computed == 8
    assert len(second.block_table) == 3  # two hits + one block for positions 8, 9


def test_last_token_is_never_served_from_the_cache():
    manager = BlockManager(8, BLOCK_SIZE)
    prompt = list(range(8))  # exactly two full blocks
    first = make_seq("first", prompt)
    prefill(manager, first)
    assert manager.num_cached_blocks == 2

    second = make_seq("second", prompt)
    take = manager.admit(second, 100)

    assert take == 4  # the whole last block is recomputed, so its logits exist
    assert second.num_computed == 4
    assert second.block_table[0] == first.block_table[0]
    assert second.block_table[1] != first.block_table[1]
    assert manager.num_hit_tokens == 4


def test_one_token_past_the_cached_blocks_computes_one_token():
    manager = BlockManager(8, BLOCK_SIZE)
    prefill(manager, make_seq("first", range(8)))
    second = make_seq("second", range(9))
    assert manager.admit(second, 100) == 1
    assert second.num_computed == 8


def test_same_block_tokens_after_a_different_prefix_is_a_miss():
    manager = BlockManager(8, BLOCK_SIZE)
    prefill(manager, make_seq("first", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    second = make_seq("second", [0, 2, 3, 4, 5, 6, 7, 8, 9])  # block 1 identical, block 0 not

    assert manager.admit(second, 100) == 9
    assert second.num_computed == 0 and manager.num_hit_tokens == 0


def test_the_same_block_tokens_at_different_depths_are_cached_separately():
    manager = BlockManager(8, BLOCK_SIZE)
    prefill(manager, make_seq("deep", [1, 2, 3, 4, 5, 6, 7, 8, 9]))  # [5, 6, 7, 8] after [1, 2, 3, 4]
    prefill(manager, make_seq("shallow", [5, 6, 7, 8, 0]))  # [5, 6, 7, 8] at the start
    assert manager.num_cached_blocks == 3

    for prompt, num_hit in [([5, 6, 7, 8, 1], 4), ([1, 2, 3, 4, 5, 6, 7, 8, 2], 8)]:
        seq = make_seq("later", prompt)
        manager.admit(seq, 100)
        assert seq.num_computed == num_hit


def test_a_hit_needs_the_same_parent_even_when_the_hash_ignores_it(monkeypatch):
    # a hash that forgets the parent: block [5, 6, 7, 8] after [1, 2, 3, 4] collides with
    # block [5, 6, 7, 8] at the start of a prompt
    monkeypatch.setattr(blocks_module, "hash", lambda key: hash(key[1]), raising=False)
    manager = BlockManager(8, BLOCK_SIZE)
    prefill(manager, make_seq("first", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert manager.num_cached_blocks == 2
    second = make_seq("second", [5, 6, 7, 8, 9])

    assert manager.admit(second, 100) == 5
    assert second.num_computed == 0


def test_a_hash_collision_with_different_tokens_is_a_miss(monkeypatch):
    monkeypatch.setattr(blocks_module, "hash", lambda key: 42, raising=False)
    manager = BlockManager(8, BLOCK_SIZE)
    prefill(manager, make_seq("first", [1, 2, 3, 4, 5]))
    second = make_seq("second", [9, 9, 9, 9, 5])

    assert manager.admit(second, 100) == 5
    assert second.num_computed == 0 and manager.num_hit_tokens == 0


def test_a_collision_in_a_later_block_stops_the_hits_there(monkeypatch):
    monkeypatch.setattr(blocks_module, "hash", lambda key: 0 if key[0] is None else 1, raising=False)
    manager = BlockManager(8, BLOCK_SIZE)
    prefill(manager, make_seq("first", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    second = make_seq("second", [1, 2, 3, 4, 0, 0, 0, 0, 9])

    assert manager.admit(second, 100) == 5
    assert second.num_computed == 4  # block 0 is a true hit, block 1 only collides


def test_prefix_caching_off_never_hits():
    manager = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    first = make_seq("first", range(9))
    prefill(manager, first)
    assert manager.num_cached_blocks == 0
    assert all(block.hash is None for block in manager.blocks)

    second = make_seq("second", range(9))
    assert manager.admit(second, 100) == 9
    assert second.num_computed == 0 and manager.num_hit_tokens == 0
    assert not set(second.block_table) & set(first.block_table)


def test_num_hit_tokens_accumulates_over_admissions():
    manager = BlockManager(16, BLOCK_SIZE)
    prefill(manager, make_seq("first", range(13)))  # three full blocks cached
    for request_id, length in [("a", 13), ("b", 9), ("c", 5), ("d", 3)]:
        prefill(manager, make_seq(request_id, range(length)))
    assert manager.num_hit_tokens == 12 + 8 + 4 + 0


# ---------------------------------------------------------------- registration


def test_register_computed_registers_only_full_computed_blocks():
    manager = BlockManager(8, BLOCK_SIZE)
    seq = make_seq("a", range(10))
    assert manager.admit(seq, 100) == 10

    seq.num_computed = 3  # block 0 not yet full
    manager.register_computed(seq)
    assert manager.num_cached_blocks == 0

    seq.num_computed = 7  # block 0 full, block 1 not
    manager.register_computed(seq)
    assert manager.num_cached_blocks == 1
    assert manager.blocks[seq.block_table[0]].hash is not None
    assert manager.blocks[seq.block_table[1]].hash is None
    assert seq.num_registered_blocks == 1

    seq.num_computed = 10  # block 2 holds two tokens: never registered
    manager.register_computed(seq)
    assert manager.num_cached_blocks == 2
    assert manager.blocks[seq.block_table[2]].hash is None
    assert manager.blocks[seq.block_table[0]].tokens == (0, 1, 2, 3)
    assert manager.blocks[seq.block_table[1]].tokens == (4, 5, 6, 7)
    assert manager.blocks[seq.block_table[1]].parent_hash == manager.blocks[seq.block_table[0]].hash


def test_blocks_beyond_the_table_are_not_registered():
    manager = BlockManager(8, BLOCK_SIZE)
    seq = make_seq("a", range(12))
    manager.admit(seq, 4)  # only one block held
    seq.num_computed = 8  # claims more than its table holds
    manager.register_computed(seq)
    assert manager.num_cached_blocks == 1


def test_output_tokens_fill_blocks_that_are_then_cached():
    manager = BlockManager(8, BLOCK_SIZE)
    seq = make_seq("a", range(3))
    prefill(manager, seq)
    seq.output_ids.append(3)  # sampled token at position 3, computed by the next decode
    assert manager.grow(seq, seq.num_tokens)
    seq.num_computed += 1
    manager.register_computed(seq)
    assert manager.num_cached_blocks == 1

    other = make_seq("b", [0, 1, 2, 3, 4])
    assert manager.admit(other, 100) == 1
    assert other.block_table[0] == seq.block_table[0]


def test_a_duplicate_block_does_not_replace_the_cached_one():
    manager = BlockManager(8, BLOCK_SIZE)
    a, b = make_seq("a", range(5)), make_seq("b", range(5))
    manager.admit(a, 100)
    manager.admit(b, 100)  # admitted before a's blocks were computed: no hit
    for seq in (a, b):
        seq.num_computed = 5
        manager.register_computed(seq)
    assert manager.num_cached_blocks == 1
    assert manager.blocks[a.block_table[0]].hash is not None
    assert manager.blocks[b.block_table[0]].hash is None


# ---------------------------------------------------------------- growth


def test_grow_adds_blocks_only_when_a_block_boundary_is_crossed():
    manager = BlockManager(4, BLOCK_SIZE)
    seq = make_seq("a", range(3))
    manager.admit(seq, 100)
    assert seq.block_table == [0]

    assert manager.grow(seq, 4)
    assert seq.block_table == [0]
    assert manager.grow(seq, 5)
    assert seq.block_table == [0, 1]
    assert manager.grow(seq, 16)
    assert seq.block_table == [0, 1, 2, 3] and manager.num_free_blocks == 0


def test_grow_beyond_the_free_blocks_takes_nothing():
    manager = BlockManager(3, BLOCK_SIZE)
    seq = make_seq("a", range(4))
    manager.admit(seq, 100)

    assert not manager.grow(seq, 13)  # needs three more, two free
    assert seq.block_table == [0]
    assert manager.num_free_blocks == 2


# ---------------------------------------------------------------- release and eviction


def test_free_returns_every_block_and_clears_the_table():
    manager = BlockManager(4, BLOCK_SIZE)
    seq = make_seq("a", range(10))
    prefill(manager, seq)
    assert manager.num_free_blocks == 1

    manager.free(seq)

    assert seq.block_table == []
    assert manager.num_free_blocks == 4
    assert ref_counts(manager) == [0, 0, 0, 0]


def test_free_is_tail_first_and_handing_out_is_least_recently_freed_first():
    manager = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    a, b = make_seq("a", range(12)), make_seq("b", range(4))
    manager.admit(a, 100)
    manager.admit(b, 100)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3])

    manager.free(a)  # free list: 2, 1, 0
    manager.free(b)  # free list: 2, 1, 0, 3

    c = make_seq("c", range(16))
    manager.admit(c, 100)
    assert c.block_table == [2, 1, 0, 3]


def test_freeing_a_sequence_twice_is_harmless():
    manager = BlockManager(4, BLOCK_SIZE)
    seq = make_seq("a", range(6))
    manager.admit(seq, 100)
    manager.free(seq)
    manager.free(seq)  # its table is empty now: a finish after a preemption
    assert manager.num_free_blocks == 4 and ref_counts(manager) == [0] * 4


def test_releasing_a_block_twice_raises():
    manager = BlockManager(4, BLOCK_SIZE)
    seq = make_seq("a", range(6))
    manager.admit(seq, 100)
    stale = make_seq("stale", range(6))
    stale.block_table = list(seq.block_table)  # a table that was never admitted
    manager.free(seq)

    with pytest.raises(RuntimeError, match="released twice"):
        manager.free(stale)


def test_a_freed_cached_block_stays_findable_until_handed_out_again():
    manager = BlockManager(2, BLOCK_SIZE)
    first = make_seq("first", range(5))  # block 0 full and cached, block 1 partial
    prefill(manager, first)
    cached_block = first.block_table[0]
    manager.free(first)  # free list: 1, 0
    assert manager.num_cached_blocks == 1

    again = make_seq("again", range(5))
    assert manager.admit(again, 100) == 1  # hit after its owner finished
    assert again.block_table[0] == cached_block
    manager.free(again)  # free list: (uncached) then 0

    filler = make_seq("filler", [100, 101, 102])
    manager.admit(filler, 100)  # takes the least recently freed block: not the cached one
    assert filler.block_table != [cached_block]
    assert manager.num_cached_blocks == 1
    other = make_seq("other", [200, 201])
    manager.admit(other, 100)  # now the cached block is handed out: evicted
    assert other.block_table == [cached_block]
    assert manager.num_cached_blocks == 0
    assert manager.blocks[cached_block].hash is None and manager.blocks[cached_block].tokens == ()
    manager.free(filler)
    manager.free(other)

    late = make_seq("late", range(5))
    assert manager.admit(late, 100) == 5
    assert late.num_computed == 0


def test_a_reused_block_is_not_evicted_while_held():
    manager = BlockManager(3, BLOCK_SIZE)
    first = make_seq("first", range(5))
    prefill(manager, first)
    shared = first.block_table[0]
    manager.free(first)
    holder = make_seq("holder", range(6))
    prefill(manager, holder)  # holds the cached block again
    assert holder.block_table[0] == shared

    pressure = make_seq("pressure", [100, 101, 102, 103, 104])
    assert manager.admit(pressure, 100) is None  # two blocks needed, one free
    small = make_seq("small", [100])
    manager.admit(small, 100)
    assert shared not in small.block_table
    assert manager.blocks[shared].hash is not None


def test_sharers_keep_a_block_until_the_last_one_releases_it():
    manager = BlockManager(4, BLOCK_SIZE)
    prompt = [7, 7, 7, 7, 1]
    owner = make_seq("owner", prompt)
    prefill(manager, owner)
    sharer = make_seq("sharer", prompt)
    prefill(manager, sharer)
    shared = owner.block_table[0]
    assert sharer.block_table[0] == shared and manager.blocks[shared].ref_count == 2

    manager.free(owner)  # aborted while the sharer still reads the block

    assert manager.blocks[shared].ref_count == 1
    assert manager.num_free_blocks == 2  # owner's private tail only
    # pressure cannot take the shared block from the sharer
    hog = make_seq("hog", range(100, 109))
    assert manager.admit(hog, 100) is None
    hog = make_seq("hog", range(100, 108))
    manager.admit(hog, 100)
    assert shared not in hog.block_table
    assert sharer.block_table[0] == shared and manager.blocks[shared].hash is not None

    manager.free(sharer)
    manager.free(hog)
    assert manager.num_free_blocks == 4 and ref_counts(manager) == [0] * 4
    # still cached: a later request with the prefix reuses it
    late = make_seq("late", prompt)
    assert manager.admit(late, 100) == 1 and late.block_table[0] == shared


def test_blocks_holding_different_images_are_different_prefixes():
    """Image placeholder tokens are one id repeated: the pixel digest in the key keeps two images apart."""
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = [7, 9, 9, 9, 9, 9, 9, 3, 5]  # tokens 1-6 are an image's placeholders
    first = make_seq("a", prompt)
    first.image_spans = [(1, 7, "cat")]
    prefill(manager, first)
    other = make_seq("b", prompt)
    other.image_spans = [(1, 7, "dog")]
    assert manager.admit(other, 1000) == len(prompt)  # no hit: a different image
    same = make_seq("c", prompt)
    same.image_spans = [(1, 7, "cat")]
    assert manager.admit(same, 1000) == 1  # the same image: both full blocks come from the cache
