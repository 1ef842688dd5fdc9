"""KV cache backends for the LLM engine.

`SlotKVCache` preallocates one row ("slot") per running sequence in every layer:
    keys[layer], values[layer]: [num_slots, num_kv_heads, capacity, head_dim]
Each row is written at its own positions, so sequences of different lengths share a
batch without re-padding, and admitting or finishing one sequence touches only its row.
A forward declares its rows and write positions with `begin_forward`; the HF attention
layers then call `update`, which writes the new keys/values and returns the keys/values
the attention reads: a zero-copy view of a slot range for decode groups, a gathered
copy of just the prefill rows otherwise.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

INITIAL_CAPACITY = 256


@dataclass
class ForwardLayout:
    """Where one forward reads and writes. R rows, T query columns, L key columns."""

    row_slots: torch.Tensor  # [R] slot of each row (dummy rows: any slot, never written)
    write_rows: torch.Tensor  # [N] slot of each written token
    write_pos: torch.Tensor  # [N] position of each written token
    write_cols: tuple[torch.Tensor, torch.Tensor]  # ([N] row index, [N] column index) into [R, T]
    kv_len: int  # L: keys visible to this forward
    slot_range: tuple[int, int] | None  # (lo, hi): rows are exactly slots lo..hi-1 (zero-copy view)


class SlotKVCache:
    """Duck-types the part of transformers' `Cache` that attention layers call (`update`)."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.max_len = max_len
        self.capacity = min(INITIAL_CAPACITY, max_len)
        shape = (num_slots, num_kv_heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(num_slots))
        self._layout: ForwardLayout | None = None

    # ------------------------------------------------------------ slots

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """The lowest free slot, so the rows in use stay packed at the low end."""
        if not self._free:
            raise RuntimeError("no free KV slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise RuntimeError(f"KV slot {slot} freed twice or out of range")  # would hand one slot to two sequences
        heapq.heappush(self._free, slot)

    def ensure_capacity(self, num_tokens: int) -> None:
        """Grow every row to hold `num_tokens` positions (doubling; rare, amortized)."""
        if num_tokens <= self.capacity:
            return
        if num_tokens > self.max_len:
            raise ValueError(f"{num_tokens} tokens exceed the cache's max_len {self.max_len}")
        new_capacity = self.capacity
        while new_capacity < num_tokens:
            new_capacity *= 2
        new_capacity = min(new_capacity, self.max_len)
        for layer in range(self.num_layers):
            self.keys[layer] = _grow(self.keys[layer], new_capacity)
            self.values[layer] = _grow(self.values[layer], new_capacity)
        self.capacity = new_capacity

    # ------------------------------------------------------------ forward protocol

    def begin_forward(self, layout: ForwardLayout) -> None:
        self._layout = layout

    def end_forward(self) -> None:
        self._layout = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states, value_states: [R, H, T, D] for this forward's rows and query columns
        layout = self._layout
        if layout is None:
            raise RuntimeError("SlotKVCache.update called outside begin_forward/end_forward")
        rows, cols = layout.write_cols
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        # [N, H, D] new entries -> cache[slot, :, pos]
        k_cache[layout.write_rows, :, layout.write_pos] = key_states[rows, :, cols]
        v_cache[layout.write_rows, :, layout.write_pos] = value_states[rows, :, cols]
        if layout.slot_range is not None:
            lo, hi = layout.slot_range
            return k_cache[lo:hi, :, : layout.kv_len], v_cache[lo:hi, :, : layout.kv_len]
        return (k_cache[layout.row_slots, :, : layout.kv_len], v_cache[layout.row_slots, :, : layout.kv_len])

    # ------------------------------------------------------------ transformers Cache odds and ends

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._layout is None else self._layout.kv_len

    @property
    def is_compileable(self) -> bool:
        return False


def _grow(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    grown = tensor.new_zeros((*tensor.shape[:2], capacity, tensor.shape[3]))
    grown[:, :, : tensor.shape[2]] = tensor
    return grown
