"""The ideal time of a workload on this model and machine, from measured model costs.

Prefill throughput and the decode-step time at each batch size are measured on the
HF model's own forward; the ideal is a zero-overhead continuous-batching schedule
(max_num_seqs rows, prefill at peak throughput, decodes at the measured step time).
"""

from __future__ import annotations

import statistics
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

import torch

from bench.baselines import BenchRequest

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Roofline:
    prefill_tok_s: float
    decode_step_s: dict[int, float]  # batch size -> seconds per decode step

    def step_s(self, batch: int) -> float:
        sizes = sorted(self.decode_step_s)
        if batch in self.decode_step_s:
            return self.decode_step_s[batch]
        i = min(max(bisect_left(sizes, batch), 1), len(sizes) - 1)
        lo, hi = sizes[i - 1], sizes[i]
        frac = (batch - lo) / (hi - lo)
        return self.decode_step_s[lo] + frac * (self.decode_step_s[hi] - self.decode_step_s[lo])

    def ideal_s(self, requests: list[BenchRequest], max_num_seqs: int) -> float:
        """Offline ideal: admit in order up to max_num_seqs, prefill at peak, decode in shared steps."""
        waiting = deque(requests)
        remaining: list[int] = []
        elapsed = 0.0
        while waiting or remaining:
            while waiting and len(remaining) < max_num_seqs:
                r = waiting.popleft()
                elapsed += len(r.prompt_ids) / self.prefill_tok_s  # the prefill yields the first token
                if r.max_tokens > 1:
                    remaining.append(r.max_tokens - 1)
            if remaining:
                elapsed += self.step_s(len(remaining))
                remaining = [n - 1 for n in remaining if n > 1]
        return elapsed


@torch.inference_mode()
def measure(model, context_len: int, max_batch: int, prefill_len: int = 512, repeats: int = 3) -> Roofline:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (1, prefill_len), device=device)
    model(input_ids=ids)  # warm-up
    prefill = [_timed(lambda: model(input_ids=ids)) for _ in range(repeats)]
    steps = {}
    for batch in [b for b in BATCH_SIZES if b <= max_batch]:
        steps[batch] = _decode_step_s(model, batch, context_len, vocab, device, repeats)
    return Roofline(prefill_tok_s=prefill_len / statistics.median(prefill), decode_step_s=steps)


def _decode_step_s(model, batch: int, context_len: int, vocab: int, device, repeats: int) -> float:
    ids = torch.randint(5, vocab, (batch, context_len), device=device)
    out = model(input_ids=ids, use_cache=True)
    cache = out.cache
    token = torch.randint(5, vocab, (batch, 1), device=device)
    times = []
    for k in range(repeats + 1):
        position = torch.full((batch, 1), context_len + k, device=device)
        elapsed = _timed(lambda: model(input_ids=token, position_ids=position, cache=cache, use_cache=True))
        if k:
            times.append(elapsed)
        cache.crop(-1)  # drop the new token: every timed step sees the same context length
    return statistics.median(times)


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start
