"""End-to-end throughput on one Redis against a local 3-master Redis Cluster, side by side in one run.

    python -m bench.cluster                          # 2 models x 64 requests x 32 tokens, 3 rounds each
    python -m bench.cluster --requests 16 --rounds 1 # a quick look

Everything is a real process: a redis-server, a 3-master cluster (redis-server --cluster-enabled x3,
joined with redis-cli --cluster create, on free loopback ports), and per topology one `redbatch worker`
per model on the tiny model (two models whose request streams sit on different cluster nodes). This
process is the producer: an AsyncClient submits every request of a round at once and streams all their
events. Rounds alternate between the topologies, so a machine that slows down hurts both alike; the
table gives each topology's median round and the cluster/single ratio (the target is >= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import RedisServer, child_env, stop_all
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


async def one_round(url: str, models: list[str], args, round_no: int) -> dict[str, float]:
    """Submit every request of the round at once, stream all their events; tokens and wall time."""
    config = {"max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0}
    async with AsyncClient(url, prefix=PREFIX) as client:
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
        wall = statistics.median(r["wall_s"] for r in rounds)
        rows[name] = (statistics.median(r["tokens"] for r in rounds), wall,
                      statistics.median(r["tokens"] / r["wall_s"] for r in rounds))
    base = rows["single Redis"][2]
    lines = [(f"{2 * args.requests} requests x {args.max_tokens} tokens per round (2 models, one worker each, "
              f"max_num_seqs {args.max_num_seqs}, {args.threads} torch thread(s)); median of {args.rounds} rounds"),
             f"{'topology':<24} {'tokens':>8} {'wall s':>8} {'tok/s':>8} {'ratio':>6}"]
    for name, (tokens, wall, tps) in rows.items():
        lines.append(f"{name:<24} {tokens:>8.0f} {wall:>8.2f} {tps:>8.1f} {tps / base:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="requests per model per round")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="rounds per topology (alternating)")
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
        urls = {"single Redis": single.url, "Redis Cluster (3 nodes)": local.url()}
        for tag, url in zip(("single", "cluster"), urls.values()):
            procs += start_workers(url, models, model_dir, workdir, tag, args)
        for url in urls.values():  # warm-up: first forwards, scripts loaded, slot maps read
            asyncio.run(one_round(url, models, argparse.Namespace(**{**vars(args), "requests": 4}), -1))
        results: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        for round_no in range(args.rounds):
            for name, url in urls.items():
                results[name].append(asyncio.run(one_round(url, models, args, round_no)))
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
