"""The gateway's shared event reads: one request's unreadable events fail that request, not the lane."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aredis

from producer.keys import Keys

pytest.importorskip("fastapi")
from producer.gateway.hub import EventHub

pytestmark = pytest.mark.redis


async def _follow(redis_server_url: str, prefix: str, setup) -> tuple:
    keys = Keys(prefix)
    client = aredis.from_url(redis_server_url)
    hub = EventHub(client, lambda: aredis.from_url(redis_server_url, single_connection_client=True), keys)
    hub.start()
    try:
        bad, good = hub.subscribe("bad-1"), hub.subscribe("good-1")
        await asyncio.sleep(0.2)  # both in the blocked read
        await setup(client, keys)
        bad_event = await bad.next_event(10)
        good_events = [event async for event in good.events(10)]
        return bad_event, good_events, hub.num_open
    finally:
        await hub.stop()
        await client.aclose()


async def _good_events(client, keys: Keys) -> None:
    await client.xadd(keys.events("good-1"), {"seq": 0, "type": "token", "text": "hi", "token_ids": "[1]"}, id="0-1")
    await client.xadd(keys.events("good-1"), {"seq": 1, "type": "done", "finish_reason": "stop"}, id="0-2")


def test_a_malformed_event_fails_its_request_and_the_lane_serves_the_others(redis_server_url, prefix):
    async def setup(client, keys):
        await client.xadd(keys.events("bad-1"), {"seq": "not a number", "type": "nonsense"}, id="0-1")
        await asyncio.sleep(0.2)
        await _good_events(client, keys)

    bad, good, num_open = asyncio.run(_follow(redis_server_url, prefix, setup))
    assert bad.type == "error" and bad.is_terminal and "malformed event" in bad.message and "bad-1" in bad.message
    assert [event.type for event in good] == ["token", "done"] and good[0].text == "hi"
    assert num_open == 0


def test_an_events_key_that_is_not_a_stream_fails_its_request_only(redis_server_url, prefix):
    async def setup(client, keys):
        await client.set(keys.events("bad-1"), "oops")  # the XREAD over it is refused (WRONGTYPE)
        await asyncio.sleep(0.2)
        await _good_events(client, keys)

    bad, good, num_open = asyncio.run(_follow(redis_server_url, prefix, setup))
    assert bad.type == "error" and "not a stream" in bad.message and "bad-1" in bad.message
    assert [event.type for event in good] == ["token", "done"]
    assert num_open == 0
