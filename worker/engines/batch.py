"""Building one packed step's tensors from the scheduled chunks.

Token order in the packed row: decode tokens first, grouped by similar KV length, then
each prefill chunk. All host-side metadata (token ids, positions, write slots, block tables,
key ranges, the logits rows and whatever the sampler needs) goes into one int64 staging
buffer and crosses to the device in one copy; masks and key slots are derived there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from worker.engines import flex
from worker.engines.attention import AttentionGroup, StepAttention
from worker.engines.kv_cache import PagedKVCache
from worker.engines.placement import Placement
from worker.scheduler import ScheduledChunk

DECODE_PAD_RATIO = 1.25  # a decode group's padded keys stay within this factor of its real keys
MIN_SHARED_BLOCKS = 2  # a decode group whose rows all start with this many of the same blocks reads them once


class Staging:
    """Named int64 (or float32, bit-cast) arrays gathered on the host, sent to the device in one copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, int, tuple[int, ...], bool]] = []  # name, offset, shape, is_float
        self._values: list[int] = []
        self._floats: list[tuple[int, list[float]]] = []

    @property
    def names(self) -> set[str]:
        return {part[0] for part in self._parts}

    def add(self, name: str, values: list[int], shape: tuple[int, ...] | None = None) -> None:
        self._parts.append((name, len(self._values), shape or (len(values),), False))
        self._values.extend(values)

    def add_floats(self, name: str, values: list[float]) -> None:
        self._floats.append((len(self._values), values))
        self._parts.append((name, len(self._values), (len(values),), True))
        self._values.extend([0] * len(values))

    def send(self, device: torch.device) -> dict[str, torch.Tensor]:
        return self.send_to([device])[device]

    def send_to(self, devices: list[torch.device]) -> dict[torch.device, dict[str, torch.Tensor]]:
        """One copy to each distinct device (a model split over devices needs its metadata on each)."""
        host = torch.tensor(self._values, dtype=torch.int64)
        for offset, values in self._floats:  # float32 bits, widened to int64 without changing them
            host[offset : offset + len(values)] = torch.tensor(values, dtype=torch.float32).view(torch.int32).long()
        if any(d.type == "cuda" for d in devices):
            host = host.pin_memory()
        return {device: self._views(host.to(device, non_blocking=True)) for device in dict.fromkeys(devices)}

    def _views(self, dev: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, offset, shape, is_float in self._parts:
            size = 1
            for dim in shape:
                size *= dim
            view = dev[offset : offset + size].view(shape)
            out[name] = view.int().view(torch.float32) if is_float else view
        return out


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    logits_rows: torch.Tensor  # [S] packed index of each sampled chunk's last token
    attention: StepAttention
    chunks: list[ScheduledChunk]  # in packed order
    sampled: list[ScheduledChunk]  # chunks that complete their sequence, in logits-row order
    extra: dict[str, torch.Tensor]  # whatever else the caller staged (sampling parameters)
    image_rows: torch.Tensor | None = None  # [M] packed index of every image token in the step
    image_pieces: list[tuple[ScheduledChunk, int, int, int]] | None = None  # (chunk, image, first, end) feature rows


@dataclass
class _GroupPlan:
    chunks: list[ScheduledChunk]
    num_queries: int
    kv_start: list[int]  # first visible key position, per row
    kv_end: list[int]  # one past the last visible key position, per row
    q_start: int  # position of the first query (prefill groups)
    window: int | None  # sliding window: a query at p reads keys p - window + 1 .. p
    num_blocks: int = 0  # blocks read per row after the shared ones (set when staged)
    shared_blocks: int = 0  # leading blocks every row of a decode group reads (a shared prefix), staged once


def order_chunks(chunks: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
    """Decode chunks grouped by similar KV length (longest first), then one group per prefill chunk. Decodes
    whose first block is one that other decodes of the step start with too (a cached prompt they share) are
    grouped among themselves, so that their group can read the shared blocks once."""
    decodes = [c for c in chunks if c.num_tokens == 1]
    firsts = [c.seq.block_table[0] if c.seq.block_table else -1 for c in decodes]
    counts: dict[int, int] = {}
    for first in firsts:
        counts[first] = counts.get(first, 0) + 1
    bucket = {id(c): f if f >= 0 and counts[f] > 1 else -1 for c, f in zip(decodes, firsts)}
    decodes.sort(key=lambda c: (bucket[id(c)], -c.seq.num_computed))
    groups: list[list[ScheduledChunk]] = []
    for chunk in decodes:
        group = groups[-1] if groups and groups[-1][0].num_tokens == 1 else None
        if group is not None and bucket[id(group[0])] != bucket[id(chunk)]:
            group = None
        if group is not None:
            longest = group[0].seq.num_computed + 1
            real = sum(c.seq.num_computed + 1 for c in group) + chunk.seq.num_computed + 1
            if (len(group) + 1) * longest <= DECODE_PAD_RATIO * real:
                group.append(chunk)
                continue
        groups.append([chunk])
    groups += [[c] for c in chunks if c.num_tokens > 1]
    return groups


def build_step(chunks: list[ScheduledChunk], cache: PagedKVCache, sliding_window: int | None,
               staging: Staging | None = None,
               add_extra: Callable[[Staging, list[ScheduledChunk]], None] | None = None,
               flex_blocks: tuple[int, int] | None = None, placement: Placement | None = None,
               mrope: bool = False) -> StepInputs:
    """`add_extra(staging, sampled)` stages more per-sampled-row arrays (sampling parameters) into the same copy.
    `flex_blocks`: build the flex-attention layout with these BlockMask (query, key) block sizes instead of the
    SDPA groups. `placement`: where the model's inputs, LM head and logits are (default: the cache's first
    device); the staging goes once to every device the step touches. `mrope`: positions are [3, N] (M-RoPE:
    temporal, height, width) instead of [N]."""
    staging = staging or Staging()
    block_size = cache.block_size
    grouped = order_chunks(chunks)
    ordered = [c for g in grouped for c in g]
    ids, positions, slots, logits_rows, sampled = [], [], [], [], []
    rope: list[list[int]] = [[], [], []]
    image_rows: list[int] = []
    image_pieces: list[tuple[ScheduledChunk, int, int, int]] = []
    for chunk in ordered:
        seq, start = chunk.seq, chunk.seq.num_computed
        end = start + chunk.num_tokens
        for index, (first, last, _) in enumerate(seq.image_spans):  # image tokens this chunk computes
            lo, hi = max(first, start), min(last, end)
            if lo < hi:
                image_rows += range(len(ids) + lo - start, len(ids) + hi - start)
                image_pieces.append((chunk, index, lo - first, hi - first))
        ids += seq.token_slice(start, end)
        table = seq.block_table
        for pos in range(start, end):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        if mrope:
            for axis, values in zip(rope, seq.rope_positions(start, end)):
                axis += values
        else:
            positions += range(start, end)
        if chunk.completes:
            logits_rows.append(len(ids) - 1)
            sampled.append(chunk)
    staging.add("input_ids", ids)
    if mrope:
        staging.add("positions", rope[0] + rope[1] + rope[2], (3, len(ids)))
    else:
        staging.add("positions", positions)
    if image_rows:
        staging.add("image_rows", image_rows)
    staging.add("write_slots", slots)
    staging.add("logits_rows", logits_rows)
    plans = _plans(grouped, None)
    sliding_plans = _plans(grouped, sliding_window) if sliding_window else None
    variants = [("attn.full", plans)] + ([("attn.sliding", sliding_plans)] if sliding_plans else [])
    flex_plans = {}
    if flex_blocks is None:
        for name, variant in variants:
            _stage_variant(staging, name, variant, block_size)
    else:
        row_tokens = [(c.seq.num_computed, c.num_tokens) for c in ordered]
        for name, variant in variants:
            row_keys = [(s, e, c.seq.block_table) for p in variant for c, s, e in zip(p.chunks, p.kv_start, p.kv_end)]
            flex_plans[name] = flex.plan(row_tokens, row_keys, block_size, variant[0].window, *flex_blocks)
            flex.stage(staging, name, flex_plans[name], row_tokens)
    if add_extra is not None:
        add_extra(staging, sampled)
    first = cache.devices[0]
    where = placement or _Where(first, first, first)
    sent = staging.send_to([where.input_device, *cache.devices, where.head_device, where.output_device])
    attention = _attention(sent[first], cache, plans, sliding_plans, flex_plans, flex_blocks)
    attention.elsewhere = {d: _attention(sent[d], cache, plans, sliding_plans, flex_plans, flex_blocks)
                           for d in cache.devices[1:]}
    inputs, out = sent[where.input_device], sent[where.output_device]
    core = {"input_ids", "positions", "write_slots", "logits_rows", "image_rows"}
    extra = {k: v for k, v in out.items() if k not in core and not k.startswith(("attn.", "flex."))}
    position_ids = inputs["positions"][:, None] if mrope else inputs["positions"][None]  # [3, 1, N] or [1, N]
    return StepInputs(input_ids=inputs["input_ids"][None], position_ids=position_ids,
                      logits_rows=sent[where.head_device]["logits_rows"], attention=attention, chunks=ordered,
                      sampled=sampled, extra=extra, image_rows=inputs.get("image_rows"),
                      image_pieces=image_pieces or None)


@dataclass(frozen=True)
class _Where:
    """The fields of placement.Placement that build_step reads."""

    input_device: torch.device
    head_device: torch.device
    output_device: torch.device


def _attention(dev: dict[str, torch.Tensor], cache: PagedKVCache, plans: list[_GroupPlan],
               sliding_plans: list[_GroupPlan] | None, flex_plans: dict[str, flex.FlexPlan],
               flex_blocks: tuple[int, int] | None) -> StepAttention:
    """The step's attention metadata on one device, from what was staged there."""
    block_size = cache.block_size
    if flex_blocks is None:
        block_ids, groups = _device_variant(dev, "attn.full", plans, block_size)
        sliding = _device_variant(dev, "attn.sliding", sliding_plans, block_size) if sliding_plans else None
        return StepAttention(cache=cache, write_slots=dev["write_slots"], block_ids=block_ids, groups=groups,
                             sliding=sliding)
    steps = {name: flex.device_step(dev, name, p, block_size, *flex_blocks) for name, p in flex_plans.items()}
    return StepAttention(cache=cache, write_slots=dev["write_slots"], block_ids=steps["attn.full"].block_ids,
                         groups=[], flex=steps["attn.full"], flex_sliding=steps.get("attn.sliding"))


def _plans(grouped: list[list[ScheduledChunk]], window: int | None) -> list[_GroupPlan]:
    plans = []
    for group in grouped:
        first = group[0]
        q_start = first.seq.num_computed
        ends = [c.seq.num_computed + c.num_tokens for c in group]
        if window is None:
            starts = [0] * len(group)
        else:  # the first query (position q_start) reads back to q_start - window + 1
            starts = [max(0, c.seq.num_computed - window + 1) for c in group]
        plans.append(_GroupPlan(group, first.num_tokens, starts, ends, q_start, window))
    return plans


def _stage_variant(staging: Staging, name: str, plans: list[_GroupPlan], block_size: int) -> None:
    """Every group's block rows (whole blocks from the first one a row reads) in one array, and each
    row's (first block position, first visible key, end of keys) in another."""
    block_ids, bases, starts, ends = [], [], [], []
    for plan in plans:
        plan.shared_blocks = _shared_blocks(plan, block_size)
        first_block = [s // block_size + plan.shared_blocks for s in plan.kv_start]
        plan.num_blocks = max(-(-e // block_size) - f for e, f in zip(plan.kv_end, first_block))
        block_ids += plan.chunks[0].seq.block_table[: plan.shared_blocks]
        for chunk, f in zip(plan.chunks, first_block):
            row = chunk.seq.block_table[f : f + plan.num_blocks]
            block_ids += row + [row[0]] * (plan.num_blocks - len(row))  # padding blocks are masked out
            bases.append(f * block_size)
        starts += plan.kv_start
        ends += plan.kv_end
    staging.add(f"{name}.blocks", block_ids)
    staging.add(f"{name}.range", bases + starts + ends, (3, len(bases)))


def _shared_blocks(plan: _GroupPlan, block_size: int) -> int:
    """How many leading blocks all rows of a decode group share (the same block ids: a prefix-cache hit) and
    read whole, leaving every row at least its newest key of its own; 0 below MIN_SHARED_BLOCKS."""
    if plan.num_queries != 1 or len(plan.chunks) < 2 or plan.window is not None or any(plan.kv_start):
        return 0
    limit = min((e - 1) // block_size for e in plan.kv_end)
    tables = [c.seq.block_table for c in plan.chunks]
    first = tables[0]
    shared = 0
    while shared < limit and all(t[shared] == first[shared] for t in tables):
        shared += 1
    return shared if shared >= MIN_SHARED_BLOCKS else 0


def _device_variant(dev: dict[str, torch.Tensor], name: str, plans: list[_GroupPlan], block_size: int
                    ) -> tuple[torch.Tensor, list[AttentionGroup]]:
    ranges = dev[f"{name}.range"]
    groups, start, row, block_offset = [], 0, 0, 0
    for plan in plans:
        rows, queries = len(plan.chunks), plan.num_queries
        base, kv_start, kv_end = ranges[:, row : row + rows]  # [G] each
        bases = _bases(plan, block_size)
        width = max(e - b for e, b in zip(plan.kv_end, bases))  # L keys read per row
        key_pos = base[:, None] + torch.arange(width, device=ranges.device)[None, :]  # [G, L]
        mask, is_causal = _mask(plan, key_pos, kv_start, kv_end, width, bases)
        groups.append(AttentionGroup(start=start, num_rows=rows, num_queries=queries, block_offset=block_offset,
                                     num_blocks=plan.num_blocks, num_keys=width, mask=mask, is_causal=is_causal,
                                     shared_blocks=plan.shared_blocks))
        start += rows * queries
        row += rows
        block_offset += plan.shared_blocks + rows * plan.num_blocks
    return dev[f"{name}.blocks"], groups


def _bases(plan: _GroupPlan, block_size: int) -> list[int]:
    return [(s // block_size + plan.shared_blocks) * block_size for s in plan.kv_start]


def _mask(plan: _GroupPlan, key_pos: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, width: int,
          bases: list[int]) -> tuple[torch.Tensor | None, bool]:
    """The group's [G, 1, T, L] bool mask (None when every key read is visible), and whether SDPA's own
    causal mask does the job instead."""
    queries = plan.num_queries
    if queries == 1:
        exact = all(s == b and e - b == width for s, e, b in zip(plan.kv_start, plan.kv_end, bases))
        if exact:
            return None, False
        visible = (key_pos >= kv_start[:, None]) & (key_pos < kv_end[:, None])  # [G, L]
        return visible[:, None, None, :], False  # [G, 1, 1, L]
    if plan.q_start == 0 and plan.window is None:
        return None, True  # a fresh prompt chunk: keys = queries, SDPA's causal mask
    q_pos = plan.q_start + torch.arange(queries, device=key_pos.device)  # [T]
    allowed = key_pos[:, None, :] <= q_pos[None, :, None]  # [1, T, L]
    if plan.window is not None:
        allowed &= key_pos[:, None, :] > q_pos[None, :, None] - plan.window
    return allowed[:, None], False  # [1, 1, T, L]
