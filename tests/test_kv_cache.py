"""PagedKVCache's tensors and the start-up sizing of the block budget."""

from __future__ import annotations

import pytest
import torch

from worker.engines.kv_cache import KVShape, PagedKVCache, num_blocks_for_budget

CPU = torch.device("cpu")
SHAPE = KVShape(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def blocks_for(kv_cache_tokens: int | None, block_size: int = 16, max_model_len: int = 64,
               default_tokens: int = 1024) -> int:
    return num_blocks_for_budget(SHAPE, block_size, max_model_len, kv_cache_tokens, gpu_memory_utilization=0.9,
                                 device=CPU, default_tokens=default_tokens)


@pytest.mark.parametrize("dtype, element_size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_bytes_per_token_counts_keys_and_values_of_every_layer(dtype, element_size):
    shape = KVShape(num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype)
    assert shape.bytes_per_token == 2 * 3 * 2 * 8 * element_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_tensors_have_one_slot_per_block_token(dtype):
    shape = KVShape(num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype)
    cache = PagedKVCache(shape, num_blocks=5, block_size=4, device=CPU)

    assert cache.num_slots == 20
    assert len(cache.keys) == len(cache.values) == 3
    for tensor in cache.keys + cache.values:
        assert tensor.shape == (20, 2, 8)
        assert tensor.dtype == dtype and tensor.device == CPU
        assert not tensor.any()
    assert len({t.data_ptr() for t in cache.keys + cache.values}) == 6  # no two layers share memory
    assert cache.num_bytes == sum(t.numel() * t.element_size() for t in cache.keys + cache.values)


def test_explicit_token_budget_rounds_down_to_whole_blocks():
    assert blocks_for(1000, block_size=16) == 62
    assert blocks_for(64, block_size=16) == 4  # exactly one max-length sequence


def test_explicit_budget_wins_over_the_default():
    assert blocks_for(128, default_tokens=4096) == 8


def test_default_budget_without_an_explicit_one_on_cpu():
    assert blocks_for(None, block_size=16, default_tokens=1024) == 64


@pytest.mark.parametrize("kv_cache_tokens, max_model_len", [(63, 64), (79, 80), (0, 1)])
def test_budget_below_one_max_length_sequence_is_a_clear_error(kv_cache_tokens, max_model_len):
    with pytest.raises(ValueError) as raised:
        blocks_for(kv_cache_tokens, block_size=16, max_model_len=max_model_len)
    message = str(raised.value)
    assert "--kv-cache-tokens" in message and "--max-model-len" in message
    assert f"max_model_len {max_model_len}" in message


def test_a_small_default_budget_is_the_same_error():
    with pytest.raises(ValueError, match="--kv-cache-tokens"):
        blocks_for(None, block_size=16, max_model_len=2048, default_tokens=1024)
