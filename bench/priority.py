"""Interactive chats beside a saturating bulk job on the same worker: what the priority levels buy.

    python -m bench.priority                                  # ~2 min on 2 CPU cores
    python -m bench.priority --windows 1 --window-s 2 --idle-chats 3 --bulk-lines 300   # the smoke size

Real processes: redis-server, one `redbatch worker` on the tiny model, and `redbatch bulk worker --simple`
running a bulk job (priority `bulk`, the default of `bulk submit`) with more lines than the run needs, so the
worker's running batch stays full. Interactive chats (priority `interactive`) are sent one at a time with a
gap (a trickle). First the trickle alone on the idle worker; then, once the bulk job fills the batch,
alternating windows: the bulk job alone, then the bulk job with the trickle. Alternating spreads a shared
machine's drift over both sides of the comparison.

It prints interactive TTFT p50/p99 on the idle worker and under the bulk load, in ms and in decode steps
(the worker's mean step time in the same phase, from its heartbeat), how far the loaded p50 is from the idle
p50 in loaded steps (target: within 2), and the bulk job's tokens/s in its alone and with-trickle windows
(the loss). Bulk tokens are the completion tokens of the lines in the job's output file, read at each window
edge (the runner flushes after every read). p99 of a few dozen samples is close to their maximum.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.bulk import Bench, write_input
from producer import Client
from producer.protocol import EventType, TaskKind
from producer.submit import chat_payload

WORDS = "tell me about the river and the green hills where a quiet town sleeps under the blue light".split()  # noqa: SIM905


@dataclass
class Phase:
    """One side of the comparison: its TTFTs, the worker's steps and time, the bulk job's tokens and time."""

    name: str
    ttft_ms: list[float] = field(default_factory=list)
    steps: float = 0.0
    step_ms_total: float = 0.0
    worker_tokens: float = 0.0
    preemptions: float = 0.0
    bulk_tokens: int = 0
    seconds: float = 0.0
    windows: list[dict] = field(default_factory=list)

    def add_heartbeats(self, before: dict[str, float], after: dict[str, float]) -> None:
        self.steps += after["steps"] - before["steps"]
        # the heartbeat's step_ms is the mean since the worker started: mean x count is the running total
        self.step_ms_total += after["step_ms"] * after["steps"] - before["step_ms"] * before["steps"]
        self.worker_tokens += after["tokens"] - before["tokens"]
        self.preemptions += after.get("preemptions", 0) - before.get("preemptions", 0)

    @property
    def step_ms(self) -> float | None:
        return self.step_ms_total / self.steps if self.steps else None

    @property
    def bulk_tokens_per_s(self) -> float | None:
        return self.bulk_tokens / self.seconds if self.seconds else None


class OutputTokens:
    """The completion tokens of the lines written to a bulk job's output so far (reads only what is new)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.tokens, self.lines = path, 0, 0, 0

    def read(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for text in complete.splitlines():
            body = (json.loads(text).get("response") or {}).get("body") or {}
            self.tokens += (body.get("usage") or {}).get("completion_tokens", 0)
            self.lines += 1
        return self.tokens


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


class Trickle:
    """Interactive chats, one at a time: each one's time to its first token event."""

    def __init__(self, url: str, prefix: str, max_tokens: int, gap_s: float):
        self.client = Client(url, prefix=prefix)
        self.model = self.client.get_model("tiny")
        self.max_tokens, self.gap_s, self.num_sent = max_tokens, gap_s, 0

    def one(self) -> float:
        i, self.num_sent = self.num_sent, self.num_sent + 1
        words = " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(6 + i % 7))
        config = {"max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        request_id = self.model.submit(TaskKind.CHAT, chat_payload([{"role": "user", "content": words}], None, None),
                                       config)
        first = None
        for event in self.client.events(request_id, timeout_s=300):
            if event.type == EventType.TOKEN and first is None:
                first = time.perf_counter() - t0
            if event.is_terminal:
                if event.type != EventType.DONE or first is None:
                    raise RuntimeError(f"interactive request {request_id} ended with {event.type}: {event.message}")
                return first * 1000
        raise RuntimeError(f"interactive request {request_id} has no terminal event")

    def run(self, phase: Phase, count: int | None = None, until: float | None = None) -> None:
        while (count is None or len(phase.ttft_ms) < count) and (until is None or time.monotonic() < until):
            phase.ttft_ms.append(self.one())
            time.sleep(self.gap_s)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    bench = Bench(argparse.Namespace(redis_url=args.redis_url, prefix=args.prefix, threads=args.threads,
                                     max_num_seqs=args.max_num_seqs, max_in_flight=None), workdir)
    idle, alone, mixed = Phase("idle"), Phase("bulk alone"), Phase("bulk + interactive")
    try:
        bench.start()
        trickle = Trickle(bench.url, args.prefix, args.chat_max_tokens, args.gap_s)
        trickle.one()  # warm-up: the first request of a fresh worker pays one-time costs
        before = _fresh_heartbeat(bench)
        trickle.run(idle, count=args.idle_chats)
        idle.add_heartbeats(before, _fresh_heartbeat(bench))

        input_path, output = workdir / "bulk.jsonl", workdir / "bulk-out.jsonl"
        write_input(input_path, args.bulk_lines, args.bulk_max_tokens)
        job_id = bench.submit(input_path, output)
        bulk_worker = bench.bulk_worker(workdir / "bulk.log")
        bench.procs.append(bulk_worker)
        _wait_saturated(bench, args.max_num_seqs, bulk_worker)
        tokens = OutputTokens(output)
        for _ in range(args.windows):
            for phase in (alone, mixed):
                _window(bench, tokens, phase, trickle if phase is mixed else None, args.window_s)
        report = {"job_id": job_id, "bulk_lines_done": tokens.lines, "is_saturated_at_end": tokens.lines < args.bulk_lines}
        bench.cancel(job_id)
    finally:
        bench.stop()
    report.update(_figures(args, idle, alone, mixed))
    return report


def _wait_saturated(bench: Bench, max_num_seqs: int, bulk_worker, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while bench.heartbeat().get("active", 0) < max_num_seqs:
        if time.monotonic() > deadline or bulk_worker.poll() is not None:
            raise SystemExit("the bulk job never filled the worker's batch")
        time.sleep(0.1)


def _fresh_heartbeat(bench: Bench, timeout_s: float = 5.0) -> dict[str, float]:
    """The worker's next heartbeat (written about every second): its counters as of now, give or take ~20 ms."""
    last = bench.heartbeat().get("last_seen")
    deadline = time.monotonic() + timeout_s
    while True:
        beat = bench.heartbeat()
        if beat.get("last_seen") != last or time.monotonic() > deadline:
            return beat
        time.sleep(0.01)


def _window(bench: Bench, tokens: OutputTokens, phase: Phase, trickle: Trickle | None, window_s: float) -> None:
    """One window, its edges at fresh heartbeats (so the step counts and the bulk tokens cover the same time)."""
    before = _fresh_heartbeat(bench)
    tokens_before, t0 = tokens.read(), time.monotonic()
    if trickle is None:
        time.sleep(window_s)
    else:
        trickle.run(phase, until=t0 + window_s)
    after = _fresh_heartbeat(bench)
    phase.bulk_tokens += tokens.read() - tokens_before
    phase.seconds += time.monotonic() - t0
    phase.add_heartbeats(before, after)
    steps = after["steps"] - before["steps"]
    step_ms = (after["step_ms"] * after["steps"] - before["step_ms"] * before["steps"]) / steps if steps else 0.0
    phase.windows.append({"s": round(time.monotonic() - t0, 2), "bulk_tokens": tokens.tokens - tokens_before,
                          "steps": int(steps), "step_ms": round(step_ms, 2)})
    print(f"  window {phase.name}: {phase.windows[-1]}", file=sys.stderr, flush=True)


def _figures(args: argparse.Namespace, idle: Phase, alone: Phase, mixed: Phase) -> dict:
    def ttft(phase: Phase) -> dict:
        p50, p99 = quantile(phase.ttft_ms, 0.5), quantile(phase.ttft_ms, 0.99)
        step = phase.step_ms
        return {"n": len(phase.ttft_ms), "p50_ms": p50, "p99_ms": p99, "step_ms": step,
                "p50_steps": p50 / step if p50 is not None and step else None,
                "p99_steps": p99 / step if p99 is not None and step else None}

    def bulk(phase: Phase) -> dict:
        return {"seconds": round(phase.seconds, 2), "bulk_tokens": phase.bulk_tokens,
                "bulk_tokens_per_s": phase.bulk_tokens_per_s, "step_ms": phase.step_ms,
                "tokens_per_step": phase.worker_tokens / phase.steps if phase.steps else None,
                "preemptions": int(phase.preemptions), "windows": phase.windows}

    out = {"settings": {k: getattr(args, k) for k in ("max_num_seqs", "threads", "bulk_max_tokens", "chat_max_tokens",
                                                      "gap_s", "windows", "window_s", "idle_chats")},
           "interactive_idle": ttft(idle), "interactive_under_bulk": ttft(mixed),
           "bulk_alone": bulk(alone), "bulk_with_interactive": bulk(mixed)}
    idle_p50, load_p50, load_step = idle.ttft_ms and quantile(idle.ttft_ms, 0.5), quantile(mixed.ttft_ms, 0.5), mixed.step_ms
    out["p50_delta_steps"] = (load_p50 - idle_p50) / load_step if idle_p50 and load_p50 is not None and load_step else None
    a, m = alone.bulk_tokens_per_s, mixed.bulk_tokens_per_s
    out["bulk_loss"] = 1 - m / a if a and m is not None else None
    return out


def table(report: dict) -> str:
    s, rows = report["settings"], []
    rows.append(f"priority benchmark: tiny model, 1 worker max_num_seqs {s['max_num_seqs']}, {s['threads']} torch "
                f"thread(s); bulk lines {s['bulk_max_tokens']} tokens at priority bulk, interactive chats "
                f"{s['chat_max_tokens']} tokens one at a time, {s['gap_s']} s apart")
    rows.append(f"{s['windows']} x ({s['window_s']} s bulk alone + {s['window_s']} s bulk + interactive), alternating")
    rows.append("")
    rows.append(f"{'interactive TTFT':<26}{'n':>4}{'p50 ms':>10}{'p99 ms':>10}{'step ms':>10}{'p50 steps':>11}"
                f"{'p99 steps':>11}")
    for name, key in (("idle worker", "interactive_idle"), ("under bulk load", "interactive_under_bulk")):
        t = report[key]
        rows.append(f"{name:<26}{t['n']:>4}{_f(t['p50_ms'])}{_f(t['p99_ms'])}{_f(t['step_ms'], 2)}"
                    f"{_f(t['p50_steps'], 2, 11)}{_f(t['p99_steps'], 2, 11)}")
    delta = report["p50_delta_steps"]
    verdict = "" if delta is None else ("  (target <= 2: met)" if delta <= 2 else "  (target <= 2: NOT met)")
    rows.append(f"p50 under load - p50 idle, in decode steps under load: {_f(delta, 2, 0).strip()}{verdict}")
    rows.append("")
    rows.append(f"{'bulk job':<26}{'s':>7}{'tokens':>9}{'tokens/s':>10}{'step ms':>10}{'tok/step':>10}{'preempt':>9}")
    for name, key in (("alone", "bulk_alone"), ("with interactive trickle", "bulk_with_interactive")):
        b = report[key]
        rows.append(f"{name:<26}{b['seconds']:>7.1f}{b['bulk_tokens']:>9}{_f(b['bulk_tokens_per_s'])}"
                    f"{_f(b['step_ms'], 2)}{_f(b['tokens_per_step'], 2)}{b['preemptions']:>9}")
    loss = report["bulk_loss"]
    rows.append(f"bulk throughput loss with the trickle: {'-' if loss is None else f'{loss * 100:.1f} %'}")
    return "\n".join(rows)


def _f(value: float | None, digits: int = 1, width: int = 10) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the redbatch worker")
    p.add_argument("--bulk-lines", type=int, default=20000, help="more than the run needs: the job is cancelled at the end")
    p.add_argument("--bulk-max-tokens", type=int, default=64)
    p.add_argument("--chat-max-tokens", type=int, default=8)
    p.add_argument("--gap-s", type=float, default=0.2, help="pause between one interactive chat's end and the next")
    p.add_argument("--idle-chats", type=int, default=40)
    p.add_argument("--windows", type=int, default=4, help="pairs of (bulk alone, bulk + interactive) windows")
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--redis-url", default=None, help="default: start redis-server on a free port")
    p.add_argument("--prefix", default="bench")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rb-priority-bench-"))
    try:
        report = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
