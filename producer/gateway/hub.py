"""Shared blocking reads: a few XREAD loops serve every open request of the gateway.

A gateway with 500 streams open must not hold 500 Redis connections, each blocked in its own
XREAD. Instead each reader ("lane") owns one connection and blocks in one XREAD over the events
streams of all the requests assigned to it, plus a wake stream of its own: a request that
subscribes while the lane is blocked XADDs one entry there (at most one per blocked read), so the
XREAD returns and the next one includes the new stream. Events are handed to per-request queues.

On a Redis Cluster an XREAD cannot span slots, so a lane reads slot by slot (producer.cluster's
read_streams_async: one pipelined non-blocking XREAD per slot on each node, then a short block on one
slot) and rebuilds its read every BLOCK_TURN_MS: a new subscription is read within that, no wake
stream needed.

Nothing here is durable state: a subscriber reads its events stream from `0-0`, so a gateway that
restarts (or another gateway) can serve the same request again from Redis.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.cluster import BLOCK_TURN_MS, close_node_clients, is_cluster, read_streams_async
from producer.errors import RequestTimeout
from producer.keys import Keys
from producer.protocol import ErrorCode, Event, EventType, decode_event
from producer.results import READ_BLOCK_MS, READ_COUNT
from producer.submit import RECONNECT_DELAY_S

log = logging.getLogger(__name__)

WAKE_TTL_S = 120  # a gateway that dies leaves its wake stream behind this long
WAKE_MAXLEN = 16


class Subscription:
    """One request's events as they arrive; iterate with `events()`, end with `close()`."""

    def __init__(self, lane: "Lane", request_id: str, key: str):
        self.lane = lane
        self.request_id = request_id
        self.key = key
        self.last_id = "0-0"
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    async def next_event(self, timeout_s: float | None = None) -> Event:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no event for request {self.request_id} within {timeout_s} s") from None

    async def events(self, timeout_s: float | None = None) -> AsyncIterator[Event]:
        """Events in order until (and including) the terminal one; `timeout_s` bounds each wait."""
        while True:
            event = await self.next_event(timeout_s)
            yield event
            if event.is_terminal:
                return

    def close(self) -> None:
        self.lane.unsubscribe(self)


class Lane:
    """One reader: one connection, one XREAD loop over its subscriptions' events streams and its wake stream."""

    def __init__(self, make_connection: Callable[[], aredis.Redis], wake_client: aredis.Redis, wake_key: str):
        self.conn = make_connection()
        self.is_cluster = is_cluster(self.conn)
        self._node_clients: dict[str, aredis.Redis] = {}  # on a Cluster: this lane's one connection per node
        self.wake_client = wake_client
        self.wake_key = wake_key
        self.wake_last_id = "0-0"
        self.subs: dict[str, Subscription] = {}  # events key -> subscription
        self.reading: set[str] | None = None  # the keys of the XREAD in flight, None between reads
        self.wake_sent = False
        self.num_reads = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._wakes: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await close_node_clients(self._node_clients)
        await self.conn.aclose()

    def subscribe(self, sub: Subscription) -> None:
        self.subs[sub.key] = sub
        self._changed.set()
        if self.reading is not None and sub.key not in self.reading and not self.wake_sent and not self.is_cluster:
            self.wake_sent = True
            task = asyncio.create_task(self._wake())
            self._wakes.add(task)
            task.add_done_callback(self._wakes.discard)

    def unsubscribe(self, sub: Subscription) -> None:
        if self.subs.get(sub.key) is sub:
            del self.subs[sub.key]

    async def _wake(self) -> None:
        try:
            pipe = self.wake_client.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=WAKE_MAXLEN, approximate=True)
            pipe.expire(self.wake_key, WAKE_TTL_S)
            await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError):
            pass  # the blocked read ends within READ_BLOCK_MS anyway

    async def _run(self) -> None:
        while True:
            if not self.subs:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams = {key: sub.last_id for key, sub in self.subs.items()}
            if not self.is_cluster:
                streams[self.wake_key] = self.wake_last_id
            self.reading, self.wake_sent = set(streams), False
            try:
                reply = await self._read(streams)
            except (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError) as exc:
                log.warning("event read failed (%s); retrying", exc)
                reply = None
                await asyncio.sleep(RECONNECT_DELAY_S)  # Redis restarting: events are kept, read on
            except Exception as exc:  # the lane serves other requests: it must not die of one
                log.exception("event read failed")
                reply = None
                await self._fail_unreadable(exc)
            finally:
                self.reading = None
            self.num_reads += 1
            self._dispatch(reply or [])

    async def _read(self, streams: dict[str, str]) -> list:
        if not self.is_cluster:
            return await self.conn.xread(streams, count=READ_COUNT, block=READ_BLOCK_MS)
        return await read_streams_async(self.conn, streams, count=READ_COUNT, block_ms=BLOCK_TURN_MS,
                                        node_clients=self._node_clients, first_turn=self.num_reads)

    async def _fail_unreadable(self, exc: Exception) -> None:
        """The XREAD was refused (a key that is not a stream, say): fail the requests whose key is at fault."""
        keys = list(self.subs)
        try:
            pipe = self.conn.pipeline(transaction=False)
            for key in keys:
                pipe.type(key)
            types = await pipe.execute()
        except Exception:  # cannot tell which: read again after a pause
            log.exception("cannot tell which request's events stream is unreadable")
            types = []
        bad = {key: _text(kind) for key, kind in zip(keys, types) if _text(kind) not in ("stream", "none")}
        for key, kind in bad.items():
            if key in self.subs:
                self._fail(self.subs[key], f"its events key holds a {kind}, not a stream ({exc})")
        if not bad:
            await asyncio.sleep(RECONNECT_DELAY_S)

    def _fail(self, sub: Subscription, why: str) -> None:
        log.error("request %s failed in the gateway: %s", sub.request_id, why)
        sub.queue.put_nowait(Event(seq=-1, type=EventType.ERROR, code=ErrorCode.MODEL_ERROR.value,
                                   message=f"gateway: request {sub.request_id}: {why}"))
        self.unsubscribe(sub)

    def _dispatch(self, reply) -> None:
        for raw_key, entries in reply:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            if key == self.wake_key:
                self.wake_last_id = _text(entries[-1][0])
                continue
            sub = self.subs.get(key)
            if sub is None:
                continue  # unsubscribed while the read was in flight
            for entry_id, fields in entries:
                sub.last_id = _text(entry_id)
                try:
                    event = decode_event(fields)
                except Exception as exc:  # noqa: BLE001 - a malformed event fails its request only
                    self._fail(sub, f"malformed event {sub.last_id}: {exc}")
                    break
                sub.queue.put_nowait(event)
                if event.is_terminal:
                    self.unsubscribe(sub)
                    break


class EventHub:
    """Routes every subscribed request's events from a few shared XREAD loops."""

    def __init__(self, client: aredis.Redis, make_connection: Callable[[], aredis.Redis], keys: Keys,
                 num_lanes: int = 1, gateway_id: str | None = None):
        self.keys = keys
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:12]}"
        self._client = client
        self._make_connection = make_connection
        self.lanes: list[Lane] = []
        self._num_lanes = num_lanes
        self._started = False

    def start(self) -> None:
        self._started = True
        for _ in range(self._num_lanes):
            self._add_lane()

    def _add_lane(self) -> Lane:
        lane = Lane(self._make_connection, self._client, self.keys.gateway_wake(f"{self.gateway_id}.{len(self.lanes)}"))
        self.lanes.append(lane)
        lane.start()
        return lane

    async def stop(self) -> None:
        for lane in self.lanes:
            await lane.stop()

    def subscribe(self, request_id: str) -> Subscription:
        """Start following `request_id`'s events from the first one."""
        key = self.keys.events(request_id)
        free = [lane for lane in self.lanes if key not in lane.subs]
        # the same request followed twice at once (a client retrying on the same gateway): another lane
        lane = min(free, key=lambda lane: len(lane.subs)) if free else self._add_lane()
        sub = Subscription(lane, request_id, key)
        lane.subscribe(sub)
        return sub

    @property
    def num_open(self) -> int:
        return sum(len(lane.subs) for lane in self.lanes)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
