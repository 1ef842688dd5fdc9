"""(c) transformers' own continuous batching (5.24), tuned: the peer a user of transformers would run.

The manager API (`model.init_continuous_batching` → `add_request` / `get_result`) is used instead of
`generate_batch` because `generate_batch` takes one `max_new_tokens` for every request and hides arrival
times; the manager is what `generate_batch` runs inside.

Tuning, and why the untuned peer ran slower than sequential `generate` on W1:

- its paged attention on CPU (`sdpa`) packs every request of a step into ONE sequence with a block-diagonal
  mask of [tokens in the step, KV of every request in the step], so a step's attention grows with
  (requests per batch)². Without `max_requests_per_batch` it admitted as many requests as the workload
  hints (64 in W1); `max_requests_per_batch = max_num_seqs` gives it the concurrency redbatch gets;
- its cache (576 pages of 32 tokens: 18k tokens) could not hold 64 running W1 requests (~24k tokens), so
  requests were evicted and re-prefilled ("soft reset"). `num_blocks` now counts 256-token pages (the
  default `page_size`) and `max_batch_tokens` x `num_blocks` are swept; both are set explicitly, otherwise
  it sizes its cache from free RAM (NOTES: 6.4 GB for a 2M model);
- `allow_block_sharing` (its prefix cache) is on for the shared-prefix workload only, with a page size
  that divides the shared prefix (it shares whole pages only);
- `auto_switch_to_flash=False`, so a GPU run uses the implementation asked for.

Measured on a busy machine: on the fast-step model's full W1 (64 requests), max_requests_per_batch 64 ran
336 tok/s, 16 ran 371-422 (sequential 218). Even tuned, the packed mask makes it weak on long contexts on
CPU: on 32 W1 requests (max_tokens capped at 48, default model) it ran 1.2x sequential and 0.55x static
batches of 16.

Setup (cache allocation in `warmup()`, thread start) happens before t0 and is not timed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from transformers import GenerationConfig

from bench.peers import pad_id
from bench.workloads import BenchRequest, RequestResult, normalize

SETUP_ERRORS = (MemoryError, RuntimeError, ValueError, TimeoutError, KeyError)
DEFAULT_PAGE = 256  # transformers' default page_size, tokens


def page_size_for_prefix(prefix_len: int) -> int:
    """Its prefix cache shares whole pages only: a page size that divides the shared prefix shares all of it
    (a 384-token system prompt in 256-token pages would share 256). Capacity stays that of the sweep's
    num_blocks of 256 tokens (the caller scales num_blocks)."""
    for page in (DEFAULT_PAGE, 128, 64, 32, 16):
        if prefix_len and prefix_len % page == 0:
            return page
    return DEFAULT_PAGE


@dataclass(frozen=True)
class HFConfig:
    max_batch_tokens: int
    num_blocks: int
    max_requests_per_batch: int
    allow_block_sharing: bool = False
    page_size: int = DEFAULT_PAGE

    @property
    def label(self) -> str:
        sharing = f", sharing, pages of {self.page_size}" if self.allow_block_sharing else ""
        return f"tokens {self.max_batch_tokens}, blocks {self.num_blocks}{sharing}"


@dataclass
class SweepPoint:
    config: HFConfig
    tok_s: float | None  # None: the configuration failed
    error: str = ""


def run(model, requests: list[BenchRequest], config: HFConfig, eos_ids: frozenset[int],
        result_timeout_s: float = 3600.0) -> list[RequestResult]:
    """Every request added at its arrival time (all at t0 offline); results in the order of `requests`."""
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    max_new = max(r.max_tokens for r in requests)
    generation = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new, eos_token_id=-1,
                                  pad_token_id=pad_id(model))
    cb_config = ContinuousBatchingConfig(
        page_size=config.page_size, num_blocks=config.num_blocks, max_batch_tokens=config.max_batch_tokens,
        max_requests_per_batch=config.max_requests_per_batch, allow_block_sharing=config.allow_block_sharing,
        auto_switch_to_flash=False, seed=0)
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_ids) for r in requests), max_generated_length=max_new,
                          num_requests=len(requests))
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)  # a failure is our row, not a traceback
    original_attn = model.config._attn_implementation
    if original_attn != "sdpa":
        model.set_attn_implementation("sdpa")
    manager = None
    try:
        manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=cb_config,
                                                 workload_hints=hints)
        manager.warmup()  # allocates the paged cache here, not inside the timed generation thread
        manager.start()
        t0 = time.perf_counter()
        outputs = _drive(manager, requests, eos_ids, t0, result_timeout_s)
    finally:
        if manager is not None:
            manager.stop(block=True, timeout=30)
            manager.destroy()
        if model.config._attn_implementation != original_attn:
            model.set_attn_implementation(original_attn)
    return [_result(r, outputs[r.request_id], t0) for r in requests]


def _drive(manager, requests: list[BenchRequest], eos_ids: frozenset[int], t0: float, timeout_s: float) -> dict:
    """Add requests as they arrive and collect finished outputs; the generation thread runs the steps."""
    pending = sorted(requests, key=lambda r: r.arrival_s)
    outputs = {}
    deadline = time.perf_counter() + timeout_s
    while len(outputs) < len(requests):
        now = time.perf_counter() - t0
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            manager.add_request(input_ids=list(r.prompt_ids), request_id=r.request_id, max_new_tokens=r.max_tokens,
                                eos_token_id=-1 if r.ignore_eos else sorted(eos_ids), record_timestamps=True)
        wait_s = min(1.0, pending[0].arrival_s - now) if pending else 1.0
        out = manager.get_result(timeout=max(wait_s, 0.001))
        if out is None:
            if not manager.is_running():
                raise RuntimeError(f"its generation thread died after {len(outputs)} of {len(requests)} results")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(outputs)} of {len(requests)} results after {timeout_s:.0f} s")
            continue
        if out.is_finished():
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            outputs[out.request_id] = out
    return outputs


def _result(r: BenchRequest, out, t0: float) -> RequestResult:
    stamps = out.timestamps  # perf_counter of each generated token, first one included
    finish = out.lifespan[1] if out.lifespan[1] > 0 else (stamps[-1] if stamps else time.perf_counter())
    return RequestResult(r.request_id, list(out.generated_tokens), stamps[0] - t0 if stamps else None, finish - t0)


def sweep(model, requests: list[BenchRequest], grid: list[HFConfig], eos_ids: frozenset[int]
          ) -> tuple[list[SweepPoint], dict[HFConfig, tuple[list[RequestResult], float]]]:
    """Run each configuration; a failure (at start or during the run) is a reported point, not a crash."""
    points, runs = [], {}
    for config in grid:
        try:
            results = run(model, requests, config, eos_ids)
        except SETUP_ERRORS as exc:
            points.append(SweepPoint(config, None, f"{type(exc).__name__}: {str(exc)[:90]}"))
            continue
        wall_s = max(r.finish_s for r in results)
        runs[config] = (results, wall_s)
        by_id = {r.request_id: r for r in requests}
        tokens = sum(len(normalize(res.output_ids, by_id[res.request_id], eos_ids)) for res in results)
        points.append(SweepPoint(config, tokens / wall_s))
    return points, runs


def best(points: list[SweepPoint]) -> HFConfig | None:
    ok = [p for p in points if p.tok_s is not None]
    return max(ok, key=lambda p: p.tok_s).config if ok else None
