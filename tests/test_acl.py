"""Minimal ACL users: each role can do its job, and a producer cannot touch the work itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from producer import Client
from producer.acl import ROLES, acl_file_line, acl_rules
from producer.keys import GROUP, Keys

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def acl_users(rds, prefix, redis_server_url):
    """A user of each role whose rules cover this test's prefix only; yields their URLs."""
    keys = Keys(prefix)
    names = {role: f"{prefix}-{role}" for role in ROLES}
    for role, name in names.items():
        rds.execute_command("ACL", "SETUSER", name, "on", f">{role}-pw", *acl_rules(keys, role).split())
    host = redis_server_url.split("//", 1)[1]
    yield {role: f"redis://{name}:{role}-pw@{host}" for role, name in names.items()}
    for name in names.values():
        rds.execute_command("ACL", "DELUSER", name)


def test_each_role_does_its_job_and_no_more(acl_users, worker_factory, prefix, rds):
    keys = Keys(prefix)
    worker = worker_factory(redis_url=acl_users["worker"], lease_s=1).start()
    producer = Client(acl_users["producer"], prefix=prefix)
    try:
        model = producer.get_model("tiny")
        reply = model.chat([{"role": "user", "content": "hi"}], generate_config={"max_tokens": 3, "stream": False})
        assert reply["usage"]["completion_tokens"] >= 1
        streamed = list(model.generate("x", generate_config={"max_tokens": 40, "ignore_eos": True, "request_id": "acl-1"}))
        assert streamed[-1]["choices"][0]["finish_reason"] == "length"
        assert producer.abort_request("tiny", "acl-1") is False
        assert worker.is_alive and worker.worker.stats.num_finished == 2

        forbidden = [
            lambda r: r.xrange(keys.requests("tiny")),
            lambda r: r.xreadgroup(GROUP, "thief", {keys.requests("tiny"): ">"}),
            lambda r: r.xautoclaim(keys.requests("tiny"), GROUP, "thief", 0),
            lambda r: r.xack(keys.requests("tiny"), GROUP, "0-1"),
            lambda r: r.hset(keys.worker("w1"), "x", "1"),
            lambda r: r.hset(keys.models(), "tiny", "{}"),
            lambda r: r.set(keys.requests("tiny"), "clobbered"),
            lambda r: r.delete(keys.events("acl-1")),
            lambda r: r.get(keys.abort("acl-1")),
            lambda r: r.keys("*"),
        ]
        for attempt in forbidden:
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt(producer.redis)
        with redis.Redis.from_url(acl_users["worker"]) as as_worker:
            with pytest.raises(redis.exceptions.NoPermissionError):
                as_worker.set(keys.abort("acl-1"), "1")  # workers read abort keys, never set them
            with pytest.raises(redis.exceptions.NoPermissionError):
                as_worker.flushall()
    finally:
        producer.close()


def test_shipped_acl_file_is_the_generated_one():
    lines = (ROOT / "ops" / "users.acl").read_text().splitlines()
    keys = Keys()
    assert acl_file_line(keys, "producer", "rb-producer", "change-me-producer") in lines
    for role in ROLES:
        assert acl_file_line(keys, role, f"rb-{role}", f"change-me-{role}") in lines
    assert "aclfile" in (ROOT / "ops" / "redis.conf").read_text()
    compose = (ROOT / "compose.yaml").read_text()
    for user in ("rb-worker", "rb-gateway", "rb-bulk"):  # each service as its role's user, not the admin
        assert f"redis://{user}:" in compose, user
    assert "redis://default:" not in compose


def test_bulk_role_runs_a_bulk_job_end_to_end_and_no_more(acl_users, worker_factory, prefix, rds, tmp_path):
    """`bulk submit`, the rq bulk worker and `bulk status` as the bulk user; the workers serve as the worker user."""
    pytest.importorskip("rq")
    from producer import bulk
    from tests.test_bulk import _chat_line, _read, _write
    from tests.test_bulk_cli import _bulk_worker, _cli

    keys = Keys(prefix)
    worker_factory(redis_url=acl_users["worker"], max_num_seqs=4).start()
    num_lines = 6
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(i) for i in range(num_lines)] + ["{not json"])
    queue, output = f"q-{prefix}", tmp_path / "out.jsonl"
    submitted = _cli(acl_users["bulk"], prefix, "submit", str(input_path), "--model", "tiny", "--output", str(output),
                     "--queue", queue, "--lease-s", "2")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    runner = _bulk_worker(acl_users["bulk"], queue, tmp_path / "rq.log")
    assert runner.wait(120) == 0, (tmp_path / "rq.log").read_text()[-3000:]
    assert "NOPERM" not in (tmp_path / "rq.log").read_text()
    out = _read(output)
    assert len(out) == num_lines + 1 and sum(line["error"] is None for line in out) == num_lines
    shown = _cli(acl_users["bulk"], prefix, "status", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "complete"
    assert "nothing to cancel" in _cli(acl_users["bulk"], prefix, "cancel", job_id).stdout
    assert bulk.status(job_id, connection=rds)["done"] == num_lines + 1

    forbidden = [
        lambda r: r.xreadgroup(GROUP, "thief", {keys.requests("tiny"): ">"}),
        lambda r: r.xack(keys.requests("tiny"), GROUP, "0-1"),
        lambda r: r.xadd(keys.events("x"), {"type": "done"}),  # only workers write results
        lambda r: r.delete(keys.events("x")),
        lambda r: r.hset(keys.worker("w1"), "x", "1"),
        lambda r: r.hset(keys.models(), "tiny", "{}"),
        lambda r: r.get(keys.abort("x")),
        lambda r: r.keys("*"),
        lambda r: r.flushall(),
        lambda r: r.config_get("*"),
        lambda r: r.set("elsewhere", "1"),
    ]
    with redis.Redis.from_url(acl_users["bulk"]) as as_bulk:
        for attempt in forbidden:
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt(as_bulk)


def test_gateway_role_serves_requests_and_the_status_page(acl_users, worker_factory, gateway_factory, prefix, rds):
    """The gateway as the gateway user: chat and /status.json (no --no-status-page needed), and nothing of the work."""
    httpx = pytest.importorskip("httpx")
    from producer import admin

    keys = Keys(prefix)
    worker_factory(redis_url=acl_users["worker"]).start()
    gateway = gateway_factory(redis_url=acl_users["gateway"])
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    deadline = time.monotonic() + 30
    while True:  # a worker's heartbeat hash appears at its first heartbeat
        status = httpx.get(gateway.url + "/status.json", timeout=10)
        assert status.status_code == 200, status.text
        tiny = status.json()["models"]["tiny"]
        if tiny["live_workers"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert tiny["live_workers"] == 1 and tiny["workers"][0]["live"] is True
    assert tiny.keys() == admin.system_status(rds, keys)["models"]["tiny"].keys()
    assert tiny["priorities"]["interactive"]["lag"] is not None  # XINFO GROUPS was allowed

    forbidden = [
        lambda r: r.xrange(keys.requests("tiny")),
        lambda r: r.xreadgroup(GROUP, "thief", {keys.requests("tiny"): ">"}),
        lambda r: r.xautoclaim(keys.requests("tiny"), GROUP, "thief", 0),
        lambda r: r.xack(keys.requests("tiny"), GROUP, "0-1"),
        lambda r: r.xrange(keys.dead("tiny")),  # the status page counts dead letters, never reads them
        lambda r: r.hset(keys.worker("w1"), "x", "1"),
        lambda r: r.hset(keys.models(), "tiny", "{}"),
        lambda r: r.delete(keys.events("x")),
        lambda r: r.get(keys.abort("x")),
        lambda r: r.keys("*"),
        lambda r: r.lpush("rq:queue:redbatch-bulk", "x"),
    ]
    with redis.Redis.from_url(acl_users["gateway"]) as as_gateway:
        for attempt in forbidden:
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt(as_gateway)


def test_a_status_page_the_redis_user_may_not_read_says_why(acl_users, worker_factory, gateway_factory):
    httpx = pytest.importorskip("httpx")
    worker_factory(redis_url=acl_users["worker"]).start()
    gateway = gateway_factory(redis_url=acl_users["producer"])  # the producer role cannot read worker hashes
    status = httpx.get(gateway.url + "/status.json", timeout=10)
    assert status.status_code == 503
    assert "gateway" in status.json()["error"]["message"] and "ACL" in status.json()["error"]["message"]


def test_tls_and_credentials_urls_are_accepted():
    from worker.config import WorkerConfig

    config = WorkerConfig(model_name="m", model_path="p", redis_url="rediss://rb-worker:secret@redis.example:6380/0")
    assert config.redis_url.startswith("rediss://")
    client = Client("rediss://rb-producer:secret@redis.example:6380/0")
    kwargs = client.redis.connection_pool.connection_kwargs
    assert kwargs["username"] == "rb-producer" and kwargs["password"] == "secret"
    assert client.redis.connection_pool.connection_class.__name__ == "SSLConnection"
    client.close()


def test_nothing_is_pickled():
    for path in list((ROOT / "producer").rglob("*.py")) + list((ROOT / "worker").rglob("*.py")):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.loads" not in text, path
