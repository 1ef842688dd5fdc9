"""The gateway's streams against a real worker: a client that leaves aborts its request, many streams share
one blocking read, a request survives the gateway that took it (retry by id, on another gateway)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from producer import Client
from producer.keys import Keys

pytest.importorskip("fastapi")
pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


def events(rds, prefix: str, request_id: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in rds.xrange(Keys(prefix).events(request_id))]


def last_type(rds, prefix: str, request_id: str) -> bytes | None:
    last = rds.xrevrange(Keys(prefix).events(request_id), count=1)
    return last[0][1][b"type"] if last else None


def num_tokens(rds, prefix: str, request_id: str) -> int:
    return sum(1 for e in events(rds, prefix, request_id) if e[b"type"] == b"token")


def long_chat(request_id: str, stream: bool = True, max_tokens: int = 900) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, "request_id": request_id}


def test_a_client_that_stops_reading_a_stream_aborts_it_and_the_slot_is_free_within_a_step(
        worker_factory, gateway_factory, rds, prefix):
    worker_factory(max_num_seqs=1).start()
    gateway = gateway_factory()
    abort_key = Keys(prefix).abort("gone-1")
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=long_chat("gone-1"), timeout=60) as response:
        chunks = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks.append(line)
            if len(chunks) == 3:
                break
    # the connection is closed here, mid-stream
    wait_for(lambda: rds.exists(abort_key), what="the abort key")
    tokens_when_aborted = num_tokens(rds, prefix, "gone-1")
    wait_for(lambda: last_type(rds, prefix, "gone-1") == b"aborted", what="the aborted event")
    # at most the step in flight when the key was set publishes after it: the worker drops the request at the next step
    assert num_tokens(rds, prefix, "gone-1") - tokens_when_aborted <= 1
    assert num_tokens(rds, prefix, "gone-1") < 900
    # the worker's only slot serves the next request
    reply = httpx.post(gateway.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_a_client_that_gives_up_on_a_non_streamed_request_aborts_it(worker_factory, gateway_factory, rds, prefix):
    worker_factory(max_num_seqs=1).start()
    gateway = gateway_factory()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/chat/completions", json=long_chat("gone-2", stream=False), timeout=1.0)
    wait_for(lambda: last_type(rds, prefix, "gone-2") == b"aborted", what="the aborted event")
    assert rds.exists(Keys(prefix).abort("gone-2"))


def test_many_open_streams_share_one_blocking_read(worker_factory, gateway_factory, rds, prefix):
    worker_factory(max_num_seqs=8).start()
    gateway = gateway_factory(redis_max_connections=8)
    num_streams = 40

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 12,
                "temperature": 0, "ignore_eos": True, "stream": True}
        text = []
        async with client.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
        return "".join(text)

    def gateway_clients() -> list[dict]:
        return [c for c in rds.client_list() if c.get("name", "").startswith("redbatch-gateway")]

    async def main() -> tuple[list[str], int, int]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=num_streams)) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(num_streams)]
            await asyncio.to_thread(wait_for, lambda: gateway.gateway.hub.num_open >= 20, 60, "20 open streams")
            connections = await asyncio.to_thread(gateway_clients)
            blocked = [c for c in connections if c["cmd"] == "xread"]
            return await asyncio.gather(*tasks), len(connections), len(blocked)

    texts, num_connections, num_blocked = asyncio.run(main())
    assert all(texts) and len(texts) == num_streams
    assert num_blocked <= 1  # one reader, whatever the number of open streams
    assert num_connections <= 8 + 1 + 1  # the command pool, the reader, the status page's client


def test_the_same_request_id_again_follows_the_request_instead_of_enqueueing_it_twice(served_pair, rds, prefix):
    _, gateway, _ = served_pair
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "request_id": "same-1"}
    first = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60).json()
    again = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert again["choices"] == first["choices"] and again["id"] == "same-1"
    streamed = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                   for line in streamed.splitlines() if line.startswith("data: {"))
    assert text == first["choices"][0]["message"]["content"]
    assert rds.xlen(Keys(prefix).requests("tiny")) == 0  # one entry, served and deleted


# ---------------------------------------------------------------- two gateways behind one Redis, one restarted


@pytest.fixture
def served_pair(worker_factory, gateway_factory):
    worker = worker_factory(max_num_seqs=4).start()
    return worker, gateway_factory(), gateway_factory()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """`redbatch gateway` as its own process (so it can be killed)."""

    def __init__(self, redis_url: str, prefix: str, port: int | None = None):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "gateway", "--redis-url", redis_url,
                                      "--prefix", prefix, "--port", str(self.port), "--grace-s", "20",
                                      "--log-level", "warning"], env=env, cwd=ROOT, start_new_session=True)
        wait_for(self._answers, 30, "the gateway process")

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return self.proc.poll() is not None and pytest.fail(f"gateway exited {self.proc.returncode}")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def gateway_processes(redis_server_url, prefix):
    made: list[GatewayProcess] = []

    def make(port: int | None = None) -> GatewayProcess:
        made.append(GatewayProcess(redis_server_url, prefix, port))
        return made[-1]

    yield make
    for gateway in made:
        if gateway.proc.poll() is None:
            gateway.kill()


def _stream_text(lines, num_chunks: int | None = None) -> str:
    """The content of the chat chunks read from `lines` (an iterator of SSE lines), all or the next num_chunks."""
    text, count = [], 0
    for line in lines:
        if line.startswith("data: {"):
            text.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
            count += 1
            if num_chunks is not None and count == num_chunks:
                break
    return "".join(text)


def test_restart_one_of_two_gateways_and_nothing_is_lost(worker_factory, gateway_processes, rds, prefix,
                                                        redis_server_url):
    worker_factory(max_num_seqs=4).start()
    a, b = gateway_processes(), gateway_processes()
    with Client(redis_server_url, prefix=prefix) as direct:
        oracle = direct.get_model("tiny").chat(MESSAGES, generate_config={"max_tokens": 60, "temperature": 0,
                                                                          "ignore_eos": True, "stream": False})
    expected = oracle["choices"][0]["message"]["content"]
    body = long_chat("crash-1", max_tokens=60)
    with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert _stream_text(lines, num_chunks=3)
        a.kill(signal.SIGKILL)  # mid-stream: the client's connection breaks
        with pytest.raises(httpx.HTTPError):
            _stream_text(lines)
    # the client retries the same request id on the other gateway: the whole answer, once
    with httpx.stream("POST", b.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert _stream_text(response.iter_lines()) == expected
    assert not rds.exists(Keys(prefix).abort("crash-1"))  # a crashed gateway aborts nothing
    assert num_tokens(rds, prefix, "crash-1") == 60
    # the restarted gateway serves at once, on the same port, and also finds requests it never saw
    a = gateway_processes(port=a.port)
    reply = httpx.post(a.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert reply["id"] == "crash-1" and reply["choices"][0]["message"]["content"] == expected
    fresh = httpx.post(a.url + "/v1/chat/completions", json=long_chat("after-1", stream=False, max_tokens=5),
                       timeout=60).json()
    assert fresh["usage"]["completion_tokens"] == 5


def test_sigterm_lets_open_streams_finish_and_aborts_nothing(worker_factory, gateway_processes, rds, prefix):
    worker_factory(max_num_seqs=4).start()
    gateway = gateway_processes()
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=long_chat("term-1", max_tokens=40),
                      timeout=60) as response:
        lines = response.iter_lines()
        first = _stream_text(lines, num_chunks=2)
        gateway.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert gateway.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful stop
    assert first and len(rest) > 30 and rest[-1] == "data: [DONE]"  # the whole stream, after the SIGTERM
    assert num_tokens(rds, prefix, "term-1") == 40
    assert last_type(rds, prefix, "term-1") == b"done" and not rds.exists(Keys(prefix).abort("term-1"))
