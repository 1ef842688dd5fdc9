"""Bulk generation on the tiny model: a clean run and a run killed (kill -9) mid-job then resumed.

    python -m bench.bulk --lines 1000                 # ~1-2 min on 2 CPU cores
    python -m bench.bulk --lines 10000 --no-kill      # the throughput run

Everything is a real process: redis-server, `redbatch worker` (tiny model), `redbatch bulk worker
--simple` (rq; the runner works in that process, so its CPU is that process's). Reports the job's
time, tokens/s, the worker's mean batch occupancy during the job (its `active` heartbeat field over
`max_num_seqs`, sampled, and generated tokens per step), the CPU seconds of the bulk worker and of the
redbatch worker, and for the killed run: lines before the kill, the resume, exactly one line per
custom_id and equality with the clean run's greedy outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.procs import (
    ROOT,
    RedisServer,
    child_env,
    cpu_seconds,
    kill_session,
    stop_all,
)
from producer.connection import connect

HEARTBEAT_FIELDS = ("active", "waiting", "steps", "tokens", "step_ms", "preemptions", "pid", "last_seen")
WORDS = "the cat dog river stream token batch model queue light dark green blue one two three when then".split()  # noqa: SIM905


def _cli(*args: str, threads: int = 1, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=child_env(threads), cwd=ROOT, **popen)


def write_input(path: Path, num_lines: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(num_lines):
            words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 9))
            if i % 4 == 3:
                line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": "tiny", "prompt": words, "max_tokens": max_tokens, "temperature": 0}}
            else:
                line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "tiny", "messages": [{"role": "user", "content": f"{words} {i}"}],
                                 "max_completion_tokens": max_tokens, "temperature": 0}}
            f.write(json.dumps(line) + "\n")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir = args, workdir
        self.url = args.redis_url
        self.procs: list[subprocess.Popen] = []
        self.server: RedisServer | None = None

    def start(self) -> None:
        self.server = RedisServer(self.url, workdir=self.workdir)
        self.url = self.server.url
        self.rds = connect(self.url)
        for _ in range(100):
            try:
                self.rds.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        model_dir = self.workdir / "tiny"
        subprocess.run([sys.executable, "-m", "producer.cli", "make-tiny-model", str(model_dir)], env=child_env(1), cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        self.worker = _cli("worker", "--model-name", "tiny", "--model-path", str(model_dir), "--redis-url", self.url,
                           "--prefix", self.args.prefix, "--max-num-seqs", str(self.args.max_num_seqs),
                           "--threads", str(self.args.threads), threads=self.args.threads,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(self.worker)
        from producer.keys import Keys

        self.keys = Keys(self.args.prefix)
        deadline = time.monotonic() + 120
        while not self.rds.zcard(self.keys.model_workers("tiny")) or "active" not in self.heartbeat():
            if time.monotonic() > deadline or self.worker.poll() is not None:
                raise SystemExit("the redbatch worker did not register")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_all(self.procs)
        if self.server is not None:
            self.server.close()

    def heartbeat(self) -> dict[str, float]:
        members = self.rds.zrange(self.keys.model_workers("tiny"), 0, 0)
        if not members:
            return {}
        raw = self.rds.hgetall(self.keys.worker(members[0].decode()))
        return {k.decode(): float(v) for k, v in raw.items() if k.decode() in HEARTBEAT_FIELDS}

    def submit(self, input_path: Path, output: Path) -> str:
        done = subprocess.run([sys.executable, "-m", "producer.cli", "bulk", "submit", str(input_path), "--model", "tiny",
                               "--output", str(output), "--redis-url", self.url, "--prefix", self.args.prefix,
                               "--lease-s", "2"] + (["--max-in-flight", str(self.args.max_in_flight)]
                                                    if self.args.max_in_flight else []),
                              env=child_env(1), cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip().splitlines()[-1]

    def bulk_worker(self, log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            return _cli("bulk", "worker", "--redis-url", self.url, "--burst", "--simple", stdout=f,
                        stderr=subprocess.STDOUT, start_new_session=True)

    def cancel(self, job_id: str) -> None:
        import producer.bulk as pb

        pb.cancel(job_id, connection=self.rds)

    def capture(self, job_id: str) -> str:
        """What `redbatch top --once` and `redbatch bulk status` print at this moment (text, 120 columns)."""
        env = dict(child_env(1), COLUMNS="120", TERM="dumb")
        top = subprocess.run([sys.executable, "-m", "producer.cli", "top", "--once", "--redis-url", self.url,
                              "--prefix", self.args.prefix], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        status = subprocess.run([sys.executable, "-m", "producer.cli", "bulk", "status", job_id, "--redis-url", self.url],
                                env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        return f"$ redbatch top --once\n{top.stdout}\n$ redbatch bulk status {job_id}\n{status.stdout}"

    def run(self, job_id: str, bulk: subprocess.Popen, kill_at: int | None = None,
            capture_top: Path | None = None) -> dict:
        """Watch a job until it stops (or until `kill_at` lines are done: then kill -9 its bulk worker)."""
        import producer.bulk as pb

        start_hb, start_worker_cpu, t0 = self.heartbeat(), cpu_seconds(self.worker.pid), time.monotonic()
        samples, bulk_cpu, bulk_cpu_at_start = [], 0.0, None
        while True:
            info = pb.status(job_id, connection=self.rds)
            samples.append(self.heartbeat().get("active", 0.0))
            if bulk.poll() is None:
                try:
                    bulk_cpu = cpu_seconds(bulk.pid)
                except OSError:
                    pass
                if bulk_cpu_at_start is None and info["status"] == "started":
                    bulk_cpu_at_start = bulk_cpu  # after the process started and imported rq: the job's own CPU from here
            if capture_top is not None and info.get("total") and info.get("done", 0) >= info["total"] // 2:
                capture_top.write_text(self.capture(job_id))
                capture_top = None
            if kill_at is not None and info.get("done", 0) >= kill_at:
                kill_session(bulk.pid)
                bulk.wait(10)
                info["killed"] = True
                break
            if info["status"] in ("finished", "failed", "canceled") or bulk.poll() is not None:
                break
            time.sleep(0.05 if kill_at is not None else 0.25)
        end_hb, wall_s = self.heartbeat(), time.monotonic() - t0
        try:  # a --burst bulk worker exits on its own once its queue is empty; never leave it running
            bulk.wait(30)
        except subprocess.TimeoutExpired:
            kill_session(bulk.pid)
            bulk.wait(10)
        steps = end_hb["steps"] - start_hb["steps"]
        tokens = end_hb["tokens"] - start_hb["tokens"]
        busy = [s for s in samples if s > 0]
        return {
            "status": info["status"], "state": info.get("state"), "done": info.get("done"), "total": info.get("total"),
            "failed": info.get("failed"), "wall_s": round(wall_s, 2), "job_elapsed_s": info.get("elapsed_s"),
            "tokens": info.get("tokens"), "tokens_per_s": info.get("tokens_per_s"),
            "worker_tokens": int(tokens), "worker_steps": int(steps),
            "tokens_per_step": round(tokens / steps, 2) if steps else None,
            "mean_active": round(sum(samples) / len(samples), 2) if samples else None,
            "mean_active_while_busy": round(sum(busy) / len(busy), 2) if busy else None,
            "occupancy": round(sum(samples) / len(samples) / self.args.max_num_seqs, 3) if samples else None,
            "bulk_cpu_s": round(bulk_cpu, 2), "bulk_job_cpu_s": round(bulk_cpu - (bulk_cpu_at_start or 0.0), 2), "worker_cpu_s": round(cpu_seconds(self.worker.pid) - start_worker_cpu, 2),
            "killed": info.get("killed", False),
        }


def _outputs(path: Path) -> dict[str, object]:
    out = {}
    for text in path.read_text().splitlines():
        line = json.loads(text)
        body = (line["response"] or {}).get("body") or {}
        choice = (body.get("choices") or [{}])[0]
        out.setdefault(line["custom_id"], []).append((choice.get("message") or {}).get("content", choice.get("text")))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-in-flight", type=int, default=None, help="default: the job's own (2 x max_num_seqs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the redbatch worker")
    p.add_argument("--kill-at", type=float, default=0.4, help="kill -9 the bulk worker at this share of lines")
    p.add_argument("--no-kill", action="store_true", help="only the clean run")
    p.add_argument("--redis-url", default=None, help="default: start redis-server on a free port")
    p.add_argument("--prefix", default="bench")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--top-capture", default=None, help="write what `redbatch top --once` and `redbatch bulk status` "
                   "show half-way through the clean run to this file")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rb-bulk-bench-"))
    bench = Bench(args, workdir)
    report: dict = {"lines": args.lines, "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs}
    try:
        bench.start()
        input_path = workdir / "in.jsonl"
        write_input(input_path, args.lines, args.max_tokens)
        clean_out = workdir / "clean.jsonl"
        job = bench.submit(input_path, clean_out)
        report["clean"] = bench.run(job, bench.bulk_worker(workdir / "bulk-clean.log"),
                                    capture_top=Path(args.top_capture) if args.top_capture else None)
        print("clean run:", json.dumps(report["clean"]), flush=True)
        if not args.no_kill:
            report["killed"] = _killed_run(bench, input_path, workdir, int(args.lines * args.kill_at))
            outputs, clean = _outputs(workdir / "killed.jsonl"), _outputs(clean_out)
            report["killed"]["one_line_per_custom_id"] = (sorted(outputs) == sorted(clean)
                                                         and all(len(v) == 1 for v in outputs.values()))
            report["killed"]["equals_clean_run"] = outputs == clean
            print("killed + resumed:", json.dumps(report["killed"]), flush=True)
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _killed_run(bench: Bench, input_path: Path, workdir: Path, kill_at: int) -> dict:
    output = workdir / "killed.jsonl"
    job = bench.submit(input_path, output)
    first = bench.run(job, bench.bulk_worker(workdir / "bulk-1.log"), kill_at=kill_at)
    lines_at_kill = output.read_text().count("\n")
    if not first["killed"]:  # a short job can finish before the kill: nothing to resume
        return {"first": first, "lines_at_kill": lines_at_kill, "second": first, "finished_before_kill": True}
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "producer.cli", "bulk", "resume", job, "--redis-url", bench.url],
                   env=child_env(1), cwd=ROOT, check=True, capture_output=True, text=True)
    second = bench.run(job, bench.bulk_worker(workdir / "bulk-2.log"))
    second["resume_wall_s"] = round(time.monotonic() - t0, 2)
    return {"first": first, "lines_at_kill": lines_at_kill, "second": second}


if __name__ == "__main__":
    sys.exit(main())
