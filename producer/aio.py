"""The asyncio twin of producer.client, on redis.asyncio."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.errors import RequestTimeout
from producer.connection import connect_async
from producer.keys import DEFAULT_PREFIX, Keys
from producer.protocol import TERMINAL_EVENTS, Event, TaskKind, decode_event
from producer.results import Shaper, image_list
from producer.submit import (
    DEFAULT_RESULT_TTL_S,
    ENQUEUE_LUA,
    READ_BLOCK_MS,
    READ_COUNT,
    RECONNECT_DELAY_S,
    ModelInfo,
    build_body,
    check_no_live_worker_policy,
    enqueue_args,
    enqueue_error,
    handle_live_workers,
    image_payload,
    model_key_name,
    prompt_payload,
    request_key_id,
)


class AsyncClient:
    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        result_ttl_s: int = DEFAULT_RESULT_TTL_S,
        on_no_live_worker: str = "error",
        redis_client: aredis.Redis | None = None,
    ):
        self.redis = redis_client if redis_client is not None else connect_async(url)
        self.keys = Keys(prefix)
        self.result_ttl_s = result_ttl_s
        self.on_no_live_worker = check_no_live_worker_policy(on_no_live_worker)
        self._enqueue = self.redis.register_script(ENQUEUE_LUA)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def list_models(self) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(self.keys.models())
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def get_model(self, name: str) -> "AsyncModel":
        name = model_key_name(name)
        info = ModelInfo.parse(name, await self.redis.hget(self.keys.models(), name))
        return AsyncModel(self, info)

    async def abort_request(self, model: str, request_id: str) -> bool:
        model_key_name(model)
        request_key_id(request_id)
        last = await self.redis.xrevrange(self.keys.events(request_id), count=1)
        if last and decode_event(last[0][1]).is_terminal:
            return False
        await self.redis.set(self.keys.abort(request_id), b"1", ex=self.result_ttl_s)
        return True

    async def events(self, request_id: str, *, timeout_s: float | None = None, after: str = "0-0") -> AsyncIterator[Event]:
        key = self.keys.events(request_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            block_ms = READ_BLOCK_MS if deadline is None else max(1, min(READ_BLOCK_MS, int((deadline - time.monotonic()) * 1000)))
            try:
                reply = await self.redis.xread({key: after}, count=READ_COUNT, block=block_ms)
            except (ConnectionError, TimeoutError, RedisConnectionError, RedisTimeoutError):
                reply = None  # Redis restarting: the events are kept, wait
                await asyncio.sleep(RECONNECT_DELAY_S)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    after = entry_id
                    event = decode_event(fields)
                    yield event
                    if event.type in TERMINAL_EVENTS:
                        return
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestTimeout(f"no result for request {request_id} within {timeout_s} s")

    async def wait(self, request_id: str, *, timeout_s: float | None = None) -> Event:
        async for event in self.events(request_id, timeout_s=timeout_s):
            if event.is_terminal:
                return event
        raise RequestTimeout(f"request {request_id} has no terminal event")


class AsyncModel:
    def __init__(self, client: AsyncClient, info: ModelInfo):
        self.client = client
        self.info = info
        self.name = info.name

    async def generate(self, prompt: str | list[int], generate_config: dict[str, Any] | None = None, *,
                       timeout_s: float | None = None, deadline_ms: int | None = None):
        return await self._run(TaskKind.GENERATE, prompt_payload(prompt), generate_config, timeout_s, deadline_ms)

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                   generate_config: dict[str, Any] | None = None, *, tool_choice: str | dict[str, Any] | None = None,
                   timeout_s: float | None = None, deadline_ms: int | None = None):
        payload: dict[str, Any] = {"messages": messages}
        if tools is not None:
            payload["tools"] = tools
        if tool_choice is not None:
            payload["tool_choice"] = tool_choice
        return await self._run(TaskKind.CHAT, payload, generate_config, timeout_s, deadline_ms)

    async def text_to_image(self, prompt: str, n: int = 1, size: str = "1024*1024", response_format: str = "b64_json",
                            *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                            seed: int | None = None, negative_prompt: str | None = None, request_id: str | None = None,
                            timeout_s: float | None = None, deadline_ms: int | None = None) -> dict[str, Any]:
        """Xinference's shape: {"created": unix s, "data": [{"b64_json": ...} | {"url": ...}, ...]}."""
        payload = image_payload(prompt, n, size, response_format, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, seed=seed, negative_prompt=negative_prompt)
        request_id = await self.submit(TaskKind.TEXT_TO_IMAGE, payload, request_id=request_id, deadline_ms=deadline_ms)
        return image_list(request_id, [e async for e in self.client.events(request_id, timeout_s=timeout_s)])

    async def submit(self, task: TaskKind, payload: dict[str, Any], generate_config: dict[str, Any] | None = None, *,
                     deadline_ms: int | None = None, request_id: str | None = None) -> str:
        self.info.check_task(task)
        request_id, body = build_body(task, payload, generate_config, request_id)
        args = enqueue_args(request_id, task, body, self.info.max_queue_len, deadline_ms, self.client.result_ttl_s)
        keys = self.client.keys
        if self.client.on_no_live_worker != "ignore":
            live = await self.client.redis.zcount(keys.model_workers(self.name), self.info.live_since_ms(), "+inf")
            handle_live_workers(self.client.on_no_live_worker, self.name, int(live))
        try:
            await self.client._enqueue(keys=[keys.requests(self.name), keys.request_owner(self.name, request_id)], args=args)
        except ResponseError as exc:
            raise enqueue_error(exc, self.name, request_id, self.info.max_queue_len) from None
        return request_id

    async def abort(self, request_id: str) -> bool:
        return await self.client.abort_request(self.name, request_id)

    async def _run(self, task, payload, generate_config, timeout_s, deadline_ms):
        """A completion dict, or (with stream) an async iterator of chunks."""
        is_stream = (generate_config or {}).get("stream", True) is not False
        request_id = await self.submit(task, payload, generate_config, deadline_ms=deadline_ms)
        shaper = Shaper(request_id, self.name, task)
        if is_stream:
            return self._stream(request_id, shaper, timeout_s)
        done = await self.client.wait(request_id, timeout_s=timeout_s)
        return shaper.completion(done, done.logprobs)

    async def _stream(self, request_id: str, shaper: Shaper, timeout_s: float | None) -> AsyncIterator[dict[str, Any]]:
        async for event in self.client.events(request_id, timeout_s=timeout_s):
            chunk = shaper.chunk(event)
            if chunk is not None:
                yield chunk
