"""What grammars cost: tokens/s of the in-process engine with 0 %, 50 % and 100 % of requests constrained.

    python -m bench.grammar                       # fast-step model, 32 requests x 64 tokens, 3 rounds
    python -m bench.grammar --hidden 768 --layers 12 --heads 12   # the CPU-bound default model

Same seeded model, same prompts and max_tokens for every mix; the mixes run interleaved round by round
(0 %, 50 %, 100 %, then again) and each row is the median round, so a noisy machine hits them alike.
Unconstrained requests ignore EOS; constrained ones follow a JSON schema whose array needs more items than
max_tokens holds (`{"values": [digits...]}`), so both kinds run to max_tokens: the same number of tokens. The grammar is compiled before the
timed rounds (its compile time is printed apart: a worker compiles each schema once and caches it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: stable speed on a shared CPU

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from transformers.utils import logging as hf_logging

from producer.protocol import GenerateBody, GenerateConfig, Request, TaskKind


def response_format(max_tokens: int) -> dict:
    # more one-digit items than max_tokens can hold: a constrained request, like the others, runs to max_tokens
    schema = {"type": "object", "properties": {"values": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": max_tokens}},
        "required": ["values"], "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "values", "schema": schema, "strict": True}}

MIXES = (0.0, 0.5, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="grammar overhead: tokens/s at 0/50/100 % constrained requests")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary (the mask is V/32 words a row)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="where the seeded model is built (default: a temp dir)")
    return p.parse_args(argv)


def build_engine(args: argparse.Namespace, model_dir: Path):
    from worker.engines.llm import LLMEngine, LLMEngineConfig
    from worker.models.loading import load_llm
    from worker.models.tiny import make_tiny_model

    path = make_tiny_model(model_dir, seed=args.seed, hidden=args.hidden, num_layers=args.layers,
                           num_heads=args.heads, num_kv_heads=args.heads, vocab_size=args.vocab_size)
    model, tokenizer = load_llm(str(path))
    config = LLMEngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.prompt_len + args.max_tokens + 16)
    return LLMEngine(model, tokenizer, config)


def make_requests(args: argparse.Namespace, num_special: int, vocab_size: int, fraction: float, tag: str
                  ) -> list[Request]:
    rng = random.Random(args.seed)
    num_constrained = round(fraction * args.num_requests)
    constrained = set(rng.sample(range(args.num_requests), num_constrained))
    requests = []
    for i in range(args.num_requests):
        prompt = [rng.randrange(num_special, vocab_size) for _ in range(args.prompt_len)]
        if i in constrained:
            config = GenerateConfig(max_tokens=args.max_tokens, temperature=0.0, response_format=response_format(args.max_tokens))
        else:
            config = GenerateConfig(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        body = GenerateBody(prompt_token_ids=prompt, generate_config=config)
        requests.append(Request(id=f"{tag}-{i}", task=TaskKind.GENERATE, body=body, created_ms=0))
    return requests


def run_once(engine, requests: list[Request]) -> tuple[int, float]:
    """(generated tokens, seconds) for the whole set, all admitted at t0."""
    started = time.perf_counter()
    for request in requests:
        engine.add(request)
    num_tokens = 0
    while engine.num_active:
        num_tokens += sum(len(out.token_ids) for out in engine.step())
    return num_tokens, time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(args, Path(args.model_dir or tmp) / "bench-grammar-model")
    num_special = len(engine.tokenizer.all_special_ids)
    vocab_size = len(engine.tokenizer)
    started = time.perf_counter()
    run_once(engine, make_requests(args, num_special, vocab_size, 1.0, "warm")[:2])  # compiles the schema
    warm_s = time.perf_counter() - started
    samples: dict[float, list[tuple[int, float]]] = {f: [] for f in MIXES}
    for round_index in range(args.rounds):
        for fraction in MIXES:
            samples[fraction].append(run_once(engine, make_requests(args, num_special, vocab_size, fraction,
                                                                    f"r{round_index}-{fraction}")))
    rows = []
    for fraction in MIXES:
        tokens, seconds = sorted(samples[fraction], key=lambda s: s[0] / s[1])[len(samples[fraction]) // 2]
        rows.append({"constrained": fraction, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / base
    print_table(args, rows, warm_s, engine.metrics())
    return rows


def print_table(args: argparse.Namespace, rows: list[dict], warm_s: float, metrics: dict) -> None:
    print(f"grammar overhead: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab_size}, "
          f"{args.num_requests} requests x {args.max_tokens} tokens, max_num_seqs {args.max_num_seqs}, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'constrained':>12} {'tokens':>8} {'seconds':>8} {'tok/s':>9} {'vs 0 %':>7}")
    for row in rows:
        print(f"{row['constrained'] * 100:>11.0f}% {row['tokens']:>8} {row['seconds']:>8.2f} "
              f"{row['tokens_per_s']:>9.1f} {row['ratio']:>7.3f}")
    print(f"first compile + 2 warm-up requests: {warm_s:.2f} s; grammars compiled {metrics['grammars_compiled']}, "
          f"cache hits {metrics['grammar_cache_hits']}")


if __name__ == "__main__":
    main()
