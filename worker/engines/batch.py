"""Building one forward's tensors from scheduled chunks.

Two layouts:
- range (decode groups): rows are the slots lo..hi-1, so the cache hands attention
  a zero-copy view; slots in the range that are not in the group become dummy rows
  (token 0, nothing written, attending only to key 0 so the softmax stays finite).
- gathered (prefill groups): one row per chunk, left-padded to the longest chunk,
  so every row's last real token is the last column (`logits_to_keep=1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engines.kv_cache import ForwardLayout
from worker.scheduler import ScheduledChunk


@dataclass
class GroupInputs:
    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor | dict[str, torch.Tensor]  # [R, 1, T, L] additive
    layout: ForwardLayout
    member_rows: torch.Tensor | None  # rows holding the group's chunks, in group order; None = all rows


def build_group(group: list[ScheduledChunk], use_range: bool, device: torch.device, dtype: torch.dtype,
                sliding_window: int | None = None) -> GroupInputs:
    width = max(c.num_tokens for c in group)  # T
    if use_range:
        lo = min(c.seq.slot for c in group)
        hi = max(c.seq.slot for c in group) + 1
        row_of = [c.seq.slot - lo for c in group]
        num_rows = hi - lo
        row_slots = list(range(lo, hi))
    else:
        lo = hi = None
        row_of = list(range(len(group)))
        num_rows = len(group)
        row_slots = [c.seq.slot for c in group]
    ids = [[0] * width for _ in range(num_rows)]
    pos = [[0] * width for _ in range(num_rows)]
    valid = [[False] * width for _ in range(num_rows)]
    write_rows, write_pos, col_rows, col_cols = [], [], [], []
    for chunk, row in zip(group, row_of):
        start = chunk.seq.num_computed
        tokens = chunk.seq.token_slice(start, start + chunk.num_tokens)
        pad = width - len(tokens)
        ids[row][pad:] = tokens
        pos[row][pad:] = range(start, start + len(tokens))
        valid[row][pad:] = [True] * len(tokens)
        write_rows += [chunk.seq.slot] * len(tokens)
        write_pos += range(start, start + len(tokens))
        col_rows += [row] * len(tokens)
        col_cols += range(pad, width)
    kv_len = max(c.seq.num_computed + c.num_tokens for c in group)  # L
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    position_ids = as_long(pos)
    valid_t = torch.tensor(valid, dtype=torch.bool, device=device)
    layout = ForwardLayout(
        row_slots=as_long(row_slots), write_rows=as_long(write_rows), write_pos=as_long(write_pos),
        write_cols=(as_long(col_rows), as_long(col_cols)), kv_len=kv_len,
        slot_range=(lo, hi) if use_range else None,
    )
    mask = _additive_mask(position_ids, valid_t, kv_len, dtype, None)
    if sliding_window is not None:
        mask = {"full_attention": mask,
                "sliding_attention": _additive_mask(position_ids, valid_t, kv_len, dtype, sliding_window)}
    member_rows = None if row_of == list(range(num_rows)) else as_long(row_of)
    return GroupInputs(as_long(ids), position_ids, mask, layout, member_rows)


def _additive_mask(position_ids: torch.Tensor, valid: torch.Tensor, kv_len: int, dtype: torch.dtype,
                   window: int | None) -> torch.Tensor:
    # query at position p may read keys 0..p (and, with a sliding window, only the last `window` of them);
    # padding and dummy queries read key 0 only, so no softmax row is empty
    keys = torch.arange(kv_len, device=position_ids.device)[None, None, :]  # [1, 1, L]
    query_pos = position_ids[:, :, None]  # [R, T, 1]
    allowed = keys <= query_pos
    if window is not None:
        allowed &= keys > query_pos - window
    allowed = torch.where(valid[:, :, None], allowed, keys == 0)  # [R, T, L]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # [R, 1, T, L]
