"""Chaos run: N requests, M workers, random kill -9 of workers and of Redis, with restarts.

    python ops/chaos.py --requests 60 --workers 3 --duration-s 60

Prints requests sent, completed, lost, duplicated tokens (a seq seen twice or tokens past
max_tokens), wrong outputs (greedy tokens differing from per-request `generate`), and the
longest recovery: the longest silence a client saw between two events of a request that had
already started streaming (a kill stalls the requests it hit until they resume elsewhere).
The longest queue wait (submit to first event) is printed apart: it measures load, not recovery.
Redis runs with AOF `appendfsync always`, so a kill -9 of Redis loses no acknowledged write.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.aio import AsyncClient  # noqa: E402
from producer.protocol import EventType, TaskKind  # noqa: E402

MODEL = "chaos"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, workdir: Path, model_path: Path, num_workers: int, lease_s: float):
        self.workdir, self.model_path, self.lease_s = workdir, model_path, lease_s
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.redis_proc: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen | None] = {f"w{i}": None for i in range(num_workers)}
        self.events: list[str] = []

    def start_redis(self) -> None:
        self.redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""], stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)

    def start_worker(self, name: str) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", MODEL, "--model-path",
               str(self.model_path), "--redis-url", self.url, "--threads", "1", "--max-num-seqs", "8",
               "--lease-s", str(self.lease_s), "--worker-id", f"{name}-{int(time.time() * 1000)}"]
        self.workers[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                              cwd=Path(__file__).resolve().parents[1])

    def kill(self, proc: subprocess.Popen | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for proc in self.workers.values():
            self.kill(proc)
        self.kill(self.redis_proc)


async def chaos_monkey(cluster: Cluster, rng: random.Random, until: float, stop: asyncio.Event) -> None:
    while time.monotonic() < until and not stop.is_set():
        await asyncio.sleep(rng.uniform(2.0, 5.0))
        if stop.is_set():
            return
        if rng.random() < 0.25:
            cluster.events.append(f"{time.strftime('%X')} kill -9 redis")
            cluster.kill(cluster.redis_proc)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            cluster.start_redis()
        else:
            name = rng.choice(list(cluster.workers))
            cluster.events.append(f"{time.strftime('%X')} kill -9 worker {name}")
            cluster.kill(cluster.workers[name])
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            cluster.start_worker(name)


async def one_request(client: AsyncClient, i: int, prompt: str, max_tokens: int) -> dict:
    request_id = f"chaos-{i}"
    config = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "request_id": request_id}
    while True:
        try:
            model = await client.get_model(MODEL)
            await model.submit(TaskKind.GENERATE, {"prompt": prompt}, config)
            break
        except (redis.ConnectionError, OSError):
            await asyncio.sleep(0.2)
    seqs, tokens, terminal = [], [], None
    submitted, last, queue_wait, longest_gap, gap_window = time.monotonic(), None, 0.0, 0.0, ""
    async for event in client.events(request_id, timeout_s=600):
        now = time.monotonic()
        if last is None:
            queue_wait = now - submitted
        elif now - last > longest_gap:
            longest_gap = now - last
            gap_window = f"{time.strftime('%X', time.localtime(time.time() - longest_gap))}-{time.strftime('%X')}"
        last = now
        seqs.append(event.seq)
        if event.type == EventType.TOKEN:
            tokens += event.token_ids or []
        if event.is_terminal:
            terminal = event.type
    return {"id": request_id, "prompt": prompt, "max_tokens": max_tokens, "seqs": seqs, "tokens": tokens,
            "terminal": terminal, "longest_gap": longest_gap,
            "gap_window": gap_window, "queue_wait": queue_wait}


async def run(args) -> tuple[list[dict], Path]:
    from worker.models.tiny import make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="redbatch-chaos-"))
    model_path = make_tiny_model(workdir / "model")
    cluster = Cluster(workdir, model_path, args.workers, args.lease_s)
    cluster.start_redis()
    for name in cluster.workers:
        cluster.start_worker(name)
    rng = random.Random(args.seed)
    client = AsyncClient(cluster.url)
    while not await _registered(client):
        await asyncio.sleep(0.2)
    stop = asyncio.Event()
    monkey = asyncio.create_task(chaos_monkey(cluster, rng, time.monotonic() + args.duration_s, stop))
    started = time.monotonic()
    jobs = [one_request(client, i, f"chaos {i} " + " ".join(rng.choice(["river", "stone", "cloud"]) for _ in range(5)),
                        rng.randint(50, args.max_tokens)) for i in range(args.requests)]
    try:
        results = await asyncio.wait_for(asyncio.gather(*jobs), timeout=args.timeout_s)
    finally:
        stop.set()
        await monkey
        await client.aclose()
        cluster.stop_all()
    print("\n".join(cluster.events))
    print(f"wall: {time.monotonic() - started:.1f} s; logs in {workdir}")
    return results, model_path


async def _registered(client: AsyncClient) -> bool:
    try:
        return bool(await client.redis.hget(client.keys.models(), MODEL))
    except redis.ConnectionError:
        return False


def report(results: list[dict], model_path: Path) -> None:
    completed = [r for r in results if r["terminal"] == EventType.DONE]
    duplicated = sum(len(r["seqs"]) - len(set(r["seqs"])) + max(0, len(r["tokens"]) - r["max_tokens"]) for r in results)
    wrong = _wrong_outputs(completed, model_path)
    print(f"requests sent:      {len(results)}")
    print(f"completed:          {len(completed)}")
    print(f"lost:               {len(results) - len(completed)}")
    print(f"duplicated tokens:  {duplicated}")
    print(f"gapped streams:     {sum(r['seqs'] != list(range(len(r['seqs']))) for r in results)}")
    print(f"wrong outputs:      {wrong} (greedy tokens vs per-request generate)")
    worst = max(results, key=lambda r: r["longest_gap"])
    print(f"longest recovery:   {worst['longest_gap']:.2f} s (longest silence inside a stream that had started: "
          f"{worst['id']}, {worst['gap_window']})")
    print(f"longest queue wait: {max(r['queue_wait'] for r in results):.2f} s (submit to first event: load, not recovery)")


def _wrong_outputs(completed: list[dict], model_path: Path) -> int:
    import torch

    from worker.models.loading import load_llm

    model, tokenizer = load_llm(str(model_path))
    wrong = 0
    for r in completed:
        ids = tokenizer(r["prompt"], return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r["max_tokens"], do_sample=False,
                             eos_token_id=None)
        wrong += out[0, ids.shape[1]:].tolist() != r["tokens"]
    return wrong


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--duration-s", type=float, default=60.0, help="how long the chaos lasts")
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--lease-s", type=float, default=2.0)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    report(*asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
