"""The redbatch contenders of the benchmark: (d) the engine in process, (e) a worker process behind Redis.

Engine features are detected, not assumed (the engine is being rewritten): `engine_config` passes
`enable_prefix_caching` / `block_size` only where `LLMEngineConfig` has them, and `profile_of` reads
whatever per-step profile the engine exposes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from bench.procs import RedisServer, stop_all
from bench.workloads import FIRST_PLAIN_ID, BenchRequest, RequestResult
from producer.aio import AsyncClient
from producer.protocol import EventType, GenerateBody, GenerateConfig, Request, TaskKind
from worker.engines.llm import LLMEngine, LLMEngineConfig

BENCH_MODEL = "bench"
BENCH_PREFIX = "rbbench"


def engine_config(max_num_seqs: int, max_num_batched_tokens: int, prefix_caching: bool | None) -> LLMEngineConfig:
    """The engine's config for a workload; prefix_caching None leaves the engine's default."""
    options = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    if prefix_caching is not None and has_prefix_caching():
        options["enable_prefix_caching"] = prefix_caching
    return LLMEngineConfig(**options)


def _config_defaults() -> dict[str, object]:
    """LLMEngineConfig's fields and defaults, whether it stays a dataclass or becomes a pydantic model."""
    if dataclasses.is_dataclass(LLMEngineConfig):
        return {f.name: f.default for f in dataclasses.fields(LLMEngineConfig)}
    if hasattr(LLMEngineConfig, "model_fields"):
        return {name: f.default for name, f in LLMEngineConfig.model_fields.items()}
    return {name: p.default for name, p in inspect.signature(LLMEngineConfig).parameters.items()}


def has_prefix_caching() -> bool:
    return "enable_prefix_caching" in _config_defaults()


def block_size() -> int | None:
    value = _config_defaults().get("block_size")
    return value if isinstance(value, int) else None


def eos_ids(model, tokenizer) -> frozenset[int]:
    """The ids that end a request which honours EOS: the generation config's, the model config's, the tokenizer's."""
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), model.config.eos_token_id, tokenizer.eos_token_id):
        ids.update([value] if isinstance(value, int) else list(value or ()))
    return frozenset(ids)


def _request(r: BenchRequest) -> Request:
    config = GenerateConfig(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=r.ignore_eos)
    return Request(id=r.request_id, task=TaskKind.GENERATE,
                   body=GenerateBody(prompt_token_ids=r.prompt_ids, generate_config=config), created_ms=0)


def run_engine(model, tokenizer, requests: list[BenchRequest], config: LLMEngineConfig
               ) -> tuple[list[RequestResult], dict[str, float]]:
    """(d) LLMEngine in process; requests join at their arrival time (all at once offline)."""
    engine = LLMEngine(model, tokenizer, config)
    _warm_up_engine(engine)
    before = profile_of(engine)
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
    results = [RequestResult(r.request_id, outputs[r.request_id], first[r.request_id], finish[r.request_id])
               for r in requests]
    after = profile_of(engine)
    return results, {k: v - before.get(k, 0.0) for k, v in after.items()}


def profile_of(engine) -> dict[str, float]:
    """Cumulative counters the engine exposes: `engine.profile` (seconds per phase) if it has one, plus steps."""
    profile = getattr(engine, "profile", None)
    if dataclasses.is_dataclass(profile):
        profile = dataclasses.asdict(profile)
    elif profile is not None and not isinstance(profile, dict):
        profile = vars(profile)
    values = {f"{k}_s" if not k.endswith("_s") else k: float(v) for k, v in (profile or {}).items()
              if isinstance(v, (int, float))}
    for counter in ("num_steps", "num_preemptions", "num_generated_tokens", "num_cached_tokens"):
        if isinstance(getattr(engine, counter, None), (int, float)):
            values[counter] = float(getattr(engine, counter))
    return values


def warm_up_request() -> BenchRequest:
    """A prompt no workload shares a block with: warming up must not fill a prefix cache for the timed run."""
    return BenchRequest("warmup", [FIRST_PLAIN_ID + i % 3 for i in range(32)], 4)


def _warm_up_engine(engine: LLMEngine) -> None:
    engine.add(_request(warm_up_request()))
    while engine.num_active:
        engine.step()


# ---------------------------------------------------------------- end to end through Redis


def start_worker(url: str, model_path: Path, threads: int, max_num_seqs: int, max_num_batched_tokens: int,
                 log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", BENCH_MODEL, "--model-path", str(model_path),
           "--redis-url", url, "--prefix", BENCH_PREFIX, "--threads", str(threads), "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", str(max_num_batched_tokens), "--max-queue-len", "0", "--grace-s", "5"]
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def run_end_to_end(redis_url: str | None, model_path: Path, requests: list[BenchRequest], threads: int,
                   max_num_seqs: int, max_num_batched_tokens: int, cpu: dict[str, float] | None = None
                   ) -> tuple[list[RequestResult], float]:
    """(e) a worker process of its own behind Redis; submit at each arrival time, stream every request back.
    `cpu` receives the CPU seconds the worker, the benchmark's redis-server and this client spent in the run."""
    server = RedisServer(redis_url)
    log_path = Path(tempfile.mkdtemp(prefix="redbatch-bench-")) / "worker.log"
    worker = start_worker(server.url, model_path, threads, max_num_seqs, max_num_batched_tokens, log_path)
    try:
        pids = {"worker": worker.pid, "redis-server": server.proc.pid if server.proc else None}
        results = asyncio.run(_produce(server.url, requests, worker, log_path, pids, cpu))
        return results, max(r.finish_s for r in results)
    finally:
        stop_all([worker])
        server.close()


async def _produce(url: str, requests: list[BenchRequest], worker: subprocess.Popen, log_path: Path,
                   pids: dict[str, int | None], cpu: dict[str, float] | None) -> list[RequestResult]:
    client = AsyncClient(url, prefix=BENCH_PREFIX)
    try:
        model = await _watched(_wait_model(client), worker, log_path)
        await _watched(_one(model, client, warm_up_request(), time.perf_counter()), worker, log_path)
        before = _cpu_seconds(pids)
        t0 = time.perf_counter()
        results = await _watched(asyncio.gather(*(_one(model, client, r, t0) for r in requests)), worker, log_path)
        if cpu is not None:
            after = _cpu_seconds(pids)
            cpu.update({k: after[k] - before[k] for k in after if k in before})
        return results
    finally:
        await client.aclose()


def _cpu_seconds(pids: dict[str, int | None]) -> dict[str, float]:
    """user + system CPU seconds so far of each process (all its threads), and of this client process."""
    out = {"client": sum(os.times()[:2])}
    ticks = os.sysconf("SC_CLK_TCK")
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return out


async def _watched(awaitable, worker: subprocess.Popen, log_path: Path):
    """Await while the worker lives: a worker that dies fails the run with its log instead of hanging it."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            return task.result()
        if worker.poll() is not None:
            task.cancel()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the benchmark worker exited with {worker.returncode}:\n{tail}")


async def _wait_model(client: AsyncClient, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await client.redis.zcard(client.keys.model_workers(BENCH_MODEL)):
            return await client.get_model(BENCH_MODEL)
        await asyncio.sleep(0.2)
    raise SystemExit("the benchmark worker did not register")


async def _one(model, client: AsyncClient, r: BenchRequest, t0: float) -> RequestResult:
    await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
    config = {"max_tokens": r.max_tokens, "temperature": 0, "ignore_eos": r.ignore_eos,
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
