"""The text_to_image benchmark: requests arriving over time with mixed step counts and two sizes, on tiny
seeded FLUX.1-dev-like and schnell-like pipelines and a tiny Stable Diffusion 3, fp32 on CPU.

    python -m bench.image | tee bench/results/image.txt    # ~15 min on a quiet 2-core machine
    python -m bench.image --num-requests 6 --workloads schnell   # the smoke size (tests/test_bench_image.py)

Contenders, on the same requests and arrival times:
  (a) the stock pipeline (FluxPipeline, StableDiffusion3Pipeline), one request at a time, in arrival order;
  (b) the stock pipeline on static batches: whenever it is free, the oldest waiting request and every
      waiting request of the same size and step count (up to a batch size), as one call with a prompt
      list and one CPU generator per image; run once per --static-batch-sizes value (diffusers' advice for
      throughput is the largest batch that fits: the sweep finds it), the best of them is the one to beat;
  (d) redbatch's image engine in this process, no Redis: requests added at their arrival times, steps
      run back to back (the engine's schedule alone, without the transport);
  (e) redbatch end to end: a `redbatch worker` process behind Redis, requests submitted by the async
      client at their arrival times, each waited for through its events.
(d) and (e) run once per --max-num-seqs value (redbatch's own main knob, swept like (b)'s batch size).
(d) and (e) first run the workload once untimed, as a long-lived worker has seen every shape before; the
stock pipeline is as warm after its calibration calls and (a)'s pass, which run before (b).
Reported: images/s over the run (first arrival to last image), p50/p99 latency (arrival to image), and
forward/wall: the time spent in the transformer's forward over the run's wall time (the worker's engine
profile for (e), which also gives the rest of its step: prompt encoders, Euler steps, VAE, PNG). Every contender's images are compared with (a)'s (PNG pixels within 1 gray level).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from bench.procs import RedisServer, child_env, stop_all
from bench.redbatch_runs import _watched
from producer.aio import AsyncClient
from producer.protocol import EventType, TaskKind

MODEL = "bench-image"
PREFIX = "rbimg"
TOKENS = 64  # T5 max_sequence_length for every contender
WORDS = ["a", "red", "cat", "dog", "river", "stone", "cloud", "over", "the", "mountain", "at", "night", "under", "rain", "green", "tree", "blue", "light", "sun"]


@dataclass(frozen=True)
class ImageRequest:
    request_id: str
    prompt: str
    size: str  # "W*H"
    num_steps: int
    seed: int
    arrival_s: float  # after the run's start

    @property
    def width_height(self) -> tuple[int, int]:
        width, height = self.size.split("*")
        return int(width), int(height)


@dataclass
class Result:
    request_id: str
    latency_s: float
    finish_s: float
    png: bytes


@dataclass
class Row:
    contender: str
    workload: str
    num_images: int
    wall_s: float
    images_per_s: float
    p50_s: float
    p99_s: float
    forward_s: float
    same_images: str  # vs (a): "yes", "no (N differ)", or "-" for (a)
    notes: str = ""
    profile: dict[str, float] = field(default_factory=dict)  # (e): the engine's seconds per phase during the run

    @property
    def forward_share(self) -> float:
        return self.forward_s / self.wall_s if self.wall_s else 0.0


@dataclass
class Workload:
    name: str
    kind: str  # dev | schnell
    requests: list[ImageRequest] = field(default_factory=list)
    rate_per_s: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.image", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="dev,schnell,mixed,sd3",
                   help="dev (20-28 steps), schnell (4 steps on the schnell-like model), mixed (4 or 20-28 "
                        "steps, half each, on the dev-like model), sd3 (20-28 steps on a tiny Stable Diffusion 3, "
                        "classifier-free guidance 7.0)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--sizes", default="32*32,48*32")
    p.add_argument("--load", type=float, default=8.0,
                   help="arrival rate as a multiple of (a)'s service rate: high enough that every contender is "
                        "busy (images/s measures capacity, not the arrival rate)")
    p.add_argument("--max-num-seqs", default="16,32",
                   help="redbatch's images in flight ((d) and (e) run once per value; 16 is the worker's default)")
    p.add_argument("--static-batch-sizes", default="4,8,16,32",
                   help="(b) runs once per batch size; the best is the contender to beat")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes of (b), (d) and (e) each (runs of a second or less vary ~2x on a shared "
                        "machine); the pass with the median images/s is reported, with the others in its notes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


# ---------------------------------------------------------------- models and workloads


def build_models(root: Path, kinds: list[str]) -> dict[str, Path]:
    """Tiny FLUX pipelines (hidden 32, 1 double + 2 single blocks): steps of a few ms, where batching pays
    as it does for a real model on an accelerator that one image leaves underused."""
    from worker.models.tiny_flux import make_tiny_flux
    from worker.models.tiny_sd3 import make_tiny_sd3

    return {k: make_tiny_sd3(root / k, seed=7) if k == "sd3" else
            make_tiny_flux(root / k, guidance=k == "dev", seed=7, hidden=32, num_layers=1, num_single_layers=2)
            for k in kinds}


MODEL_OF = {"dev": "dev", "schnell": "schnell", "mixed": "dev", "sd3": "sd3"}
MODEL_TITLE = {"dev": "tiny FLUX.1-dev-like", "schnell": "tiny FLUX.1-schnell-like",
               "sd3": "tiny Stable Diffusion 3 (CFG 7.0)"}


def make_requests(workload: str, num: int, sizes: list[str], seed: int) -> list[ImageRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        if workload == "schnell" or (workload == "mixed" and i % 2):
            steps = 4
        else:
            steps = rng.randint(20, 28)
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        out.append(ImageRequest(f"{workload}-{i}", prompt, rng.choice(sizes), steps, seed=1000 + i, arrival_s=0.0))
    return out


def with_arrivals(requests: list[ImageRequest], rate_per_s: float, seed: int) -> list[ImageRequest]:
    """Poisson arrivals at rate_per_s, the first at t=0."""
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for i, r in enumerate(requests):
        if i:
            t += rng.expovariate(rate_per_s)
        out.append(ImageRequest(r.request_id, r.prompt, r.size, r.num_steps, r.seed, round(t, 4)))
    return out


# ---------------------------------------------------------------- the stock pipeline


class ForwardClock:
    """Seconds spent inside the transformer's forward (hooks around it)."""

    def __init__(self, transformer):
        self.total_s = 0.0
        self._start = 0.0
        transformer.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        transformer.register_forward_hook(lambda *_: self._stop())

    def _stop(self) -> None:
        self.total_s += time.perf_counter() - self._start


def load_stock(path: Path):
    from worker.models.loading import load_diffusers

    pipe = load_diffusers(str(path))
    return pipe, ForwardClock(pipe.transformer)


def stock_call(pipe, batch: list[ImageRequest]) -> list[bytes]:
    """One stock pipeline call for requests of one size and step count, at the pipeline's default guidance
    (FLUX 3.5; SD3 7.0 with the negative prompt ""), as redbatch's; PNG bytes per request."""
    width, height = batch[0].width_height
    images = pipe([r.prompt for r in batch], height=height, width=width, num_inference_steps=batch[0].num_steps,
                  generator=[torch.Generator("cpu").manual_seed(r.seed) for r in batch],
                  max_sequence_length=TOKENS).images
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def run_sequential(pipe, requests: list[ImageRequest]) -> tuple[list[Result], float]:
    t0 = time.perf_counter()
    results = []
    for r in requests:
        _sleep_until(t0, r.arrival_s)
        (png,) = stock_call(pipe, [r])
        now = time.perf_counter() - t0
        results.append(Result(r.request_id, now - r.arrival_s, now, png))
    return results, t0


def run_static(pipe, requests: list[ImageRequest], max_batch: int) -> tuple[list[Result], float]:
    t0 = time.perf_counter()
    pending = list(requests)
    results = []
    while pending:
        now = time.perf_counter() - t0
        arrived = [r for r in pending if r.arrival_s <= now]
        if not arrived:
            _sleep_until(t0, pending[0].arrival_s)
            continue
        key = (arrived[0].size, arrived[0].num_steps)
        batch = [r for r in arrived if (r.size, r.num_steps) == key][:max_batch]
        pngs = stock_call(pipe, batch)
        now = time.perf_counter() - t0
        for r, png in zip(batch, pngs):
            results.append(Result(r.request_id, now - r.arrival_s, now, png))
            pending.remove(r)
    return results, t0


def _sleep_until(t0: float, offset_s: float) -> None:
    delay = t0 + offset_s - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# ---------------------------------------------------------------- redbatch end to end


def run_engine(path: Path, requests: list[ImageRequest], max_num_seqs: int, repeats: int
               ) -> list[tuple[list[Result], dict[str, float]]]:
    """(d): the image engine in this process, fed at the arrival times, `repeats` timed passes after an untimed
    one; each pass's results and profile. PNG bytes come from the engine's own outputs (as the worker
    publishes them)."""
    from producer.protocol import Request, TextToImageBody
    from worker.engines.image import ImageEngine, ImageEngineConfig
    from worker.models.loading import load_diffusers

    engine = ImageEngine(load_diffusers(str(path)), ImageEngineConfig(
        max_num_seqs=max_num_seqs, max_sequence_length=TOKENS, progress_every_steps=0))

    def request(r: ImageRequest) -> Request:
        return Request(id=r.request_id, task=TaskKind.TEXT_TO_IMAGE, created_ms=0, body=TextToImageBody(
            prompt=r.prompt, size=r.size, num_inference_steps=r.num_steps, seed=r.seed, response_format="png"))

    _feed(engine, request, requests, "-warm")  # a long-lived worker's steady state: every shape seen once
    passes = []
    for _ in range(repeats):
        before = dict(engine.profile)
        results = _feed(engine, request, requests, "")
        passes.append((results, {k: round(v - before[k], 3) for k, v in engine.profile.items()}))
    return passes


def _feed(engine, request, requests: list[ImageRequest], suffix: str) -> list[Result]:
    """Add requests at their arrival times (as the worker reads: up to num_free) and step until idle."""
    by_id = {r.request_id + suffix: r for r in requests}
    pending, results = list(requests), []
    t0 = time.perf_counter()
    while pending or engine.num_active:
        now = time.perf_counter() - t0
        while pending and pending[0].arrival_s <= now and engine.num_free > 0:
            r = pending.pop(0)
            engine.add(request(ImageRequest(r.request_id + suffix, r.prompt, r.size, r.num_steps, r.seed, 0.0)))
        if not engine.num_active:
            _sleep_until(t0, pending[0].arrival_s)
            continue
        for out in engine.step():
            if out.is_finished:
                now = time.perf_counter() - t0
                r = by_id[out.seq.request_id]
                results.append(Result(r.request_id, now - r.arrival_s, now, out.pngs[0]))
    return results


def run_redbatch(args, path: Path, requests: list[ImageRequest], max_num_seqs: int
                 ) -> list[tuple[list[Result], dict[str, float]]]:
    """(e): one worker, `args.repeats` timed passes after an untimed one; each pass's results and the worker's
    engine profile (seconds per phase) during it."""
    server = RedisServer(args.redis_url)
    log_path = Path(tempfile.mkdtemp(prefix="redbatch-bench-image-")) / "worker.log"
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", MODEL, "--model-path", str(path),
           "--redis-url", server.url, "--prefix", PREFIX, "--threads", str(args.threads),
           "--max-num-seqs", str(max_num_seqs), "--max-sequence-length", str(TOKENS),
           "--progress-every-steps", "0", "--max-queue-len", "0", "--grace-s", "5", "--heartbeat-interval-s", "0.2"]
    env = child_env(args.threads)
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        return asyncio.run(_produce(server.url, requests, worker, log_path, args.repeats))
    finally:
        stop_all([worker])
        server.close()


async def _produce(url: str, requests: list[ImageRequest], worker, log_path: Path, repeats: int
                   ) -> list[tuple[list[Result], dict[str, float]]]:
    client = AsyncClient(url, prefix=PREFIX)
    try:
        model = await _watched(_wait_model(client), worker, log_path)
        # one untimed pass of the workload first: a long-lived worker's steady state (every shape seen once; the
        # stock contenders are as warm after their calibration and (a)'s pass)
        warm_t0 = time.perf_counter()
        await _watched(asyncio.gather(*(_one(model, client, r, warm_t0, "w") for r in requests)), worker, log_path)
        passes = []
        for _ in range(repeats):
            await asyncio.sleep(0.5)  # a heartbeat after the last pass carries the profile this one starts from
            before = await _profile(client)
            t0 = time.perf_counter()
            tag = str(int(t0 * 1000))
            results = await _watched(asyncio.gather(*(_one(model, client, r, t0, tag) for r in requests)), worker,
                                     log_path)
            await asyncio.sleep(1.5)  # the next heartbeat carries the engine's profile after the last step
            after = await _profile(client)
            passes.append((list(results), {k: round(after[k] - before.get(k, 0.0), 3) for k in after}))
        return passes
    finally:
        await client.aclose()


async def _wait_model(client: AsyncClient, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await client.redis.zcard(client.keys.model_workers(MODEL)):
            return await client.get_model(MODEL)
        await asyncio.sleep(0.2)
    raise SystemExit("the benchmark's image worker did not register")


PHASES = ("forward_s", "encode_s", "euler_s", "decode_s", "png_s")  # the image engine's profile, in its heartbeat


async def _profile(client: AsyncClient) -> dict[str, float]:
    (worker_id,) = await client.redis.zrange(client.keys.model_workers(MODEL), 0, -1)
    raw = await client.redis.hmget(client.keys.worker(worker_id.decode()), PHASES)
    return {phase: float(value or 0) for phase, value in zip(PHASES, raw)}


async def _one(model, client: AsyncClient, r: ImageRequest, t0: float, tag: str) -> Result:
    await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
    body = {"prompt": r.prompt, "size": r.size, "num_inference_steps": r.num_steps, "seed": r.seed,
            "response_format": "png"}
    request_id = await model.submit(TaskKind.TEXT_TO_IMAGE, body, request_id=f"{r.request_id}-{tag}")
    png = b""
    async for event in client.events(request_id, timeout_s=3600):
        if event.type == EventType.IMAGE:
            png = event.data
        elif event.is_terminal and event.type != EventType.DONE:
            raise RuntimeError(f"{request_id} ended with {event.type.value}: {event.message}")
    now = time.perf_counter() - t0
    return Result(r.request_id, now - r.arrival_s, now, png)


# ---------------------------------------------------------------- the report


def to_row(contender: str, workload: Workload, results: list[Result], forward_s: float,
           reference: dict[str, bytes] | None, profile: dict[str, float] | None = None) -> Row:
    latencies = sorted(r.latency_s for r in results)
    wall_s = max(r.finish_s for r in results)
    same = "-"
    if reference is not None:
        num_differ = sum(not _same_png(r.png, reference[r.request_id]) for r in results)
        same = "yes" if num_differ == 0 else f"no ({num_differ} differ)"
    return Row(contender, workload.name, len(results), round(wall_s, 3), round(len(results) / wall_s, 3),
               round(statistics.median(latencies), 3), round(_quantile(latencies, 0.99), 3), round(forward_s, 3), same,
               profile=profile or {})


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _same_png(a: bytes, b: bytes) -> bool:
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
    y = np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
    return x.shape == y.shape and int(np.abs(x - y).max()) <= 1


NAMES = {"a": "(a) stock, one at a time", "b": "(b) stock, static batches", "d": "(d) redbatch engine, in process",
         "e": "(e) redbatch end to end"}


def static_name(batch_size: int) -> str:
    return f"{NAMES['b']} <= {batch_size}"


def redbatch_name(kind: str, max_num_seqs: int) -> str:
    return f"{NAMES[kind]}, max_num_seqs {max_num_seqs}"


def print_table(rows: list[Row], workloads: list[Workload], args) -> None:
    print(f"text_to_image benchmark: {args.num_requests} requests/workload, sizes {args.sizes}, redbatch "
          f"max_num_seqs {args.max_num_seqs}, static batch sizes {args.static_batch_sizes}, {args.threads} threads, "
          f"fp32 CPU, T5 {TOKENS} tokens")
    for w in workloads:
        steps = sorted({r.num_steps for r in w.requests})
        print(f"\n## {w.name}: {MODEL_TITLE[w.kind]}, steps {', '.join(map(str, steps))}, Poisson arrivals at "
              f"{w.rate_per_s:.2f}/s over {w.requests[-1].arrival_s:.1f} s")
        mine = [r for r in rows if r.workload == w.name]
        best_peer = max((r.images_per_s for r in mine if r.contender.startswith(("(a)", "(b)"))), default=0.0)
        print("| contender | images/s | vs best stock | p50 s | p99 s | forward/wall | same images as (a) | passes |")
        print("|---|---|---|---|---|---|---|---|")
        for r in mine:
            ratio = r.images_per_s / best_peer if best_peer else 0.0
            print(f"| {r.contender} | {r.images_per_s:.2f} | {ratio:.2f}x | {r.p50_s:.2f} | {r.p99_s:.2f} | "
                  f"{r.forward_share:.0%} | {r.same_images} | {r.notes.removeprefix('median of ') or '-'} |")
        for r in mine:
            if r.profile:
                print(f"\n{r.contender} over its {r.wall_s:.2f} s: " + ", ".join(
                    f"{phase[:-2]} {seconds:.3f} s ({seconds / r.wall_s:.0%})" for phase, seconds in r.profile.items())
                      + f"; the rest (loop, Redis, waiting for arrivals) {1 - sum(r.profile.values()) / r.wall_s:.0%}")
        stock = max((r for r in mine if r.contender.startswith(("(a)", "(b)"))), key=lambda r: r.images_per_s,
                    default=None)
        ours = max((r for r in mine if r.contender.startswith("(e)")), key=lambda r: r.images_per_s, default=None)
        if stock and ours:
            print(f"\nbest end to end: {ours.contender} {ours.images_per_s:.2f} images/s = "
                  f"{ours.images_per_s / stock.images_per_s:.2f}x {stock.contender} ({stock.images_per_s:.2f}); "
                  f"p50 {ours.p50_s:.2f} vs {stock.p50_s:.2f} s")


def run_workload(args, w: Workload, path: Path) -> list[Row]:
    pipe, clock = load_stock(path)
    stock_call(pipe, [ImageRequest("warm", "warm up", w.requests[0].size, 2, 0, 0.0)])
    calib = []  # (a)'s service time per size at the workload's mean step count
    for size in args.sizes.split(","):
        steps = round(statistics.mean(r.num_steps for r in w.requests))
        started = time.perf_counter()
        stock_call(pipe, [ImageRequest("calib", "calibrate", size, steps, 1, 0.0)])
        calib.append(time.perf_counter() - started)
    w.rate_per_s = args.load / statistics.mean(calib)
    w.requests = with_arrivals(w.requests, w.rate_per_s, args.seed)
    rows = []
    clock.total_s = 0.0
    results, _ = run_sequential(pipe, w.requests)
    rows.append(to_row(NAMES["a"], w, results, clock.total_s, None))
    reference = {r.request_id: r.png for r in results}
    for batch_size in (int(b) for b in args.static_batch_sizes.split(",")):
        passes = []
        for _ in range(args.repeats):
            clock.total_s = 0.0
            results, _ = run_static(pipe, w.requests, batch_size)
            passes.append(to_row(static_name(batch_size), w, results, clock.total_s, reference))
        rows.append(median_row(passes))
    del pipe
    for max_num_seqs in (int(m) for m in str(args.max_num_seqs).split(",")):
        for kind, run in (("d", lambda m: run_engine(path, w.requests, m, args.repeats)),
                          ("e", lambda m: run_redbatch(args, path, w.requests, m))):
            rows.append(median_row([to_row(redbatch_name(kind, max_num_seqs), w, results, profile["forward_s"],
                                           reference, profile) for results, profile in run(max_num_seqs)]))
    return rows


def median_row(passes: list[Row]) -> Row:
    """The pass with the median images/s (its latencies and profile with it); `same_images` over all passes."""
    row = sorted(passes, key=lambda r: r.images_per_s)[len(passes) // 2]
    differ = [r.same_images for r in passes if r.same_images not in ("yes", "-")]
    if differ:
        row.same_images = differ[0]
    if len(passes) > 1:
        row.notes = "median of " + ", ".join(f"{r.images_per_s:.2f}" for r in passes)
    return row


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.workloads.split(",")
    with tempfile.TemporaryDirectory(prefix="redbatch-bench-image-") as root:
        paths = build_models(Path(root), sorted({MODEL_OF[n] for n in names}))
        workloads = [Workload(n, MODEL_OF[n], make_requests(n, args.num_requests, args.sizes.split(","), args.seed))
                     for n in names]
        rows = [row for w in workloads for row in run_workload(args, w, paths[w.kind])]
    print_table(rows, workloads, args)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
