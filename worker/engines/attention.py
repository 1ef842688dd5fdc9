"""Paged attention for the packed step, plugged into transformers' attention interface.

The engine runs the model once per step on all scheduled tokens packed into one row
([1, N]: prefill chunks and decode tokens of every request, each token at its own
position). Every attention layer of the unmodified HF model then calls `paged_attention`
(registered as ATTENTION_NAME), which

1. writes the step's new keys/values into the paged cache at their slots, and
2. attends each group of rows to its own keys, read from the cache through its block table:
   decode rows are grouped by similar KV length (one SDPA call per group, key padding
   bounded by DECODE_PAD_RATIO), each prefill chunk is a group of its own (causal within
   the chunk, after the cached prefix). When all rows of a decode group start with the same
   cached blocks (a shared system prompt), those keys are read once for the whole group, as
   one matrix product over all its queries, and combined with each row's own keys through
   their softmax normalisers (shared-prefix, or cascade, attention).

No [R, T, L] mask over the whole batch exists and no token is padded: the linear layers see
exactly N tokens. Without step metadata (e.g. `model.generate` on the same model object) the
function is transformers' own SDPA attention, so the model behaves as if untouched.

A model split over devices gets the step's metadata on every device that holds layers
(StepAttention.on); each layer writes and reads its own device's cache tensors. Under tensor
parallelism the function sees this process's heads only, and the cache holds just those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from worker.engines import flex
from worker.engines.kv_cache import PagedKVCache

ATTENTION_NAME = "redbatch_paged"
STEP_KWARG = "redbatch_step"  # the forward kwarg that carries StepAttention down to the layers


@dataclass
class AttentionGroup:
    """Rows whose queries attend together; their tokens are contiguous in the packed step."""

    start: int  # first packed token of the group
    num_rows: int  # G
    num_queries: int  # T per row (1 for decode groups)
    block_offset: int  # the group's blocks in StepAttention.block_ids: [block_offset, + shared + G * num_blocks)
    num_blocks: int  # blocks read per row (after the shared ones)
    num_keys: int  # L: keys read per row, from the start of its first own block
    mask: torch.Tensor | None  # [G, 1, T, L] bool, True = may attend; None = every key read, or causal
    is_causal: bool  # T == L from position 0: SDPA's own causal mask suffices
    shared_blocks: int = 0  # decode groups: leading blocks all rows read, at block_offset, before the rows' own

    @property
    def end(self) -> int:
        return self.start + self.num_rows * self.num_queries


@dataclass
class StepAttention:
    # no method may be called `to`: accelerate's device hooks would call it on every layer's kwargs
    cache: PagedKVCache
    write_slots: torch.Tensor  # [N] cache slot of every packed token
    block_ids: torch.Tensor  # [sum of G * num_blocks] the blocks every group reads, row after row
    groups: list[AttentionGroup]
    sliding: tuple[torch.Tensor, list[AttentionGroup]] | None = None  # same rows, keys limited to the window
    flex: flex.FlexStep | None = None  # set: the flex-attention layout replaces the SDPA groups
    flex_sliding: flex.FlexStep | None = None
    elsewhere: dict[torch.device, StepAttention] = field(default_factory=dict)  # the same step on other devices

    def on(self, device: torch.device) -> StepAttention:
        """This step's metadata on the device of a layer's cache."""
        return self if device == self.write_slots.device else self.elsewhere[device]

    def layout_for(self, sliding_window: int | None) -> tuple[torch.Tensor, list[AttentionGroup]]:
        if sliding_window and self.sliding is not None:
            return self.sliding
        return self.block_ids, self.groups


class LayerProbe:
    """Passed instead of a StepAttention by a probe forward (worker/engines/placement.py): notes, per layer,
    the device its keys are computed on and their shape [1, Hkv, N, D] (Hkv: this process's share)."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.device, int, int, torch.dtype]] = {}

    def record(self, layer: int, key: torch.Tensor) -> None:
        self.layers[layer] = (key.device, key.shape[1], key.shape[3], key.dtype)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query: [1, H, N, D]; key, value: [1, Hkv, N, D] for the step's N packed tokens (RoPE applied)
    step: StepAttention | LayerProbe | None = kwargs.pop(STEP_KWARG, None)
    if isinstance(step, LayerProbe):
        step.record(module.layer_idx, key)
        step = None
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = module.layer_idx
    k_cache, v_cache = step.cache.keys[layer], step.cache.values[layer]  # [S, Hkv, D]
    step = step.on(k_cache.device)
    k_cache.index_copy_(0, step.write_slots, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, step.write_slots, value[0].transpose(0, 1).to(v_cache.dtype))
    if step.flex is not None:
        layout = step.flex_sliding if kwargs.get("sliding_window") and step.flex_sliding is not None else step.flex
        k_blocks, v_blocks = step.cache.gather(layer, layout.block_ids)
        return flex.attend(query, k_blocks, v_blocks, layout, scaling, kwargs.get("softcap"))[None], None
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit softcapping needs the flex attention backend (--attention-backend flex)")
    num_heads, head_dim = query.shape[1], query.shape[3]
    block_ids, groups = step.layout_for(kwargs.get("sliding_window"))
    # one gather per layer for every group's blocks: [sum G * num_blocks, block_size, Hkv, D]
    k_blocks, v_blocks = step.cache.gather(layer, block_ids)
    q = query[0].transpose(0, 1)  # [N, H, D]
    out = torch.empty_like(q)
    for group in groups:
        attend = _shared_prefix_attention if group.shared_blocks else _group_attention
        out[group.start : group.end] = attend(q[group.start : group.end], k_blocks, v_blocks, group, num_heads,
                                              head_dim, scaling)
    return out[None], None  # [1, N, H, D]


def _rows_blocks(blocks: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """[G, L, Hkv, D]: the group's rows of gathered blocks (after its shared ones), keys in position order."""
    first = group.block_offset + group.shared_blocks
    rows = blocks[first : first + group.num_rows * group.num_blocks]
    rows = rows.view(group.num_rows, group.num_blocks * blocks.shape[1], *blocks.shape[2:])  # [G, nb * bs, Hkv, D]
    return rows[:, : group.num_keys]


def _rows_keys(blocks: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """[G, Hkv, L, D]: the group's rows of gathered blocks, as keys (or values) in position order."""
    return _rows_blocks(blocks, group).transpose(1, 2)


def _group_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, group: AttentionGroup,
                     num_heads: int, head_dim: int, scaling: float | None) -> torch.Tensor:
    rows, queries = group.num_rows, group.num_queries
    keys = _rows_keys(k_blocks, group)  # [G, Hkv, L, D]
    values = _rows_keys(v_blocks, group)
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


def _shared_prefix_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                             group: AttentionGroup, num_heads: int, head_dim: int, scaling: float | None
                             ) -> torch.Tensor:
    """A decode group whose rows share their leading blocks: softmax over [shared keys, own keys] per row,
    computed as two parts (the shared keys once for all G rows, as one batched matrix product; each row's own
    keys as in _group_attention) merged through their maxima and normalisers. q [G, H, D] -> [G, H, D]."""
    rows = group.num_rows
    scale = scaling if scaling is not None else head_dim ** -0.5
    shared = slice(group.block_offset, group.block_offset + group.shared_blocks)
    ks = k_blocks[shared].flatten(0, 1)  # [Ls, Hkv, D]
    vs = v_blocks[shared].flatten(0, 1)
    num_kv_heads = ks.shape[1]
    per_kv = num_heads // num_kv_heads
    qf = q.float().view(rows, num_kv_heads, per_kv, head_dim)  # [G, Hkv, H/Hkv, D]
    # shared part: every query of the group against the same keys, [Hkv, G * H/Hkv, Ls]
    qs = qf.permute(1, 0, 2, 3).reshape(num_kv_heads, rows * per_kv, head_dim)
    s1 = torch.bmm(qs, ks.float().permute(1, 2, 0)) * scale
    m1 = s1.amax(-1, keepdim=True)
    p1 = torch.exp(s1 - m1)
    l1 = p1.sum(-1, keepdim=True)
    o1 = torch.bmm(p1, vs.float().transpose(0, 1))  # [Hkv, G * H/Hkv, D], not yet normalised

    def per_row(t: torch.Tensor) -> torch.Tensor:  # [Hkv, G * H/Hkv, X] -> [G, Hkv, H/Hkv, X]
        return t.view(num_kv_heads, rows, per_kv, t.shape[-1]).permute(1, 0, 2, 3)

    o1, m1, l1 = per_row(o1), per_row(m1), per_row(l1)
    # own part: each row's keys after the shared blocks (padding masked)
    o2, m2, l2 = _own_part(qf, _rows_blocks(k_blocks, group), _rows_blocks(v_blocks, group), group.mask, scale)
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    out = (o1 * a1 + o2 * a2) / (l1 * a1 + l2 * a2)
    return out.reshape(rows, num_heads, head_dim).to(q.dtype)


ELEMENTWISE_MAX = 1 << 24  # the CPU own part multiplies and sums while its product has at most this many elements


def _own_part(qf: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised softmax attention of qf [G, Hkv, g, D] over each row's keys/values [G, L, Hkv, D] (the
    gathered layout) with mask [G, 1, 1, L] or None: (o [G, Hkv, g, D], max [G, Hkv, g, 1], sum [G, Hkv, g, 1]).
    On the CPU a product and a sum over D read the keys once where a matmul would first copy them transposed;
    elsewhere (or when that product would be large) the matmul."""
    keys, values = keys.float(), values.float()
    rows, length, num_kv_heads, head_dim = keys.shape
    if keys.device.type == "cpu" and rows * length * num_kv_heads * qf.shape[2] * head_dim <= ELEMENTWISE_MAX:
        scores = (keys[:, :, :, None, :] * qf[:, None]).sum(-1) * scale  # [G, L, Hkv, g]
        if mask is not None:  # every row keeps its newest key, so no row is all masked
            scores = scores.masked_fill(~mask[:, 0, 0, :, None, None], float("-inf"))
        top = scores.amax(1, keepdim=True)
        weights = torch.exp(scores - top)
        out = (weights[..., None] * values[:, :, :, None, :]).sum(1)  # [G, Hkv, g, D]
        return out, top[:, 0, :, :, None], weights.sum(1)[..., None]
    scores = torch.matmul(qf, keys.permute(0, 2, 3, 1)) * scale  # [G, Hkv, g, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - top)
    return torch.matmul(weights, values.transpose(1, 2)), top, weights.sum(-1, keepdim=True)


def register() -> str:
    """Make ATTENTION_NAME a valid attn_implementation (idempotent); its mask function is SDPA's, for
    callers without step metadata."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
