"""What the gateway does per request: submit through the async client, follow the events, shape the answer.

Stateless by construction: everything a request needs after its submit is in Redis (its entry, its
events stream, its abort key), so another gateway, or this one after a restart, can serve it again.
A request POSTed again with the same `request_id` is not enqueued twice: the gateway follows the
existing request's events from the first one (an idempotent retry).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.aio import AsyncClient, AsyncModel
from producer.connection import connect, connect_async
from producer.errors import DuplicateRequest, RedbatchError, RequestAborted, RequestError, RequestTimeout
from producer.gateway.config import GatewayConfig
from producer.gateway.errors import ABORTED_STATUS, HTTPError, from_redbatch, unknown_model
from producer.gateway.hub import EventHub, Subscription
from producer.gateway.openai_api import Translated
from producer.gateway.shaping import DONE_LINE, StreamShaper, completion, sse, with_data_urls
from producer.gateway.streaming import ClientGone, DisconnectWatcher, EventStreamResponse
from producer.keys import Keys
from producer.protocol import Event, ModelRegistration, TaskKind, now_ms
from producer.results import Shaper, check_terminal, image_list

log = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_NAME = "redbatch-gateway"  # CLIENT LIST shows which connections are the gateway's
READER_CLIENT_NAME = "redbatch-gateway-events"


class Gateway:
    """One gateway process: its Redis clients, the shared event reader and the per-request flow."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.keys = Keys(config.prefix)
        # Commands (submit, abort, models) share a bounded pool; each event reader holds one connection of its own.
        self.redis = connect_async(config.redis_url, max_connections=config.redis_max_connections,
                                   client_name=CLIENT_NAME)
        self.client = AsyncClient(redis_client=self.redis, prefix=config.prefix, result_ttl_s=config.result_ttl_s)
        self.hub = EventHub(self.redis, lambda: connect_async(config.redis_url, single_connection_client=True,
                                                              client_name=READER_CLIENT_NAME),
                            self.keys, num_lanes=config.num_event_readers)
        # producer.admin.system_status is synchronous: the status page runs it in a thread
        self.sync_redis = connect(config.redis_url, client_name=CLIENT_NAME)
        self._models: dict[str, tuple[float, AsyncModel]] = {}
        self._lookups: dict[str, asyncio.Future] = {}  # model name -> the registration read in flight
        self._background: set[asyncio.Task] = set()
        self.num_streams = 0  # open requests (streams and waits), for readiness and the status page

    async def start(self) -> None:
        self.hub.start()

    async def stop(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        await self.hub.stop()
        await self.redis.aclose()
        self.sync_redis.close()

    # ------------------------------------------------------------ models

    async def model(self, name: str) -> AsyncModel:
        """The model's handle (its registration cached for model_info_ttl_s); 404 when no worker registered it."""
        cached = self._models.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.config.model_info_ttl_s:
            return cached[1]
        # One read per model however many requests miss the cache at once: 512 requests arriving together
        # made 512 HGETs queue for the command pool (bench.gateway), each one more wait before its submit.
        lookup = self._lookups.get(name)
        if lookup is None:
            lookup = self._lookups[name] = asyncio.ensure_future(self._look_up(name))
            lookup.add_done_callback(lambda done: self._lookup_done(name, done))
        return await asyncio.shield(lookup)  # a request whose client left must not cancel the others' read

    async def _look_up(self, name: str) -> AsyncModel:
        try:
            model = await self.client.get_model(name)
        except RedbatchError:
            raise unknown_model(name) from None
        self._models[name] = (time.monotonic(), model)
        return model

    def _lookup_done(self, name: str, done: asyncio.Future) -> None:
        if self._lookups.get(name) is done:
            del self._lookups[name]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have left

    async def registered_models(self) -> dict[str, tuple[ModelRegistration, int]]:
        """Every registered model with its number of live workers (ZCOUNT of fresh heartbeats)."""
        raw = await self.redis.hgetall(self.keys.models())
        models = {k.decode(): ModelRegistration.parse(v) for k, v in raw.items()}
        now, names = now_ms(), sorted(models)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zcount(self.keys.model_workers(name), now - models[name].heartbeat_ttl_s * 1000, "+inf")
        counts = await pipe.execute() if names else []
        return {name: (models[name], int(n)) for name, n in zip(names, counts)}

    # ------------------------------------------------------------ one request

    async def serve(self, request: Request, req: Translated) -> Response:
        try:
            model = await self.model(req.model)
            request_id = await self._submit(model, req)
        except (RedisConnectionError, RedisTimeoutError) as exc:  # no free connection in time, Redis away
            raise HTTPError(503, f"Redis did not answer in time, nothing was enqueued: {exc}", type="server_error",
                            code="redis_unavailable", headers={"Retry-After": str(self.config.retry_after_s)}) from None
        sub = self.hub.subscribe(request_id)
        watcher = DisconnectWatcher(request.receive)
        shaper = Shaper(request_id, model.name, req.task)
        headers = {"X-Request-Id": request_id}
        self.num_streams += 1
        handed_to_stream = False
        try:
            first = await self._next(sub, watcher, model.name)
            if req.task == TaskKind.TEXT_TO_IMAGE:
                return await self._images(sub, watcher, model.name, req, first, headers)
            if not req.is_stream:
                done = await self._terminal(sub, watcher, model.name, first)
                return JSONResponse(self._completion(shaper, done, model.name), headers=headers)
            if first.is_terminal and first.type != "done":
                check_terminal_http(first, request_id, model.name, self.config.retry_after_s)
            stream = StreamShaper(shaper, bool(getattr(req.body, "include_usage", False)))
            handed_to_stream = True
            return EventStreamResponse(self._sse(sub, stream, first, model.name), watcher,
                                       on_gone=lambda: self._gone(sub, model.name), on_end=lambda: self._stream_ended(sub),
                                       headers=headers)
        except ClientGone:
            self._gone(sub, model.name)
            return Response(status_code=ABORTED_STATUS)
        except RequestTimeout as exc:
            self._gone(sub, model.name)
            raise from_redbatch(exc, model.name, self.config.retry_after_s) from None
        finally:
            if not handed_to_stream:
                sub.close()
                watcher.cancel()
                self.num_streams -= 1

    async def _submit(self, model: AsyncModel, req: Translated) -> str:
        deadline_ms = req.deadline_ms
        if deadline_ms is None and self.config.max_queue_wait_s is not None:
            deadline_ms = now_ms() + int(self.config.max_queue_wait_s * 1000)
        try:
            return await model.submit(req.task, req.payload, req.generate_config, deadline_ms=deadline_ms,
                                      request_id=req.image_request_id, user=req.user)
        except DuplicateRequest:
            return req.request_id  # a retry: follow the request already there
        except RedbatchError as exc:
            raise from_redbatch(exc, model.name, self.config.retry_after_s) from None

    async def _next(self, sub: Subscription, watcher: "DisconnectWatcher", model: str) -> Event:
        return await watcher.race(sub.next_event(self.config.request_timeout_s))

    async def _terminal(self, sub: Subscription, watcher: "DisconnectWatcher", model: str, event: Event) -> Event:
        while not event.is_terminal:
            event = await self._next(sub, watcher, model)
        return event

    def _completion(self, shaper: Shaper, done: Event, model: str) -> dict[str, Any]:
        try:
            return completion(shaper, done)
        except (RequestError, RequestAborted) as exc:
            raise from_redbatch(exc, model, self.config.retry_after_s) from None

    async def _images(self, sub, watcher, model: str, req: Translated, event: Event, headers) -> Response:
        events = [event]
        while not event.is_terminal:
            event = await self._next(sub, watcher, model)
            events.append(event)
        try:
            images = image_list(sub.request_id, events)
        except (RequestError, RequestAborted) as exc:
            raise from_redbatch(exc, model, self.config.retry_after_s) from None
        if req.body.response_format != "b64_json":
            images = with_data_urls(images)
        return JSONResponse(images, headers=headers)

    async def _sse(self, sub: Subscription, stream: StreamShaper, event: Event, model: str) -> AsyncIterator[bytes]:
        while True:
            try:
                for chunk in stream.chunks(event):
                    yield sse(chunk)
            except (RequestError, RequestAborted) as exc:  # an error event after the stream began
                yield sse(from_redbatch(exc, model, self.config.retry_after_s).body())
                break
            if event.is_terminal:
                break
            try:
                event = await sub.next_event(self.config.request_timeout_s)
            except RequestTimeout as exc:
                self._abort_later(model, sub.request_id)
                yield sse(from_redbatch(exc, model, self.config.retry_after_s).body())
                break
        yield DONE_LINE

    def _stream_ended(self, sub: Subscription) -> None:
        sub.close()
        self.num_streams -= 1

    def _gone(self, sub: Subscription, model: str) -> None:
        """The client went away (or waited too long): abort its request, so the worker frees the slot."""
        sub.close()
        self._abort_later(model, sub.request_id)

    def _abort_later(self, model: str, request_id: str) -> None:
        # A task of its own: the request's task may be cancelled right after this (see NOTES: Starlette)
        self.spawn(self.client.abort_request(model, request_id))

    def spawn(self, work: Awaitable[T]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def abort(self, request_id: str, model: str | None) -> bool:
        return await self.client.abort_request(model or "any", request_id)


def check_terminal_http(event: Event, request_id: str, model: str, retry_after_s: int) -> None:
    """Raise the HTTP error an `error` or `aborted` terminal event stands for."""
    try:
        check_terminal(event, request_id)
    except (RequestError, RequestAborted) as exc:
        raise from_redbatch(exc, model, retry_after_s) from None

