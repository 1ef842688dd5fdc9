"""`redbatch bulk` end to end: real redis-server, real worker on the tiny model, rq bulk workers as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest

rq = pytest.importorskip("rq")

from producer import bulk
from producer.bulk.runner import BulkRunner
from producer.bulk.state import JobSpec
from tests.test_bulk import _chat_line, _read, _texts, _write

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("REDBATCH_REDIS_URL", None)
    return env


def _cli(url: str, prefix: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "producer.cli", "bulk", *args, "--redis-url", url, "--prefix", prefix]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s, env=_env(), cwd=ROOT)


def _bulk_worker(url: str, queue: str, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "producer.cli", "bulk", "worker", "--redis-url", url, "--queue", queue, "--burst"]
    with open(log_path, "ab") as log:  # its own session: the job's work horse runs in a process group of its own
        return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_session(sid: int) -> None:
    """kill -9 every process of the session: the rq worker and its work horse, as when the machine dies."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_lines(path: Path, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {count} lines")


def test_kill_9_the_bulk_worker_then_resume_matches_a_clean_run(worker_factory, rds, prefix, redis_server_url,
                                                                tmp_path) -> None:
    worker_factory(max_num_seqs=4).start()
    num_lines = 40
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(i, max_tokens=16) for i in range(num_lines)])
    clean_spec = JobSpec(input_path=str(input_path), output_path=str(tmp_path / "clean.jsonl"), model="tiny", prefix=prefix)
    BulkRunner(rds, "clean", clean_spec, 0, lambda p: None).run()

    queue, output = f"q-{uuid.uuid4().hex[:8]}", tmp_path / "out.jsonl"
    done = _cli(redis_server_url, prefix, "submit", str(input_path), "--model", "tiny", "--output", str(output),
                "--queue", queue, "--lease-s", "1", "--max-in-flight", "6")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    job = bulk.fetch_job(job_id, rds)
    assert job.kwargs["model"] == "tiny" and job.func_name == bulk.RUN_JOB

    first = _bulk_worker(redis_server_url, queue, tmp_path / "rq1.log")
    try:
        _wait_lines(output, 5)
    finally:
        _kill_session(first.pid)
        first.wait(10)
    num_before = output.read_text().count("\n")
    assert num_before < num_lines, "the job finished before the kill; make it longer"
    assert bulk.status(job_id, connection=rds)["status"] == "started"  # rq does not know yet

    resumed = _cli(redis_server_url, prefix, "resume", job_id)
    assert resumed.returncode == 0, resumed.stderr
    assert "queued" in resumed.stdout
    second = _bulk_worker(redis_server_url, queue, tmp_path / "rq2.log")
    assert second.wait(120) == 0, (tmp_path / "rq2.log").read_text()[-3000:]

    out = _read(output)
    assert sorted(line["custom_id"] for line in out) == sorted(f"chat-{i}" for i in range(num_lines))
    assert all(line["error"] is None for line in out)
    assert _texts(out) == _texts(_read(tmp_path / "clean.jsonl"))
    info = bulk.status(job_id, connection=rds)
    assert info["status"] == "finished" and info["state"] == "complete" and info["runs"] == 2
    assert info["done"] == info["total"] == num_lines
    assert info["submitted"] <= num_lines - num_before  # the second run resubmitted only lines the first had not
    status_line = _cli(redis_server_url, prefix, "status", job_id)
    assert f"done {num_lines}/{num_lines}" in status_line.stdout
    followed = _cli(redis_server_url, prefix, "status", job_id, "--follow")  # a stopped job: one frame, then exit
    assert followed.returncode == 0 and f"done {num_lines}/{num_lines}" in followed.stdout


def test_submit_stores_json_not_pickle_and_cancel_before_start(worker_factory, rds, prefix, redis_server_url,
                                                               tmp_path) -> None:
    worker_factory().start()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(0)])
    job = bulk.submit(input_path, model="tiny", output_path=tmp_path / "out.jsonl", connection=rds, prefix=prefix,
                      queue=queue)
    data = json.loads(zlib.decompress(rds.hget(job.key, "data")))  # rq compresses; JSON inside, not a pickle
    assert data[0] == "producer.bulk.run_job" and data[3]["model"] == "tiny"
    assert bulk.status(job.id, connection=rds)["status"] == "queued"
    assert "cancelled before it started" in bulk.cancel(job.id, connection=rds)
    assert bulk.status(job.id, connection=rds)["status"] == "canceled"
    resumed = bulk.resume(job.id, connection=rds)  # a cancelled job can be resumed
    assert resumed.get_status().value == "queued"


def test_submit_refuses_unknown_models_and_non_empty_outputs(rds, prefix, tmp_path, worker_factory) -> None:
    from producer.errors import UnknownModel

    worker_factory().start()
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(0)])
    with pytest.raises(UnknownModel):
        bulk.submit(input_path, model="nope", output_path=tmp_path / "o.jsonl", connection=rds, prefix=prefix)
    (tmp_path / "full.jsonl").write_text("x\n")
    with pytest.raises(bulk.JobInputError, match="not empty"):
        bulk.submit(input_path, model="tiny", output_path=tmp_path / "full.jsonl", connection=rds, prefix=prefix)
    with pytest.raises(bulk.BulkError, match="no bulk job"):
        bulk.status("nonexistent", connection=rds)


def test_rq_reruns_an_abandoned_job_by_itself_after_kill_9(worker_factory, rds, prefix, redis_server_url,
                                                            tmp_path) -> None:
    """No `bulk resume`: a new bulk worker's registry cleanup finds the dead worker's job abandoned
    (rq's AbandonedJobError), retries it (the Retry `bulk submit` sets) and the re-run finishes the output."""
    worker_factory(max_num_seqs=4).start()
    num_lines = 40
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(i, max_tokens=16) for i in range(num_lines)])
    clean_spec = JobSpec(input_path=str(input_path), output_path=str(tmp_path / "clean.jsonl"), model="tiny", prefix=prefix)
    BulkRunner(rds, "clean", clean_spec, 0, lambda p: None).run()

    queue, output = f"q-{uuid.uuid4().hex[:8]}", tmp_path / "out.jsonl"
    done = _cli(redis_server_url, prefix, "submit", str(input_path), "--model", "tiny", "--output", str(output),
                "--queue", queue, "--lease-s", "1", "--max-in-flight", "6")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    assert bulk.fetch_job(job_id, rds).retries_left == bulk.DEFAULT_RETRIES

    first = _bulk_worker(redis_server_url, queue, tmp_path / "rq1.log")
    try:
        _wait_lines(output, 5)
    finally:
        _kill_session(first.pid)
        first.wait(10)
    num_before = output.read_text().count("\n")
    assert num_before < num_lines, "the job finished before the kill; make it longer"
    assert bulk.status(job_id, connection=rds)["status"] == "started"

    # rq calls a started job abandoned once its worker's last heartbeat is older than the heartbeat TTL
    # (job_monitoring_interval + 60 s = 90 s here); instead of waiting that long, age the entry
    started = rq.Queue(queue, connection=rds).started_job_registry
    entries = rds.zrange(started.key, 0, -1)
    assert len(entries) == 1 and entries[0].decode().startswith(job_id)
    rds.zadd(started.key, {entries[0]: 1}, xx=True)

    second = _bulk_worker(redis_server_url, queue, tmp_path / "rq2.log")  # cleans the registries as it starts
    assert second.wait(120) == 0, (tmp_path / "rq2.log").read_text()[-3000:]
    log = (tmp_path / "rq2.log").read_text()
    assert "for retry" in log, log[-3000:]

    out = _read(output)
    assert len(out) == num_lines
    assert sorted(line["custom_id"] for line in out) == sorted(f"chat-{i}" for i in range(num_lines))
    assert all(line["error"] is None for line in out)
    assert _texts(out) == _texts(_read(tmp_path / "clean.jsonl"))
    job = bulk.fetch_job(job_id, rds)
    assert job.retries_left == bulk.DEFAULT_RETRIES - 1
    info = bulk.status(job_id, connection=rds)
    assert info["status"] == "finished" and info["state"] == "complete" and info["runs"] == 2
    assert info["done"] == info["total"] == num_lines
    assert info["submitted"] <= num_lines - num_before
    assert job_id not in rq.Queue(queue, connection=rds).failed_job_registry
