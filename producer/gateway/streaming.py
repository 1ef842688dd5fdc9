"""Noticing that an HTTP client went away, while waiting for its events and while streaming them.

uvicorn tells an app about a closed connection only through `receive()` (an `http.disconnect`
message); a `send()` after it is silently dropped. So every request has a watcher task blocked
in `receive()`, and the waits race it. The abort that follows runs as a task of its own (the
request's own task may be cancelled next: an `await` in a `finally` there would never run).
A gateway that shuts down cancels its requests: that is not a disconnect, and aborts nothing
(a client may retry the same `request_id` on another gateway).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client closed its connection."""


class DisconnectWatcher:
    def __init__(self, receive: Receive):
        self.task = asyncio.ensure_future(self._wait(receive))

    @staticmethod
    async def _wait(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def race(self, work: Awaitable[T]) -> T:
        """`work`'s result, or ClientGone if the client disconnects first (`work` is then cancelled)."""
        job = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({job, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        job.cancel()
        raise ClientGone()

    def cancel(self) -> None:
        self.task.cancel()


class EventStreamResponse(Response):
    """`text/event-stream` from an async iterator of bytes; `on_gone` runs if the client leaves first."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], watcher: DisconnectWatcher, on_gone: Callable[[], Any],
                 on_end: Callable[[], Any], headers: dict[str, str] | None = None):
        self.chunks = chunks
        self.watcher = watcher
        self.on_gone = on_gone
        self.on_end = on_end
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming: asyncio.Future | None = None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            streaming = asyncio.ensure_future(self._send_all(send))
            done, _ = await asyncio.wait({streaming, self.watcher.task}, return_when=asyncio.FIRST_COMPLETED)
            if streaming in done:
                streaming.result()
                return
            self.on_gone()
        finally:
            if streaming is not None and not streaming.done():
                streaming.cancel()  # the client left, or the gateway is shutting down
            self.watcher.cancel()
            self.on_end()

    async def _send_all(self, send: Send) -> None:
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
