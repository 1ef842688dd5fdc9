"""The flex-attention path: one `flex_attention` call per layer over the whole packed step.

The SDPA path (attention.py) runs one SDPA call per group of rows; on a GPU that is many
small kernels per layer. This path runs one kernel per layer instead: every row's cache
blocks are gathered into one key/value sequence, sequence after sequence in packed order, and
a block-sparse mask says which keys each query may see:

    same sequence  and  key position <= query position  (and > query position - window)

Because queries and keys are both laid out sequence by sequence, the keys a block of queries
can see form one contiguous range of key blocks. The BlockMask is therefore built directly
from per-query-block (first key block, count) pairs computed on the host with the rest of the
step's metadata: no dense [N, L] mask is ever evaluated, and nothing here syncs with the device.

On CUDA the kernel is `torch.compile(flex_attention)` (Triton); on CPU the eager reference
implementation runs, which is slow and meant for tests only (`--attention-backend flex`).
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch

log = logging.getLogger("redbatch.engine")

CUDA_BLOCK = (128, 128)  # BlockMask (query, key) block sizes on CUDA: the kernel's tiles must divide these
TEST_BLOCK = (16, 16)  # elsewhere (the eager reference): small, so that tests cross many blocks


def is_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class FlexPlan:
    """Host side of one layout (full or sliding): which blocks to gather and how queries map onto keys."""

    pages: list[int]  # cache blocks to gather, row after row in packed order
    page_seq: list[int]  # the row each gathered block belongs to
    page_pos: list[int]  # position of each gathered block's first slot
    q_block_first: list[int]  # per query block: first key block it may see
    q_block_count: list[int]  # per query block: how many key blocks, from the first
    window: int | None


@dataclass
class FlexStep:
    """Device side: the gathered blocks and the block mask, shared by every layer of that layout."""

    block_ids: torch.Tensor  # [P] cache blocks to gather
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask


def plan(row_tokens: list[tuple[int, int]], row_keys: list[tuple[int, int, list[int]]], block_size: int,
         window: int | None, q_block: int, kv_block: int) -> FlexPlan:
    """`row_tokens[i]`: (first query position, number of queries) of packed row i, rows in packed order.
    `row_keys[i]`: (first key position it reads, end of keys, its block table)."""
    pages, page_seq, page_pos, kv_lo, kv_hi = [], [], [], [], []
    for i, (start, end, table) in enumerate(row_keys):
        first, last = start // block_size, -(-end // block_size)
        kv_lo.append(len(pages) * block_size + start - first * block_size)
        pages += table[first:last]
        page_seq += [i] * (last - first)
        page_pos += [b * block_size for b in range(first, last)]
        kv_hi.append(len(pages) * block_size)
    row_of_query = [i for i, (_, n) in enumerate(row_tokens) for _ in range(n)]
    num_queries = len(row_of_query)
    firsts, counts = [], []
    for q in range(0, num_queries, q_block):
        lo_row, hi_row = row_of_query[q], row_of_query[min(q + q_block, num_queries) - 1]
        lo = kv_lo[lo_row] // kv_block
        hi = -(-kv_hi[hi_row] // kv_block)
        firsts.append(lo)
        counts.append(hi - lo)
    return FlexPlan(pages, page_seq, page_pos, firsts, counts, window)


def stage(staging, name: str, flex_plan: FlexPlan, row_tokens: list[tuple[int, int]]) -> None:
    staging.add(f"{name}.pages", flex_plan.pages)
    staging.add(f"{name}.page_seq", flex_plan.page_seq)
    staging.add(f"{name}.page_pos", flex_plan.page_pos)
    staging.add(f"{name}.q_blocks", flex_plan.q_block_first + flex_plan.q_block_count,
                (2, len(flex_plan.q_block_first)))
    if "flex.q_seq" not in staging.names:  # shared by the full and the sliding layout
        staging.add("flex.q_seq", [i for i, (_, n) in enumerate(row_tokens) for _ in range(n)])
        staging.add("flex.q_pos", [p for start, n in row_tokens for p in range(start, start + n)])


def device_step(dev: dict[str, torch.Tensor], name: str, flex_plan: FlexPlan, block_size: int, q_block: int,
                kv_block: int) -> FlexStep:
    from torch.nn.attention.flex_attention import BlockMask

    page_seq, page_pos = dev[f"{name}.page_seq"], dev[f"{name}.page_pos"]
    device = page_seq.device
    kv_seq = page_seq[:, None].expand(-1, block_size).reshape(-1)  # [L]
    kv_pos = (page_pos[:, None] + torch.arange(block_size, device=device)[None, :]).reshape(-1)  # [L]
    q_seq, q_pos = dev["flex.q_seq"], dev["flex.q_pos"]
    window = flex_plan.window

    def visible(b, h, q_idx, kv_idx):
        same = (q_seq[q_idx] == kv_seq[kv_idx]) & (kv_pos[kv_idx] <= q_pos[q_idx])
        if window is not None:
            same = same & (kv_pos[kv_idx] > q_pos[q_idx] - window)
        return same

    first, count = dev[f"{name}.q_blocks"]  # [Q blocks] each
    num_kv_blocks = -(-kv_seq.shape[0] // kv_block)  # BlockMask wants the index rows this wide
    indices = (first[:, None] + torch.arange(num_kv_blocks, device=device)[None, :]).clamp_(max=num_kv_blocks - 1)
    block_mask = BlockMask.from_kv_blocks(
        count.to(torch.int32)[None, None], indices.to(torch.int32)[None, None], BLOCK_SIZE=(q_block, kv_block),
        mask_mod=visible, seq_lengths=(q_seq.shape[0], kv_seq.shape[0]), compute_q_blocks=False)
    return FlexStep(block_ids=dev[f"{name}.pages"], block_mask=block_mask)


def attend(query: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, flex_step: FlexStep,
           scaling: float | None, softcap: float | None) -> torch.Tensor:
    """query [1, H, N, D]; k_blocks, v_blocks [P, block_size, Hkv, D] → [N, H, D]."""
    keys = k_blocks.flatten(0, 1).transpose(0, 1)[None]  # [1, Hkv, L, D]
    values = v_blocks.flatten(0, 1).transpose(0, 1)[None]
    score_mod = None
    if softcap:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)
    out = _kernel(query.device.type)(query, keys, values, score_mod=score_mod, block_mask=flex_step.block_mask,
                                     scale=scaling, enable_gqa=keys.shape[1] != query.shape[1])
    return out[0].transpose(0, 1)  # [N, H, D]


@functools.cache
def _kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)

    def eager(*args, **kwargs):
        with warnings.catch_warnings():  # "flex_attention called without torch.compile": intended off CUDA
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(*args, **kwargs)

    return eager


def warm_up(device: torch.device, dtype: torch.dtype) -> None:
    """One tiny call through the kernel (compiles it); raises what compiling raises."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_block, kv_block = block_sizes(device)
    q = torch.zeros((1, 2, q_block, 64), dtype=dtype, device=device)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, q_block, kv_block,
                             device=device, BLOCK_SIZE=(q_block, kv_block))
    _kernel(device.type)(q, q, q, block_mask=mask)


def block_sizes(device: torch.device) -> tuple[int, int]:
    return CUDA_BLOCK if device.type == "cuda" else TEST_BLOCK
