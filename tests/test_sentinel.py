"""Sentinel URLs: parsing, the clients connect() builds, and components following a failover.

The failover test runs a master, a replica and three sentinels (tests/redis_topologies.py), a worker
process and a client over the Sentinel URL, SIGKILLs the master mid-run and checks every request's stream.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import warnings

import pytest
import redis

from producer.connection import connect, connect_async
from producer.keys import Keys
from producer.protocol import ModelRegistration
from producer.sentinel import AsyncSentinelRedis, SentinelRedis, parse_sentinel_url
from tests.redis_topologies import SentinelTopology, has_redis_server, wait_until

needs_redis_server = pytest.mark.skipif(not has_redis_server(), reason="needs a redis-server binary")


# ---------------------------------------------------------------- parsing


def test_the_url_names_sentinels_service_and_db():
    target = parse_sentinel_url("redis+sentinel://10.0.0.1:5000,[::1]:5001,sentinel-c/mymaster/3")
    assert target.sentinels == [("10.0.0.1", 5000), ("::1", 5001), ("sentinel-c", 26379)]
    assert (target.service_name, target.db, target.is_tls) == ("mymaster", 3, False)
    assert target.master_options == {} and target.sentinel_options == {}
    assert parse_sentinel_url("redis+sentinel://h:1/svc").db == 0


def test_credentials_go_to_the_master_and_sentinel_options_to_the_sentinels():
    target = parse_sentinel_url("redis+sentinel://app:p%40ss%3Aw@h:1,h:2/svc"
                                "?sentinel_username=watch&sentinel_password=s3&socket_timeout=2.5")
    assert target.master_options == {"username": "app", "password": "p@ss:w", "socket_timeout": 2.5}
    assert target.sentinel_options == {"username": "watch", "password": "s3", "socket_timeout": 2.5}
    assert parse_sentinel_url("redis+sentinel://:only-pw@h:1/svc").master_options == {"password": "only-pw"}


def test_rediss_sentinel_uses_tls_for_both():
    target = parse_sentinel_url("rediss+sentinel://h:1/svc?ssl_ca_certs=/ca.crt")
    assert target.is_tls
    for options in (target.master_options, target.sentinel_options):
        assert options == {"ssl": True, "ssl_ca_certs": "/ca.crt"}


@pytest.mark.parametrize("url, message", [
    ("redis+sentinel://h:1", "must name the service"),
    ("redis+sentinel://h:1/", "must name the service"),
    ("redis+sentinel://h:1/svc/x", "database must be a number"),
    ("redis+sentinel://h:1/svc/0/extra", "must name the service"),
    ("redis+sentinel://h:99999/svc", "invalid sentinel port"),
    ("redis+sentinel://h:1,,h:2/svc", "empty sentinel address"),
    ("redis+sentinel://h:1/svc?db=2", "unknown Sentinel URL option 'db'"),
    ("redis+sentinel://h:1/svc?ssl_ca_certs=/x", "unknown Sentinel URL option 'ssl_ca_certs'"),  # TLS options: rediss
    ("redis+sentinel://h:1/svc?socket_timeout=soon", "not a number of seconds"),
])
def test_bad_urls_fail_clearly(url, message):
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)


def test_errors_do_not_show_the_password():
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url("redis+sentinel://u:secret@h:1")
    assert "secret" not in str(caught.value)


def test_connect_dispatches_on_the_scheme():
    sync = connect("redis+sentinel://127.0.0.1:1/svc/2", socket_connect_timeout=0.2, client_name="x")
    assert isinstance(sync, SentinelRedis)
    pool = sync.connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"], pool.connection_kwargs["client_name"]) == ("svc", 2, "x")
    assert sync.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["socket_connect_timeout"] == 0.2
    with pytest.raises(redis.ConnectionError):  # no sentinel there: a ConnectionError, which callers retry
        sync.ping()
    sync.close()
    assert isinstance(connect("redis://127.0.0.1:1/0"), redis.Redis)

    async def bounded():
        client = connect_async("redis+sentinel://127.0.0.1:1/svc", max_connections=3, single_connection_client=False)
        assert isinstance(client, AsyncSentinelRedis) and client.connection_pool.max_connections == 3
        await client.aclose()

    asyncio.run(bounded())


# ---------------------------------------------------------------- a real Sentinel deployment


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    """master + replica + 3 sentinels that the tests below leave standing (the failover test has its own)."""
    if not has_redis_server():
        pytest.skip("needs a redis-server binary")
    topo = SentinelTopology(tmp_path_factory.mktemp("sentinel")).start()
    yield topo
    topo.stop()


@pytest.mark.redis
def test_connect_reaches_the_master_through_the_sentinels(topology):
    with connect(topology.url(db=2)) as client:
        client.set("sentinel-probe", "1")
        assert client.info("replication")["role"] == "master"
        assert client.connection_pool.master_address == ("127.0.0.1", topology.master_port())
    with redis.Redis(host="127.0.0.1", port=topology.master_port(), db=2) as master:  # the db from the URL's path
        assert master.get("sentinel-probe") == b"1"
        master.delete("sentinel-probe")


@pytest.mark.redis
def test_redbatch_status_and_the_async_client_over_the_sentinel_url(topology, prefix):
    from producer.aio import AsyncClient

    url = topology.url()
    with connect(url) as client:  # a registered model for status to show
        client.hset(Keys(prefix).models(), "sen-model", ModelRegistration(tasks=["generate"], model_path="p").to_json())
    status = subprocess.run([sys.executable, "-m", "producer.cli", "status", "--json", "--redis-url", url,
                             "--prefix", prefix], check=False, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert status.returncode == 0, status.stderr
    assert "sen-model" in json.dumps(json.loads(status.stdout))

    async def models():
        async with AsyncClient(url, prefix=prefix) as client:
            return await client.list_models()

    assert "sen-model" in asyncio.run(models())


@pytest.mark.redis
@needs_redis_server
def test_credentials_for_the_master_and_for_the_sentinels(tmp_path):
    topo = SentinelTopology(tmp_path, num_replicas=0, num_sentinels=1, password="data-pw",
                            sentinel_password="watch-pw").start()
    try:
        with connect(topo.url()) as client:
            assert client.ping()
        no_sentinel_pw = topo.url().replace("?sentinel_password=watch-pw", "")
        with connect(no_sentinel_pw) as client, pytest.raises(redis.ConnectionError, match="(?i)auth"):
            client.ping()  # the sentinels refuse to say where the master is
        wrong_master_pw = topo.url().replace(":data-pw@", ":wrong@")
        with connect(wrong_master_pw) as client, pytest.raises(redis.AuthenticationError):
            client.ping()
    finally:
        topo.stop()


# ---------------------------------------------------------------- a failover mid-run

MODEL = "sen-tiny"
NUM_REQUESTS = 12
MAX_TOKENS = 120


def _greedy_reference(tiny_llama, prompt: str, max_tokens: int) -> list[int]:
    import torch

    model, tokenizer = tiny_llama
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def _worker_process(url: str, prefix: str, model_path, log_path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", MODEL, "--model-path", str(model_path),
           "--redis-url", url, "--prefix", prefix, "--threads", "1", "--max-num-seqs", "4", "--lease-s", "3",
           "--worker-id", "sen-w1"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"},
                                stdout=log, stderr=subprocess.STDOUT)


async def _read_all(client, request_id: str) -> list | None:
    """The events a consumer sees, reading on through the failover; None: no terminal event (lost)."""
    from producer.errors import RequestTimeout

    try:
        return [event async for event in client.events(request_id, timeout_s=300)]
    except RequestTimeout:
        return None


async def _run_through_a_failover(topo: SentinelTopology, url: str, prefix: str, prompts: list[str]) -> dict:
    from producer.aio import AsyncClient
    from producer.protocol import TaskKind

    keys = Keys(prefix)
    config = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    async with AsyncClient(url, prefix=prefix) as client:
        model = await client.get_model(MODEL)
        ids = [await model.submit(TaskKind.GENERATE, {"prompt": p}, config) for p in prompts]
        readers = [asyncio.create_task(_read_all(client, i)) for i in ids]

        async def phase() -> tuple[int, int, int]:  # (finished, streaming, not started)
            done = streaming = queued = 0
            for request_id in ids:
                last = await client.redis.xrevrange(keys.events(request_id), count=1)
                if not last:
                    queued += 1
                elif last[0][1][b"type"] in (b"done", b"error", b"aborted"):
                    done += 1
                else:
                    streaming += 1
            return done, streaming, queued

        deadline = asyncio.get_running_loop().time() + 240
        while True:  # mid-run: some requests finished, some streaming
            at_kill = await phase()
            if at_kill[0] >= 1 and at_kill[1] >= 1:
                break
            assert asyncio.get_running_loop().time() < deadline, f"never mid-run: {at_kill}"
            await asyncio.sleep(0.02)
        old_master = topo.master_port()
        started = asyncio.get_running_loop().time()
        topo.kill(old_master)
        await asyncio.to_thread(topo.wait_for_new_master, old_master, 120)
        promotion_s = asyncio.get_running_loop().time() - started
        seen = await asyncio.wait_for(asyncio.gather(*readers), timeout=400)
        stored = [[(eid, fields) for eid, fields in await client.redis.xrange(keys.events(i))] for i in ids]
        heartbeat = await client.redis.hgetall(keys.worker("sen-w1"))
    return {"ids": ids, "seen": seen, "stored": stored, "at_kill": at_kill, "promotion_s": promotion_s,
            "reclaimed": int(heartbeat.get(b"reclaimed", 0)), "new_master": await asyncio.to_thread(topo.master_port)}


def _collect_connections_left_by_the_failover() -> None:
    """redis-py's asyncio client drops the connections that were blocked on the killed master without
    closing their transports (12 here, one per reader); they are garbage once the run's event loop is
    closed. Collect them now, with their ResourceWarnings silenced, so that they are not collected (and
    reported as an error) during some later test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.redis
@pytest.mark.slow
@needs_redis_server
def test_a_master_killed_mid_run_loses_and_duplicates_nothing(tmp_path, prefix, tiny_llama, tiny_llama_path):
    """Worker and client follow the promoted replica; every consumer stream is contiguous, ends with exactly one
    terminal event, and its tokens are the greedy oracle's (nothing duplicated, nothing skipped)."""
    from producer.protocol import EventType, decode_event

    topo = SentinelTopology(tmp_path / "redis", down_after_ms=1000, failover_timeout_ms=5000).start()
    url = topo.url()
    worker = _worker_process(url, prefix, tiny_llama_path, tmp_path / "worker.log")
    try:
        with connect(url) as client:
            wait_until(lambda: client.zcard(Keys(prefix).model_workers(MODEL)), 180, "the worker to register")
        prompts = [f"failover {i} river stone" for i in range(NUM_REQUESTS)]
        run = asyncio.run(_run_through_a_failover(topo, url, prefix, prompts))
        _collect_connections_left_by_the_failover()
        assert worker.poll() is None, "the worker died in the failover"
        assert run["new_master"] != topo.data_ports[0]
        counts = {"requests": NUM_REQUESTS, "completed": 0, "lost": 0, "duplicated": 0, "re_run": run["reclaimed"],
                  "promotion_s": round(run["promotion_s"], 1), "at_kill(done,streaming,queued)": run["at_kill"]}
        for prompt, events, stored in zip(prompts, run["seen"], run["stored"]):
            if events is None:
                counts["lost"] += 1
                continue
            seqs = [e.seq for e in events]
            counts["duplicated"] += len(seqs) - len(set(seqs))
            assert seqs == list(range(len(events))), "a gap or a duplicate in what the consumer saw"
            assert [e.is_terminal for e in events].count(True) == 1 and events[-1].type == EventType.DONE
            tokens = [t for e in events if e.type == EventType.TOKEN for t in (e.token_ids or [])]
            assert tokens == _greedy_reference(tiny_llama, prompt, MAX_TOKENS)
            assert events[-1].text == "".join(e.text or "" for e in events if e.type == EventType.TOKEN)
            assert [decode_event(f) for _, f in stored] == events  # the promoted master holds that same stream
            counts["completed"] += 1
        print("failover counts:", json.dumps(counts))
        assert counts["completed"] == NUM_REQUESTS and counts["lost"] == 0 and counts["duplicated"] == 0
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        topo.stop()
