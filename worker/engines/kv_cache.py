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
    """Duck-types the part of transformers' `Cache` that attention layers call (`update`).

    Memory is bounded by `max_cached_tokens`: rows x capacity never exceeds it. Rows
    grow in length by doubling; when a longer row is needed and the budget cannot hold
    every running sequence at that length, the engine preempts some first (see `grow`).
    """

    def __init__(self, num_layers: int, max_slots: int, num_kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device, max_cached_tokens: int | None = None):
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_len = max_len
        self.max_cached_tokens = max_cached_tokens or max_slots * max_len
        self._shape_rest = (num_kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self._allocate(self._initial_capacity())
        self._layout: ForwardLayout | None = None

    def _initial_capacity(self) -> int:
        return min(INITIAL_CAPACITY, self.max_len, self.max_cached_tokens)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.num_rows = self.rows_for_capacity(capacity)
        heads, head_dim = self._shape_rest
        shape = (self.num_rows, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]
        self._free = list(range(self.num_rows))

    def rows_for_capacity(self, capacity: int) -> int:
        return min(self.max_slots, self.max_cached_tokens // capacity)

    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence the cache can ever hold."""
        return min(self.max_len, self.max_cached_tokens)

    def capacity_for(self, num_tokens: int) -> int:
        """The row length `grow` would pick to hold num_tokens (doubling, capped by max_len and the budget)."""
        if num_tokens > self.max_sequence_tokens:
            raise ValueError(f"{num_tokens} tokens exceed the cache (max_len {self.max_len}, budget {self.max_cached_tokens})")
        capacity = self.capacity
        while capacity < num_tokens:
            capacity *= 2
        return min(capacity, self.max_sequence_tokens)

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
        if not 0 <= slot < self.num_rows or slot in self._free:
            raise RuntimeError(f"KV slot {slot} freed twice or out of range")  # would hand one slot to two sequences
        heapq.heappush(self._free, slot)

    def grow(self, num_tokens: int, live_slots: list[int]) -> dict[int, int]:
        """Make rows hold num_tokens, keeping the live rows packed into slots 0..n-1. Returns old -> new slot.

        Rare: capacity doubles each time. The caller first preempts down to
        rows_for_capacity(capacity_for(num_tokens)) live rows.
        """
        capacity = self.capacity_for(num_tokens)
        if capacity <= self.capacity:
            return {slot: slot for slot in live_slots}
        if len(live_slots) > self.rows_for_capacity(capacity):
            raise RuntimeError(f"{len(live_slots)} live rows do not fit the KV budget at {capacity} tokens a row")
        old_keys, old_values, old_capacity = self.keys, self.values, self.capacity
        self._allocate(capacity)
        order = sorted(live_slots)
        if order:
            src = torch.tensor(order, device=self._device)
            for layer in range(self.num_layers):
                self.keys[layer][: len(order), :, :old_capacity] = old_keys[layer][src]
                self.values[layer][: len(order), :, :old_capacity] = old_values[layer][src]
        self._free = list(range(len(order), self.num_rows))
        return {old: new for new, old in enumerate(order)}

    def reset(self) -> None:
        """Back to the initial size when nothing runs, returning what a long burst grew."""
        if self.capacity > self._initial_capacity():
            self._allocate(self._initial_capacity())

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

