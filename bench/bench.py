"""redbatch benchmark: every contender on the same model, requests and machine, in one run.

    python -m bench.bench                       # W1 + W2 on the default ~85M Llama, 2 threads
    python -m bench.bench --hidden 256 --layers 4 --num-requests 16 --w2-requests 12   # a quick look

W1 (offline mixed): all requests at once; prompts uniform in [16, 512] tokens, max_tokens
log-uniform in [16, 256], greedy, EOS ignored. W2 (online): the same kind of requests
arriving as a Poisson process at a rate near the engine's capacity, through Redis.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/bench.py): import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from rich.console import Console
from rich.table import Table

from bench import baselines, redbatch_runs, roofline
from bench.baselines import BenchRequest, RequestResult
from worker.engines.llm import LLMEngineConfig

console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--w2-requests", type=int, default=48)
    p.add_argument("--w2-load", type=float, default=0.8, help="W2 arrival rate as a fraction of redbatch's W1 rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--contenders", default="a,b,c,d,e", help="comma list of a,b,c,d,e")
    p.add_argument("--skip-w2", action="store_true")
    p.add_argument("--redis-url", default=None, help="default: a redis-server of the benchmark's own")
    p.add_argument("--model-dir", default=None)
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> Path:
    from worker.models.tiny import make_tiny_model

    path = Path(args.model_dir or Path(tempfile.gettempdir()) / f"redbatch-bench-{args.hidden}x{args.layers}-s{args.seed}")
    if not (path / "config.json").exists():
        make_tiny_model(path, seed=args.seed, hidden=args.hidden, num_layers=args.layers, num_heads=args.heads,
                        num_kv_heads=args.heads, intermediate=args.hidden * 8 // 3, max_len=1024)
    return path


def workload(vocab: int, n: int, seed: int, rate_per_s: float | None = None) -> list[BenchRequest]:
    rng = random.Random(seed)
    arrival = 0.0
    requests = []
    for i in range(n):
        prompt = [rng.randrange(5, vocab) for _ in range(rng.randint(16, 512))]
        max_tokens = int(round(16 * 2 ** (4 * rng.random())))  # log-uniform in [16, 256]: a long tail
        if rate_per_s:
            arrival += rng.expovariate(rate_per_s)
        requests.append(BenchRequest(f"q{i}", prompt, max_tokens, arrival if rate_per_s else 0.0))
    return requests


def summarize(name: str, requests: list[BenchRequest], results: list[RequestResult], wall_s: float) -> dict:
    by_id = {r.request_id: r for r in requests}
    tokens = sum(len(r.output_ids) for r in results)
    ttft = [r.first_token_s - by_id[r.request_id].arrival_s for r in results if r.first_token_s is not None]
    tpot = [(r.finish_s - r.first_token_s) / (len(r.output_ids) - 1) for r in results
            if r.first_token_s is not None and len(r.output_ids) > 1]
    return {"name": name, "tokens": tokens, "wall_s": wall_s, "tok_s": tokens / wall_s, "ttft": ttft, "tpot": tpot,
            "outputs": {r.request_id: r.output_ids for r in results}}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def timed(fn, *args, **kwargs) -> tuple[list[RequestResult], float]:
    start = time.perf_counter()
    results = fn(*args, **kwargs)
    return results, time.perf_counter() - start


def run_w1(args, model, tokenizer, model_path: Path, requests, redis_url: str | None) -> list[dict]:
    wanted = set(args.contenders.split(","))
    pad = tokenizer.pad_token_id
    engine_config = LLMEngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    rows = []
    if "a" in wanted:
        rows.append(summarize("(a) generate, one at a time", requests, *timed(baselines.run_sequential, model, requests)))
    if "b" in wanted:
        rows.append(summarize(f"(b) static batches of {args.max_num_seqs}", requests,
                              *timed(baselines.run_static, model, requests, args.max_num_seqs, pad)))
    if "c" in wanted:
        blocks = args.max_num_seqs * (1024 // 32) + 64
        rows.append(summarize("(c) transformers continuous batching", requests,
                              *timed(baselines.run_hf_continuous, model, requests, args.max_num_batched_tokens, blocks)))
    if "d" in wanted:
        rows.append(summarize("(d) redbatch engine, in process", requests,
                              *timed(redbatch_runs.run_engine, model, tokenizer, requests, engine_config)))
    if "e" in wanted:
        rows.append(summarize("(e) redbatch worker via Redis", requests,
                              *_timed_end_to_end(args, model_path, requests, redis_url)))
    return rows


def _timed_end_to_end(args, model_path: Path, requests, redis_url: str | None) -> tuple[list[RequestResult], float]:
    server = redbatch_runs.RedisForBench(redis_url)
    log_path = Path(tempfile.mkdtemp(prefix="redbatch-bench-")) / "worker.log"
    worker = redbatch_runs.start_worker(server.url, model_path, args.threads, args.max_num_seqs,
                                        args.max_num_batched_tokens, log_path)
    try:
        results = redbatch_runs.run_end_to_end(server.url, requests)
        return results, max(r.finish_s for r in results)
    finally:
        worker.terminate()
        worker.wait(30)
        server.close()


def print_w1(rows: list[dict], reference: dict | None, ideal_s: float, rf: roofline.Roofline) -> None:
    table = Table(title="W1 offline mixed: tokens/s side by side (ratio = contender / redbatch in process)")
    for col in ("contender", "tokens", "wall s", "tok/s", "ratio", "same tokens as (a)/(b)"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    base = next((r for r in rows if r["name"].startswith("(d)")), None)
    for row in rows:
        ratio = row["tok_s"] / base["tok_s"] if base else float("nan")
        same = "-" if reference is None else f"{sum(row['outputs'][k] == v for k, v in reference.items())}/{len(reference)}"
        table.add_row(row["name"], str(row["tokens"]), f"{row['wall_s']:.1f}", f"{row['tok_s']:.1f}", f"{ratio:.2f}", same)
    if base:
        table.add_row("roofline ideal (zero-overhead schedule)", str(base["tokens"]), f"{ideal_s:.1f}",
                      f"{base['tokens'] / ideal_s:.1f}", f"{base['wall_s'] / ideal_s:.2f}", "-")
    console.print(table)
    steps = ", ".join(f"b{b}={s * 1000:.0f}ms" for b, s in rf.decode_step_s.items())
    console.print(f"model costs: prefill {rf.prefill_tok_s:.0f} tok/s; decode step {steps}")
    if base:
        others = [r["tok_s"] for r in rows if r["name"][:3] in ("(a)", "(b)", "(c)")]
        e2e = next((r for r in rows if r["name"].startswith("(e)")), None)
        console.print(f"targets: (d) / best of (a,b,c) = {base['tok_s'] / max(others):.2f} (>= 1.3)" if others else "")
        if e2e:
            console.print(f"         (e) / (d) = {e2e['tok_s'] / base['tok_s']:.2f} (>= 0.95)")
        console.print(f"         efficiency = ideal / actual = {ideal_s / base['wall_s']:.2f} (>= 0.8)")


def print_w2(rows: list[dict], rate: float) -> None:
    table = Table(title=f"W2 online: Poisson arrivals at {rate:.2f} req/s")
    for col in ("contender", "tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for row in rows:
        table.add_row(row["name"], f"{row['tok_s']:.1f}", f"{pct(row['ttft'], .5):.2f}", f"{pct(row['ttft'], .99):.2f}",
                      f"{pct(row['tpot'], .5) * 1000:.0f}", f"{pct(row['tpot'], .99) * 1000:.0f}")
    console.print(table)


def run_w2(args, model, tokenizer, model_path, rate: float, redis_url) -> list[dict]:
    requests = workload(model.config.vocab_size, args.w2_requests, args.seed + 1, rate_per_s=rate)
    rows = [summarize("(e) redbatch worker via Redis", requests, *_timed_end_to_end(args, model_path, requests, redis_url)),
            summarize(f"(b) static batches of {args.max_num_seqs}, online loop", requests,
                      *timed(baselines.run_static, model, requests, args.max_num_seqs, tokenizer.pad_token_id))]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from worker.models.loading import load_llm

    model_path = build_model(args)
    model, tokenizer = load_llm(str(model_path))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    console.print(f"model: Llama {params:.0f}M params (hidden {args.hidden}, {args.layers} layers), fp32, "
                  f"{args.threads} threads, max_num_seqs {args.max_num_seqs}, seed {args.seed}")
    requests = workload(model.config.vocab_size, args.num_requests, args.seed)
    mean_context = int(statistics.mean(len(r.prompt_ids) + r.max_tokens / 2 for r in requests))
    rf = roofline.measure(model, mean_context, args.max_num_seqs)
    rows = run_w1(args, model, tokenizer, model_path, requests, args.redis_url)
    reference = next((r["outputs"] for r in rows if r["name"][:3] in ("(a)", "(b)")), None)
    print_w1(rows, reference, rf.ideal_s(requests, args.max_num_seqs), rf)
    base = next((r for r in rows if r["name"].startswith("(d)")), None)
    if not args.skip_w2 and base:
        rate = args.w2_load * args.num_requests / base["wall_s"]
        print_w2(run_w2(args, model, tokenizer, model_path, rate, args.redis_url), rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
