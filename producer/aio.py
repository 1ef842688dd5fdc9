"""The asyncio twin of producer.client, on redis.asyncio: the same shared pieces, awaited I/O."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.cluster import close_node_clients, id_source, read_streams_async
from producer.connection import connect_async
from producer.errors import RequestTimeout
from producer.keys import DEFAULT_PREFIX, DEFAULT_PRIORITY, Keys, Priority
from producer.protocol import Event, TaskKind
from producer.results import READ_COUNT, EventCursor, Shaper, has_finished, image_list
from producer.submit import (
    DEFAULT_RESULT_TTL_S,
    ENQUEUE_LUA,
    RECONNECT_DELAY_S,
    ModelInfo,
    Submission,
    chat_payload,
    check_no_live_worker_policy,
    decode_models,
    handle_live_workers,
    image_payload,
    model_key_name,
    new_request_id,
    prompt_payload,
    request_key_id,
    wants_stream,
)


class AsyncClient:
    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        result_ttl_s: int = DEFAULT_RESULT_TTL_S,
        on_no_live_worker: str = "error",
        colocate_request_ids: bool = True,
        redis_client: aredis.Redis | None = None,
    ):
        self.redis = redis_client if redis_client is not None else connect_async(url)
        self.keys = Keys(prefix)
        self.result_ttl_s = result_ttl_s
        self.on_no_live_worker = check_no_live_worker_policy(on_no_live_worker)
        self.colocate_request_ids = colocate_request_ids  # on a Cluster: see producer.cluster.colocated_id
        self._enqueue = self.redis.register_script(ENQUEUE_LUA)
        self._node_clients: dict[str, aredis.Redis] = {}  # on a Cluster: a plain client per node for event reads

    async def aclose(self) -> None:
        await close_node_clients(self._node_clients)
        await self.redis.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def list_models(self) -> dict[str, dict[str, Any]]:
        return decode_models(await self.redis.hgetall(self.keys.models()))

    async def get_model(self, name: str) -> "AsyncModel":
        name = model_key_name(name)
        info = ModelInfo.parse(name, await self.redis.hget(self.keys.models(), name))
        return AsyncModel(self, info)

    async def abort_request(self, model: str, request_id: str) -> bool:
        model_key_name(model)
        request_key_id(request_id)
        if has_finished(await self.redis.xrevrange(self.keys.events(request_id), count=1)):
            return False
        await self.redis.set(self.keys.abort(request_id), b"1", ex=self.result_ttl_s)
        return True

    async def events(self, request_id: str, *, timeout_s: float | None = None, after: str = "0-0") -> AsyncIterator[Event]:
        cursor = EventCursor(self.keys.events(request_id), request_id, timeout_s, after)
        while not cursor.is_done:
            try:
                reply = await read_streams_async(self.redis, {cursor.key: cursor.after}, count=READ_COUNT,
                                                 block_ms=cursor.block_ms(), node_clients=self._node_clients,
                                                 single_connection=False)
            except (ConnectionError, TimeoutError, RedisConnectionError, RedisTimeoutError):
                reply = None  # Redis restarting: the events are kept, wait
                await asyncio.sleep(RECONNECT_DELAY_S)
            for event in cursor.take(reply):
                yield event

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
                       timeout_s: float | None = None, deadline_ms: int | None = None,
                       priority: Priority | str = DEFAULT_PRIORITY):
        return await self._run(TaskKind.GENERATE, prompt_payload(prompt), generate_config, timeout_s, deadline_ms, priority)

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                   generate_config: dict[str, Any] | None = None, *, tool_choice: str | dict[str, Any] | None = None,
                   timeout_s: float | None = None, deadline_ms: int | None = None,
                       priority: Priority | str = DEFAULT_PRIORITY):
        payload = chat_payload(messages, tools, tool_choice)
        return await self._run(TaskKind.CHAT, payload, generate_config, timeout_s, deadline_ms, priority)

    async def text_to_image(self, prompt: str, n: int = 1, size: str = "1024*1024", response_format: str = "b64_json",
                            *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                            seed: int | None = None, negative_prompt: str | None = None, request_id: str | None = None,
                            timeout_s: float | None = None, deadline_ms: int | None = None,
                            priority: Priority | str = DEFAULT_PRIORITY) -> dict[str, Any]:
        """Xinference's shape: {"created": unix s, "data": [{"b64_json": ...} | {"url": ...}, ...]}."""
        payload = image_payload(prompt, n, size, response_format, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, seed=seed, negative_prompt=negative_prompt)
        request_id = await self.submit(TaskKind.TEXT_TO_IMAGE, payload, request_id=request_id, deadline_ms=deadline_ms,
                                       priority=priority)
        return image_list(request_id, [e async for e in self.client.events(request_id, timeout_s=timeout_s)])

    async def submit(self, task: TaskKind, payload: dict[str, Any], generate_config: dict[str, Any] | None = None, *,
                     deadline_ms: int | None = None, request_id: str | None = None,
                     user: str | None = None, priority: Priority | str = DEFAULT_PRIORITY) -> str:
        client = self.client
        sub = Submission.prepare(client.keys, self.info, task, payload, generate_config, deadline_ms,
                                 client.result_ttl_s, request_id, user, priority,
                                 id_source(client.redis, client.keys.requests(self.name), new_request_id,
                                           client.colocate_request_ids))
        if client.on_no_live_worker != "ignore":
            live = await client.redis.zcount(sub.workers_key, sub.live_since_ms, "+inf")
            handle_live_workers(client.on_no_live_worker, self.name, int(live))
        try:
            await client._enqueue(keys=sub.script_keys, args=sub.script_args)
        except ResponseError as exc:
            raise sub.refusal(exc) from None
        return sub.request_id

    async def abort(self, request_id: str) -> bool:
        return await self.client.abort_request(self.name, request_id)

    async def _run(self, task, payload, generate_config, timeout_s, deadline_ms, priority):
        """A completion dict, or (with stream) an async iterator of chunks."""
        request_id = await self.submit(task, payload, generate_config, deadline_ms=deadline_ms, priority=priority)
        shaper = Shaper(request_id, self.name, task)
        if wants_stream(generate_config):
            return self._stream(request_id, shaper, timeout_s)
        done = await self.client.wait(request_id, timeout_s=timeout_s)
        return shaper.completion(done, done.logprobs)

    async def _stream(self, request_id: str, shaper: Shaper, timeout_s: float | None) -> AsyncIterator[dict[str, Any]]:
        async for event in self.client.events(request_id, timeout_s=timeout_s):
            chunk = shaper.chunk(event)
            if chunk is not None:
                yield chunk
