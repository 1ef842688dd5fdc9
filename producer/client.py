"""Synchronous client, shaped like Xinference's: Client(url).get_model(name).chat(...).

Request building, result shaping and the events cursor are shared with the async twin
(producer.aio) through producer.submit and producer.results; this module only does the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.exceptions import ResponseError

from producer.cluster import id_source, read_streams
from producer.connection import connect
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


class Client:
    """A connection to one redbatch deployment (one Redis and key prefix)."""

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        result_ttl_s: int = DEFAULT_RESULT_TTL_S,
        on_no_live_worker: str = "error",
        colocate_request_ids: bool = True,
        redis_client: redis.Redis | None = None,
    ):
        self.redis = redis_client if redis_client is not None else connect(url)
        self.keys = Keys(prefix)
        self.result_ttl_s = result_ttl_s
        self.on_no_live_worker = check_no_live_worker_policy(on_no_live_worker)
        self.colocate_request_ids = colocate_request_ids  # on a Cluster: see producer.cluster.colocated_id
        self._enqueue = self.redis.register_script(ENQUEUE_LUA)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def list_models(self) -> dict[str, dict[str, Any]]:
        return decode_models(self.redis.hgetall(self.keys.models()))

    def get_model(self, name: str) -> "Model":
        return Model(self, self.model_info(name))

    def model_info(self, name: str) -> ModelInfo:
        name = model_key_name(name)
        return ModelInfo.parse(name, self.redis.hget(self.keys.models(), name))

    def abort_request(self, model: str, request_id: str) -> bool:
        """Ask the workers to stop `request_id`. False (a no-op) when it already finished."""
        model_key_name(model)
        request_key_id(request_id)
        if has_finished(self.redis.xrevrange(self.keys.events(request_id), count=1)):
            return False
        self.redis.set(self.keys.abort(request_id), b"1", ex=self.result_ttl_s)
        return True

    def events(self, request_id: str, *, timeout_s: float | None = None, after: str = "0-0") -> Iterator[Event]:
        """Yield the request's events in order until (and including) the terminal one."""
        cursor = EventCursor(self.keys.events(request_id), request_id, timeout_s, after)
        while not cursor.is_done:
            try:
                reply = read_streams(self.redis, {cursor.key: cursor.after}, count=READ_COUNT, block_ms=cursor.block_ms())
            except (redis.ConnectionError, redis.TimeoutError):  # Redis restarting: the events are kept, wait
                reply = None
                time.sleep(RECONNECT_DELAY_S)
            yield from cursor.take(reply)

    def wait(self, request_id: str, *, timeout_s: float | None = None) -> Event:
        """Block until the request's terminal event and return it (done, error or aborted)."""
        for event in self.events(request_id, timeout_s=timeout_s):
            if event.is_terminal:
                return event
        raise RequestTimeout(f"request {request_id} has no terminal event")


class Model:
    """A handle on one served model. Methods mirror Xinference's model handles."""

    def __init__(self, client: Client, info: ModelInfo):
        self.client = client
        self.info = info
        self.name = info.name

    def generate(
        self,
        prompt: str | list[int],
        generate_config: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        deadline_ms: int | None = None,
        priority: Priority | str = DEFAULT_PRIORITY,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        return self._run(TaskKind.GENERATE, prompt_payload(prompt), generate_config, timeout_s, deadline_ms, priority)

    def chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        generate_config: dict[str, Any] | None = None,
        *,
        tool_choice: str | dict[str, Any] | None = None,
        timeout_s: float | None = None,
        deadline_ms: int | None = None,
        priority: Priority | str = DEFAULT_PRIORITY,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        payload = chat_payload(messages, tools, tool_choice)
        return self._run(TaskKind.CHAT, payload, generate_config, timeout_s, deadline_ms, priority)

    def text_to_image(
        self,
        prompt: str,
        n: int = 1,
        size: str = "1024*1024",
        response_format: str = "b64_json",
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        negative_prompt: str | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        deadline_ms: int | None = None,
        priority: Priority | str = DEFAULT_PRIORITY,
    ) -> dict[str, Any]:
        """Xinference's shape: {"created": unix s, "data": [{"b64_json": ...} | {"url": ...}, ...]}."""
        payload = image_payload(prompt, n, size, response_format, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, seed=seed, negative_prompt=negative_prompt)
        request_id = self.submit(TaskKind.TEXT_TO_IMAGE, payload, request_id=request_id, deadline_ms=deadline_ms,
                                 priority=priority)
        return image_list(request_id, list(self.client.events(request_id, timeout_s=timeout_s)))

    def submit(
        self,
        task: TaskKind,
        payload: dict[str, Any],
        generate_config: dict[str, Any] | None = None,
        *,
        deadline_ms: int | None = None,
        request_id: str | None = None,
        user: str | None = None,
        priority: Priority | str = DEFAULT_PRIORITY,
    ) -> str:
        """Enqueue one request and return its id without waiting."""
        client = self.client
        sub = Submission.prepare(client.keys, self.info, task, payload, generate_config, deadline_ms,
                                 client.result_ttl_s, request_id, user, priority,
                                 id_source(client.redis, client.keys.requests(self.name), new_request_id,
                                           client.colocate_request_ids))
        if client.on_no_live_worker != "ignore":
            live = client.redis.zcount(sub.workers_key, sub.live_since_ms, "+inf")
            handle_live_workers(client.on_no_live_worker, self.name, int(live))
        try:
            client._enqueue(keys=sub.script_keys, args=sub.script_args)
        except ResponseError as exc:
            raise sub.refusal(exc) from None
        return sub.request_id

    def abort(self, request_id: str) -> bool:
        return self.client.abort_request(self.name, request_id)

    def _run(self, task, payload, generate_config, timeout_s, deadline_ms, priority):
        request_id = self.submit(task, payload, generate_config, deadline_ms=deadline_ms, priority=priority)
        shaper = Shaper(request_id, self.name, task)
        if wants_stream(generate_config):
            return self._stream(request_id, shaper, timeout_s)
        done = self.client.wait(request_id, timeout_s=timeout_s)
        return shaper.completion(done, done.logprobs)

    def _stream(self, request_id: str, shaper: Shaper, timeout_s: float | None) -> Iterator[dict[str, Any]]:
        for event in self.client.events(request_id, timeout_s=timeout_s):
            chunk = shaper.chunk(event)
            if chunk is not None:
                yield chunk
