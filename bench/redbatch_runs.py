"""The redbatch contenders of the benchmark: (d) the engine in process, (e) a worker process behind Redis."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.baselines import BenchRequest, RequestResult
from producer.aio import AsyncClient
from producer.protocol import EventType, GenerateBody, GenerateConfig, Request, TaskKind
from worker.engines.llm import LLMEngine, LLMEngineConfig

BENCH_MODEL = "bench"
BENCH_PREFIX = "rbbench"


def _request(r: BenchRequest) -> Request:
    config = GenerateConfig(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
    return Request(id=r.request_id, task=TaskKind.GENERATE,
                   body=GenerateBody(prompt_token_ids=r.prompt_ids, generate_config=config), created_ms=0)


def run_engine(model, tokenizer, requests: list[BenchRequest], config: LLMEngineConfig) -> list[RequestResult]:
    """(d) LLMEngine in process; requests join at their arrival time (all at once offline)."""
    engine = LLMEngine(model, tokenizer, config)
    _warm_up_engine(engine, requests[0])
    pending = sorted(requests, key=lambda r: r.arrival_s)
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    t0 = time.perf_counter()
    while pending or engine.num_active:
        now = time.perf_counter() - t0
        while pending and pending[0].arrival_s <= now:
            engine.add(_request(pending.pop(0)))
        if not engine.num_active:
            time.sleep(max(0.0, pending[0].arrival_s - now))
            continue
        for out in engine.step():
            rid = out.seq.request_id
            outputs[rid] += out.token_ids
            first.setdefault(rid, time.perf_counter() - t0)
            if out.is_finished:
                finish[rid] = time.perf_counter() - t0
    return [RequestResult(r.request_id, outputs[r.request_id], first[r.request_id], finish[r.request_id]) for r in requests]


def _warm_up_engine(engine: LLMEngine, sample: BenchRequest) -> None:
    engine.add(_request(BenchRequest("warmup", sample.prompt_ids[:32], 4)))
    while engine.num_active:
        engine.step()


# ---------------------------------------------------------------- end to end through Redis


class RedisForBench:
    """A redis-server of the benchmark's own (free port, temp dir), or the URL given."""

    def __init__(self, url: str | None):
        self.url, self.proc, self.dir = url, None, None
        if url is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit("the end-to-end contender needs redis-server (apt-get install redis-server) or --redis-url")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.dir = tempfile.mkdtemp(prefix="redbatch-bench-redis-")
            self.proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir,
                                          "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
            self.url = f"redis://127.0.0.1:{port}/0"
        _wait_ping(self.url)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def _wait_ping(url: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    with redis.Redis.from_url(url) as client:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def start_worker(url: str, model_path: Path, threads: int, max_num_seqs: int, max_num_batched_tokens: int,
                 log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", BENCH_MODEL, "--model-path", str(model_path),
           "--redis-url", url, "--prefix", BENCH_PREFIX, "--threads", str(threads), "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", str(max_num_batched_tokens), "--max-queue-len", "0", "--grace-s", "5"]
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def run_end_to_end(url: str, requests: list[BenchRequest]) -> list[RequestResult]:
    """(e) submit through Redis at each arrival time and stream every request's events back."""
    return asyncio.run(_produce(url, requests))


async def _produce(url: str, requests: list[BenchRequest]) -> list[RequestResult]:
    client = AsyncClient(url, prefix=BENCH_PREFIX)
    try:
        model = await _wait_model(client)
        await _one(model, client, BenchRequest("warmup", requests[0].prompt_ids[:32], 4), time.perf_counter())
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(_one(model, client, r, t0) for r in requests)))
    finally:
        await client.aclose()


async def _wait_model(client: AsyncClient, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await client.redis.zcard(client.keys.model_workers(BENCH_MODEL)):
            return await client.get_model(BENCH_MODEL)
        await asyncio.sleep(0.2)
    raise SystemExit("the benchmark worker did not register")


async def _one(model, client: AsyncClient, r: BenchRequest, t0: float) -> RequestResult:
    await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
    config = {"max_tokens": r.max_tokens, "temperature": 0, "ignore_eos": True,
              "request_id": f"{r.request_id}-{int(t0 * 1000)}"}
    request_id = await model.submit(TaskKind.GENERATE, {"prompt_token_ids": r.prompt_ids}, config)
    tokens: list[int] = []
    first = None
    async for event in client.events(request_id, timeout_s=3600):
        if event.type == EventType.TOKEN:
            first = first if first is not None else time.perf_counter() - t0
            tokens += event.token_ids or []
        elif event.is_terminal:
            if event.type != EventType.DONE:
                raise RuntimeError(f"request {request_id} ended with {event.type}: {event.message}")
            return RequestResult(r.request_id, tokens, first, time.perf_counter() - t0)
    raise RuntimeError(f"request {request_id} has no terminal event")
