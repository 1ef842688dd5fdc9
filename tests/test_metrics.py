"""The worker's Prometheus endpoint (--metrics-port), scraped over HTTP from a real worker process."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from producer import Client
from producer.keys import Keys
from producer.protocol import TaskKind

OPS = Path(__file__).resolve().parent.parent / "ops" / "monitoring"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model": "m-tiny", **labels}.items())))]


def test_a_worker_serves_prometheus_metrics(redis_server_url, prefix, rds, tiny_llama_path):
    port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--model-name", "m-tiny", "--model-path",
                             str(tiny_llama_path), "--redis-url", redis_server_url, "--prefix", prefix, "--threads",
                             "1", "--max-num-seqs", "4", "--metrics-port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = Client(redis_server_url, prefix=prefix)
        deadline = time.monotonic() + 90
        while not rds.zcard(Keys(prefix).model_workers("m-tiny")):
            assert proc.poll() is None and time.monotonic() < deadline, "worker did not register"
            time.sleep(0.1)
        model = client.get_model("m-tiny")
        ids = [model.submit(TaskKind.GENERATE, {"prompt": f"p{i}"}, {"max_tokens": 6, "ignore_eos": True})
               for i in range(3)]
        ids.append(model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": "hi"}]},
                                {"max_tokens": 4, "ignore_eos": True}))
        assert all(client.wait(i, timeout_s=60).type == "done" for i in ids)
        # requests that end without an engine step are counted too: aborted before it started, expired,
        # rejected at intake (a body that is not JSON), and an entry with no readable id (dead letters only)
        client.abort_request("m-tiny", "gone-before-start")
        model.submit(TaskKind.GENERATE, {"prompt": "x"}, {"max_tokens": 4}, request_id="gone-before-start")
        model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": "hi"}]}, {"max_tokens": 4},
                     request_id="too-late", deadline_ms=int(time.time() * 1000) - 1000)
        requests_key = Keys(prefix).requests("m-tiny")
        rds.xadd(requests_key, {"v": "1", "id": "not-json", "task": "generate", "body": "{nope",
                                "created": str(int(time.time() * 1000))})
        rds.xadd(requests_key, {"v": "1", "task": "generate", "body": "{}"})
        assert client.wait("gone-before-start", timeout_s=60).type == "aborted"
        assert client.wait("too-late", timeout_s=60).code == "expired"
        assert client.wait("not-json", timeout_s=60).code == "invalid_request"
        while rds.xlen(Keys(prefix).dead("m-tiny")) < 1:
            assert time.monotonic() < deadline, "the entry without an id was not dead-lettered"
            time.sleep(0.1)
        rds.xadd(Keys(prefix).dead("m-tiny"), {"reason": "test", "entry_id": "0-1", "worker": "w", "ts": "0"})

        samples = _scrape(port)
        while sum(v for (name, _), v in samples.items() if name == "redbatch_requests_total") < 7:
            assert time.monotonic() < deadline, "the ended requests were not all counted"
            time.sleep(0.1)  # counted right after the events are written, so a scrape can come just before
            samples = _scrape(port)
        assert _value(samples, "redbatch_requests_total", task="generate", outcome="done_length") == 3
        assert _value(samples, "redbatch_requests_total", task="chat", outcome="done_length") == 1
        assert _value(samples, "redbatch_requests_total", task="generate", outcome="aborted") == 1
        assert _value(samples, "redbatch_requests_total", task="chat", outcome="expired") == 1
        assert _value(samples, "redbatch_requests_total", task="generate", outcome="invalid_request") == 1
        assert sum(v for (name, _), v in samples.items() if name == "redbatch_requests_total") == 7
        assert _value(samples, "redbatch_dead_lettered_total") == 1
        assert _value(samples, "redbatch_generated_tokens_total") == 3 * 6 + 4
        steps = _value(samples, "redbatch_step_seconds_count")
        assert steps >= 6 and _value(samples, "redbatch_step_seconds_sum") > 0
        assert _value(samples, "redbatch_batch_size_count") == steps
        assert _value(samples, "redbatch_batch_size_bucket", le="4.0") == steps  # never more than max_num_seqs
        assert _value(samples, "redbatch_time_to_first_token_seconds_count") == 4
        assert _value(samples, "redbatch_time_per_output_token_seconds_count") == 4
        assert _value(samples, "redbatch_queue_depth") == 0 and _value(samples, "redbatch_dead_letters") == 2
        assert [_value(samples, "redbatch_queue_depth_by_priority", priority=p) for p in ("interactive", "bulk",
                                                                                         "background")] == [0, 0, 0]
        assert _value(samples, "redbatch_kv_blocks") > 0 and _value(samples, "redbatch_kv_usage_ratio") >= 0
        assert _value(samples, "redbatch_active_requests") == 0
        assert _value(samples, "redbatch_reclaimed_total") == 0
        served = {name for name, _ in samples}
        referenced = set(re.findall(r"redbatch_[a-z_]+", "".join(p.read_text() for p in OPS.iterdir())))
        assert referenced and referenced <= served, referenced - served  # the ops files query what is served
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_ops_monitoring_files_parse_and_hold_together():
    scrape = yaml.safe_load((OPS / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"] and scrape["scrape_configs"]
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"RedbatchQueueGrowing", "RedbatchNoLiveWorker", "RedbatchDeadLettersRising",
                                            "RedbatchTTFTHigh"}
    assert all(r["expr"] and r["annotations"]["summary"] for r in rules)
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]) >= 8
    assert all(t["expr"] for p in dashboard["panels"] for t in p["targets"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_scrape_config_and_the_alert_rules():
    for args in (["check", "rules", str(OPS / "alerts.yml")], ["check", "config", str(OPS / "prometheus.yml")]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
