"""Live versus stale workers: the producer's NoLiveWorker check, and `redbatch status`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from producer import Client, NoLiveWorker, NoLiveWorkerWarning
from producer.keys import Keys
from producer.protocol import TaskKind

ROOT = Path(__file__).resolve().parent.parent


def test_submit_to_a_model_whose_last_worker_is_gone_raises_no_live_worker(worker_factory, redis_server_url, prefix, rds):
    keys = Keys(prefix)
    worker = worker_factory().start()
    client = Client(redis_server_url, prefix=prefix)
    model = client.get_model("tiny")
    assert client.wait(model.submit(TaskKind.GENERATE, {"prompt": "x"}, {"max_tokens": 2}), timeout_s=60).type == "done"
    worker.stop()  # graceful: it leaves the model's workers zset
    assert rds.zcard(keys.model_workers("tiny")) == 0
    with pytest.raises(NoLiveWorker, match="'tiny' has no live worker"):
        model.submit(TaskKind.GENERATE, {"prompt": "x"})
    assert rds.xlen(keys.requests("tiny")) == 0  # the served entry was deleted; the refused one never enqueued


def test_a_stale_heartbeat_counts_as_no_live_worker_and_the_policy_is_configurable(worker_factory, redis_server_url,
                                                                                  prefix, rds):
    keys = Keys(prefix)
    worker_factory().start().stop()
    rds.zadd(keys.model_workers("tiny"), {"killed-9": 1})  # a worker that died without unregistering, long ago
    with pytest.raises(NoLiveWorker):
        Client(redis_server_url, prefix=prefix).get_model("tiny").submit(TaskKind.GENERATE, {"prompt": "x"})
    with pytest.warns(NoLiveWorkerWarning):
        Client(redis_server_url, prefix=prefix, on_no_live_worker="warn").get_model("tiny").submit(
            TaskKind.GENERATE, {"prompt": "x"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client(redis_server_url, prefix=prefix, on_no_live_worker="ignore").get_model("tiny").submit(
            TaskKind.GENERATE, {"prompt": "x"})
    assert rds.xlen(keys.requests("tiny")) == 2  # warn and ignore enqueue; error does not
    rds.zadd(keys.model_workers("tiny"), {"fresh": int(time.time() * 1000)})
    Client(redis_server_url, prefix=prefix).get_model("tiny").submit(TaskKind.GENERATE, {"prompt": "x"})
    with pytest.raises(ValueError, match="on_no_live_worker"):
        Client(redis_server_url, prefix=prefix, on_no_live_worker="maybe")


# ---------------------------------------------------------------- redbatch status / top, the real CLI


def _cli(url: str, prefix: str, *args: str) -> str:
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", *args, "--redis-url", url, "--prefix", prefix],
                          env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _wait_heartbeat(rds, keys: Keys, worker_id: str, field: str, at_least: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        value = rds.hget(keys.worker(worker_id), field)
        if value is not None and int(float(value)) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"no heartbeat with {field} >= {at_least}")


def test_status_json_and_a_top_frame_show_a_live_worker_and_a_stale_one(worker_factory, redis_server_url, prefix, rds):
    keys = Keys(prefix)
    worker = worker_factory(max_num_seqs=4, heartbeat_interval_s=0.1).start()
    worker_id = worker.worker.config.worker_id
    client = Client(redis_server_url, prefix=prefix)
    model = client.get_model("tiny")
    done = client.wait(model.submit(TaskKind.GENERATE, {"prompt": "x"}, {"max_tokens": 5, "ignore_eos": True}),
                       timeout_s=60)
    assert done.type == "done"
    _wait_heartbeat(rds, keys, worker_id, "finished", 1)
    rds.xadd(keys.dead("tiny"), {"reason": "test", "entry_id": "0-1", "worker": "w", "ts": "0"})

    status = json.loads(_cli(redis_server_url, prefix, "status", "--json"))
    tiny = status["models"]["tiny"]
    assert tiny["has_live_worker"] and tiny["live_workers"] == 1 and tiny["dead_letters"] == 1
    assert tiny["tasks"] and {"queue_len", "pending", "lag"} <= set(tiny)
    (live,) = tiny["workers"]
    assert live["worker_id"] == worker_id and live["live"]
    assert live["finished"] >= 1 and live["tokens"] >= 5 and live["steps"] >= 5 and live["max_num_seqs"] == 4
    assert live["kv_blocks"] > 0 and 0 <= live["kv_used"] <= 1 and live["uptime_s"] > 0
    assert live["tokens_per_s"] > 0 and live["step_ms"] > 0

    frame = _cli(redis_server_url, prefix, "top", "--once")
    assert "tiny" in frame and "1 live worker" in frame and "dead 1" in frame
    assert worker_id in frame and "live" in frame.split(worker_id)[1].splitlines()[0]
    for column in ("active", "waiting", "steps/s", "tokens/s", "step ms", "KV use", "uptime"):
        assert column in frame
    assert f"{live['max_num_seqs']}" in frame.split(worker_id)[1].splitlines()[0]  # active/slots on its row

    worker.stop()
    # a worker that died without unregistering a minute ago (a live one would have pruned it from the zset)
    rds.zadd(keys.model_workers("tiny"), {"gone-worker": int(time.time() * 1000) - 60_000})
    status = json.loads(_cli(redis_server_url, prefix, "status", "--json"))
    tiny = status["models"]["tiny"]
    assert tiny["has_live_worker"] is False and tiny["live_workers"] == 0
    (stale,) = tiny["workers"]
    assert stale["worker_id"] == "gone-worker" and not stale["live"] and stale["heartbeat_age_s"] >= 59
    frame = _cli(redis_server_url, prefix, "top", "--iterations", "2", "--interval", "0.1")
    assert "NO LIVE WORKER" in frame and "stale (" in frame.split("gone-worker")[1].splitlines()[0]
