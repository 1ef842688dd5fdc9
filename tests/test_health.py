"""The worker's health file and the `redbatch worker --health / --ready` probes Kubernetes runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from worker.health import HealthFile, check


def test_liveness_follows_the_loop_and_readiness_also_wants_redis_and_serving(tmp_path):
    path = tmp_path / "h" / "health.json"
    health = HealthFile(path)
    assert check(path, ready=False, max_age_s=30)[0] is False  # starting: the loop never turned
    health.loop_turned()
    assert check(path, ready=False, max_age_s=30)[0] is True
    ok, why = check(path, ready=True, max_age_s=30)
    assert not ok and "heartbeat" in why  # no heartbeat reached Redis yet
    health.heartbeat_written(draining=False)
    assert check(path, ready=True, max_age_s=30)[0]
    health.heartbeat_written(draining=True)
    ok, why = check(path, ready=True, max_age_s=30)
    assert not ok and "draining" in why
    assert check(path, ready=False, max_age_s=30)[0]  # a draining worker is still alive
    later = time.time() + 60
    ok, why = check(path, ready=False, max_age_s=30, now=later)
    assert not ok and "not turned" in why


def test_a_missing_or_broken_file_fails_the_probe(tmp_path):
    assert check(tmp_path / "nope.json", ready=False, max_age_s=30)[0] is False
    (tmp_path / "bad.json").write_text("{")
    assert check(tmp_path / "bad.json", ready=False, max_age_s=30)[0] is False


def test_loop_turns_are_written_at_most_once_a_second(tmp_path):
    path = tmp_path / "health.json"
    health = HealthFile(path)
    health.loop_turned()
    first = json.loads(path.read_text())["loop"]
    health.loop_turned()  # at once again: not written
    assert json.loads(path.read_text())["loop"] == first


def _probe(path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", "worker", "--health-file", str(path), *flags],
                          capture_output=True, text=True, timeout=60)


def _wait_for(predicate, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")


@pytest.mark.redis
def test_probes_against_a_real_worker_process(redis_server_url, prefix, tiny_llama_path, tmp_path):
    path = tmp_path / "health.json"
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", "health-tiny", "--model-path",
           str(tiny_llama_path), "--redis-url", redis_server_url, "--prefix", prefix, "--threads", "1",
           "--health-file", str(path)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _probe(path, "--ready").returncode == 0)
        live = _probe(path, "--health")
        assert live.returncode == 0 and live.stdout.startswith("ok:")
        proc.send_signal(signal.SIGSTOP)  # a hung worker: the loop stops turning
        _wait_for(lambda: _probe(path, "--health", "--health-max-age-s", "2").returncode == 1)
        assert "not turned" in _probe(path, "--health", "--health-max-age-s", "2").stdout
        proc.send_signal(signal.SIGCONT)
        _wait_for(lambda: _probe(path, "--health", "--health-max-age-s", "2").returncode == 0)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=60)


def test_probe_without_a_health_file_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.delenv("REDBATCH_HEALTH_FILE", raising=False)
    result = subprocess.run([sys.executable, "-m", "producer.cli", "worker", "--health"], capture_output=True,
                            text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "REDBATCH_HEALTH_FILE"})
    assert result.returncode == 2 and "--health-file" in result.stderr
