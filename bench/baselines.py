"""Non-redbatch contenders for the throughput benchmark.

(a) ``run_sequential``     -- ``model.generate`` one request at a time.
(b) ``run_static``         -- ``model.generate`` on left-padded static batches (offline or a simple online server loop).
(c) ``run_hf_continuous``  -- transformers' own continuous batching (``init_continuous_batching`` manager).

All three decode greedily and *ignore* EOS the way redbatch's ``ignore_eos`` does: the EOS token is an ordinary
token that may be generated, and generation always runs to ``max_tokens``. For ``generate`` that is
``eos_token_id=None`` passed as a kwarg (kwargs override the model's generation config; a ``GenerationConfig``
object would not, its ``None`` fields get filled from the model defaults). ``min_new_tokens`` is deliberately NOT
used: its logits processor sets the EOS logit to -inf, which changes greedy outputs wherever EOS would have been
the argmax, so they would no longer match redbatch or (c). ``eos_token_id=-1`` works too but warns.

Times are ``time.perf_counter()`` seconds relative to the workload start ``t0`` (taken on entry, or, for (c), once
the manager is set up: cache allocation / thread start are excluded).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only effective if torch was not imported yet

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()


@dataclass
class BenchRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float = 0.0  # offset from the workload start (0 for offline)


@dataclass
class RequestResult:
    request_id: str
    output_ids: list[int]
    first_token_s: float | None  # seconds from workload start when the first output token existed (None if unknown)
    finish_s: float  # seconds from workload start when the request finished


# --------------------------------------------------------------------------------------------------------------------
# helpers


class _StepClock(LogitsProcessor):
    """A no-op logits processor that records ``perf_counter()`` at every generation step.

    ``generate`` calls logits processors once per step, right after that step's forward and just before the
    (greedy) token choice, so ``times[k]`` is when output token ``k + 1`` came into existence (to within an argmax).
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.times and scores.is_cuda:
            torch.cuda.synchronize(scores.device)  # step 1 only: make TTFT mean "computed", not "launched"
        self.times.append(time.perf_counter())
        return scores


def _default_pad_id(model) -> int:
    for src in (getattr(model, "generation_config", None), model.config):
        pad = getattr(src, "pad_token_id", None) if src is not None else None
        if isinstance(pad, int) and pad >= 0:
            return pad
    return 0


def _greedy_kwargs(max_new_tokens: int, pad_token_id: int) -> dict:
    # eos_token_id=None as a *kwarg* disables stopping on EOS without suppressing it (see module docstring).
    return dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=pad_token_id,
    )


def _sleep_until(t0: float, offset_s: float) -> None:
    delay = t0 + offset_s - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _arrival_order(requests: list[BenchRequest]) -> list[BenchRequest]:
    return sorted(requests, key=lambda r: r.arrival_s)  # stable: ties keep submission order


def _generate_batch(model, batch: list[BenchRequest], pad_token_id: int, t0: float) -> list[RequestResult]:
    """One ``model.generate`` over ``batch`` (left padded), greedy, EOS ignored; outputs cut to each max_tokens."""
    device = model.device
    max_len = max(len(r.prompt_ids) for r in batch)
    input_ids = torch.full((len(batch), max_len), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(batch), max_len), dtype=torch.long, device=device)
    for i, r in enumerate(batch):
        n = len(r.prompt_ids)
        input_ids[i, max_len - n :] = torch.tensor(r.prompt_ids, dtype=torch.long, device=device)
        attention_mask[i, max_len - n :] = 1
    clock = _StepClock()
    max_new = max(r.max_tokens for r in batch)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_processor=LogitsProcessorList([clock]),
        **_greedy_kwargs(max_new, pad_token_id),
    )
    new_tokens = out[:, max_len:].tolist()  # one device->host copy for the whole batch
    finish = time.perf_counter() - t0
    first = (clock.times[0] - t0) if clock.times else None
    return [
        RequestResult(r.request_id, new_tokens[i][: r.max_tokens], first, finish) for i, r in enumerate(batch)
    ]


# --------------------------------------------------------------------------------------------------------------------
# (a) sequential


def run_sequential(model, requests: list[BenchRequest]) -> list[RequestResult]:
    """``model.generate`` one request at a time in arrival order, waiting for each arrival if it is in the future.

    Results are returned in the order of ``requests``.
    """
    model.eval()
    pad = _default_pad_id(model)
    t0 = time.perf_counter()
    by_id: dict[str, RequestResult] = {}
    for r in _arrival_order(requests):
        _sleep_until(t0, r.arrival_s)
        (res,) = _generate_batch(model, [r], pad, t0)
        by_id[r.request_id] = res
    return [by_id[r.request_id] for r in requests]


# --------------------------------------------------------------------------------------------------------------------
# (b) static batching


def run_static(model, requests: list[BenchRequest], batch_size: int, pad_token_id: int) -> list[RequestResult]:
    """Static batching with ``model.generate``.

    Offline (all ``arrival_s <= 0``): requests sorted by prompt length (stable) and cut into batches of
    ``batch_size``, run back to back.
    Online (any ``arrival_s > 0``): a server loop; whenever idle it takes every request that has arrived (FIFO, up
    to ``batch_size``) and runs one ``generate`` on them; it sleeps until the next arrival when nothing is waiting.

    Each batch decodes ``max(max_tokens)`` steps; every request's output is cut to its own ``max_tokens``, and every
    request of a batch finishes when the batch's ``generate`` returns. ``first_token_s`` is the time the batch's first
    decoding step completed. Results are returned in the order of ``requests``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    model.eval()
    by_id: dict[str, RequestResult] = {}
    online = any(r.arrival_s > 0 for r in requests)
    t0 = time.perf_counter()

    if not online:
        ordered = sorted(requests, key=lambda r: len(r.prompt_ids))
        for start in range(0, len(ordered), batch_size):
            for res in _generate_batch(model, ordered[start : start + batch_size], pad_token_id, t0):
                by_id[res.request_id] = res
    else:
        pending = deque(_arrival_order(requests))
        waiting: deque[BenchRequest] = deque()
        while pending or waiting:
            now = time.perf_counter() - t0
            while pending and pending[0].arrival_s <= now:
                waiting.append(pending.popleft())
            if not waiting:
                _sleep_until(t0, pending[0].arrival_s)
                continue
            batch = [waiting.popleft() for _ in range(min(batch_size, len(waiting)))]
            for res in _generate_batch(model, batch, pad_token_id, t0):
                by_id[res.request_id] = res
    return [by_id[r.request_id] for r in requests]


# --------------------------------------------------------------------------------------------------------------------
# (c) transformers' continuous batching


def run_hf_continuous(
    model,
    requests: list[BenchRequest],
    max_batch_tokens: int,
    num_blocks: int,
    block_size: int = 32,
    *,
    attn_implementation: str = "sdpa",
    result_timeout_s: float = 600.0,
) -> list[RequestResult]:
    """transformers' built-in continuous batching, offline (every request submitted at t0).

    Uses ``model.init_continuous_batching(generation_config, continuous_batching_config, workload_hints)`` and the
    manager directly (not ``generate_batch``) because ``generate_batch`` has one ``max_new_tokens`` for all requests
    and hides the per-request times. Each request is added with its own ``max_new_tokens`` and ``eos_token_id=-1``
    (EOS ignored, not suppressed) and ``record_timestamps=True``; per request ``first_token_s`` is its first token
    timestamp and ``finish_s`` the end of its lifespan (both ``perf_counter``, as is ``t0`` here).

    The cache is sized explicitly: ``ContinuousBatchingConfig(num_blocks=, max_batch_tokens=, page_size=block_size)``
    (in 5.24 the size lives in ``ContinuousBatchingConfig``, ``block_size`` is its deprecated name for
    ``page_size``; ``num_blocks`` is a capacity target in whole-model blocks of ``page_size`` tokens, rounded up to
    128-byte-aligned sectors). Without both it would size itself from free RAM/VRAM.

    ``attn_implementation``: what CB accepts is ``"sdpa"`` (it still uses the paged cache), ``"paged|eager"`` or a
    flash implementation; both of the first two work on CPU in 5.24 and match ``generate`` token for token.
    ``"paged|sdpa"`` is accepted with a FutureWarning and just becomes ``"sdpa"``; ``"sdpa_paged"`` raises.
    The model's own implementation is restored afterwards.
    ``auto_switch_to_flash`` is off so a GPU run uses exactly the implementation asked for.
    Setup (``manager.warmup()``: cache allocation and, on GPU, graph capture; thread start) happens before ``t0``
    and is not timed.
    """
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    if not requests:
        return []
    model.eval()
    max_new = max(r.max_tokens for r in requests)
    gen_cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new,
        eos_token_id=-1,  # None would log a warning and be turned into -1 anyway
        pad_token_id=_default_pad_id(model),
    )
    cb_cfg = ContinuousBatchingConfig(
        page_size=block_size,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        allow_block_sharing=False,  # no prefix caching: a plain CB baseline
        auto_switch_to_flash=False,
        seed=0,
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(r.prompt_ids) for r in requests),
        max_generated_length=max_new,
        num_requests=len(requests),
    )
    original_attn = model.config._attn_implementation
    if original_attn != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    manager = None
    try:
        manager = model.init_continuous_batching(
            generation_config=gen_cfg, continuous_batching_config=cb_cfg, workload_hints=hints
        )
        # warmup() builds the batch processor (paged cache allocation) here; start() alone would build it inside the
        # generation thread, after t0. On CPU it captures nothing else (no CUDA graphs / compile).
        manager.warmup()
        manager.start()
        t0 = time.perf_counter()
        for r in requests:
            manager.add_request(
                input_ids=list(r.prompt_ids),
                request_id=r.request_id,
                max_new_tokens=r.max_tokens,
                eos_token_id=-1,
                record_timestamps=True,
            )
        outputs = {}
        deadline = time.perf_counter() + result_timeout_s
        while len(outputs) < len(requests):
            out = manager.get_result(timeout=1.0)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError(f"HF continuous batching thread died after {len(outputs)} results")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"HF continuous batching: {len(outputs)}/{len(requests)} results")
                continue
            if out.is_finished():
                if out.error is not None:
                    raise RuntimeError(f"HF continuous batching request {out.request_id} failed: {out.error}")
                outputs[out.request_id] = out
        batch_end = time.perf_counter()
    finally:
        if manager is not None:
            manager.stop(block=True, timeout=30)
            manager.destroy()
        if model.config._attn_implementation != original_attn:
            model.set_attn_implementation(original_attn)

    results = []
    for r in requests:
        out = outputs[r.request_id]
        end = out.lifespan[1] if out.lifespan[1] > 0 else batch_end
        ts = out.timestamps
        results.append(
            RequestResult(
                request_id=r.request_id,
                output_ids=list(out.generated_tokens)[: r.max_tokens],
                first_token_s=(ts[0] - t0) if ts else None,
                finish_s=end - t0,
            )
        )
    return results


# --------------------------------------------------------------------------------------------------------------------
# smoke check


def _smoke_model(seed: int = 0):
    """A small seeded Llama whose greedy output depends on its input (std-0.02 init would not: see NOTES)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2000,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.normal_(0.0, std)
    return model.eval()


def _tok_per_s(requests: list[BenchRequest], results: list[RequestResult]) -> float:
    tokens = sum(len(res.output_ids) for res in results)
    return tokens / max(res.finish_s for res in results)


def _main() -> None:
    import random

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    device = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _smoke_model().to(device)
    # fp32 batched vs unbatched is bit-identical on CPU; GPU GEMM kernels may differ with batch shape: report only
    strict = device.type == "cpu"
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    rng = random.Random(0)
    requests = [
        BenchRequest(
            request_id=f"r{i}",
            prompt_ids=[rng.randrange(3, 2000) for _ in range(rng.randint(16, 64))],
            max_tokens=rng.randint(8, 32),
        )
        for i in range(8)
    ]
    # warm up the allocator / kernels so the first contender is not penalised
    run_sequential(model, [BenchRequest("w", requests[0].prompt_ids, 4)])

    total = sum(r.max_tokens for r in requests)
    seq = run_sequential(model, requests)
    sta = run_static(model, requests, batch_size=4, pad_token_id=0)
    hf = run_hf_continuous(model, requests, max_batch_tokens=256, num_blocks=64, block_size=32)
    for name, res in (("sequential", seq), ("static bs=4", sta), ("hf continuous", hf)):
        ttft = [x.first_token_s for x in res if x.first_token_s is not None]
        print(
            f"{name:14s} {_tok_per_s(requests, res):7.1f} tok/s  "
            f"wall {max(x.finish_s for x in res):6.2f}s  "
            f"mean TTFT {sum(ttft) / len(ttft) if ttft else float('nan'):.3f}s"
        )

    # the model must be input-sensitive, otherwise the equality checks below prove nothing
    distinct = len({tuple(x.output_ids[:8]) for x in seq})
    print(f"distinct first-8-token outputs across 8 prompts: {distinct}")
    assert distinct >= 6, "smoke model ignores its input"

    for r, a, b, c in zip(requests, seq, sta, hf):
        assert len(a.output_ids) == r.max_tokens, (r.request_id, len(a.output_ids))
        assert len(b.output_ids) == r.max_tokens, (r.request_id, len(b.output_ids))
        assert len(c.output_ids) == r.max_tokens, (r.request_id, len(c.output_ids))
        assert a.first_token_s is not None and a.first_token_s <= a.finish_s
        assert b.first_token_s is not None and b.first_token_s <= b.finish_s
    static_match = sum(a.output_ids == b.output_ids for a, b in zip(seq, sta))
    match = sum(a.output_ids == c.output_ids for a, c in zip(seq, hf))
    n = len(requests)
    print(f"static == sequential: {static_match}/{n}; hf continuous == sequential: {match}/{n}")
    print(f"total tokens per contender: {total}")
    if strict:
        assert static_match == n, "static batching differs from sequential"
    assert match >= n * 3 // 4, "HF continuous batching disagrees with sequential on most requests"
    print("smoke check OK")


if __name__ == "__main__":
    _main()
