"""Offline bulk generation as an rq job: an OpenAI Batch file in, an OpenAI batch output file out.

    job = producer.bulk.submit("in.jsonl", model="qwen", output_path="out.jsonl", redis_url=...)
    producer.bulk.status(job.id, connection=...)    # the numbers `redbatch bulk status` shows

rq is an optional dependency (the `bulk` extra); `import producer` works without it. Jobs use rq's
JSON serializer: a job is its function name and JSON keyword arguments (JobSpec), never a pickle.
See docs/bulk.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from producer.bulk.state import (
    DEFAULT_LEASE_S,
    JobBusy,
    JobInputError,
    JobSpec,
    LeaseLost,
)
from producer.cluster import is_cluster_url
from producer.connection import connect
from producer.errors import RedbatchError
from producer.keys import DEFAULT_PREFIX, Keys, check_bulk_job_id
from producer.submit import DEFAULT_RESULT_TTL_S, ModelInfo

__all__ = ["BULK_QUEUE", "BulkError", "JobBusy", "JobInputError", "JobSpec", "LeaseLost", "cancel", "check_rq_url",
           "resume", "run_job", "run_worker", "status", "submit"]

BULK_QUEUE = "redbatch-bulk"
JOB_RECORD_TTL_S = 7 * 24 * 3600  # how long rq keeps a finished or failed job (its meta: the progress)
DEFAULT_RETRIES = 3  # rq re-runs a job whose worker died (abandoned) or that raised, this many times
CANCEL_TTL_S = JOB_RECORD_TTL_S
RUN_JOB = "producer.bulk.run_job"


class BulkError(RedbatchError):
    """A bulk command that cannot be carried out (no such job, nothing to resume, ...)."""


def _rq():
    try:
        import rq
        from rq.serializers import JSONSerializer
    except ImportError:
        raise BulkError("bulk jobs need rq: pip install 'redbatch[bulk]'") from None
    return rq, JSONSerializer


def _queue(connection: redis.Redis, name: str):
    rq, serializer = _rq()
    return rq.Queue(name, connection=connection, serializer=serializer)


def _connect(redis_url: str | None, connection: redis.Redis | None) -> redis.Redis:
    if connection is not None:
        return connection
    check_rq_url(redis_url)
    return connect(redis_url)


def check_rq_url(redis_url: str | None) -> None:
    """rq keeps its queue in multi-key transactions over keys of many slots: it needs one Redis, not a Cluster."""
    if redis_url and is_cluster_url(redis_url):
        raise BulkError("rq's queue needs a plain Redis (redis://, rediss://, redis+sentinel://), not a Redis Cluster: "
                        "give that as --redis-url and the cluster the model is served on as --serving-url")


def fetch_job(job_id: str, connection: redis.Redis):
    rq, serializer = _rq()
    check_bulk_job_id(job_id)
    try:
        return rq.job.Job.fetch(job_id, connection=connection, serializer=serializer)
    except rq.exceptions.NoSuchJobError:
        raise BulkError(f"no bulk job {job_id!r} (rq keeps finished jobs {JOB_RECORD_TTL_S // 86400} days)") from None


def submit(
    input_path: str | os.PathLike,
    *,
    model: str,
    output_path: str | os.PathLike,
    redis_url: str | None = None,
    connection: redis.Redis | None = None,
    max_in_flight: int | None = None,
    prefix: str = DEFAULT_PREFIX,
    result_ttl_s: int = DEFAULT_RESULT_TTL_S,
    lease_s: float = DEFAULT_LEASE_S,
    priority: str = "bulk",
    queue: str = BULK_QUEUE,
    retries: int = DEFAULT_RETRIES,
    job_id: str | None = None,
    serving_url: str | None = None,
):
    """Enqueue a bulk job and return its rq Job. Paths are made absolute here and read by the bulk worker.
    `serving_url`: the Redis (or Redis Cluster) the model's workers serve, when it is not rq's own."""
    rq, _ = _rq()
    rds = _connect(redis_url, connection)
    spec = JobSpec(input_path=str(Path(input_path).absolute()), output_path=str(Path(output_path).absolute()),
                   model=model, max_in_flight=max_in_flight, prefix=prefix, result_ttl_s=result_ttl_s, lease_s=lease_s,
                   priority=priority, serving_url=serving_url)
    keys = Keys(prefix)
    with _serving(spec, rds) as serving:
        ModelInfo.parse(model, serving.hget(keys.models(), model))  # UnknownModel now rather than in the job
    output = Path(spec.output_path)
    if output.exists() and output.stat().st_size > 0:
        raise JobInputError(f"output {output} exists and is not empty; a job's output starts empty")
    retry = rq.Retry(max=retries) if retries > 0 else None
    return _queue(rds, queue).enqueue(
        RUN_JOB, kwargs=spec.model_dump(), job_id=job_id, job_timeout=-1, result_ttl=JOB_RECORD_TTL_S,
        failure_ttl=JOB_RECORD_TTL_S, retry=retry, description=f"bulk {Path(spec.input_path).name} -> {model}",
    )


def run_job(**kwargs: Any) -> dict[str, Any]:
    """The rq job function: run (or continue) the bulk job this rq job stands for."""
    from rq import get_current_job

    from producer.bulk.runner import BulkRunner

    spec = JobSpec(**kwargs)
    job = get_current_job()
    before = job.meta.get("progress") or {}

    def save(progress: dict[str, Any]) -> None:
        job.meta["progress"] = progress
        job.save_meta()

    with _serving(spec, job.connection) as serving:
        runner = BulkRunner(serving, job.id, spec, previous_runs=int(before.get("runs", 0)), save_progress=save,
                            input_sha256=before.get("input_sha256"), control=job.connection)
        return runner.run()


@contextmanager
def _serving(spec: JobSpec, control: redis.Redis) -> Iterator[redis.Redis]:
    """The client of the Redis the job's requests go to: its own for a serving_url, else rq's."""
    if spec.serving_url is None:
        yield control
        return
    client = connect(spec.serving_url)
    try:
        yield client
    finally:
        client.close()


def status(job_id: str, *, connection: redis.Redis | None = None, redis_url: str | None = None) -> dict[str, Any]:
    """rq's status of the job and its progress (done, failed, total, tokens/s, ETA...)."""
    job = fetch_job(job_id, _connect(redis_url, connection))
    out: dict[str, Any] = {"job_id": job.id, "status": job.get_status().value, **(job.meta.get("progress") or {})}
    if out["status"] == "failed":
        result = job.latest_result()
        out["error"] = (result.exc_string or "").strip().splitlines()[-1:] if result else None
    return out


def cancel(job_id: str, *, connection: redis.Redis | None = None, redis_url: str | None = None) -> str:
    """Stop a job: a queued one never starts; a running one stops submitting and aborts its in-flight
    requests (their lines stay out of the output; `resume` continues the job). Returns what happened."""
    rds = _connect(redis_url, connection)
    job = fetch_job(job_id, rds)
    keys = Keys(JobSpec(**job.kwargs).prefix)
    state = job.get_status().value
    if state in ("finished", "failed", "canceled", "stopped"):
        return f"job {job_id} is {state}: nothing to cancel"
    rds.set(keys.bulk_cancel(job_id), b"1", ex=CANCEL_TTL_S)
    if state == "started":
        return f"cancel requested: job {job_id} stops submitting and aborts its requests in flight"
    job.cancel()
    return f"job {job_id} was {state}; cancelled before it started"


def resume(job_id: str, *, connection: redis.Redis | None = None, redis_url: str | None = None,
           wait_s: float | None = None):
    """Queue a stopped job (its worker died, it failed or was cancelled) again; returns the rq Job.

    A job whose runner still holds its lease is running: wait up to `wait_s` (default: the lease) for
    a dead runner's lease to expire, then refuse.
    """
    rds = _connect(redis_url, connection)
    job = fetch_job(job_id, rds)
    spec = JobSpec(**job.kwargs)
    keys = Keys(spec.prefix)
    state = job.get_status().value
    if state in ("queued", "scheduled", "deferred"):
        return job
    progress = job.meta.get("progress") or {}
    if state == "finished" and progress.get("state") == "complete":
        raise BulkError(f"job {job_id} is complete: nothing to resume")
    deadline = time.monotonic() + (spec.lease_s + 1 if wait_s is None else wait_s)
    while rds.exists(keys.bulk_lease(job_id)):
        if time.monotonic() >= deadline:
            raise JobBusy(f"job {job_id} is running: its runner renews its lease")
        time.sleep(0.2)
    rds.delete(keys.bulk_cancel(job_id))
    queue = _queue(rds, job.origin)
    queue.started_job_registry.remove_executions(job)  # a dead runner's: rq would call it abandoned later
    for registry in (queue.failed_job_registry, queue.finished_job_registry, queue.canceled_job_registry):
        registry.remove(job)
    return queue.enqueue_job(job)


def run_worker(*, connection: redis.Redis, queues: list[str] | None = None, burst: bool = False,
               simple: bool = False, name: str | None = None) -> bool:
    """rq's worker on the bulk queue(s) with the JSON serializer (what `rq worker -S
    rq.serializers.JSONSerializer redbatch-bulk` runs). `simple`: run jobs in this process, no fork."""
    rq, serializer = _rq()
    worker_class = rq.SimpleWorker if simple else rq.Worker
    worker = worker_class([_queue(connection, q) for q in queues or [BULK_QUEUE]], connection=connection,
                          serializer=serializer, name=name, maintenance_interval=60)
    return worker.work(burst=burst, logging_level="INFO")
