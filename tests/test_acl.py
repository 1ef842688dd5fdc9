"""Minimal ACL users: each role can do its job, and a producer cannot touch the work itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from producer import Client
from producer.acl import acl_file_line, acl_rules
from producer.keys import GROUP, Keys

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def acl_users(rds, prefix, redis_server_url):
    """A producer and a worker user whose rules cover this test's prefix only; yields their URLs."""
    keys = Keys(prefix)
    names = {role: f"{prefix}-{role}" for role in ("producer", "worker")}
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
    assert acl_file_line(keys, "worker", "rb-worker", "change-me-worker") in lines
    assert "aclfile" in (ROOT / "ops" / "redis.conf").read_text()


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
