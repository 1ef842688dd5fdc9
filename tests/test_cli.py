"""The `redbatch` command: a real worker process, signals, the demo, the tiny-model builder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from producer import Client
from producer.cli import build_parser, main
from producer.protocol import EventType, TaskKind

pytestmark = pytest.mark.redis


def _worker_process(url: str, prefix: str, model_path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", "cli-tiny", "--model-path", str(model_path),
           "--redis-url", url, "--prefix", prefix, "--threads", "1", "--max-num-seqs", "2", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_registered(client: Client, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early with {proc.returncode}")
        if client.redis.zcard(client.keys.model_workers("cli-tiny")):
            return
        time.sleep(0.1)
    raise AssertionError("worker did not register")


def test_worker_process_serves_then_exits_0_on_sigterm_after_finishing(redis_server_url, prefix, rds, tiny_llama_path):
    client = Client(redis_server_url, prefix=prefix)
    proc = _worker_process(redis_server_url, prefix, tiny_llama_path, "--grace-s", "60")
    try:
        _wait_registered(client, proc)
        model = client.get_model("cli-tiny")
        reply = model.chat([{"role": "user", "content": "hi"}], generate_config={"max_tokens": 4, "stream": False},
                           timeout_s=60)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        running = model.submit(TaskKind.GENERATE, {"prompt": "long"}, {"max_tokens": 300, "ignore_eos": True})
        deadline = time.monotonic() + 30
        while not client.redis.xlen(client.keys.events(running)) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        final = client.wait(running, timeout_s=5)
        assert final.type == EventType.DONE and final.usage.completion_tokens == 300
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.redis.close()


def test_sigterm_stops_reading_new_requests_while_draining(redis_server_url, prefix, rds, tiny_llama_path):
    client = Client(redis_server_url, prefix=prefix)
    proc = _worker_process(redis_server_url, prefix, tiny_llama_path, "--grace-s", "60")
    try:
        _wait_registered(client, proc)
        model = client.get_model("cli-tiny")
        running = model.submit(TaskKind.GENERATE, {"prompt": "long"}, {"max_tokens": 400, "ignore_eos": True})
        deadline = time.monotonic() + 30
        while not client.redis.xlen(client.keys.events(running)) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the worker has seen the signal and is draining
        late = model.submit(TaskKind.GENERATE, {"prompt": "after"}, {"max_tokens": 2})
        time.sleep(0.5)
        assert proc.poll() is None, "the worker should still be finishing the running request"
        assert not client.redis.exists(client.keys.events(late))
        assert proc.wait(timeout=120) == 0
        assert client.wait(running, timeout_s=5).type == EventType.DONE
        pending = client.redis.xpending(client.keys.requests("cli-tiny"), "workers")["pending"]
        assert pending == 0 and not client.redis.exists(client.keys.events(late))  # never read: still queued
        assert client.redis.xlen(client.keys.requests("cli-tiny")) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.redis.close()


def test_cli_chat_and_abort_commands(worker_factory, redis_server_url, prefix, capsys):
    worker_factory(model_name="tiny").start()
    assert main(["chat", "tiny", "hello", "--redis-url", redis_server_url, "--prefix", prefix, "--max-tokens", "3",
                 "--json", "--request-id", "cli-1"]) == 0
    assert '"chat.completion"' in capsys.readouterr().out
    assert main(["abort", "tiny", "cli-1", "--redis-url", redis_server_url, "--prefix", prefix]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["chat", "nobody", "hello", "--redis-url", redis_server_url, "--prefix", prefix]) == 1
    assert "no worker has ever registered" in capsys.readouterr().err


def test_make_tiny_model_command(tmp_path, torch_threads):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory):
    from worker.models.demo_model import make_demo_model

    torch.set_num_threads(1)
    return make_demo_model(tmp_path_factory.mktemp("demo-model"), log=lambda line: None)


def test_demo_model_speaks_words_of_its_text(demo_model_path):
    """The demo model is trained: its replies are made of the bundled text's words, not byte noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.models.demo_model import CORPUS, make_demo_model

    assert make_demo_model(demo_model_path, log=pytest.fail) == demo_model_path  # cached: no second training
    vocabulary = set(re.findall(r"[a-z]+", CORPUS.read_text().lower()))
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path)
    for topic in ("the lion and the mouse", "a redis stream"):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {topic}."}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=32, do_sample=False)
        words = re.findall(r"[A-Za-z]+", tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        assert len(words) >= 8
        assert sum(w.lower() in vocabulary for w in words) / len(words) >= 0.9, words


def test_demo_runs_a_burst_aborts_one_and_prints_throughput(redis_server_url, tmp_path, monkeypatch, capsys,
                                                            demo_model_path):
    from worker import demo

    monkeypatch.setattr(demo, "_tiny_model_path", lambda home: demo_model_path)
    monkeypatch.setattr(demo, "DEMO_MODEL", f"demo-{tmp_path.name[-6:]}".replace("_", "-"))
    assert demo.run_demo(redis_server_url, num_requests=3, max_tokens=6, max_num_seqs=2, threads=1, home=tmp_path) == 0
    out = capsys.readouterr().out
    assert "request #1 was aborted by the demo" in out and "(aborted)" in out
    assert "throughput: 3 requests" in out and "redbatch top" in out


def test_worker_flags_parse():
    args = build_parser().parse_args(["worker", "--model-name", "m", "--model-path", "p", "--max-num-seqs", "3",
                                      "--device", "cuda:1", "--dtype", "bfloat16"])
    assert (args.max_num_seqs, args.device, args.dtype) == (3, "cuda:1", "bfloat16")
    assert args.attention_backend == "auto"
    args = build_parser().parse_args(["worker", "--model-name", "m", "--model-path", "p", "--attention-backend", "flex"])
    assert args.attention_backend == "flex"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--model-name", "m", "--model-path", "p", "--attention-backend", "x"])


def test_worker_flags_are_generated_from_every_config_field():
    """Each WorkerConfig field is a flag whose default is the field's: no second copy of a default in cli.py."""
    from worker.cli_args import COMMON_FIELDS, config_from_args, flag_name
    from worker.config import WorkerConfig

    parser = build_parser()
    worker_parser = parser._subparsers._group_actions[0].choices["worker"]
    by_dest = {a.dest: a for a in worker_parser._actions}
    for name, info in WorkerConfig.model_fields.items():
        assert name in by_dest, f"no flag for WorkerConfig.{name}"
        action = by_dest[name]
        if name not in COMMON_FIELDS:
            assert action.option_strings == [flag_name(name, info)]
            assert action.help, f"--{name} has no help text"
        if not info.is_required() and info.default_factory is None and name not in COMMON_FIELDS + ("health_file",):
            assert action.default == info.default, name
    args = parser.parse_args(["worker", "--model-name", "m", "--model-path", "p"])
    assert config_from_args(args).model_dump(exclude={"worker_id"}) == \
        WorkerConfig(model_name="m", model_path="p").model_dump(exclude={"worker_id"})


def test_worker_flags_keep_their_names_and_reach_the_config():
    from worker.cli_args import config_from_args

    args = build_parser().parse_args([
        "worker", "--model-name", "m", "--model-path", "p", "--threads", "3", "--no-prefix-cache",
        "--max-num-seqs", "5", "--kv-cache-tokens", "512", "--lease-s", "2.5", "--worker-id", "w-1",
        "--trust-remote-code", "--tool-parser", "hermes", "--metrics-port", "0", "--heartbeat-ttl-s", "7"])
    config = config_from_args(args, redis_url="redis://h:1/0")
    assert (config.num_threads, config.enable_prefix_caching, config.max_num_seqs, config.kv_cache_tokens) == \
        (3, False, 5, 512)
    assert (config.lease_s, config.worker_id, config.trust_remote_code, config.tool_parser) == \
        (2.5, "w-1", True, "hermes")
    assert (config.metrics_port, config.heartbeat_ttl_s, config.redis_url) == (0, 7, "redis://h:1/0")


def test_worker_command_reports_an_invalid_flag_value(capsys):
    assert main(["worker", "--model-name", "m", "--model-path", "p", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err
