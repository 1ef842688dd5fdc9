"""Shared fixtures: tiny models, a real Redis server, workers in threads, request factories."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from producer.protocol import GenerateBody, GenerateConfig, Request, TaskKind

TEST_THREADS = int(os.environ.get("REDBATCH_TEST_THREADS", "1"))
GATE_WAIT_S = 30  # a held step that nobody releases fails its test instead of hanging it


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    torch.set_num_threads(TEST_THREADS)
    _quiet_transformers()
    return TEST_THREADS


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, torch_threads) -> Path:
    from worker.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory, torch_threads) -> Path:
    from worker.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_path):
    from worker.models.loading import load_llm

    return load_llm(str(tiny_llama_path))


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_qwen2_path):
    from worker.models.loading import load_llm

    return load_llm(str(tiny_qwen2_path))


MULTIBYTE_TEXT = "😀東京 naïve ∑∞λ end"  # the tiny tokenizer splits 😀, 東, ∑ and ∞ across tokens
MULTIBYTE_PROMPT = "go"


@pytest.fixture(scope="session")
def multibyte_llama(tmp_path_factory, torch_threads):
    """(path, (model, tokenizer)): a rigged tiny Llama whose greedy reply to MULTIBYTE_PROMPT is the tokens of
    MULTIBYTE_TEXT, then EOS."""
    from worker.models.loading import load_llm
    from worker.models.tiny import make_tokenizer

    path = tmp_path_factory.mktemp("multibyte-llama")
    tokenizer = make_tokenizer(path)
    ids = tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    trigger = tokenizer(MULTIBYTE_PROMPT).input_ids[-1]
    assert len(set(ids)) == len(ids) and trigger not in ids, "each token of the reply must appear once"
    eos = tokenizer.eos_token_id
    successor = dict.fromkeys(range(len(tokenizer)), eos)
    successor.update({trigger: ids[0], **dict(itertools.pairwise(ids)), ids[-1]: eos})
    save_successor_llama(path, tokenizer, successor, eos_ids=[eos])
    return path, load_llm(str(path))


def make_request(request_id: str, prompt_ids: list[int], **config) -> Request:
    config.setdefault("temperature", 0.0)
    body = GenerateBody(prompt_token_ids=prompt_ids, generate_config=GenerateConfig(**config))
    return Request(id=request_id, task=TaskKind.GENERATE, body=body, created_ms=0)


def save_successor_llama(out_dir: Path, tokenizer, successor: dict[int, int], eos_ids: list[int]) -> None:
    """Save a tiny Llama whose greedy next token after t is successor[t] (for every t in the vocabulary).

    The one layer's o_proj and down_proj are zero, so the last hidden state is the current token's one-hot
    embedding, and lm_head maps it to its successor."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    vocab = len(tokenizer)
    hidden = 8 * math.ceil(vocab / 8)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))  # token t -> unit vector t
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, hidden)
        head[[successor[t] for t in range(vocab)], list(range(vocab))] = 1.0
        model.lm_head.weight.copy_(head)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=eos_ids, do_sample=False)
    model.save_pretrained(out_dir)


# ---------------------------------------------------------------- real Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory):
    """REDBATCH_TEST_REDIS_URL if set (CI starts its own server), else a redis-server we start here."""
    url = os.environ.get("REDBATCH_TEST_REDIS_URL")
    if url:
        redis.Redis.from_url(url).ping()
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no Redis: set REDBATCH_TEST_REDIS_URL or install redis-server")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def rds(redis_server_url, prefix):
    client = redis.Redis.from_url(redis_server_url)
    yield client
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


class WorkerThread:
    """A real worker loop (real Redis, tiny model) running in a thread of the test process."""

    def __init__(self, worker):
        self.worker = worker
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self):
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test by stop()
            self.error = exc

    def start(self) -> WorkerThread:
        self.thread.start()
        assert self.worker.ready.wait(30), "worker did not register"
        return self

    @property
    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout_s: float = 30) -> None:
        self.worker.request_stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------- steps the test holds


class StepGate:
    """Wraps engine.step: the steps numbered in `hold` (1-based) wait until the test releases them."""

    def __init__(self, engine, hold: set[int]):
        self._step = engine.step
        self.num_calls = 0
        self.entered = {n: threading.Event() for n in hold}
        self.released = {n: threading.Event() for n in hold}
        engine.step = self

    def __call__(self):
        self.num_calls += 1
        n = self.num_calls
        if n in self.entered:
            self.entered[n].set()
            if not self.released[n].wait(GATE_WAIT_S):
                raise RuntimeError(f"step {n} was never released")
        return self._step()

    def wait_entered(self, n: int) -> None:
        assert self.entered[n].wait(GATE_WAIT_S), f"step {n} never started"

    def release(self, n: int) -> None:
        self.released[n].set()

    def release_all(self) -> None:
        for event in self.released.values():
            event.set()


def build_worker_thread(server_url: str, prefix: str, tiny_llama, tiny_llama_path, model_name: str = "tiny",
                        model=None, **overrides) -> WorkerThread:
    """A worker on the tiny Llama (or `model`: a (model, tokenizer) pair) against redis_url, not started."""
    from worker.config import WorkerConfig
    from worker.engines.llm import LLMEngine, LLMEngineConfig
    from worker.loop import Worker
    from worker.streams import WorkerStreams

    hf_model, tokenizer = model or tiny_llama
    options = {"model_name": model_name, "model_path": str(tiny_llama_path), "redis_url": server_url, "prefix": prefix,
               "read_block_ms": 100, "heartbeat_interval_s": 0.2, "grace_s": 5.0}
    options.update(overrides)
    config = WorkerConfig(**options)
    engine = LLMEngine(hf_model, tokenizer, LLMEngineConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len, max_tokens_limit=config.max_tokens_limit,
        max_cached_tokens=config.kv_cache_tokens, tool_parser=config.tool_parser))
    streams = WorkerStreams(redis.Redis.from_url(config.redis_url), config)
    return WorkerThread(Worker(config, engine, streams))


@pytest.fixture
def worker_factory(redis_server_url, prefix, rds, tiny_llama, tiny_llama_path):
    """Build (not start) workers on the tiny Llama: worker_factory(max_num_seqs=4, ...) -> WorkerThread.

    Depends on `rds` so that workers stop before the test's keys are deleted.
    """
    made: list[WorkerThread] = []

    def make(**overrides) -> WorkerThread:
        handle = build_worker_thread(redis_server_url, prefix, tiny_llama, tiny_llama_path, **overrides)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        if handle.is_alive:
            handle.stop()


# ---------------------------------------------------------------- tiny FLUX


@pytest.fixture(scope="session")
def tiny_flux_paths(tmp_path_factory, torch_threads) -> dict[str, Path]:
    """Tiny random FLUX.1-dev-like (guidance embedding) and schnell-like (none) pipelines, saved to disk."""
    pytest.importorskip("diffusers", reason="the image extra (diffusers) is not installed")
    from worker.models.tiny_flux import make_tiny_flux

    root = tmp_path_factory.mktemp("tiny-flux")
    return {"dev": make_tiny_flux(root / "dev", guidance=True, seed=0),
            "schnell": make_tiny_flux(root / "schnell", guidance=False, seed=1)}


@pytest.fixture(scope="session")
def tiny_flux_pipes(tiny_flux_paths):
    """The two tiny pipelines loaded with from_pretrained (fp32, CPU), shared read-only by tests."""
    from worker.models.loading import load_diffusers

    return {kind: load_diffusers(str(path)) for kind, path in tiny_flux_paths.items()}


@pytest.fixture(scope="session")
def tiny_sd3_paths(tmp_path_factory, torch_threads) -> dict[str, Path]:
    """Tiny random Stable Diffusion 3 pipelines, saved to disk: SD3's fixed shift, and dynamic shifting."""
    pytest.importorskip("diffusers", reason="the image extra (diffusers) is not installed")
    from worker.models.tiny_sd3 import make_tiny_sd3

    root = tmp_path_factory.mktemp("tiny-sd3")
    return {"sd3": make_tiny_sd3(root / "sd3", seed=2),
            "sd3-dynamic": make_tiny_sd3(root / "sd3-dynamic", seed=3, dynamic_shift=True)}


@pytest.fixture(scope="session")
def tiny_sd3_pipes(tiny_sd3_paths):
    """The tiny SD3 pipelines loaded with from_pretrained (fp32, CPU), shared read-only by tests."""
    from worker.models.loading import load_diffusers

    return {kind: load_diffusers(str(path)) for kind, path in tiny_sd3_paths.items()}


def build_image_worker_thread(server_url: str, prefix: str, pipe, model_path, model_name: str = "flux",
                              **overrides) -> WorkerThread:
    """A worker serving a tiny pipeline (already loaded) through the image engine, not started."""
    from worker.config import WorkerConfig
    from worker.engines.image import ImageEngine, ImageEngineConfig
    from worker.loop import Worker
    from worker.streams import WorkerStreams

    options = {"model_name": model_name, "model_path": str(model_path), "redis_url": server_url, "prefix": prefix,
               "read_block_ms": 100, "heartbeat_interval_s": 0.2, "grace_s": 5.0, "task": "text_to_image",
               "max_sequence_length": 64, "max_num_seqs": 8}
    options.update(overrides)
    config = WorkerConfig(**options)
    engine = ImageEngine(pipe, ImageEngineConfig(
        max_num_seqs=config.max_num_seqs, max_images_per_request=config.max_images_per_request,
        max_inference_steps=config.max_inference_steps, allowed_sizes=config.allowed_image_sizes,
        progress_every_steps=config.progress_every_steps, max_sequence_length=config.max_sequence_length,
        output_dir=config.image_output_dir))
    streams = WorkerStreams(redis.Redis.from_url(config.redis_url), config)
    return WorkerThread(Worker(config, engine, streams))


@pytest.fixture
def image_worker_factory(request, redis_server_url, prefix, rds):
    """Build (not start) workers on a tiny pipeline: image_worker_factory("dev" | "schnell" | "sd3", **config)
    -> WorkerThread (FLUX.1-dev-like, schnell-like, Stable Diffusion 3); the tiny models are built on first use."""
    made: list[WorkerThread] = []

    def make(kind: str = "dev", **overrides) -> WorkerThread:
        family = "tiny_sd3" if kind.startswith("sd3") else "tiny_flux"
        pipes, paths = request.getfixturevalue(f"{family}_pipes"), request.getfixturevalue(f"{family}_paths")
        handle = build_image_worker_thread(redis_server_url, prefix, pipes[kind], paths[kind], **overrides)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        if handle.is_alive:
            handle.stop()


# ---------------------------------------------------------------- the HTTP gateway, in a thread


class GatewayThread:
    """`redbatch gateway`'s app under a real uvicorn server on a free port, in a thread of the test process."""

    def __init__(self, config):
        import uvicorn

        from producer.gateway import create_app

        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=config.port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=2))
        self.url = f"http://127.0.0.1:{config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def gateway(self):
        return self.app.state.gateway

    def start(self) -> GatewayThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "gateway did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "gateway did not stop"


@pytest.fixture
def gateway_factory(redis_server_url, prefix, rds):
    """Start gateways on this test's prefix: gateway_factory(api_keys={...}) -> GatewayThread (started)."""
    pytest.importorskip("fastapi", reason="the gateway extra is not installed")
    from producer.gateway import GatewayConfig

    made: list[GatewayThread] = []

    def make(**overrides) -> GatewayThread:
        options = {"redis_url": redis_server_url, "prefix": prefix, "port": _free_port(), "model_info_ttl_s": 0}
        options.update(overrides)
        handle = GatewayThread(GatewayConfig(**options)).start()
        made.append(handle)
        return handle

    yield make
    for handle in made:
        if handle.thread.is_alive():
            handle.stop()
