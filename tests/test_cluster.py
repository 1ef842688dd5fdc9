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

