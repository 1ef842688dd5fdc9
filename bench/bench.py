"""redbatch benchmark: every contender on the same model, requests and machine, in one run.

See bench/README.md for the commands, the workloads and how each peer is tuned.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: stable speed on a shared CPU

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/bench.py): import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from transformers.utils import logging as hf_logging

from bench import hf_cb, peers, redbatch_runs, report, roofline, workloads
from bench.report import Row, WorkloadResult
from bench.workloads import BenchRequest, RequestResult, Workload

WORKLOADS = ("w1", "w3", "w4", "w2")  # W2 last: its arrival rate and peer configuration come from W1
MODELS = ("default", "fast")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="redbatch benchmark (see bench/README.md)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of w1,w3,w4,w2")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of default,fast")
    p.add_argument("--contenders", default="a,b,c,d,e", help="comma list of a,b,c,d,e")
    p.add_argument("--hidden", type=int, default=768, help="the default model")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--fast-hidden", type=int, default=256, help="the fast-step model")
    p.add_argument("--fast-layers", type=int, default=4)
    p.add_argument("--fast-heads", type=int, default=4)
    p.add_argument("--num-requests", type=int, default=64, help="W1 and W3")
    p.add_argument("--w4-requests", type=int, default=64)
    p.add_argument("--w4-prefix", type=int, default=384, help="W4's shared system prompt, tokens")
    p.add_argument("--w2-requests", type=int, default=48)
    p.add_argument("--w2-load", type=float, default=0.8, help="W2 arrival rate as a fraction of (d)'s W1 rate")
    p.add_argument("--w2-rate", type=float, default=None, help="W2 arrivals per second (overrides --w2-load)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="cap every max_tokens (quick looks only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--static-batch-sizes", default="4,8,16", help="(b) sweep: batch sizes (capped at max_num_seqs)")
    p.add_argument("--hf-batch-tokens", default="256,512,1024", help="transformers CB sweep: max_batch_tokens")
    p.add_argument("--hf-num-blocks", default="128,256", help="transformers CB sweep: num_blocks (of 256 tokens)")
    p.add_argument("--calib-requests", type=int, default=32, help="the sweep runs on this many requests of each workload")
    p.add_argument("--redis-url", default=None, help="default: a redis-server of the benchmark's own")
    p.add_argument("--model-dir", default=None, help="where the seeded models are built (default: the temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    for name, allowed in (("workloads", WORKLOADS), ("models", MODELS), ("contenders", tuple(report.NAMES))):
        chosen = [x for x in getattr(args, name).split(",") if x]
        if not chosen or set(chosen) - set(allowed):
            p.error(f"--{name} takes a comma list of {','.join(allowed)}")
        setattr(args, name, chosen)
    return args


@dataclass
class ModelRun:
    """One model's state through the workloads: the model, its EOS ids, reference outputs, the cost model."""

    name: str
    path: Path
    model: object
    tokenizer: object
    eos_ids: frozenset[int]
    cost: roofline.CostModel
    references: dict[tuple, list[int]] = field(default_factory=dict)  # BenchRequest.key -> sequential output
    w1_rate_req_s: float | None = None
    w1_hf_config: hf_cb.HFConfig | None = None


def build_model(args: argparse.Namespace, name: str) -> Path:
    from worker.models.tiny import make_tiny_model

    hidden, layers, heads = ((args.hidden, args.layers, args.heads) if name == "default"
                             else (args.fast_hidden, args.fast_layers, args.fast_heads))
    root = Path(args.model_dir or tempfile.gettempdir())
    path = root / f"redbatch-bench-{hidden}x{layers}x{heads}-s{args.seed}"
    if not (path / "config.json").exists():
        make_tiny_model(path, seed=args.seed, hidden=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                        intermediate=hidden * 8 // 3, max_len=1024)
    return path


def load(args: argparse.Namespace, name: str) -> ModelRun:
    from worker.models.loading import load_llm

    path = build_model(args, name)
    model, tokenizer = load_llm(str(path))
    eos_ids = redbatch_runs.eos_ids(model, tokenizer)
    peers.run_sequential(model, [redbatch_runs.warm_up_request()], eos_ids)  # first-call costs stay out of (a)
    cost = roofline.fit(model, args.max_num_seqs, args.max_num_batched_tokens, model.config.max_position_embeddings)
    run = ModelRun(name, path, model, tokenizer, eos_ids, cost)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    c = model.config
    report.print_model_header(name, f"Llama {params:.1f}M params (hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
                              f"{c.num_attention_heads} heads), fp32, {args.threads} threads, max_num_seqs "
                              f"{args.max_num_seqs}, token budget {args.max_num_batched_tokens}, seed {args.seed}", cost)
    return run


def make_workload(args: argparse.Namespace, run: ModelRun, name: str) -> Workload:
    vocab = run.model.config.vocab_size
    cap = args.max_tokens_cap
    if name == "w1":
        return workloads.w1(vocab, args.num_requests, args.seed, cap)
    if name == "w3":
        return workloads.w3(vocab, args.num_requests, args.seed + 3, cap)
    if name == "w4":
        return workloads.w4(vocab, args.w4_requests, args.seed + 4, args.w4_prefix, cap)
    base = workloads.w1(vocab, args.w2_requests, args.seed, cap)
    return workloads.w2(base, args.w2_requests, w2_rate(args, run, base), args.seed + 2)


def w2_rate(args: argparse.Namespace, run: ModelRun, base: Workload) -> float:
    if args.w2_rate:
        return args.w2_rate
    if run.w1_rate_req_s is None:  # W1's (d) did not run: estimate the capacity from the roofline
        ideal = ideal_s(args, run, base)
        run.w1_rate_req_s = 0.75 * len(base.requests) / ideal
    return args.w2_load * run.w1_rate_req_s


def ensure_references(run: ModelRun, requests: list[BenchRequest]) -> None:
    """Sequential `generate` outputs for requests (a) did not time: the exactness reference for every contender."""
    missing = [r for r in requests if r.key not in run.references]
    for r, res in zip(missing, peers.run_sequential(run.model, missing, run.eos_ids)):
        run.references[r.key] = workloads.normalize(res.output_ids, r, run.eos_ids)


def ideal_s(args: argparse.Namespace, run: ModelRun, workload: Workload) -> float:
    ensure_references(run, workload.requests)
    cached = 0
    if workload.shared_prefix_len and redbatch_runs.has_prefix_caching():
        block = redbatch_runs.block_size() or 16
        cached = workload.shared_prefix_len // block * block
    return roofline.ideal_s(run.cost, [len(r.prompt_ids) for r in workload.requests],
                            [len(run.references[r.key]) for r in workload.requests],
                            args.max_num_seqs, args.max_num_batched_tokens, cached)


def to_row(contender: str, run: ModelRun, workload: Workload, results: list[RequestResult], wall_s: float,
           config: str = "") -> Row:
    by_id = {r.request_id: r for r in workload.requests}
    outputs = {res.request_id: workloads.normalize(res.output_ids, by_id[res.request_id], run.eos_ids) for res in results}
    same = sum(outputs[r.request_id] == run.references.get(r.key) for r in workload.requests)
    ttft = [res.first_token_s - by_id[res.request_id].arrival_s for res in results if res.first_token_s is not None]
    tpot = [(res.finish_s - res.first_token_s) / (len(outputs[res.request_id]) - 1) for res in results
            if res.first_token_s is not None and len(outputs[res.request_id]) > 1]
    return Row(contender, config, sum(len(o) for o in outputs.values()), wall_s, f"{same}/{len(workload.requests)}",
               ttft, tpot)


def _timed(fn, *args):
    """Run a contender; its wall time runs from its own t0 (after setup: cache allocation, warm-up, thread
    start) to its last finish, the same clock for every contender."""
    results = fn(*args)
    return results, max(r.finish_s for r in results)


def run_peer_b(args, run: ModelRun, workload: Workload, result: WorkloadResult) -> Row:
    """Static batches: the batch size is swept on the calibration subset (a long output tail can make big
    batches lose to small ones), then the best runs the whole workload."""
    sizes = sorted({min(b, args.max_num_seqs) for b in _ints(args.static_batch_sizes)})
    calibration = workloads.calibration_subset(workload, args.calib_requests)
    runs = {b: _timed(peers.run_static, run.model, calibration.requests, b, run.eos_ids) for b in sizes}
    tok_s = {b: sum(len(workloads.normalize(res.output_ids, r, run.eos_ids)) for r, res in zip(calibration.requests, rs))
             / wall for b, (rs, wall) in runs.items()}
    best = max(tok_s, key=tok_s.get)
    result.notes.append("(b) batch-size sweep on " + ("the whole workload" if calibration is workload else
                        f"the first {len(calibration.requests)} requests") + ": "
                        + ", ".join(f"{b}: {v:.1f} tok/s" for b, v in tok_s.items()) + f" -> {best}")
    label = f"batch {best} (best of {','.join(map(str, sizes))})"
    if calibration is workload:
        return to_row("b", run, workload, *runs[best], config=label)
    return to_row("b", run, workload, *_timed(peers.run_static, run.model, workload.requests, best, run.eos_ids),
                  config=label)


def run_peer_c(args, run: ModelRun, workload: Workload, result: WorkloadResult) -> Row:
    """The transformers CB sweep (on a calibration subset when the workload is bigger), then its best on all."""
    sharing = workload.shared_prefix_len > 0
    page = hf_cb.page_size_for_prefix(workload.shared_prefix_len)
    grid = [hf_cb.HFConfig(t, b * hf_cb.DEFAULT_PAGE // page, args.max_num_seqs, sharing, page)
            for t in _ints(args.hf_batch_tokens) for b in _ints(args.hf_num_blocks)]
    calibration = workloads.calibration_subset(workload, args.calib_requests)
    n, total = len(calibration.requests), len(workload.requests)
    result.sweep_note = "swept on the whole workload" if n == total else f"swept on the first {n} of {total} requests"
    result.sweep, runs = hf_cb.sweep(run.model, calibration.requests, grid, run.eos_ids)
    best = hf_cb.best(result.sweep)
    if best is None:
        return Row("c", error="every configuration of the sweep failed")
    if workload.name == "w1":
        run.w1_hf_config = best
    label = f"best of sweep: {best.label}"
    if n == total:
        return to_row("c", run, workload, *runs[best], config=label)
    return to_row("c", run, workload, *_timed(hf_cb.run, run.model, workload.requests, best, run.eos_ids), config=label)


def run_offline(args, run: ModelRun, workload: Workload) -> WorkloadResult:
    result = WorkloadResult(run.name, workload.name, workload.title, [], notes=list(workload.notes))
    reqs = workload.requests
    if "a" in args.contenders:  # not guarded: every other row is checked against its tokens
        results, wall = _timed(peers.run_sequential, run.model, reqs, run.eos_ids)
        for r, res in zip(reqs, results):
            run.references[r.key] = workloads.normalize(res.output_ids, r, run.eos_ids)
        result.rows.append(to_row("a", run, workload, results, wall))
    ensure_references(run, reqs)
    prefix = True if workload.shared_prefix_len else None
    contenders = {
        "b": lambda: run_peer_b(args, run, workload, result),
        "c": lambda: run_peer_c(args, run, workload, result),
        "d": lambda: _engine_row(args, run, workload, result, prefix),
        "e": lambda: _end_to_end_row(args, run, workload, result),
    }
    result.rows += [_guarded(c, fn) for c, fn in contenders.items() if c in args.contenders]
    result.ideal_s = ideal_s(args, run, workload)
    if workload.honours_eos:
        stopped = sum(bool(run.references[r.key]) and run.references[r.key][-1] in run.eos_ids for r in reqs)
        result.notes.append(f"{stopped} of {len(reqs)} requests stop at EOS before max_tokens (sequential reference)")
    report.flag_misconfigured_peers(result)
    return result


def run_online(args, run: ModelRun, workload: Workload) -> WorkloadResult:
    result = WorkloadResult(run.name, workload.name, workload.title, [])
    ensure_references(run, workload.requests)
    contenders = {
        "b": lambda: to_row("b", run, workload, *_timed(peers.run_static, run.model, workload.requests,
                                                        args.max_num_seqs, run.eos_ids),
                            config=f"server loop, batch up to {args.max_num_seqs}"),
        "c": lambda: _online_c(args, run, workload, result),
        "d": lambda: _engine_row(args, run, workload, result, None),
        "e": lambda: _end_to_end_row(args, run, workload, result),
    }
    result.rows += [_guarded(c, fn) for c, fn in contenders.items() if c in args.contenders]
    return result


def _guarded(contender: str, fn) -> Row:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a contender that breaks is a FAILED row, not a lost benchmark run
        report.console.print(f"[red]{report.NAMES[contender]} failed: {type(exc).__name__}")
        report.console.print_exception(max_frames=4)
        return Row(contender, error=f"{type(exc).__name__}: {str(exc)[:160]}")


def _engine_row(args, run: ModelRun, workload: Workload, result: WorkloadResult, prefix_caching: bool | None) -> Row:
    config = redbatch_runs.engine_config(args.max_num_seqs, args.max_num_batched_tokens, prefix_caching)
    results, result.profile = redbatch_runs.run_engine(run.model, run.tokenizer, workload.requests, config)
    wall = max(r.finish_s for r in results)
    if workload.name == "w1":
        run.w1_rate_req_s = len(workload.requests) / wall
    return to_row("d", run, workload, results, wall, config=_engine_label(args, workload))


def _end_to_end_row(args, run: ModelRun, workload: Workload, result: WorkloadResult | None = None) -> Row:
    cpu: dict[str, float] = {}
    results, wall = redbatch_runs.run_end_to_end(args.redis_url, run.path, workload.requests, args.threads,
                                                 args.max_num_seqs, args.max_num_batched_tokens, cpu)
    if result is not None and cpu:
        cores = os.cpu_count() or 1
        spent = ", ".join(f"{name} {seconds:.1f} s ({seconds / wall:.2f} cores)" for name, seconds in cpu.items())
        result.notes.append(f"(e) CPU during the run: {spent}; the machine has {cores} cores x {wall:.1f} s wall "
                            f"(the in-process engine (d) has its cores to itself)")
    return to_row("e", run, workload, results, wall, config=_engine_label(args, workload))


def _online_c(args, run: ModelRun, workload: Workload, result: WorkloadResult) -> Row:
    config = run.w1_hf_config
    if config is None:  # W1 did not sweep: NOTES' best CPU configuration, within the grid's bounds
        config = hf_cb.HFConfig(min(1024, max(_ints(args.hf_batch_tokens))), min(_ints(args.hf_num_blocks)),
                                args.max_num_seqs)
        result.notes.append("(c) runs NOTES' best CPU configuration: W1's sweep did not run for this model")
    return to_row("c", run, workload, *_timed(hf_cb.run, run.model, workload.requests, config, run.eos_ids),
                  config=f"W1's best: {config.label}")


def _engine_label(args, workload: Workload) -> str:
    label = f"max_num_seqs {args.max_num_seqs}, budget {args.max_num_batched_tokens}"
    if workload.shared_prefix_len:
        label += ", prefix cache on" if redbatch_runs.has_prefix_caching() else ", no prefix cache in this engine"
    return label


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_all(args: argparse.Namespace) -> tuple[list[WorkloadResult], dict[str, roofline.CostModel]]:
    results, costs = [], {}
    for model_name in args.models:
        run = load(args, model_name)
        costs[model_name] = run.cost
        for name in [w for w in WORKLOADS if w in args.workloads]:
            workload = make_workload(args, run, name)
            if workload.is_online:
                result = run_online(args, run, workload)
                report.print_online(result)
            else:
                result = run_offline(args, run, workload)
                report.print_offline(result)
            results.append(result)
        del run
    return results, costs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results, costs = run_all(args)
    target_rows = report.targets(results)
    report.print_targets(target_rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_json(results, target_rows, costs), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
