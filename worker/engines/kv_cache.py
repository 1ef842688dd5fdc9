"""The paged KV cache's memory: one key and one value tensor per layer, allocated once at start.

    keys[layer], values[layer]: [num_blocks * block_size, num_kv_heads, head_dim]

Slot s = block * block_size + offset holds one token's key/value. Which sequence owns which
block is the BlockManager's business (plain Python); this class only holds the tensors and
sizes the budget. Nothing here grows or reallocates during a step.

A model split over devices (accelerate's device_map) keeps each layer's tensors on the device
where that layer computes; under tensor parallelism each process holds its share of the KV
heads (num_kv_heads is the local count) and the same block ids as every other rank.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    def __init__(self, shape: KVShape, num_blocks: int, block_size: int,
                 device: torch.device | Sequence[torch.device]):
        """`device`: one for every layer, or one per layer (where that layer computes)."""
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layer_devices = _per_layer(device, shape.num_layers)
        dims = (num_blocks * block_size, shape.num_kv_heads, shape.head_dim)
        self.keys = [torch.zeros(dims, dtype=shape.dtype, device=d) for d in self.layer_devices]
        self.values = [torch.zeros(dims, dtype=shape.dtype, device=d) for d in self.layer_devices]
        # where a layer gathers the blocks its rows read, one per device, reused by every layer and step: a fresh
        # tensor of tens of MB per gather is a fresh mmap, and its page faults cost more than the copy (seen on CPU)
        self._gather: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices holding layers, in layer order (the first is where a step's inputs go)."""
        return list(dict.fromkeys(self.layer_devices))

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of these blocks: [len(block_ids), block_size, num_kv_heads, head_dim] each, views of
        a buffer on the layer's device that the next gather there overwrites."""
        num = block_ids.shape[0]
        device = self.layer_devices[layer]
        buffers = self._gather.get(device)
        if buffers is None or buffers[0].shape[0] < num:
            rest = (self.block_size, self.shape.num_kv_heads, self.shape.head_dim)
            size = max(num, 2 * (buffers[0].shape[0] if buffers else 0))
            buffers = self._gather[device] = tuple(
                torch.empty((size, *rest), dtype=self.shape.dtype, device=device) for _ in range(2))
        out_k, out_v = (buf[:num] for buf in buffers)
        blocks = (-1, self.block_size, self.shape.num_kv_heads, self.shape.head_dim)
        torch.index_select(self.keys[layer].view(blocks), 0, block_ids, out=out_k)
        torch.index_select(self.values[layer].view(blocks), 0, block_ids, out=out_v)
        return out_k, out_v

    def layers_on(self, device: torch.device) -> int:
        return sum(d == device for d in self.layer_devices)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_slots * self.shape.bytes_per_token


def num_blocks_for_budget(shape: KVShape, block_size: int, max_model_len: int, kv_cache_tokens: int | None,
                          gpu_memory_utilization: float, device: torch.device | Sequence[torch.device],
                          default_tokens: int, activation_bytes: int | dict[torch.device, int] = 0) -> int:
    """How many blocks the cache gets: an explicit token budget, else (CUDA) what gpu_memory_utilization
    leaves after the weights, the CUDA context and a step's activations (measured by the caller), else
    default_tokens. Too little for one max-length sequence is a configuration error, reported at start.

    `device`: one device, or one per layer; then every CUDA device must hold its layers' share of the
    blocks, so the device with the least room per layer sets the count. `activation_bytes`: per device."""
    layer_devices = _per_layer(device, shape.num_layers)
    cuda_devices = [d for d in dict.fromkeys(layer_devices) if d.type == "cuda"]
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    elif cuda_devices:
        if not isinstance(activation_bytes, dict):
            activation_bytes = {d: activation_bytes for d in cuda_devices}
        tokens = min(_cuda_tokens(shape, d, layer_devices.count(d), gpu_memory_utilization, activation_bytes.get(d, 0))
                     for d in cuda_devices)
    else:
        tokens = default_tokens
    num_blocks = tokens // block_size
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"the KV cache budget ({max(tokens, 0)} tokens = {num_blocks} blocks of {block_size}) cannot hold one "
            f"sequence of max_model_len {max_model_len} tokens: raise --kv-cache-tokens "
            f"(or --gpu-memory-utilization), or lower --max-model-len")
    return num_blocks


def _cuda_tokens(shape: KVShape, device: torch.device, num_layers: int, gpu_memory_utilization: float,
                 activation_bytes: int) -> int:
    free_b, total_b = torch.cuda.mem_get_info(device)
    used_b = total_b - free_b + activation_bytes  # weights and context are in use already
    bytes_per_token = shape.bytes_per_token * num_layers // shape.num_layers  # this device's layers only
    return int((total_b * gpu_memory_utilization - used_b) // bytes_per_token)


def _per_layer(device: torch.device | Sequence[torch.device], num_layers: int) -> list[torch.device]:
    if isinstance(device, (torch.device, str)):
        return [torch.device(device)] * num_layers
    devices = [torch.device(d) for d in device]
    if len(devices) != num_layers:
        raise ValueError(f"{len(devices)} layer devices for {num_layers} layers")
    return devices
