"""A model bigger than one device: accelerate's device_map (with offload) and tensor parallelism (torchrun).

No GPU here. Devices: a model split over devices is shown with layers whose cache sits on `meta`
(PyTorch refuses to mix meta and CPU tensors in one op, so a layer handed another device's step
metadata fails), and accelerate's offload to disk runs for real. Tensor parallelism runs for real
over two gloo processes started by torchrun, through the worker CLI and a real Redis.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import make_request
from tests.test_attention import (BLOCK_SIZE, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALING, FakeAttention, mixed_cases,
                                  reference, slots_of)
from worker.config import WorkerConfig
from worker.engines import attention, tensor_parallel
from worker.engines.batch import build_step
from worker.engines.kv_cache import KVShape, PagedKVCache

CPU, META = torch.device("cpu"), torch.device("meta")
PROMPTS = [[1, 50, 60, 70, 80], [1, 9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [1, 300, 301]]
MAX_TOKENS = 8


# ---------------------------------------------------------------- layers on different devices


def test_each_layers_cache_lives_on_that_layers_device():
    cache = PagedKVCache(KVShape(3, NUM_KV_HEADS, HEAD_DIM, torch.float32), 8, BLOCK_SIZE, [CPU, META, META])

    assert [t.device for t in cache.keys] == [t.device for t in cache.values] == [CPU, META, META]
    assert cache.devices == [CPU, META] and cache.layers_on(META) == 2
    k_blocks, _ = cache.gather(1, torch.tensor([0, 3], device=META))
    assert k_blocks.device == META and k_blocks.shape == (2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    assert cache.gather(0, torch.tensor([0, 3]))[0].device == CPU  # each device its own gather buffer


def _attend(cache, step, layer: int, cases, device):
    packed = {id(c.chunk.seq): c for c in cases}
    order = [packed[id(chunk.seq)] for chunk in step.chunks]
    new = [slice(c.chunk.seq.num_computed, None) for c in order]
    query = torch.cat([c.queries for c in order]).transpose(0, 1)[None].to(device)
    key = torch.cat([c.keys[s] for c, s in zip(order, new)]).transpose(0, 1)[None].to(device)
    value = torch.cat([c.values[s] for c, s in zip(order, new)]).transpose(0, 1)[None].to(device)
    out, _ = attention.paged_attention(FakeAttention(layer), query, key, value, None, scaling=SCALING,
                                       **{attention.STEP_KWARG: step.attention})
    return order, out[0]


@pytest.mark.parametrize("flex_blocks", [None, (16, 16)])
def test_a_step_runs_on_each_layers_device_with_that_devices_metadata(flex_blocks):
    cases = mixed_cases()
    cache = PagedKVCache(KVShape(2, NUM_KV_HEADS, HEAD_DIM, torch.float32), 16, BLOCK_SIZE, [CPU, META])
    for case in cases:  # layer 0's cached prefix
        computed = slots_of(case, range(case.chunk.seq.num_computed))
        cache.keys[0][computed] = case.keys[: len(computed)]
        cache.values[0][computed] = case.values[: len(computed)]
    step = build_step([c.chunk for c in cases], cache, None, flex_blocks=flex_blocks)

    on_meta = step.attention.on(META)
    assert on_meta is not step.attention and step.attention.on(CPU) is step.attention
    assert on_meta.write_slots.device == META and on_meta.block_ids.device == META
    assert on_meta.block_ids.shape == step.attention.block_ids.shape
    if flex_blocks is not None:  # flex_attention itself refuses meta tensors: its block mask is built there
        assert on_meta.flex.block_ids.device == META and on_meta.flex.block_mask.kv_num_blocks.device == META
    else:  # layer 1 (meta) writes and attends with meta metadata only: any CPU tensor in its ops would raise
        _, out_meta = _attend(cache, step, 1, cases, META)
        assert out_meta.device == META and out_meta.shape == (sum(c.chunk.num_tokens for c in cases), NUM_HEADS,
                                                              HEAD_DIM)
    # layer 0 (CPU) is still exact
    order, out = _attend(cache, step, 0, cases, CPU)
    start = 0
    for case in order:
        got = out[start : start + case.chunk.num_tokens]
        start += case.chunk.num_tokens
        torch.testing.assert_close(got, reference(case), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- accelerate's device_map, offloaded to disk


def generate_reference(model_path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return [model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist()
            for p in prompts]


@pytest.fixture(scope="module")
def reference_tokens(tiny_llama_path):
    tokens = generate_reference(tiny_llama_path, PROMPTS)
    assert len({tuple(t) for t in tokens}) == len(PROMPTS)  # the model's output depends on its prompt
    return tokens


def run_engine(engine, prompts: list[list[int]]) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add(make_request(f"r{i}", prompt, max_tokens=MAX_TOKENS))
    out: dict[str, list[int]] = {}
    while engine.num_active:
        for step_out in engine.step():
            out.setdefault(step_out.seq.request_id, []).extend(step_out.token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]


OFFLOAD_MAPS = {
    # the embedding, layer 1 and the LM head on disk (their parameters on meta), run on the CPU
    "explicit": dict(device_map=json.dumps({"model.embed_tokens": "disk", "model.layers.0": "cpu",
                                            "model.layers.1": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                                            "lm_head": "disk"})),
    "auto": dict(device_map="auto", max_memory="cpu=100KB"),  # nothing fits: accelerate offloads it all to disk
}


@pytest.mark.parametrize("placement", sorted(OFFLOAD_MAPS))
def test_device_map_with_offload_serves_the_same_greedy_tokens(placement, tiny_llama_path, reference_tokens,
                                                                tmp_path, torch_threads):
    from worker.main import build_engine

    config = WorkerConfig(model_name="tiny", model_path=str(tiny_llama_path), offload_folder=str(tmp_path),
                          max_num_batched_tokens=8, max_model_len=64, kv_cache_tokens=256,
                          **OFFLOAD_MAPS[placement])
    engine = build_engine(config)

    assert any(p.device == META for p in engine.model.parameters())  # offloaded: not where they compute
    assert engine.kv.layer_devices == [CPU, CPU] and engine.device == CPU  # where they compute
    assert run_engine(engine, PROMPTS) == reference_tokens  # chunked prefills of 8 tokens, batched decode


# ---------------------------------------------------------------- configuration


def test_device_map_and_max_memory_are_parsed_and_checked(tmp_path):
    base = dict(model_name="m", model_path="p")
    assert WorkerConfig(**base, device_map="balanced").device_map_value == "balanced"
    inline = WorkerConfig(**base, device_map='{"model.layers.0": 0, "lm_head": "cpu"}', max_memory="0=70GiB,cpu=1TiB")
    assert inline.device_map_value == {"model.layers.0": 0, "lm_head": "cpu"}
    assert inline.max_memory_caps == {0: "70GiB", "cpu": "1TiB"}
    assert WorkerConfig(**base).device_map_value is None and WorkerConfig(**base).max_memory_caps is None
    path = tmp_path / "map.json"
    path.write_text('{"": "disk"}')
    assert WorkerConfig(**base, device_map=str(path)).device_map_value == {"": "disk"}
    for bad, message in [(dict(device_map="everywhere"), "device_map must be"),
                         (dict(device_map="{not json"), "not valid JSON"),
                         (dict(device_map='{"a": [0]}'), "module names to devices"),
                         (dict(device_map="auto", max_memory="0:70GiB"), "DEVICE=SIZE"),
                         (dict(device_map="auto", tp_size=2), "choose one"),
                         (dict(max_memory="0=1GiB"), "only apply with a device_map")]:
        with pytest.raises(ValueError, match=message):
            WorkerConfig(**base, **bad)


def test_tp_size_must_split_heads_whole(tiny_llama):
    config = tiny_llama[0].config  # 4 attention heads, 2 KV heads
    tensor_parallel.check_heads(config, 2)
    with pytest.raises(ValueError, match="--tp-size 4 must divide the model's 4 attention heads and 2 KV heads"):
        tensor_parallel.check_heads(config, 4)


def test_tp_size_outside_torchrun_says_how_to_launch():
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2 --no-python redbatch worker --tp-size 2"):
        tensor_parallel.check_launch(2, None)
    tensor_parallel.check_launch(2, "2")


def test_worker_cli_passes_the_sharding_flags(monkeypatch):
    from producer import cli

    seen = {}
    monkeypatch.setattr("worker.main.run_worker", lambda config, burst: seen.setdefault("config", config) and 0)
    cli.main(["worker", "--model-name", "m", "--model-path", "p", "--device-map", "sequential",
              "--max-memory", "0=10GiB", "--offload-folder", "/tmp/off"])
    assert (seen["config"].device_map, seen["config"].max_memory_caps, seen["config"].offload_folder) == (
        "sequential", {0: "10GiB"}, "/tmp/off")
    seen.clear()
    cli.main(["worker", "--model-name", "m", "--model-path", "p", "--tp-size", "4"])
    assert seen["config"].tp_size == 4


# ---------------------------------------------------------------- tensor parallelism: what travels, what fails


def test_followers_rebuild_rank_0s_packed_step_from_the_message():
    cases = mixed_cases()
    cache = PagedKVCache(KVShape(1, NUM_KV_HEADS, HEAD_DIM, torch.float32), 16, BLOCK_SIZE, CPU)
    chunks = [c.chunk for c in cases]
    leader = build_step(chunks, cache, sliding_window=2)
    follower = build_step(tensor_parallel.decode(tensor_parallel.encode(chunks)), cache, sliding_window=2)

    for name in ("input_ids", "position_ids", "logits_rows"):
        assert torch.equal(getattr(leader, name), getattr(follower, name)), name
    for a, b in [(leader.attention, follower.attention)]:
        assert torch.equal(a.write_slots, b.write_slots) and torch.equal(a.block_ids, b.block_ids)
        assert torch.equal(a.sliding[0], b.sliding[0])
        for ga, gb in zip(a.groups + a.sliding[1], b.groups + b.sliding[1]):
            assert (ga.start, ga.num_rows, ga.num_queries, ga.num_blocks, ga.num_keys, ga.is_causal) == (
                gb.start, gb.num_rows, gb.num_queries, gb.num_blocks, gb.num_keys, gb.is_causal)
            assert (ga.mask is None) == (gb.mask is None) and (ga.mask is None or torch.equal(ga.mask, gb.mask))
    assert [c.completes for c in leader.chunks] == [c.completes for c in follower.chunks]


class FakePeers:
    """A StepChannel without other ranks."""

    def __init__(self):
        self.sent, self.is_diverged, self.is_leader, self.rank, self.world_size = [], False, True, 0, 2

    def send(self, chunks):
        self.sent.append(tensor_parallel.encode(chunks))

    def min_across(self, value):
        return value


def test_a_failed_tensor_parallel_step_stops_the_worker_instead_of_failing_requests(tiny_llama):
    from worker.engines.llm import LLMEngine, LLMEngineConfig

    model, tokenizer = tiny_llama
    peers = FakePeers()
    engine = LLMEngine(model, tokenizer, LLMEngineConfig(max_num_seqs=2), peers=peers)
    engine.add(make_request("a", PROMPTS[0], max_tokens=2))
    assert len(engine.step()) == 1 and len(peers.sent) == 1  # the chunks went out before the forward

    def broken(*args, **kwargs):
        raise torch.OutOfMemoryError("the device is full")

    engine.model.forward, real = broken, engine.model.forward
    try:
        with pytest.raises(tensor_parallel.RanksDiverged, match="the other ranks cannot follow"):
            engine.step()  # no OOM retry: the other ranks already ran this step's collectives
    finally:
        engine.model.forward = real
    assert peers.is_diverged and not issubclass(tensor_parallel.RanksDiverged, Exception)


# ---------------------------------------------------------------- tensor parallelism for real: torchrun, gloo, Redis


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.redis
@pytest.mark.slow
def test_two_rank_tensor_parallel_worker_serves_generates_greedy_tokens(redis_server_url, prefix, rds, tiny_llama_path,
                                                                  reference_tokens, tmp_path):
    from producer import Client
    from producer.protocol import EventType, TaskKind

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    log_path = tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "producer.cli", "worker", "--model-name", "tp",
           "--model-path", str(tiny_llama_path), "--redis-url", redis_server_url, "--prefix", prefix,
           "--tp-size", "2", "--threads", "1", "--max-num-batched-tokens", "8", "--kv-cache-tokens", "256",
           "--max-model-len", "64",
           "--grace-s", "30"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = Client(redis_server_url, prefix=prefix)
    try:
        deadline = time.monotonic() + 120
        while not client.redis.zcard(client.keys.model_workers("tp")):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        model = client.get_model("tp")
        ids = [model.submit(TaskKind.GENERATE, {"prompt_token_ids": p}, {"max_tokens": MAX_TOKENS, "temperature": 0})
               for p in PROMPTS]
        tokens = []
        for request_id in ids:
            events = list(client.events(request_id, timeout_s=60))
            assert events[-1].type == EventType.DONE, events[-1]
            tokens.append([t for e in events if e.type == EventType.TOKEN for t in e.token_ids])
        assert tokens == reference_tokens
        consumers = client.redis.xinfo_consumers(client.keys.requests("tp"), "workers")
        assert len(consumers) == 1 and client.redis.zcard(client.keys.model_workers("tp")) == 1  # one worker
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both ranks: rank 0 drains, then stops rank 1
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        client.close()
    log = log_path.read_text()
    heads = dict(re.findall(r"rank (\d): KV cache of \d+ blocks, (\d+) KV heads per layer", log))
    assert heads == {"0": "1", "1": "1"}, log[-3000:]  # each rank holds half of the model's 2 KV heads
    steps = re.search(r"rank 1: rank 0 stopped after (\d+) steps", log)
    assert steps and int(steps.group(1)) >= MAX_TOKENS, log[-3000:]
