"""Plain `generate` peers: (a) one request at a time, (b) static batches sorted by prompt length.

Greedy, fp32. EOS: a request with `ignore_eos` runs to max_tokens with EOS an ordinary token, which for
`generate` is `eos_token_id=None` passed as a kwarg (kwargs override the model's generation config;
`min_new_tokens` would suppress EOS and change greedy outputs). A request that honours EOS passes the model's
EOS ids; a static batch then pads rows that stopped early, which `workloads.normalize` cuts away.

Times are `perf_counter()` seconds from the workload start t0.
"""

from __future__ import annotations

import time
from collections import deque

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.workloads import BenchRequest, RequestResult


class _StepClock(LogitsProcessor):
    """A no-op logits processor: `generate` calls it once per step, right after the forward, so times[k] is when
    output token k existed (to within an argmax)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.times and scores.is_cuda:
            torch.cuda.synchronize(scores.device)  # step 1 only: TTFT means "computed", not "launched"
        self.times.append(time.perf_counter())
        return scores


def pad_id(model) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        pad = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(pad, int) and pad >= 0:
            return pad
    return 0


def _generate(model, batch: list[BenchRequest], eos_ids: frozenset[int], t0: float) -> list[RequestResult]:
    """One `generate` over `batch`, left padded; outputs cut to each request's max_tokens."""
    pad = pad_id(model)
    width = max(len(r.prompt_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long, device=model.device)  # [B, S]
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=model.device)
    for i, r in enumerate(batch):
        input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
        attention_mask[i, width - len(r.prompt_ids):] = 1
    honours_eos = any(not r.ignore_eos for r in batch)
    clock = _StepClock()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=LogitsProcessorList([clock]),
                         do_sample=False, num_beams=1, max_new_tokens=max(r.max_tokens for r in batch),
                         eos_token_id=sorted(eos_ids) if honours_eos else None, pad_token_id=pad)
    new_tokens = out[:, width:].tolist()  # one device->host copy for the batch
    finish = time.perf_counter() - t0
    first = clock.times[0] - t0 if clock.times else None
    return [RequestResult(r.request_id, new_tokens[i][: r.max_tokens], first, finish) for i, r in enumerate(batch)]


def _sleep_until(t0: float, offset_s: float) -> None:
    delay = t0 + offset_s - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_sequential(model, requests: list[BenchRequest], eos_ids: frozenset[int]) -> list[RequestResult]:
    """(a) `generate` one request at a time in arrival order; results in the order of `requests`."""
    t0 = time.perf_counter()
    by_id = {}
    for r in sorted(requests, key=lambda r: r.arrival_s):
        _sleep_until(t0, r.arrival_s)
        (by_id[r.request_id],) = _generate(model, [r], eos_ids, t0)
    return [by_id[r.request_id] for r in requests]


def run_static(model, requests: list[BenchRequest], batch_size: int, eos_ids: frozenset[int]) -> list[RequestResult]:
    """(b) static batches of `batch_size`.

    Offline: sorted by prompt length (less padding, rows of a batch finish closer together), run back to back.
    Online (any arrival_s > 0): whenever idle, one `generate` over everything that has arrived (FIFO, up to
    batch_size). Every request of a batch finishes when its `generate` returns.
    """
    t0 = time.perf_counter()
    by_id = {}
    if not any(r.arrival_s > 0 for r in requests):
        ordered = sorted(requests, key=lambda r: len(r.prompt_ids))
        for start in range(0, len(ordered), batch_size):
            for res in _generate(model, ordered[start:start + batch_size], eos_ids, t0):
                by_id[res.request_id] = res
        return [by_id[r.request_id] for r in requests]
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    while pending:
        now = time.perf_counter() - t0
        if pending[0].arrival_s > now:
            _sleep_until(t0, pending[0].arrival_s)
            continue
        batch = []
        while pending and pending[0].arrival_s <= now and len(batch) < batch_size:
            batch.append(pending.popleft())
        for res in _generate(model, batch, eos_ids, t0):
            by_id[res.request_id] = res
    return [by_id[r.request_id] for r in requests]
