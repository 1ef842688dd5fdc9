"""The roofline: what a workload would take on this model and machine with a zero-overhead engine.

1. A cost model of one forward, fitted to measured plain-HF forwards (a uniform batch of B rows, q new tokens
   each, over a DynamicCache of L past tokens filled with random K/V; the fastest of several repeats):

       cost_s = a + b·num_tokens + e·num_seqs + c·sum_kv + d·sum_pairs

   num_tokens = tokens computed in the step; num_seqs = sequences in it (a decode is one sequence of one
   token: small-batch matmuls and per-row attention cost more per token than a prefill chunk's);
   sum_kv = Σ over sequences of the KV length read (past + new); sum_pairs = Σ q·(past + (q+1)/2), the
   query-key pairs of causal attention (prefill's quadratic part, which `c` alone would price wrong).
   Least squares on relative error; a term that comes out negative is dropped and the rest refitted.
2. A replay of the workload as an FCFS continuous-batching schedule that costs nothing but its forwards:
   up to max_num_seqs running, a token budget per step, every running decode gets its token first and the
   rest of the budget goes to prefill chunks in arrival order (chunks folded into the decode step, one
   forward per step); with prefix caching, a prefill that starts after the shared prefix was computed skips
   its cached full blocks.

efficiency = ideal / actual.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass

import torch

TERMS = ("a (s)", "b (s/token)", "e (s/seq)", "c (s/kv token)", "d (s/pair)")


@dataclass(frozen=True)
class StepShape:
    num_tokens: int
    num_seqs: int
    sum_kv: int
    sum_pairs: float

    @property
    def features(self) -> list[float]:  # in the order of TERMS
        return [1.0, float(self.num_tokens), float(self.num_seqs), float(self.sum_kv), float(self.sum_pairs)]


@dataclass
class CostModel:
    coefficients: list[float]  # one per TERMS
    points: list[tuple[int, int, int, float]]  # measured (batch, q, past, seconds)
    rms_rel_error: float
    max_rel_error: float

    def cost_s(self, shape: StepShape) -> float:
        return sum(k * f for k, f in zip(self.coefficients, shape.features))

    def worst_points(self, n: int = 3) -> list[tuple[int, int, int, float, float]]:
        """(batch, q, past, measured s, modelled s) of the n points the fit misses most."""
        rows = [(b, q, p, s, self.cost_s(shape_of(b, q, p))) for b, q, p, s in self.points]
        return sorted(rows, key=lambda r: -abs(r[4] - r[3]) / r[3])[:n]


def shape_of(batch: int, q: int, past: int) -> StepShape:
    return StepShape(batch * q, batch, batch * (past + q), batch * (q * past + q * (q + 1) / 2))


def grid(max_num_seqs: int, token_budget: int, max_len: int) -> list[tuple[int, int, int]]:
    """(batch, q, past) points: decode at several batch sizes and contexts, and single prefill chunks.

    No batched prefill: HF pads and masks a batch of chunks (its slow attention path), which a step that
    packs chunks into one sequence never pays, so those points would teach the model a cost that is not
    the hardware's."""
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_num_seqs} | {max_num_seqs})
    points = [(b, 1, past) for b in batches for past in (64, 320, 640)]
    chunks = sorted({q for q in (16, 64, 128, 256, token_budget) if q <= token_budget})
    points += [(1, q, past) for q in chunks for past in (0, 192, 384)]
    return [(b, q, p) for b, q, p in points if p + q <= max_len]


@torch.inference_mode()
def fit(model, max_num_seqs: int, token_budget: int, max_len: int, repeats: int = 3) -> CostModel:
    points = [(b, q, p, _measure(model, b, q, p, repeats)) for b, q, p in grid(max_num_seqs, token_budget, max_len)]
    x = torch.tensor([shape_of(b, q, p).features for b, q, p, _ in points], dtype=torch.float64)
    y = torch.tensor([s for *_, s in points], dtype=torch.float64)
    coefficients = _nonnegative_fit(x, y)
    predicted = x @ torch.tensor(coefficients, dtype=torch.float64)
    rel = ((predicted - y) / y).abs()
    return CostModel(coefficients, points, float(rel.pow(2).mean().sqrt()), float(rel.max()))


def _nonnegative_fit(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Least squares of relative error (rows scaled by 1/y); drop terms that come out negative and refit."""
    active = list(range(x.shape[1]))
    while True:
        scaled = x[:, active] / y[:, None]
        solution = torch.linalg.lstsq(scaled, torch.ones_like(y)[:, None]).solution[:, 0]
        if (solution >= 0).all() or len(active) == 1:
            coefficients = [0.0] * x.shape[1]
            for i, k in zip(active, solution.tolist()):
                coefficients[i] = max(k, 0.0)
            return coefficients
        active.pop(int(solution.argmin()))


def _measure(model, batch: int, q: int, past: int, repeats: int) -> float:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    config = model.config.get_text_config()
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=model.config)
    if past:
        for layer in range(config.num_hidden_layers):  # random K/V: a forward's cost does not depend on values
            k = torch.randn(batch, num_kv_heads, past, head_dim, device=device, dtype=dtype)
            cache.update(k, torch.randn_like(k), layer)
    ids = torch.randint(5, config.vocab_size, (batch, q), device=device)  # [B, q]
    warm = False
    positions = torch.arange(past, past + q, device=device).expand(batch, q)
    times: list[float] = []
    while len(times) < repeats:
        start = _now(device)
        model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
        elapsed = _now(device) - start
        if past:
            cache.crop(-q)  # drop the new tokens: every repeat sees the same context (negative: the 5.x API)
        else:
            cache = DynamicCache(config=model.config)
        if warm:
            times.append(elapsed)
        else:  # the first run warms up and sets how many repeats a short forward gets (noise on a shared CPU)
            warm, repeats = True, max(repeats, min(15, int(0.25 / max(elapsed, 1e-4))))
    return min(times)  # a roofline is a lower bound: the fastest repeat, not one slowed by a busy neighbour


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class _Running:
    prompt_len: int
    output_len: int
    computed: int = 0
    generated: int = 0


def ideal_s(cost: CostModel, prompt_lens: list[int], output_lens: list[int], max_num_seqs: int, token_budget: int,
            cached_prefix: int = 0) -> float:
    """Seconds of a zero-overhead FCFS schedule of the requests (all at t0, in order)."""
    waiting = deque(_Running(p, max(o, 1)) for p, o in zip(prompt_lens, output_lens))
    running: list[_Running] = []
    prefix_ready = False
    elapsed = 0.0
    while waiting or running:
        while waiting and len(running) < max_num_seqs:
            running.append(waiting.popleft())
        budget = token_budget
        num_tokens, num_seqs, sum_kv, sum_pairs = 0, 0, 0, 0.0
        for seq in sorted(running, key=lambda s: s.computed < s.prompt_len):  # decodes first, then FCFS prefills
            if seq.computed == 0 and prefix_ready:
                seq.computed = min(cached_prefix, seq.prompt_len - 1)
            q = 1 if seq.computed >= seq.prompt_len else min(seq.prompt_len - seq.computed, budget)
            if q == 0:
                continue
            budget -= q
            num_tokens += q
            num_seqs += 1
            sum_kv += seq.computed + q
            sum_pairs += q * (seq.computed + (q + 1) / 2)
            seq.computed += q
            if seq.computed >= seq.prompt_len:  # a finished prefill or a decode samples a token
                seq.generated += 1
        elapsed += cost.cost_s(StepShape(num_tokens, num_seqs, sum_kv, sum_pairs))
        prefix_ready = prefix_ready or any(s.computed >= cached_prefix for s in running)
        running = [s for s in running if s.generated < s.output_len]
    return elapsed
