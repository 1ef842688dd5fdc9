"""Redis Cluster: URL parsing, the clients connect() builds, and every component against a local 3-master cluster.

The cluster (tests/redis_topologies.py LocalCluster) is started once for the module; each test uses a key
prefix of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import ClassVar

import pytest
from redis.cluster import RedisCluster

from producer import cluster
from producer.cluster import NodePipeline, parse_cluster_url, read_streams, slot_of
from producer.connection import connect, connect_async
from producer.keys import Keys
from producer.protocol import ModelRegistration, TaskKind
from tests.redis_topologies import LocalCluster, has_redis_server

# ---------------------------------------------------------------- parsing


def test_the_url_names_startup_nodes_and_credentials():
    target = parse_cluster_url("redis+cluster://app:p%40ss@10.0.0.1:7000,[::1]:7001,node-c?socket_timeout=2")
    assert target.nodes == [("10.0.0.1", 7000), ("::1", 7001), ("node-c", 6379)]
    assert target.options == {"username": "app", "password": "p@ss", "socket_timeout": 2.0}
    assert not target.is_tls
    tls = parse_cluster_url("rediss+cluster://h:1?ssl_ca_certs=/ca.crt")
    assert tls.is_tls and tls.options == {"ssl": True, "ssl_ca_certs": "/ca.crt"}


@pytest.mark.parametrize("url, message", [
    ("redis+cluster://h:1/0", "no databases"),
    ("redis+cluster://h:99999", "invalid cluster node port"),
    ("redis+cluster://h:1,,h:2", "empty node address"),
    ("redis+cluster://h:1?db=2", "unknown Cluster URL option 'db'"),
    ("redis+cluster://h:1?ssl_ca_certs=/x", "unknown Cluster URL option 'ssl_ca_certs'"),
    ("redis+cluster://h:1?socket_timeout=soon", "not a number of seconds"),
])
def test_bad_urls_fail_clearly(url, message):
    with pytest.raises(ValueError, match=message):
        parse_cluster_url(url)


def test_errors_do_not_show_the_password():
    with pytest.raises(ValueError) as caught:
        parse_cluster_url("redis+cluster://u:secret@h:1/3")
    assert "secret" not in str(caught.value)


# ---------------------------------------------------------------- a local cluster


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    if not has_redis_server():
        pytest.skip("needs a redis-server binary")
    topo = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield topo
    topo.stop()


@pytest.fixture
def crds(local_cluster, prefix):
    client = connect(local_cluster.url())
    yield client
    for node in client.get_primaries():
        conn = client.get_redis_connection(node)
        keys = list(conn.scan_iter(f"{prefix}:*", count=1000))
        for key in keys:
            conn.delete(key)
    client.close()


def _register(client, keys: Keys, model: str) -> None:
    import time

    client.hset(keys.models(), model, ModelRegistration(tasks=["generate"], model_path="p").to_json())
    client.zadd(keys.model_workers(model), {"w": int(time.time() * 1000)})


@pytest.mark.redis
def test_connect_builds_cluster_clients(local_cluster):
    with connect(local_cluster.url()) as client:
        assert isinstance(client, RedisCluster) and cluster.is_cluster(client)
        assert len(client.get_primaries()) == 3

    async def ping():
        client = connect_async(local_cluster.url(), max_connections=4)
        try:
            return cluster.is_cluster(client) and await client.ping()
        finally:
            await client.aclose()

    assert asyncio.run(ping())


@pytest.mark.redis
def test_node_pipeline_keeps_the_order_across_nodes(crds, prefix):
    keys = [f"{prefix}:k{i}" for i in range(30)]
    assert len({crds.nodes_manager.get_node_from_slot(slot_of(k)).name for k in keys}) == 3
    pipe = NodePipeline(crds)
    for i, key in enumerate(keys):
        pipe.set(key, i)
    for key in keys:
        pipe.get(key)
    assert pipe.execute() == [True] * 30 + [str(i).encode() for i in range(30)]


@pytest.mark.redis
def test_read_streams_reads_every_slot(crds, prefix):
    streams = {f"{prefix}:s{i}": "0-0" for i in range(12)}
    for i, key in enumerate(streams):
        crds.xadd(key, {"i": i})
    got = {k.decode(): [f[b"i"] for _, f in entries] for k, entries in read_streams(crds, streams, block_ms=100)}
    assert got == {key: [str(i).encode()] for i, key in enumerate(streams)}
    assert read_streams(crds, {k: "$" for k in streams}, block_ms=120) == []  # blocks in turns, then nothing


@pytest.mark.redis
def test_sync_and_async_clients_over_the_cluster_url(local_cluster, crds, prefix):
    from producer.aio import AsyncClient
    from producer.client import Client

    keys = Keys(prefix)
    _register(crds, keys, "cl-model")
    with Client(local_cluster.url(), prefix=prefix) as client:
        assert "cl-model" in client.list_models()
        request_id = client.get_model("cl-model").submit(TaskKind.GENERATE, {"prompt": "hi"}, {"max_tokens": 2})
        assert crds.xlen(keys.requests("cl-model")) == 1
        assert client.abort_request("cl-model", request_id)
        crds.xadd(keys.events(request_id), {"seq": 0, "type": "aborted"}, id="0-1")
        assert client.wait(request_id, timeout_s=30).type.value == "aborted"

    async def run():
        async with AsyncClient(local_cluster.url(), prefix=prefix) as client:
            model = await client.get_model("cl-model")
            rid = await model.submit(TaskKind.GENERATE, {"prompt": "hi"}, {"max_tokens": 2})
            crds.xadd(keys.events(rid), {"seq": 0, "type": "aborted"}, id="0-1")
            return (await client.wait(rid, timeout_s=30)).type.value

    assert asyncio.run(run()) == "aborted"


@pytest.mark.redis
def test_cli_status_over_the_cluster_url(local_cluster, crds, prefix):
    _register(crds, Keys(prefix), "cl-status")
    status = subprocess.run([sys.executable, "-m", "producer.cli", "status", "--json", "--redis-url",
                             local_cluster.url(), "--prefix", prefix], check=False, capture_output=True, text=True,
                            timeout=120, env={**os.environ})
    assert status.returncode == 0, status.stderr
    assert "cl-status" in json.dumps(json.loads(status.stdout))



# ---------------------------------------------------------------- workers on the cluster


def models_on_different_nodes(crds, prefix: str) -> tuple[str, str]:
    """Two model names whose request streams live on different masters."""
    keys, seen = Keys(prefix), {}
    for i in range(200):
        name = f"cl-m{i}"
        node = crds.nodes_manager.get_node_from_slot(slot_of(keys.requests(name))).name
        seen.setdefault(node, name)
        if len(seen) == 2:
            return tuple(seen.values())
    raise AssertionError("every model name landed on one node")


def cluster_worker(url: str, prefix: str, model_name: str, tiny_llama, tiny_llama_path, **overrides):
    """A worker thread on the tiny Llama whose client connect() builds from the cluster URL."""
    from tests.conftest import WorkerThread
    from worker.config import WorkerConfig
    from worker.engines.llm import LLMEngine, LLMEngineConfig
    from worker.loop import Worker
    from worker.streams import WorkerStreams

    hf_model, tokenizer = tiny_llama
    options = {"model_name": model_name, "model_path": str(tiny_llama_path), "redis_url": url, "prefix": prefix,
               "read_block_ms": 100, "heartbeat_interval_s": 0.2, "grace_s": 5.0, "max_num_seqs": 4}
    config = WorkerConfig(**{**options, **overrides})
    engine = LLMEngine(hf_model, tokenizer, LLMEngineConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len, max_tokens_limit=config.max_tokens_limit,
        max_cached_tokens=config.kv_cache_tokens))
    return WorkerThread(Worker(config, engine, WorkerStreams(connect(url), config)))


@pytest.fixture
def cluster_workers(local_cluster, crds, prefix, tiny_llama, tiny_llama_path):
    made = []

    def make(model_name: str, **overrides):
        handle = cluster_worker(local_cluster.url(), prefix, model_name, tiny_llama, tiny_llama_path, **overrides)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        if handle.is_alive:
            handle.stop()


@pytest.fixture
def cclient(local_cluster, prefix):
    from producer.client import Client

    with Client(local_cluster.url(), prefix=prefix) as client:
        yield client


GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.mark.redis
def test_two_models_on_different_nodes_serve_exact_greedy_output(cluster_workers, cclient, crds, prefix, tiny_llama):
    from tests.test_reliability import assert_clean_stream, reference, streamed_ids

    models = models_on_different_nodes(crds, prefix)
    for name in models:
        cluster_workers(name).start()
    prompts = {name: [f"cluster {name} {i} river stone" for i in range(4)] for name in models}
    ids = {(name, p): cclient.get_model(name).submit(TaskKind.GENERATE, {"prompt": p}, {**GREEDY, "max_tokens": 12})
           for name in models for p in prompts[name]}
    assert len({crds.nodes_manager.get_node_from_slot(slot_of(Keys(prefix).events(i))).name for i in ids.values()}) > 1
    for (name, prompt), request_id in ids.items():
        events = list(cclient.events(request_id, timeout_s=120))
        assert_clean_stream(events)
        assert streamed_ids(events) == reference(tiny_llama, prompt, 12)
    for name in models:
        assert crds.xlen(Keys(prefix).requests(name)) == 0  # acked and deleted


def node_of(crds, key: str) -> str:
    return crds.nodes_manager.get_node_from_slot(slot_of(key)).name


@pytest.mark.redis
def test_drawn_ids_sit_on_their_models_node_and_chosen_ids_anywhere_still_work(cluster_workers, cclient, crds,
                                                                                 local_cluster, prefix, tiny_llama):
    """The clients draw ids whose keys share the model's node (a step then touches one node); an id the caller
    names, on another node, is served the same; colocate_request_ids=False draws ids anywhere."""
    from producer.aio import AsyncClient
    from producer.client import Client
    from tests.test_reliability import assert_clean_stream, reference, streamed_ids

    keys = Keys(prefix)
    name = models_on_different_nodes(crds, prefix)[0]
    home = node_of(crds, keys.requests(name))
    cluster_workers(name).start()
    model = cclient.get_model(name)
    drawn = [model.submit(TaskKind.GENERATE, {"prompt": f"colocated {i}"}, {**GREEDY, "max_tokens": 8})
             for i in range(6)]
    assert {node_of(crds, keys.events(i)) for i in drawn} == {home}
    elsewhere = next(f"chosen-{i}" for i in range(100) if node_of(crds, keys.events(f"chosen-{i}")) != home)
    assert model.submit(TaskKind.GENERATE, {"prompt": "chosen id"},
                        {**GREEDY, "max_tokens": 8, "request_id": elsewhere}) == elsewhere
    for request_id, prompt in [*zip(drawn, [f"colocated {i}" for i in range(6)]), (elsewhere, "chosen id")]:
        events = list(cclient.events(request_id, timeout_s=120))
        assert_clean_stream(events)
        assert streamed_ids(events) == reference(tiny_llama, prompt, 8)

    async def async_ids(colocate: bool) -> list[str]:
        async with AsyncClient(local_cluster.url(), prefix=prefix, colocate_request_ids=colocate) as client:
            handle = await client.get_model(name)
            return [await handle.submit(TaskKind.GENERATE, {"prompt": "a"}, {**GREEDY, "max_tokens": 2})
                    for _ in range(12)]

    assert {node_of(crds, keys.events(i)) for i in asyncio.run(async_ids(True))} == {home}
    assert len({node_of(crds, keys.events(i)) for i in asyncio.run(async_ids(False))}) > 1  # all 12 on one node: odds 3**-11
    with Client(local_cluster.url(), prefix=prefix, colocate_request_ids=False) as spread:
        handle = spread.get_model(name)
        ids = [handle.submit(TaskKind.GENERATE, {"prompt": "b"}, {**GREEDY, "max_tokens": 2}) for _ in range(12)]
    assert len({node_of(crds, keys.events(i)) for i in ids}) > 1


def test_colocated_id_falls_back_to_any_id_without_a_slot_map():
    class NoMap:
        slots_cache: ClassVar[dict] = {}

        def get_node_from_slot(self, slot):
            raise cluster.redis_errors.SlotNotCoveredError(f"slot {slot}")

    client = type("C", (), {"nodes_manager": NoMap()})()
    assert cluster.colocated_id(client, "rb:{m}:requests", lambda: "fresh") == "fresh"


@pytest.mark.redis
def test_abort_on_the_cluster(cluster_workers, cclient, crds, prefix):
    from producer.protocol import EventType
    from tests.test_loop import events_of, wait_for

    name = models_on_different_nodes(crds, prefix)[0]
    cluster_workers(name).start()
    model = cclient.get_model(name)
    running = model.submit(TaskKind.GENERATE, {"prompt": "abort me"}, {**GREEDY, "max_tokens": 400})
    wait_for(lambda: len(events_of(cclient, running)) >= 3)
    assert cclient.abort_request(name, running)
    events = list(cclient.events(running, timeout_s=60))
    assert events[-1].type == EventType.ABORTED and len(events) < 401
    assert [e.seq for e in events] == list(range(len(events)))


@pytest.mark.redis
def test_handed_back_requests_are_reclaimed_and_resumed_exactly(cluster_workers, cclient, crds, prefix, tiny_llama):
    from tests.test_loop import events_of, wait_for
    from tests.test_reliability import assert_clean_stream, reference, streamed_ids

    name = models_on_different_nodes(crds, prefix)[1]
    first = cluster_workers(name, grace_s=0.3, lease_s=30).start()
    model = cclient.get_model(name)
    prompts = [f"resume on the cluster {i}" for i in range(3)]
    ids = [model.submit(TaskKind.GENERATE, {"prompt": p}, {**GREEDY, "max_tokens": 300}) for p in prompts]
    wait_for(lambda: all(len(events_of(cclient, i)) >= 5 for i in ids))
    first.stop()  # grace runs out: handed back unfinished
    assert all(not events_of(cclient, i)[-1].is_terminal for i in ids)
    second = cluster_workers(name, lease_s=30).start()
    for request_id, prompt in zip(ids, prompts):
        events = list(cclient.events(request_id, timeout_s=120))
        assert_clean_stream(events)
        assert streamed_ids(events) == reference(tiny_llama, prompt, 300)
    assert second.worker.stats.num_reclaimed == 3


# ---------------------------------------------------------------- per-step round trips


@pytest.mark.redis
def test_per_step_round_trips_are_bounded_by_nodes_not_requests(local_cluster, crds, prefix, monkeypatch):
    from producer.protocol import EventType
    from worker.config import WorkerConfig
    from worker.outbox import Outbox
    from worker.streams import WorkerStreams

    config = WorkerConfig(model_name="cl-trips", model_path="p", redis_url=local_cluster.url(), prefix=prefix)
    streams = WorkerStreams(crds, config)
    request_ids = [f"trip-{i}" for i in range(60)]  # spread over every node
    assert len({crds.nodes_manager.get_node_from_slot(slot_of(Keys(prefix).events(i))).name for i in request_ids}) == 3

    def outbox(seq: int, ids: list[str] = request_ids) -> Outbox:
        box = Outbox()
        for request_id in ids:
            box.event(request_id, seq, EventType.TOKEN, text="x", token_ids=[1])
        return box

    streams.flush(outbox(0))  # the first flush loads the events script on each node
    sends = []
    send = NodePipeline._send
    monkeypatch.setattr(NodePipeline, "_send", lambda self, node, calls, asking: (sends.append(node.name),
                                                                                 send(self, node, calls, asking))[1])
    assert streams.aborted(request_ids) == set()
    assert streams.flush(outbox(1)) == set()
    assert len(sends) <= 2 * 3 and sorted(set(sends)) == sorted(n.name for n in crds.get_primaries())
    assert all(crds.xlen(Keys(prefix).events(i)) == 2 for i in request_ids)

    counter = iter(range(10_000))
    colocated = [cluster.colocated_id(crds, Keys(prefix).requests("cl-trips"), lambda: f"near-{next(counter)}")
                 for _ in range(60)]  # what the clients draw: all on the model's node
    streams.flush(outbox(0, colocated))
    sends.clear()
    assert streams.aborted(colocated) == set()
    assert streams.flush(outbox(1, colocated)) == set()
    assert sends == [node_of(crds, Keys(prefix).requests("cl-trips"))] * 2  # one round trip each, to one node


@pytest.mark.redis
def test_dead_letters_are_requeued_on_the_cluster(crds, prefix):
    from producer import admin
    from producer.protocol import GenerateBody, dead_letter_fields, encode_request

    keys, model = Keys(prefix), "cl-dead"
    fields = encode_request("dead-1", TaskKind.GENERATE, GenerateBody(prompt="x"))
    crds.xadd(keys.dead(model), dead_letter_fields(fields, "boom", "1-1", "w1", 0, "interactive"))
    crds.xadd(keys.events("dead-1"), {"seq": 0, "type": "error"}, id="0-1")
    crds.set(keys.request_owner(model, "dead-1"), "1-1")
    assert admin.requeue_dead(crds, keys, model) == 1
    assert crds.xlen(keys.requests(model)) == 1 and crds.xlen(keys.dead(model)) == 0
    assert not crds.exists(keys.events("dead-1")) and not crds.exists(keys.request_owner(model, "dead-1"))


# ---------------------------------------------------------------- the gateway, bulk jobs and the CLI


@pytest.mark.redis
def test_a_gateway_lane_reads_requests_of_every_slot(local_cluster, crds, prefix):
    pytest.importorskip("fastapi")
    from producer.gateway.hub import EventHub

    keys = Keys(prefix)
    request_ids = [f"lane-{i}" for i in range(12)]
    assert len({crds.nodes_manager.get_node_from_slot(slot_of(keys.events(i))).name for i in request_ids}) == 3

    async def follow():
        client = connect_async(local_cluster.url())
        hub = EventHub(client, lambda: connect_async(local_cluster.url()), keys)
        hub.start()
        try:
            subs = [hub.subscribe(request_ids[0])]
            await asyncio.sleep(0.2)  # the lane is in its blocking turns
            subs += [hub.subscribe(i) for i in request_ids[1:]]  # no wake stream on a Cluster: read within a turn
            for i in request_ids:
                await client.xadd(keys.events(i), {"seq": 0, "type": "token", "text": i, "token_ids": "[1]"}, id="0-1")
                await client.xadd(keys.events(i), {"seq": 1, "type": "done", "finish_reason": "stop"}, id="0-2")
            got = {}
            for sub in subs:
                got[sub.request_id] = [e.text or e.type.value async for e in sub.events(30)]
            return got, hub.num_open
        finally:
            await hub.stop()
            await client.aclose()

    got, num_open = asyncio.run(follow())
    assert got == {i: [i, "done"] for i in request_ids} and num_open == 0
    wakes = [k for node in crds.get_primaries() for k in crds.get_redis_connection(node).scan_iter(f"{prefix}:gateway:*")]
    assert wakes == []  # a lane on a Cluster needs no wake stream


@pytest.mark.redis
def test_the_gateway_serves_over_the_cluster(local_cluster, cluster_workers, gateway_factory, cclient, crds, prefix):
    import httpx

    name = models_on_different_nodes(crds, prefix)[0]
    cluster_workers(name).start()
    gateway = gateway_factory(redis_url=local_cluster.url())
    body = {"model": name, "messages": [{"role": "user", "content": "a fox"}], "max_tokens": 8, "temperature": 0}
    reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120).json()
    oracle = cclient.get_model(name).chat(body["messages"], generate_config={"max_tokens": 8, "temperature": 0,
                                                                             "stream": False})
    assert reply["choices"][0]["message"]["content"] == oracle["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == 8
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == oracle["choices"][0]["message"]["content"]


def _bulk_lines(model: str, n: int) -> str:
    return "".join(json.dumps({"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "messages": [{"role": "user", "content": f"bulk {i}"}],
                                        "max_completion_tokens": 5, "temperature": 0}}) + "\n" for i in range(n))


@pytest.mark.redis
def test_a_bulk_job_serves_on_the_cluster_and_resumes(cluster_workers, crds, rds, prefix, tmp_path):
    from producer.bulk.runner import BulkRunner
    from producer.bulk.state import JobSpec

    name = models_on_different_nodes(crds, prefix)[1]
    cluster_workers(name).start()
    input_path = tmp_path / "in.jsonl"
    input_path.write_text(_bulk_lines(name, 8))
    spec = JobSpec(input_path=str(input_path), output_path=str(tmp_path / "out.jsonl"), model=name, prefix=prefix,
                   lease_s=1.0, max_in_flight=4)

    class Crash(Exception):
        pass

    def crash_after_3(progress):
        if progress["done"] >= 3:
            raise Crash

    with pytest.raises(Crash):  # rq's Redis holds the lease and cancel keys, the cluster the requests
        BulkRunner(crds, "cljob", spec, 0, crash_after_3, control=rds).run()
    summary = BulkRunner(crds, "cljob", spec, 1, lambda p: None, control=rds).run()
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary["done"] == 8 and summary["failed"] == 0 and summary["recomputed"] == 0
    assert sorted(line["custom_id"] for line in out) == [f"c-{i}" for i in range(8)]
    assert all(line["response"]["body"]["usage"]["completion_tokens"] == 5 for line in out)
    assert not rds.exists(Keys(prefix).bulk_lease("cljob"))


@pytest.mark.redis
def test_the_bulk_cli_queues_on_rqs_redis_and_serves_on_the_cluster(local_cluster, cluster_workers, crds, rds,
                                                                    redis_server_url, prefix, tmp_path):
    pytest.importorskip("rq")
    name = models_on_different_nodes(crds, prefix)[0]
    cluster_workers(name).start()
    input_path = tmp_path / "in.jsonl"
    input_path.write_text(_bulk_lines(name, 3))
    queue = f"{prefix}-bulk"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "producer.cli", "bulk", *args, "--prefix", prefix], check=False,
                              capture_output=True, text=True, timeout=180, env={**os.environ})

    refused = cli("submit", str(input_path), "--model", name, "--output", str(tmp_path / "x.jsonl"),
                  "--redis-url", local_cluster.url())
    assert refused.returncode != 0 and "--serving-url" in refused.stderr
    submitted = cli("submit", str(input_path), "--model", name, "--output", str(tmp_path / "out.jsonl"),
                    "--redis-url", redis_server_url, "--serving-url", local_cluster.url(), "--queue", queue)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    ran = cli("worker", "--burst", "--simple", "--queue", queue, "--redis-url", redis_server_url)
    assert ran.returncode == 0, ran.stderr[-2000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in out) == ["c-0", "c-1", "c-2"] and all(not line["error"] for line in out)
    status = cli("status", job_id, "--json", "--redis-url", redis_server_url)
    assert json.loads(status.stdout)["done"] == 3
