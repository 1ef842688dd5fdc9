"""The async client against fakeredis.FakeAsyncRedis. Plain tests drive asyncio.run (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import fakeredis
import pytest

from producer import AsyncClient, AsyncModel
from producer.errors import UnsupportedTask, InvalidRequest, QueueFull, RequestAborted, RequestExpired, RequestTimeout, UnknownModel
from producer.keys import Keys
from producer.protocol import EventType, FinishReason, TaskKind, Usage, decode_request, encode_event, event_stream_id

KEYS = Keys()
MODEL = "tiny-llm"
USAGE = Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6)
MESSAGES = [{"role": "user", "content": "hi"}]
T = TypeVar("T")


def run(test: Callable[[AsyncClient, fakeredis.FakeAsyncRedis], Awaitable[T]], **client_kwargs: Any) -> T:
    """Run `test(client, conn)` on a fresh fake server, closing the connection afterwards."""

    async def main() -> T:
        conn = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        client = AsyncClient(redis_client=conn, **client_kwargs)
        try:
            return await test(client, conn)
        finally:
            await client.aclose()

    return asyncio.run(main())


async def register(conn: Any, **info: Any) -> None:
    entry = {"tasks": ["generate", "chat"], "max_num_seqs": 4, "max_queue_len": 3} | info
    await conn.hset(KEYS.models(), MODEL, json.dumps(entry))
    await conn.zadd(KEYS.model_workers(MODEL), {"w1": int(time.time() * 1000)})  # a live worker: submits are accepted


async def registered_model(client: AsyncClient, conn: Any, **info: Any) -> AsyncModel:
    await register(conn, **info)
    return await client.get_model(MODEL)


async def write_events(conn: Any, request_id: str, events: list[tuple[EventType, dict[str, Any]]], delay_s: float = 0.0) -> None:
    for seq, (type_, fields) in enumerate(events):
        if delay_s:
            await asyncio.sleep(delay_s)
        await conn.xadd(KEYS.events(request_id), encode_event(seq, type_, **fields), id=event_stream_id(seq))


def tokens_then_done(*pieces: str) -> list[tuple[EventType, dict[str, Any]]]:
    events: list[tuple[EventType, dict[str, Any]]] = [(EventType.TOKEN, {"text": p, "token_ids": [i]}) for i, p in enumerate(pieces)]
    events.append((EventType.DONE, {"finish_reason": FinishReason.STOP, "text": "".join(pieces), "usage": USAGE}))
    return events


async def queued(conn: Any) -> list[Any]:
    return [decode_request(fields) for _, fields in await conn.xrange(KEYS.requests(MODEL))]


def test_get_model_unregistered_raises_unknown_model() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        with pytest.raises(UnknownModel):
            await client.get_model(MODEL)
        with pytest.raises(InvalidRequest):
            await client.get_model("bad name")
        await register(conn)
        model = await client.get_model(MODEL)
        assert model.info.tasks == ("generate", "chat")
        assert set(await client.list_models()) == {MODEL}

    run(body)


def test_submit_writes_a_decodable_entry() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        model = await registered_model(client, conn)
        request_id = await model.submit(TaskKind.CHAT, {"messages": MESSAGES}, {"max_tokens": 2, "request_id": "a-1"})
        assert request_id == "a-1"
        [request] = await queued(conn)
        assert request.id == "a-1"
        assert request.task is TaskKind.CHAT
        assert request.generate_config.max_tokens == 2

    run(body)


def test_invalid_config_and_unregistered_task_write_nothing() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        model = await registered_model(client, conn, tasks=["generate"])
        with pytest.raises(InvalidRequest):
            await model.generate("x", generate_config={"max_tokenz": 1})
        with pytest.raises(UnsupportedTask):
            await model.chat(MESSAGES)
        assert await conn.xlen(KEYS.requests(MODEL)) == 0

    run(body)


def test_queue_full_and_unbounded() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        model = await registered_model(client, conn)
        for _ in range(3):
            await model.submit(TaskKind.GENERATE, {"prompt": "x"})
        with pytest.raises(QueueFull):
            await model.submit(TaskKind.GENERATE, {"prompt": "x"})
        assert await conn.xlen(KEYS.requests(MODEL)) == 3
        unbounded = await registered_model(client, conn, max_queue_len=0)
        for _ in range(10):
            await unbounded.submit(TaskKind.GENERATE, {"prompt": "x"})
        assert await conn.xlen(KEYS.requests(MODEL)) == 13

    run(body)


def test_abort() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        assert await client.abort_request(MODEL, "running") is True
        assert 0 < await conn.ttl(KEYS.abort("running")) <= 60
        await write_events(conn, "finished", tokens_then_done("a"))
        assert await client.abort_request(MODEL, "finished") is False
        assert await conn.exists(KEYS.abort("finished")) == 0
        model = await registered_model(client, conn)
        assert await model.abort("queued") is True
        assert await conn.exists(KEYS.abort("queued")) == 1

    run(body, result_ttl_s=60)


def test_events_and_wait() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        await write_events(conn, "r1", tokens_then_done("a", "b"))
        events = [e async for e in client.events("r1", timeout_s=2)]
        assert [(e.seq, e.type) for e in events] == [(0, EventType.TOKEN), (1, EventType.TOKEN), (2, EventType.DONE)]
        done = await client.wait("r1", timeout_s=2)
        assert done.type is EventType.DONE and done.text == "ab"

    run(body)


def test_wait_times_out_when_nothing_arrives() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        start = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.wait("r1", timeout_s=0.2)
        assert 0.15 <= time.monotonic() - start < 1.5

    run(body)


def test_wait_sees_events_written_concurrently() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        writer = asyncio.create_task(write_events(conn, "r1", tokens_then_done("x", "y"), delay_s=0.02))
        done = await client.wait("r1", timeout_s=5)
        await writer
        assert done.text == "xy"

    run(body)


def test_chat_stream_chunks_from_a_concurrent_worker() -> None:
    async def worker(conn: Any) -> str:
        reply = await conn.xread({KEYS.requests(MODEL): "0-0"}, count=1, block=5000)
        request = decode_request(reply[0][1][0][1])
        await write_events(conn, request.id, tokens_then_done("Hel", "lo"), delay_s=0.01)
        return request.id

    async def body(client: AsyncClient, conn: Any) -> None:
        model = await registered_model(client, conn)
        task = asyncio.create_task(worker(conn))
        stream = await model.chat(MESSAGES, generate_config={"stream": True}, timeout_s=5)
        chunks = [c async for c in stream]
        request_id = await task
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == request_id for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"] == USAGE.model_dump()

    run(body)


def test_non_stream_completion() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        model = await registered_model(client, conn)
        await write_events(conn, "g1", tokens_then_done(" upon", " a"))
        out = await model.generate("Once", generate_config={"stream": False, "request_id": "g1"}, timeout_s=2)
        assert out["object"] == "text_completion"
        assert out["id"] == "g1"
        assert out["choices"][0]["text"] == " upon a"
        assert out["usage"]["total_tokens"] == 6
        await write_events(conn, "c1", tokens_then_done("hi"))
        out = await model.chat(MESSAGES, generate_config={"stream": False, "request_id": "c1"}, timeout_s=2)
        assert out["object"] == "chat.completion"
        assert out["choices"][0]["message"] == {"role": "assistant", "content": "hi"}

    run(body)


def test_error_and_abort_events_raise() -> None:
    async def body(client: AsyncClient, conn: Any) -> None:
        model = await registered_model(client, conn, max_queue_len=0)
        await write_events(conn, "e1", [(EventType.ERROR, {"code": "expired", "message": "too late"})])
        with pytest.raises(RequestExpired):
            await model.chat(MESSAGES, generate_config={"stream": False, "request_id": "e1"}, timeout_s=2)
        await write_events(conn, "a1", [(EventType.TOKEN, {"text": "a", "token_ids": [1]}), (EventType.ABORTED, {})])
        stream = await model.generate("x", generate_config={"request_id": "a1"}, timeout_s=2)
        seen = []
        with pytest.raises(RequestAborted):
            async for chunk in stream:
                seen.append(chunk["choices"][0]["text"])
        assert seen == ["a"]

    run(body)
