"""The paged KV cache's memory: one key and one value tensor per layer, allocated once at start.

    keys[layer], values[layer]: [num_blocks * block_size, num_kv_heads, head_dim]

Slot s = block * block_size + offset holds one token's key/value. Which sequence owns which
block is the BlockManager's business (plain Python); this class only holds the tensors and
sizes the budget. Nothing here grows or reallocates during a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element  # keys and values


class PagedKVCache:
    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, device: torch.device):
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        num_slots = num_blocks * block_size
        dims = (num_slots, shape.num_kv_heads, shape.head_dim)
        self.keys = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        # where a layer gathers the blocks its rows read, reused by every layer and step: a fresh tensor of
        # tens of MB per gather is a fresh mmap, and its page faults cost more than the copy (seen on CPU)
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of these blocks: [len(block_ids), block_size, num_kv_heads, head_dim] each, views of
        a buffer that the next gather overwrites."""
        num = block_ids.shape[0]
        if self._gather is None or self._gather[0].shape[0] < num:
            rest = (self.block_size, self.shape.num_kv_heads, self.shape.head_dim)
            size = max(num, 2 * (self._gather[0].shape[0] if self._gather else 0))
            self._gather = tuple(torch.empty((size, *rest), dtype=self.shape.dtype, device=self.keys[0].device)
                                 for _ in range(2))
        out_k, out_v = (buf[:num] for buf in self._gather)
        blocks = (-1, self.block_size, self.shape.num_kv_heads, self.shape.head_dim)
        torch.index_select(self.keys[layer].view(blocks), 0, block_ids, out=out_k)
        torch.index_select(self.values[layer].view(blocks), 0, block_ids, out=out_v)
        return out_k, out_v

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_slots * self.shape.bytes_per_token


def num_blocks_for_budget(shape: KVShape, block_size: int, max_model_len: int, kv_cache_tokens: int | None,
                          gpu_memory_utilization: float, device: torch.device, default_tokens: int,
                          activation_bytes: int = 0) -> int:
    """How many blocks the cache gets: an explicit token budget, else (CUDA) what gpu_memory_utilization
    leaves after the weights, the CUDA context and a step's activations (measured by the caller), else
    default_tokens. Too little for one max-length sequence is a configuration error, reported at start."""
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    elif device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(device)
        used_b = total_b - free_b + activation_bytes  # weights and context are in use already
        tokens = int((total_b * gpu_memory_utilization - used_b) // shape.bytes_per_token)
    else:
        tokens = default_tokens
    num_blocks = tokens // block_size
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"the KV cache budget ({max(tokens, 0)} tokens = {num_blocks} blocks of {block_size}) cannot hold one "
            f"sequence of max_model_len {max_model_len} tokens: raise --kv-cache-tokens "
            f"(or --gpu-memory-utilization), or lower --max-model-len")
    return num_blocks
