"""Sampling for a whole batch on the logits' device, with counter-based seeded randomness.

API (all tensors on the logits' device, B rows, V vocabulary entries):

    request_seed(seed: int | None) -> int
    SamplingTensors.build(params: list[GenerateConfig], seeds: list[int], counters: list[int], device)
        -> SamplingTensors
    SamplingTensors.host_fields(params: list[GenerateConfig]) -> dict[str, int | bool]
    sample(logits: Tensor [B, V], t: SamplingTensors, seen: Tensor [B, V] bool | None = None) -> SampleResult
    SampleResult.to_host() -> HostSample            # the step's one device->host transfer
    uniforms(seed: Tensor [B] i64, counter: Tensor [B] i64) -> Tensor [B] f32 in [0, 1)

Randomness. A sampled row draws one uniform, `uniforms(seed, counter)`, a pure function of the
request's seed and the index of the output token being sampled (`counter`), computed with integer
tensor ops. So a seeded request's tokens do not depend on its batch mates, on step timing, on
preemption or on the device; a request resumed after N published tokens continues with
counter = N and replays nothing. `request_seed(None)` gives an unseeded request a random seed,
drawn once and kept for the request's life.

Semantics are Hugging Face's, in its order: repetition penalty (a seen token's logit is divided
by the penalty when positive, multiplied when negative), then temperature, top-k (ties with the
k-th logit stay) and top-p (the smallest set of largest logits whose mass reaches top_p; the best
token always stays). A row with temperature 0 is greedy: the argmax of the penalized logits, as
`model.generate` picks it. Logprobs are log_softmax of the processed logits: the penalized logits
for greedy rows, the scaled and filtered ones for sampled rows.

`sample()` never reads a tensor on the host; the three host fields of SamplingTensors choose the
code path (all greedy: argmax alone; no top-k/top-p: no sort; top-k alone: topk, not a sort).
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from producer.protocol import GenerateConfig

_MASK32 = 0xFFFF_FFFF
_WHOLE_VOCAB = sys.maxsize  # num_candidates when some top-p row has no top-k: clipped to V


def request_seed(seed: int | None) -> int:
    """The request's own seed, or a random 62-bit one for a request that gave none."""
    return secrets.randbits(62) if seed is None else seed


# ---------------------------------------------------------------- counter-based randomness


def _mul32(x: Tensor, factor: int) -> Tensor:
    # x * factor mod 2^32 for x in [0, 2^32): multiplying 16-bit halves keeps every product below
    # 2^49, so int64 never overflows and every device computes the same bits
    low = (x & 0xFFFF) * factor
    high = ((x >> 16) * factor) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    # a bijection on 32-bit words with strong avalanche (xorshift-multiply; constants published
    # by C. Wellons' hash-prospector as "lowbias32")
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed: Tensor, counter: Tensor) -> Tensor:
    """[B] float32 in [0, 1), a pure function of (seed, counter): equal on every device, in any batch."""
    # key: both seed words and the counter's high word; the counter's low word then passes through
    # two keyed rounds (xor, then add, so two seeds' streams are not shifted copies of each other).
    # Each round is a bijection, so one seed never repeats a 32-bit value within 2^32 counters.
    key = _mix32(((counter >> 32) & _MASK32) ^ 0x9E3779B9)
    key = _mix32(((seed >> 32) & _MASK32) ^ key)
    key = _mix32((seed & _MASK32) ^ key)
    x = _mix32((counter & _MASK32) ^ key)
    x = _mix32((x + key) & _MASK32)
    return (x >> 8).to(torch.float32) * 2.0**-24  # 24 bits: exact in float32, at most 1 - 2^-24


# ---------------------------------------------------------------- batch parameters


@dataclass
class SamplingTensors:
    """One step's sampling parameters: [B] tensors on the logits' device, plus host fields."""

    temperature: Tensor  # [B] f32; 0 = greedy
    top_p: Tensor  # [B] f32; 1 = off
    top_k: Tensor  # [B] i64; 0 = off
    repetition_penalty: Tensor | None  # [B] f32; None when every row has 1.0
    seed: Tensor  # [B] i64, from request_seed
    counter: Tensor  # [B] i64: index of the output token being sampled
    is_all_greedy: bool  # host
    num_top_logprobs: int  # host: max requested top logprobs over rows; -1 = no row wants logprobs
    num_candidates: int  # host: how many largest logits per row top-k/top-p look at; 0 = none

    @classmethod
    def build(cls, params: list[GenerateConfig], seeds: list[int], counters: list[int], device) -> "SamplingTensors":
        floats = torch.tensor([[p.temperature for p in params], [p.top_p for p in params],
                               [p.repetition_penalty for p in params]], dtype=torch.float32)  # [3, B]
        ints = torch.tensor([[p.top_k for p in params], seeds, counters], dtype=torch.long)  # [3, B]
        # floats travel as their bit patterns, so both halves go in one host->device copy
        packed = torch.cat([floats.view(torch.int32).long(), ints]).to(device)  # [6, B]
        floats, ints = packed[:3].int().view(torch.float32), packed[3:]
        is_penalized = any(p.repetition_penalty != 1.0 for p in params)
        return cls(temperature=floats[0], top_p=floats[1], top_k=ints[0],
                   repetition_penalty=floats[2] if is_penalized else None,
                   seed=ints[1], counter=ints[2], **cls.host_fields(params))

    @staticmethod
    def host_fields(params: list[GenerateConfig]) -> dict[str, int | bool]:
        """is_all_greedy, num_top_logprobs, num_candidates: for an engine that fills the tensors itself."""
        sampled = [p for p in params if not p.is_greedy]
        if any(p.top_p < 1.0 and p.top_k == 0 for p in sampled):
            num_candidates = _WHOLE_VOCAB  # top-p over the whole vocabulary: a full sort
        else:
            num_candidates = max((p.top_k for p in sampled), default=0)
        return {
            "is_all_greedy": not sampled,
            "num_top_logprobs": max((p.logprobs for p in params if p.logprobs is not None), default=-1),
            "num_candidates": num_candidates,
        }


# ---------------------------------------------------------------- results


@dataclass
class HostSample:
    tokens: list[int]
    logprob: list[float] | None  # the chosen token's
    top_ids: list[list[int]] | None  # [B][n], best first; a row that asked for fewer takes a prefix
    top_logprobs: list[list[float]] | None  # [B][n]; -inf past a row's kept tokens


@dataclass
class SampleResult:
    tokens: Tensor  # [B] long
    logprob: Tensor | None = None  # [B] f32, the chosen token's under the processed distribution
    top_ids: Tensor | None = None  # [B, n] long, best first
    top_logprobs: Tensor | None = None  # [B, n] f32

    def to_host(self) -> HostSample:
        """Everything in one device->host transfer (ids are exact in float64)."""
        columns = [self.tokens[:, None].double()]
        if self.logprob is not None:
            columns.append(self.logprob[:, None].double())
        if self.top_ids is not None:
            columns += [self.top_ids.double(), self.top_logprobs.double()]
        rows = torch.cat(columns, dim=1).tolist()  # [B, 1 (+1) (+2n)]
        num_top = 0 if self.top_ids is None else self.top_ids.shape[1]
        top_start = 1 if self.logprob is None else 2
        return HostSample(
            tokens=[int(row[0]) for row in rows],
            logprob=None if self.logprob is None else [row[1] for row in rows],
            top_ids=None if self.top_ids is None else [
                [int(i) for i in row[top_start:top_start + num_top]] for row in rows],
            top_logprobs=None if self.top_ids is None else [row[top_start + num_top:] for row in rows],
        )


# ---------------------------------------------------------------- sampling


def sample(logits: Tensor, t: SamplingTensors, seen: Tensor | None = None) -> SampleResult:
    """One token per row of logits [B, V].

    `seen` [B, V] bool marks each row's prompt and output tokens; without it no penalty is applied.
    """
    logits = logits.float()
    if t.repetition_penalty is not None and seen is not None:
        logits = _penalize(logits, seen, t.repetition_penalty)
    greedy = logits.argmax(dim=-1)  # [B]
    if t.is_all_greedy:
        return _with_logprobs(logits, greedy, t.num_top_logprobs)
    is_greedy = t.temperature == 0  # [B]
    temperature = torch.where(is_greedy, 1.0, t.temperature)
    processed = _top_k_top_p(logits / temperature[:, None], t)  # [B, V]
    drawn = _inverse_cdf(processed, uniforms(t.seed, t.counter))
    tokens = torch.where(is_greedy, greedy, drawn)
    if t.num_top_logprobs < 0:
        return SampleResult(tokens)
    return _with_logprobs(torch.where(is_greedy[:, None], logits, processed), tokens, t.num_top_logprobs)


def _penalize(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    # logits [B, V], seen [B, V] bool, penalty [B]
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def _top_k_top_p(scores: Tensor, t: SamplingTensors) -> Tensor:
    """scores [B, V] with -inf outside each row's top-k, then top-p, set."""
    vocab = scores.shape[-1]
    n = min(t.num_candidates, vocab)
    if n == 0:
        return scores
    if n < vocab:  # every top-p row also has a top-k <= n: its candidates are the n largest
        values, ids = scores.topk(n, dim=-1)  # [B, n], descending
    else:
        values, ids = scores.sort(dim=-1, descending=True)
    is_top_k = t.top_k[:, None] > 0  # [B, 1]
    kth = values.gather(1, t.top_k.clamp(1, n)[:, None] - 1)  # [B, 1]
    drop = is_top_k & (values < kth)  # [B, n]
    probs = values.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # of the larger candidates; 0 for the best one
    drop |= (t.top_p[:, None] < 1) & (mass_before >= t.top_p[:, None])
    # tokens outside the n candidates rank past every row's top_k: dropped by top-k rows only
    outside = is_top_k.expand(-1, vocab) if n < vocab else torch.zeros_like(scores, dtype=torch.bool)
    return scores.masked_fill(outside.scatter(1, ids, drop), float("-inf"))


def _inverse_cdf(processed: Tensor, u: Tensor) -> Tensor:
    # processed [B, V] (-inf = dropped), u [B] in [0, 1) -> [B] long
    cdf = processed.softmax(dim=-1).cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]  # the last entry is exactly 1 > u, so the draw never runs off the end
    # the first entry > u; a dropped token repeats its predecessor's entry, so it is never the first
    return torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)


def _with_logprobs(processed: Tensor, tokens: Tensor, num_top: int) -> SampleResult:
    if num_top < 0:
        return SampleResult(tokens)
    logp = processed.log_softmax(dim=-1)  # [B, V]
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    if num_top == 0:
        return SampleResult(tokens, chosen)
    top = logp.topk(min(num_top, logp.shape[-1]), dim=-1)
    return SampleResult(tokens, chosen, top.indices, top.values)
