"""End-to-end throughput on one Redis against a local 3-master Redis Cluster, side by side in one run.

    python -m bench.cluster                          # 2 models x 32 requests x 32 tokens, 7 rounds each
    python -m bench.cluster --requests 16 --rounds 1 # a quick look

Everything is a real process: a redis-server, a 3-master cluster (redis-server --cluster-enabled x3,
joined with redis-cli --cluster create, on free loopback ports), and per topology one `redbatch worker`
per model on the tiny model (two models whose request streams sit on different cluster nodes). This
process is the producer: an AsyncClient submits every request of a round at once and streams all their
events. Rounds alternate between the topologies, so a machine that slows down hurts both alike; the
table gives each topology's median round and the cluster/single ratio (the target is >= 0.95).

Two cluster rows: the clients' default, request ids drawn so a request's keys sit on its model's node
(a worker's step then touches one node), and `colocate_request_ids=False`, ids anywhere (a step touches
every node: what ids a caller names itself get). The CPU columns are each topology's CPU seconds per
1k tokens, split into the producer (this process), the workers and the redis-servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import RedisServer, child_env, cpu_seconds, stop_all
from producer.aio import AsyncClient
from producer.cluster import slot_of
from producer.connection import connect
from producer.keys import Keys
from tests.redis_topologies import (  # the same cluster the tests start
    LocalCluster,
    wait_until,
)

PREFIX = "rbcl"


def models_on_two_nodes(local: LocalCluster) -> list[str]:
    """Two model names whose request streams hash to slots on different cluster nodes."""
    keys, by_port = Keys(PREFIX), {}
    for i in range(500):
        name = f"bench-m{i}"
        by_port.setdefault(local.port_of_slot(slot_of(keys.requests(name))), name)
        if len(by_port) == 2:
            return list(by_port.values())
    raise RuntimeError("every model name hashed to one node")


def start_workers(url: str, models: list[str], model_dir: Path, workdir: Path, tag: str, args) -> list:
    procs = []
    for name in models:
        log = open(workdir / f"{tag}-{name}.log", "wb")  # noqa: SIM115 - the child holds it; closed at exit
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", "--model-name", name, "--model-path", str(model_dir),
             "--redis-url", url, "--prefix", PREFIX, "--threads", str(args.threads), "--max-num-seqs",
             str(args.max_num_seqs), "--worker-id", f"{tag}-{name}"],
            env=child_env(args.threads), stdout=log, stderr=subprocess.STDOUT))
    with connect(url) as client:
        for name in models:
            wait_until(lambda name=name: client.zcard(Keys(PREFIX).model_workers(name)), 300, f"worker {name} ({tag})")
    return procs


async def one_round(url: str, models: list[str], args, round_no: int, colocate: bool = True) -> dict[str, float]:
    """Submit every request of the round at once, stream all their events; tokens and wall time."""
    config = {"max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0}
    async with AsyncClient(url, prefix=PREFIX, colocate_request_ids=colocate) as client:
        handles = [await client.get_model(name) for name in models]

        async def run(model, i: int) -> int:
            chunks = await model.generate(f"round {round_no} request {i} river stone cloud", config)
            num_tokens = 0
            async for chunk in chunks:
                if chunk.get("usage"):  # the last chunk
                    num_tokens = chunk["usage"]["completion_tokens"]
            return num_tokens

        start = time.perf_counter()
        counts = await asyncio.gather(*(run(m, i) for m in handles for i in range(args.requests)))
        wall_s = time.perf_counter() - start
    return {"tokens": float(sum(counts)), "wall_s": wall_s}


def table(results: dict[str, list[dict[str, float]]], args) -> str:
    rows = {}
    for name, rounds in results.items():
        per_1k = {part: statistics.median(1000 * r[part] / r["tokens"] for r in rounds) for part in CPU_PARTS}
        rows[name] = (statistics.median(r["tokens"] for r in rounds), statistics.median(r["wall_s"] for r in rounds),
                      statistics.median(r["tokens"] / r["wall_s"] for r in rounds), per_1k)
    base = rows[SINGLE][2]
    lines = [(f"{2 * args.requests} requests x {args.max_tokens} tokens per round (2 models, one worker each, "
              f"max_num_seqs {args.max_num_seqs}, {args.threads} torch thread(s)); median of {args.rounds} rounds"),
             (f"{'topology':<34} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'ratio':>6}   "
              "CPU s per 1k tokens: producer workers redis")]
    for name, (tokens, wall, tps, cpu) in rows.items():
        lines.append(f"{name:<34} {tokens:>7.0f} {wall:>7.2f} {tps:>8.1f} {tps / base:>6.3f}   "
                     f"{' ' * 20}{cpu['producer_cpu_s']:>8.2f} {cpu['workers_cpu_s']:>7.2f} {cpu['redis_cpu_s']:>5.2f}")
    return "\n".join(lines)


SINGLE, COLOCATED, SPREAD = "single Redis", "Cluster (3 nodes), ids colocated", "Cluster (3 nodes), ids anywhere"
CPU_PARTS = ("producer_cpu_s", "workers_cpu_s", "redis_cpu_s")


def measured_round(url: str, models: list[str], args, round_no: int, colocate: bool, workers: list,
                   redis_pids: list[int]) -> dict[str, float]:
    """One round, with the CPU each side spent on it."""
    def cpu() -> tuple[float, float, float]:
        mine = os.times()
        return (mine.user + mine.system, sum(cpu_seconds(p.pid) for p in workers),
                sum(cpu_seconds(pid) for pid in redis_pids))

    before = cpu()
    result = asyncio.run(one_round(url, models, args, round_no, colocate))
    return {**result, **{part: after - start for part, after, start in zip(CPU_PARTS, cpu(), before)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32,
                   help="requests per model per round (above ~50, the async cluster client's connection pool runs out)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7, help="rounds per topology (alternating)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from worker.models.tiny import make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="redbatch-bench-cluster-"))
    model_dir = make_tiny_model(workdir / "model")
    (workdir / "single").mkdir()
    single = RedisServer(workdir=workdir / "single")
    local = LocalCluster(workdir / "cluster").start()
    procs: list = []
    try:
        models = models_on_two_nodes(local)
        workers = {"single": start_workers(single.url, models, model_dir, workdir, "single", args),
                   "cluster": start_workers(local.url(), models, model_dir, workdir, "cluster", args)}
        procs = [*workers["single"], *workers["cluster"]]
        runs = {SINGLE: (single.url, True, workers["single"], [single.proc.pid]),
                COLOCATED: (local.url(), True, workers["cluster"], [p.pid for p in local.procs.values()]),
                SPREAD: (local.url(), False, workers["cluster"], [p.pid for p in local.procs.values()])}
        for url, colocate, *_ in runs.values():  # warm-up: first forwards, scripts loaded, slot maps read
            asyncio.run(one_round(url, models, argparse.Namespace(**{**vars(args), "requests": 4}), -1, colocate))
        results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        for round_no in range(args.rounds):
            for name, (url, colocate, round_workers, redis_pids) in runs.items():
                results[name].append(measured_round(url, models, args, round_no, colocate, round_workers, redis_pids))
                print(f"round {round_no + 1} {name}: {results[name][-1]['tokens'] / results[name][-1]['wall_s']:.1f} "
                      "tok/s", flush=True)
        print(table(results, args))
    finally:
        stop_all(procs)
        local.stop()
        single.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
