"""Soak: many short requests through real workers; afterwards nothing is left behind and nothing grew.

    python -m bench.soak --requests 100000 --workers 2     # the issue's run (a few minutes on 2 cores)
    python -m bench.soak --requests 2000                   # a quick look

Everything is a real process: its own redis-server (own port and directory), `redbatch worker` x N on
the tiny model with a short result TTL, and this process as the producer. The producer keeps a window
of requests in flight and reads all their events streams with one blocking XREAD per round. It records

- the workers' RSS at checkpoints (after the warm-up tenth, then every tenth): RSS stays flat;
- Redis `used_memory` and the key count before the run, right after it, and after the result TTL;
- what is left per request after the TTL (request entries, pending entries, id owners, events streams,
  abort keys): nothing.

It prints a table and PASS or FAIL (exit status 0 or 1).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.procs import ROOT, RedisServer, child_env, rss_mb, stop_all
from producer.client import Client
from producer.connection import connect
from producer.keys import GROUP, Keys
from producer.protocol import TERMINAL_EVENTS, EventType, TaskKind, decode_event

MODEL = "soak"
PER_REQUEST_KINDS = ("owner", "events", "abort")  # Keys.patterns() kinds created once per request


def count_keys(rds: redis.Redis, pattern: str) -> int:
    return sum(1 for _ in rds.scan_iter(match=pattern, count=1000))


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir = args, workdir
        self.keys = Keys(args.prefix)
        self.workers: list[subprocess.Popen] = []
        self.logs: list = []
        self.server: RedisServer | None = None

    # ------------------------------------------------------------ processes
    def start(self) -> None:
        self.server = RedisServer(workdir=self.workdir)
        self.url = self.server.url
        self.rds = connect(self.url)
        model_dir = self.workdir / "tiny"
        subprocess.run([sys.executable, "-m", "producer.cli", "make-tiny-model", str(model_dir)], env=child_env(1),
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        for i in range(self.args.workers):
            log = open(self.workdir / f"worker{i}.log", "wb")  # noqa: SIM115 (closed in stop())
            self.logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "producer.cli", "worker", "--model-name", MODEL, "--model-path", str(model_dir),
                 "--redis-url", self.url, "--prefix", self.args.prefix, "--max-num-seqs", str(self.args.max_num_seqs),
                 "--threads", "1", "--result-ttl-s", str(self.args.result_ttl_s), "--worker-id", f"soak-{i}"],
                env=child_env(1), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            self.workers.append(proc)
        deadline = time.monotonic() + 180
        # registered, and each heartbeat hash written: the baseline holds every long-lived key
        while (self.rds.zcard(self.keys.model_workers(MODEL)) < self.args.workers
               or count_keys(self.rds, self.keys.worker_pattern()) < self.args.workers):
            if time.monotonic() > deadline or any(w.poll() is not None for w in self.workers):
                raise SystemExit(f"the workers did not register (logs in {self.workdir})")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_all(self.workers)
        for log in self.logs:
            log.close()
        if self.server is not None:
            self.server.close()

    # ------------------------------------------------------------ measurements
    def redis_state(self) -> dict[str, float]:
        info = self.rds.info("memory")
        return {"used_memory_mb": info["used_memory"] / 2**20, "keys": self.rds.dbsize(),
                "key_names": sorted(k.decode() for k in self.rds.scan_iter(count=1000)) if self.rds.dbsize() < 50 else []}

    def leftovers(self) -> dict[str, int]:
        patterns = self.keys.patterns()
        left = {kind: count_keys(self.rds, patterns[kind]) for kind in PER_REQUEST_KINDS}
        stream = self.keys.requests(MODEL)
        left["request_entries"] = self.rds.xlen(stream)
        left["pending"] = sum(g["pending"] for g in self.rds.xinfo_groups(stream) if g["name"].decode() == GROUP)
        return left

    def worker_rss(self) -> list[float]:
        return [rss_mb(w.pid) for w in self.workers]

    # ------------------------------------------------------------ the run
    def run(self) -> dict:
        args = self.args
        rng = random.Random(0)
        client = Client(self.url, prefix=args.prefix, result_ttl_s=args.result_ttl_s, on_no_live_worker="ignore")
        model = client.get_model(MODEL)
        vocab_top = 200  # the tiny model's vocabulary is larger; any ids below this are valid prompts
        in_flight: dict[str, str] = {}  # events key -> last id read
        outcomes = {t.value: 0 for t in TERMINAL_EVENTS}
        terminal_per_request: dict[str, int] = {}
        submitted = 0
        checkpoints: list[tuple[int, list[float]]] = []
        next_checkpoint = args.requests // 10
        t0 = time.monotonic()
        finished = 0
        while finished < args.requests:
            while submitted < args.requests and len(in_flight) < args.window:
                prompt = [rng.randrange(3, vocab_top) for _ in range(rng.randint(2, 12))]
                request_id = model.submit(TaskKind.GENERATE, {"prompt_token_ids": prompt},
                                          {"max_tokens": args.max_tokens, "temperature": 0.0, "stream": True})
                in_flight[self.keys.events(request_id)] = "0-0"
                submitted += 1
            reply = client.redis.xread(in_flight, count=64, block=5000) or []
            for key, entries in reply:
                key = key.decode()
                for entry_id, fields in entries:
                    in_flight[key] = entry_id
                    event = decode_event(fields)
                    if event.type in TERMINAL_EVENTS:
                        outcomes[event.type.value] += 1
                        terminal_per_request[key] = terminal_per_request.get(key, 0) + 1
                        in_flight.pop(key, None)
                        finished += 1
                        break
            if finished >= next_checkpoint:
                checkpoints.append((finished, self.worker_rss()))
                next_checkpoint += max(1, args.requests // 10)
                print(f"  {finished:>7} done  {finished / (time.monotonic() - t0):7.0f} req/s  "
                      f"worker RSS {', '.join(f'{r:.0f}' for r in checkpoints[-1][1])} MB", flush=True)
        wall = time.monotonic() - t0
        client.close()
        return {"wall_s": wall, "outcomes": outcomes, "checkpoints": checkpoints,
                "duplicated_terminal": sum(1 for n in terminal_per_request.values() if n > 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--window", type=int, default=256, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--result-ttl-s", type=int, default=15, help="events/abort/id keys expire after this")
    p.add_argument("--rss-growth-mb", type=float, default=64.0, help="fail if a worker's RSS grows more than this "
                   "from the first checkpoint to the last")
    p.add_argument("--memory-slack-mb", type=float, default=1.0, help="fail if Redis used_memory after the TTL "
                   "exceeds the baseline by more than this")
    p.add_argument("--prefix", default="soak")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="redbatch-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            soak.start()
            before = soak.redis_state()
            print(f"soak: {args.requests} requests, {args.workers} workers, window {args.window}, "
                  f"max_tokens {args.max_tokens}, result TTL {args.result_ttl_s} s", flush=True)
            result = soak.run()
            after = soak.redis_state()
            wait_s = args.result_ttl_s + 2
            print(f"waiting {wait_s} s for the result TTL, then until expiry finishes", flush=True)
            time.sleep(wait_s)
            deadline = time.monotonic() + 120
            left = soak.leftovers()
            while any(left.values()) and time.monotonic() < deadline:
                time.sleep(2)
                left = soak.leftovers()
            expired = soak.redis_state()
            alive = all(w.poll() is None for w in soak.workers)
        finally:
            soak.stop()

    first, last = result["checkpoints"][0][1], result["checkpoints"][-1][1]
    growth = max(b - a for a, b in zip(first, last))
    done = result["outcomes"][EventType.DONE.value]
    checks = {
        "every request done": done == args.requests,
        "no request with two terminal events": result["duplicated_terminal"] == 0,
        "workers alive": alive,
        f"worker RSS growth <= {args.rss_growth_mb:g} MB": growth <= args.rss_growth_mb,
        "nothing left per request after the TTL": not any(left.values()),
        f"Redis memory back to baseline (+{args.memory_slack_mb:g} MB)":
            expired["used_memory_mb"] <= before["used_memory_mb"] + args.memory_slack_mb,
        "key count back to baseline": expired["keys"] <= before["keys"],
    }
    print()
    print("| requests | workers | wall s | req/s | outcomes |")
    print("|---|---|---|---|---|")
    print(f"| {args.requests} | {args.workers} | {result['wall_s']:.1f} | {args.requests / result['wall_s']:.0f} | "
          f"{', '.join(f'{k} {v}' for k, v in result['outcomes'].items() if v)} |")
    print()
    print("| Redis | used_memory MB | keys |")
    print("|---|---|---|")
    for name, state in (("before", before), ("after the run", after), ("after the TTL", expired)):
        print(f"| {name} | {state['used_memory_mb']:.2f} | {state['keys']} |")
    print()
    print("| worker RSS MB at | " + " | ".join(f"w{i}" for i in range(args.workers)) + " |")
    print("|---|" + "---|" * args.workers)
    for n, rss in result["checkpoints"]:
        print(f"| {n} done | " + " | ".join(f"{r:.0f}" for r in rss) + " |")
    print()
    if expired["keys"] > before["keys"]:
        print(f"keys before: {before['key_names']}\nkeys after the TTL: {expired['key_names']}")
    print("left per request after the TTL: " + ", ".join(f"{k} {v}" for k, v in left.items()))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    passed = all(checks.values())
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
