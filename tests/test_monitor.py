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
