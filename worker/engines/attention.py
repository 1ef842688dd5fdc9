"""Paged attention for the packed step, plugged into transformers' attention interface.

The engine runs the model once per step on all scheduled tokens packed into one row
([1, N]: prefill chunks and decode tokens of every request, each token at its own
position). Every attention layer of the unmodified HF model then calls `paged_attention`
(registered as ATTENTION_NAME), which

1. writes the step's new keys/values into the paged cache at their slots, and
2. attends each group of rows to its own keys, read from the cache through its block table:
   decode rows are grouped by similar KV length (one SDPA call per group, key padding
   bounded by DECODE_PAD_RATIO), each prefill chunk is a group of its own (causal within
   the chunk, after the cached prefix).

No [R, T, L] mask over the whole batch exists and no token is padded: the linear layers see
exactly N tokens. Without step metadata (e.g. `model.generate` on the same model object) the
function is transformers' own SDPA attention, so the model behaves as if untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from worker.engines.kv_cache import PagedKVCache

ATTENTION_NAME = "redbatch_paged"
STEP_KWARG = "redbatch_step"  # the forward kwarg that carries StepAttention down to the layers


@dataclass
class AttentionGroup:
    """Rows whose queries attend together; their tokens are contiguous in the packed step."""

    start: int  # first packed token of the group
    num_rows: int  # G
    num_queries: int  # T per row (1 for decode groups)
    slots: torch.Tensor  # [G, L] cache slot of each key a row may read (padding: any valid slot)
    mask: torch.Tensor | None  # [G, 1, T, L] bool, True = may attend; None = every key, or causal
    is_causal: bool  # T == L from position 0: SDPA's own causal mask suffices

    @property
    def end(self) -> int:
        return self.start + self.num_rows * self.num_queries


@dataclass
class StepAttention:
    cache: PagedKVCache
    write_slots: torch.Tensor  # [N] cache slot of every packed token
    groups: list[AttentionGroup]
    sliding_groups: list[AttentionGroup] | None = None  # same rows, keys limited to the window

    def groups_for(self, sliding_window: int | None) -> list[AttentionGroup]:
        if sliding_window and self.sliding_groups is not None:
            return self.sliding_groups
        return self.groups


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query: [1, H, N, D]; key, value: [1, Hkv, N, D] for the step's N packed tokens (RoPE applied)
    step: StepAttention | None = kwargs.pop(STEP_KWARG, None)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("redbatch's paged attention does not support attention logit softcapping")
    layer = module.layer_idx
    k_cache, v_cache = step.cache.keys[layer], step.cache.values[layer]  # [S, Hkv, D]
    k_cache.index_copy_(0, step.write_slots, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, step.write_slots, value[0].transpose(0, 1).to(v_cache.dtype))
    num_heads, head_dim = query.shape[1], query.shape[3]
    q = query[0].transpose(0, 1)  # [N, H, D]
    out = torch.empty_like(q)
    for group in step.groups_for(kwargs.get("sliding_window")):
        out[group.start : group.end] = _group_attention(q[group.start : group.end], k_cache, v_cache, group,
                                                        num_heads, head_dim, scaling)
    return out[None], None  # [1, N, H, D]


def _group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup,
                     num_heads: int, head_dim: int, scaling: float | None) -> torch.Tensor:
    rows, queries = group.num_rows, group.num_queries
    keys = k_cache[group.slots].transpose(1, 2)  # [G, Hkv, L, D]
    values = v_cache[group.slots].transpose(1, 2)
    num_kv_heads = keys.shape[1]
    if queries == 1:
        # one query per row: fold the query heads sharing a KV head into the query axis (no KV repeat)
        qg = q.view(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [G, Hkv, H/Hkv, D]
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=group.mask, scale=scaling)
        return o.reshape(rows, num_heads, head_dim)  # [G, H, D]
    qg = q.view(rows, queries, num_heads, head_dim).transpose(1, 2)  # [G, H, T, D]
    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=group.mask, is_causal=group.is_causal,
                                       scale=scaling, enable_gqa=num_kv_heads != num_heads)
    return o.transpose(1, 2).reshape(rows * queries, num_heads, head_dim)


def register() -> str:
    """Make ATTENTION_NAME a valid attn_implementation (idempotent); its mask function is SDPA's, for
    callers without step metadata."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
