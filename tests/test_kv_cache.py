"""SlotKVCache: slot allocation, growth, and per-row writes with zero-copy range reads."""

from __future__ import annotations

import pytest
import torch

from worker.engines.kv_cache import INITIAL_CAPACITY, ForwardLayout, SlotKVCache

torch.set_num_threads(1)
CPU = torch.device("cpu")
HEADS, HEAD_DIM = 2, 3


def make_cache(num_slots: int = 4, max_len: int = 1024, num_layers: int = 2, budget: int | None = None) -> SlotKVCache:
    return SlotKVCache(num_layers=num_layers, max_slots=num_slots, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                       max_len=max_len, dtype=torch.float32, device=CPU, max_cached_tokens=budget)


def as_long(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def layout(row_slots, write_rows, write_pos, col_rows, col_cols, kv_len, slot_range=None) -> ForwardLayout:
    return ForwardLayout(row_slots=as_long(row_slots), write_rows=as_long(write_rows), write_pos=as_long(write_pos),
                         write_cols=(as_long(col_rows), as_long(col_cols)), kv_len=kv_len, slot_range=slot_range)


def states(num_rows: int, num_cols: int, offset: float = 0.0) -> torch.Tensor:
    # [R, H, T, D], every entry distinct and nonzero
    return torch.arange(1, num_rows * HEADS * num_cols * HEAD_DIM + 1, dtype=torch.float32).reshape(
        num_rows, HEADS, num_cols, HEAD_DIM) + offset


def shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


# ---------------------------------------------------------------- slots


def test_allocate_returns_lowest_free_slot_and_reuses_freed_ones():
    cache = make_cache(num_slots=4)
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    assert cache.num_free_slots == 1
    cache.free(1)
    cache.free(0)
    assert cache.num_free_slots == 3
    assert cache.allocate() == 0
    assert cache.allocate() == 1
    assert cache.allocate() == 3


def test_allocate_when_full_raises():
    cache = make_cache(num_slots=2)
    cache.allocate()
    cache.allocate()
    assert cache.num_free_slots == 0
    with pytest.raises(RuntimeError):
        cache.allocate()


def test_shapes_and_initial_capacity():
    cache = make_cache(num_slots=3, num_layers=2)
    assert cache.capacity == INITIAL_CAPACITY
    assert len(cache.keys) == len(cache.values) == 2
    assert cache.keys[0].shape == (3, HEADS, INITIAL_CAPACITY, HEAD_DIM)
    assert make_cache(max_len=100).capacity == 100


# ---------------------------------------------------------------- growth


def test_grow_doubles_and_preserves_live_rows():
    cache = make_cache(num_slots=2, max_len=4096)
    for layer in range(cache.num_layers):
        cache.keys[layer].normal_()
        cache.values[layer].normal_()
    old_keys = [k.clone() for k in cache.keys]
    old_values = [v.clone() for v in cache.values]

    assert cache.grow(INITIAL_CAPACITY, [0, 1]) == {0: 0, 1: 1}  # already enough: untouched
    assert cache.capacity == INITIAL_CAPACITY
    assert cache.grow(3 * INITIAL_CAPACITY, [0, 1]) == {0: 0, 1: 1}

    assert cache.capacity == 4 * INITIAL_CAPACITY
    for layer in range(cache.num_layers):
        for new, old in [(cache.keys[layer], old_keys[layer]), (cache.values[layer], old_values[layer])]:
            assert new.shape == (2, HEADS, 4 * INITIAL_CAPACITY, HEAD_DIM)
            assert torch.equal(new[:, :, :INITIAL_CAPACITY], old)
            assert not new[:, :, INITIAL_CAPACITY:].any()


def test_grow_packs_live_rows_to_the_low_slots_and_frees_the_rest():
    cache = make_cache(num_slots=4, max_len=4096)
    for slot in range(4):
        cache.keys[0][slot].fill_(slot)
    moves = cache.grow(INITIAL_CAPACITY + 1, [3, 1])
    assert moves == {1: 0, 3: 1}
    assert cache.keys[0][0, :, :INITIAL_CAPACITY].eq(1).all() and cache.keys[0][1, :, :INITIAL_CAPACITY].eq(3).all()
    assert [cache.allocate(), cache.allocate()] == [2, 3]


def test_grow_stops_at_max_len_and_refuses_beyond():
    cache = make_cache(num_slots=1, max_len=600)
    cache.grow(300, [])
    assert cache.capacity == 512
    cache.grow(513, [])
    assert cache.capacity == 600
    assert cache.keys[0].shape[2] == 600
    with pytest.raises(ValueError):
        cache.grow(601, [])
    assert cache.capacity == 600


def test_budget_bounds_rows_times_capacity():
    cache = make_cache(num_slots=8, max_len=4096, budget=2048)
    assert (cache.num_rows, cache.capacity) == (8, INITIAL_CAPACITY)
    assert cache.rows_for_capacity(cache.capacity_for(600)) == 2
    with pytest.raises(RuntimeError):
        cache.grow(600, [0, 1, 2])  # three live rows of 1024 tokens exceed 2048
    cache.grow(600, [0, 1])
    assert cache.num_rows * cache.capacity <= 2048 and cache.num_rows == 2
    assert cache.max_sequence_tokens == 2048
    with pytest.raises(ValueError):
        cache.capacity_for(2049)


def test_reset_returns_to_the_initial_size():
    cache = make_cache(num_slots=2, max_len=4096)
    cache.grow(1000, [])
    cache.reset()
    assert cache.capacity == INITIAL_CAPACITY and cache.num_free_slots == 2


# ---------------------------------------------------------------- update


def test_update_outside_forward_raises():
    cache = make_cache()
    with pytest.raises(RuntimeError):
        cache.update(states(1, 1), states(1, 1), 0)
    cache.begin_forward(layout([0], [0], [0], [0], [0], kv_len=1, slot_range=(0, 1)))
    cache.update(states(1, 1), states(1, 1), 0)
    cache.end_forward()
    with pytest.raises(RuntimeError):
        cache.update(states(1, 1), states(1, 1), 0)


def test_get_seq_length_follows_the_forward():
    cache = make_cache()
    assert cache.get_seq_length() == 0
    cache.begin_forward(layout([0], [0], [4], [0], [0], kv_len=5, slot_range=(0, 1)))
    assert cache.get_seq_length() == 5
    cache.end_forward()
    assert cache.get_seq_length() == 0


def test_range_update_writes_per_row_positions_and_returns_a_view():
    cache = make_cache(num_slots=4)
    # decode over slots 1..2: slot 1 writes position 5, slot 2 writes position 3
    cache.begin_forward(layout(row_slots=[1, 2], write_rows=[1, 2], write_pos=[5, 3],
                               col_rows=[0, 1], col_cols=[0, 0], kv_len=6, slot_range=(1, 3)))
    key_states, value_states = states(2, 1), states(2, 1, offset=1000.0)

    keys, values = cache.update(key_states, value_states, layer_idx=1)

    k_cache, v_cache = cache.keys[1], cache.values[1]
    assert torch.equal(k_cache[1, :, 5], key_states[0, :, 0])
    assert torch.equal(k_cache[2, :, 3], key_states[1, :, 0])
    assert torch.equal(v_cache[2, :, 3], value_states[1, :, 0])
    assert int((k_cache != 0).sum()) == 2 * HEADS * HEAD_DIM  # nothing else written
    assert not cache.keys[0].any()  # other layers untouched
    assert keys.shape == values.shape == (2, HEADS, 6, HEAD_DIM)
    assert torch.equal(keys, k_cache[1:3, :, :6]) and torch.equal(values, v_cache[1:3, :, :6])
    # zero-copy: the returned tensors are views into the cache itself
    assert keys._base is k_cache and values._base is v_cache
    assert keys.data_ptr() == k_cache[1].data_ptr()
    k_cache[2, 0, 0, 0] = 42.0
    assert keys[1, 0, 0, 0] == 42.0


def test_gathered_update_writes_chunks_and_returns_the_rows():
    cache = make_cache(num_slots=4)
    # prefill of two rows, left-padded to T=3: slot 3 writes positions 0..2, slot 0 writes 4..5
    cache.begin_forward(layout(row_slots=[3, 0], write_rows=[3, 3, 3, 0, 0], write_pos=[0, 1, 2, 4, 5],
                               col_rows=[0, 0, 0, 1, 1], col_cols=[0, 1, 2, 1, 2], kv_len=6))
    key_states, value_states = states(2, 3), states(2, 3, offset=1000.0)

    keys, values = cache.update(key_states, value_states, layer_idx=0)

    k_cache, v_cache = cache.keys[0], cache.values[0]
    assert torch.equal(k_cache[3, :, 0:3], key_states[0])
    assert torch.equal(k_cache[0, :, 4:6], key_states[1, :, 1:3])
    assert torch.equal(v_cache[0, :, 4:6], value_states[1, :, 1:3])
    assert not k_cache[0, :, :4].any()  # the padding column wrote nothing
    assert keys.shape == (2, HEADS, 6, HEAD_DIM)
    assert torch.equal(keys, k_cache[[3, 0], :, :6]) and torch.equal(values, v_cache[[3, 0], :, :6])
    assert not shares_storage(keys, k_cache)


def test_update_after_growth_writes_into_the_new_tensors():
    cache = make_cache(num_slots=1, max_len=2048)
    cache.grow(INITIAL_CAPACITY + 1, [])
    pos = INITIAL_CAPACITY + 10
    cache.begin_forward(layout([0], [0], [pos], [0], [0], kv_len=pos + 1, slot_range=(0, 1)))
    keys, _ = cache.update(states(1, 1), states(1, 1), layer_idx=0)
    assert torch.equal(cache.keys[0][0, :, pos], states(1, 1)[0, :, 0])
    assert shares_storage(keys, cache.keys[0])
