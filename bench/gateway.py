"""The HTTP gateway's overhead: the same streams read straight from Redis and through the gateway, side by side.

    python -m bench.gateway                                   # 64 and 512 streams (a few minutes on 2 cores)
    python -m bench.gateway --concurrency 8 --max-tokens 8    # a quick look
    python -m bench.gateway --clients openai --rounds 3       # the SDK only, three interleaved rounds

Real processes: a redis-server of its own (free port), `redbatch worker` on the tiny model (2 layers,
hidden 64: steps of a few ms, so the gateway's cost is not hidden behind the forward) and
`redbatch gateway` (uvicorn, a process of its own, so its CPU, read from /proc, is its own). At each
concurrency N, N streams open at once, each the same greedy completion (prompt token ids,
`--max-tokens`, ignore_eos), along each path in turn:

  direct   producer.aio.AsyncClient: submit, then XREAD BLOCK on the request's events stream
  openai   POST /v1/completions stream=true through the official SDK's AsyncOpenAI
  httpx    the same POST, its SSE lines read with plain httpx (what the SDK itself costs the client)

TTFT runs from a stream's submit (or POST) to its first visible text; inter-token latency (ITL) is
the gap between successive pieces of visible text (a token that decodes to nothing sends no SSE
chunk, so the direct path skips it too). Redis connections are counted in CLIENT LIST by client
name, sampled through each run (the peak). Every process shares the machine's cores, so the
client's and the worker's CPU are printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.gateway_report import DIRECT_CLIENT_NAME, cpu_lines, summarize, table_lines
from bench.procs import ROOT, RedisServer, child_env, cpu_seconds, free_port, stop_all
from bench.workloads import FIRST_PLAIN_ID
from producer.aio import AsyncClient
from producer.connection import connect, connect_async
from producer.keys import Keys
from producer.protocol import EventType, TaskKind

MODEL = "tiny"
PREFIX = "rbgwbench"
PATHS = ("direct", "openai", "httpx")
TIMEOUT_S = 600.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="64,512", help="comma list: streams open at once")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per stream")
    p.add_argument("--clients", default="openai,httpx", help="gateway clients beside the direct path: openai,httpx")
    p.add_argument("--rounds", type=int, default=1, help="runs per path and concurrency, the order alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    p.add_argument("--max-num-seqs", type=int, default=None, help="the worker's (default: the largest concurrency)")
    p.add_argument("--event-readers", type=int, default=1, help="the gateway's shared XREAD loops")
    p.add_argument("--redis-url", default=None, help="default: a redis-server of the benchmark's own")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--log-dir", default=None, help="keep the worker's and the gateway's logs here")
    args = p.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",") if n]
    clients = [c for c in args.clients.split(",") if c]
    if not clients or set(clients) - {"openai", "httpx"}:
        p.error("--clients takes a comma list of openai,httpx")
    if not args.concurrency or min(args.concurrency) < 1 or args.rounds < 1:
        p.error("--concurrency takes positive numbers, --rounds at least 1")
    args.paths = ["direct", *clients]
    return args


# ---------------------------------------------------------------- the processes


class Stack:
    """redis-server, the tiny model's worker and the gateway, each a process of its own."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir = args, workdir
        self.procs: list[subprocess.Popen] = []
        self.server: RedisServer | None = None

    def start(self) -> None:
        self.server = RedisServer(self.args.redis_url, workdir=self.workdir)
        self.url = self.server.url
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.gateway = self._spawn("gateway", [  # it needs no model: it starts while the model is built
            "gateway", "--redis-url", self.url, "--prefix", PREFIX, "--port", str(self.port), "--event-readers",
            str(self.args.event_readers), "--no-status-page", "--grace-s", "5", "--log-level", "warning"], 1)
        model_dir = self.workdir / "tiny"
        subprocess.run([sys.executable, "-m", "producer.cli", "make-tiny-model", str(model_dir)], env=child_env(1),
                       cwd=ROOT, check=True, capture_output=True)
        self.vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        seqs = self.args.max_num_seqs or max(self.args.concurrency)
        max_len = max(64, self.args.prompt_len + self.args.max_tokens + 16)
        self.worker = self._spawn("worker", [
            "worker", "--model-name", MODEL, "--model-path", str(model_dir), "--redis-url", self.url, "--prefix",
            PREFIX, "--threads", str(self.args.threads), "--max-num-seqs", str(seqs), "--max-model-len", str(max_len),
            "--no-prefix-cache", "--max-queue-len", "0", "--grace-s", "5"], self.args.threads)
        self._wait(self._worker_registered, "the worker to register")
        self._wait(self._gateway_ready, "the gateway to answer /ready")

    def _spawn(self, name: str, argv: list[str], threads: int) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "producer.cli", *argv], env=child_env(threads), cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def _wait(self, ready, what: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    def _worker_registered(self) -> bool:
        with connect(self.url) as rds:
            return bool(rds.zcard(Keys(PREFIX).model_workers(MODEL)))

    def _gateway_ready(self) -> bool:
        try:
            return httpx.get(self.base_url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pids(self) -> dict[str, int]:
        pids = {"worker": self.worker.pid, "gateway": self.gateway.pid}
        if self.server.proc is not None:
            pids["redis-server"] = self.server.proc.pid
        return pids

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in self.workdir.glob("*.log"))

    def stop(self) -> None:
        stop_all(self.procs)
        if self.server is not None:
            self.server.close()


# ---------------------------------------------------------------- one stream, along each path


@dataclass
class Stream:
    """When one stream's visible text arrived."""

    t0: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    text: list[str] = field(default_factory=list)
    error: str | None = None  # the stream failed: counted, its figures left out
    _last: float = 0.0

    def saw(self, text: str) -> None:
        now = time.perf_counter()
        if self.ttft_s is None:
            self.ttft_s = now - self.t0
        else:
            self.gaps_s.append(now - self._last)
        self._last = now
        self.text.append(text)


async def direct_stream(client: AsyncClient, model, prompt: list[int], max_tokens: int, request_id: str) -> Stream:
    s = Stream()
    config = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "request_id": request_id}
    await model.submit(TaskKind.GENERATE, {"prompt_token_ids": prompt}, config)
    async for event in client.events(request_id, timeout_s=TIMEOUT_S):
        if event.type == EventType.TOKEN:
            s.tokens += len(event.token_ids or [])
            if event.text:
                s.saw(event.text)
        elif event.is_terminal and event.type != EventType.DONE:
            raise RuntimeError(f"request {request_id} ended with {event.type.value}: {event.message}")
    return s


def _body(prompt: list[int], max_tokens: int, request_id: str) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "request_id": request_id}


async def openai_stream(client, prompt: list[int], max_tokens: int, request_id: str) -> Stream:
    s = Stream()
    body = _body(prompt, max_tokens, request_id)
    extra = {k: body.pop(k) for k in ("ignore_eos", "request_id")}  # redbatch's keys go in extra_body
    stream = await client.completions.create(**body, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            s.saw(chunk.choices[0].text)
        if chunk.usage is not None:
            s.tokens = chunk.usage.completion_tokens
    return s


async def httpx_stream(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, request_id: str) -> Stream:
    s = Stream()
    async with client.stream("POST", "/v1/completions", json=_body(prompt, max_tokens, request_id)) as response:
        if response.status_code != 200:
            raise RuntimeError(f"request {request_id}: HTTP {response.status_code}: {(await response.aread())[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"request {request_id}: {chunk['error']}")
            if chunk["choices"] and chunk["choices"][0].get("text"):
                s.saw(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
    return s


# ---------------------------------------------------------------- one run: N streams at once along one path


@dataclass
class Run:
    path: str
    concurrency: int
    streams: list[Stream]
    wall_s: float
    cpu_s: dict[str, float]  # process name -> CPU seconds during the run ("client": this process)
    connections: dict[str, int]  # client name -> most connections at once in CLIENT LIST

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)


class ConnectionSampler:
    """Counts CLIENT LIST entries by client name every `interval_s` while it runs; keeps the peak of each."""

    def __init__(self, url: str, interval_s: float = 0.25):
        self.redis = connect_async(url, client_name="rb-bench-sampler")
        self.interval_s = interval_s
        self.peak: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            counts = Counter(c.get("name", "") for c in await self.redis.client_list())
            for name, n in counts.items():
                self.peak[name] = max(self.peak[name], n)
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
                return
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> dict[str, int]:
        self._stop.set()
        try:
            await self._task
        finally:
            await self.redis.aclose()
        return dict(self.peak)


def prompts(num: int, length: int, vocab_size: int) -> list[list[int]]:
    """Distinct prompts of plain (non-special) token ids, the same for every path."""
    span = vocab_size - FIRST_PLAIN_ID
    return [[FIRST_PLAIN_ID + (i * 37 + k * 11 + k * k) % span for k in range(length)] for i in range(num)]


async def run_path(stack: Stack, path: str, batch: list[list[int]], max_tokens: int, tag: str) -> Run:
    """Open len(batch) streams at once along `path`; each client is fresh, so connecting is part of the run."""
    n = len(batch)
    ids = [f"{tag}-{path}-{i}" for i in range(n)]
    if path == "direct":
        # one connection per open stream (each blocks in its own XREAD): redis-py's default pool of 100 is too few
        redis_client = connect_async(stack.url, max_connections=n + 16, client_name=DIRECT_CLIENT_NAME)
        client = AsyncClient(redis_client=redis_client, prefix=PREFIX)
        model = await client.get_model(MODEL)
        one, close = (lambda p, rid: direct_stream(client, model, p, max_tokens, rid)), client.aclose
    elif path == "openai":
        import openai

        http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0,
                                    timeout=TIMEOUT_S, http_client=http)
        one, close = (lambda p, rid: openai_stream(client, p, max_tokens, rid)), client.close
    else:
        client = httpx.AsyncClient(base_url=stack.base_url, timeout=TIMEOUT_S,
                                   limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        one, close = (lambda p, rid: httpx_stream(client, p, max_tokens, rid)), client.aclose
    sampler = ConnectionSampler(stack.url)
    try:
        before, t0 = _cpu(stack.pids), time.perf_counter()
        streams = await asyncio.gather(*(_guarded(one(p, rid)) for p, rid in zip(batch, ids)))
        wall_s, after = time.perf_counter() - t0, _cpu(stack.pids)
    finally:
        connections = await sampler.stop()
        await close()
    return Run(path, n, list(streams), wall_s, {k: after[k] - before[k] for k in after}, connections)


async def _guarded(stream) -> Stream:
    """A stream that fails (an HTTP 500, a dropped connection) is one failed stream, not a lost run."""
    try:
        return await stream
    except Exception as exc:  # noqa: BLE001 - counted and shown in the table
        return Stream(error=f"{type(exc).__name__}: {str(exc)[:200]}")


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {"client": sum(os.times()[:2])}
    out.update({name: cpu_seconds(pid) for name, pid in pids.items()})
    return out


async def measure(stack: Stack, args: argparse.Namespace) -> list[list[Run]]:
    """Every path at every concurrency, `rounds` times (the order reversed every other round); one list per
    (concurrency, path) of its runs."""
    for path in args.paths:  # first-call costs (imports, the gateway's model lookup, the worker's first steps)
        await run_path(stack, path, prompts(2, args.prompt_len, stack.vocab_size), 4, "warmup")
    results: dict[tuple[int, str], list[Run]] = {}
    for n in args.concurrency:
        batch = prompts(n, args.prompt_len, stack.vocab_size)
        for r in range(args.rounds):
            for path in args.paths if r % 2 == 0 else reversed(args.paths):
                run = await run_path(stack, path, batch, args.max_tokens, f"c{n}r{r}")
                results.setdefault((n, path), []).append(run)
                failed = [st.error for st in run.streams if st.error]
                print(f"  {n} streams, {path}: {run.tokens} tokens in {run.wall_s:.2f} s"
                      + (f", {len(failed)} failed, e.g. {failed[0]}" if failed else ""), file=sys.stderr, flush=True)
    return [results[(n, path)] for n in args.concurrency for path in args.paths]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    workdir = Path(args.log_dir or tempfile.mkdtemp(prefix="rb-gw-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(args, workdir)
    try:
        stack.start()
        grouped = asyncio.run(measure(stack, args))
    except Exception:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        if args.log_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for i, runs in enumerate(grouped):
        reference = grouped[i - i % len(args.paths)]  # the direct runs of the same concurrency
        rows.append(summarize(runs, None if runs[0].path == "direct" else reference))
    print(f"gateway overhead: tiny Llama (2 layers, hidden 64), worker max_num_seqs "
          f"{args.max_num_seqs or max(args.concurrency)}, {args.threads} thread(s), prompt {args.prompt_len} tokens, "
          f"max_tokens {args.max_tokens} (ignore_eos), greedy; gateway: 1 uvicorn process, "
          f"{args.event_readers} event reader(s); {os.cpu_count()} CPUs shared by every process")
    print("\n".join(table_lines(rows)))
    print("\n".join(cpu_lines(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
