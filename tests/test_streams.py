"""WorkerStreams against fakeredis: reclaim, the restart guard, hand-back delivery counts."""

from __future__ import annotations

import time

import fakeredis
import pytest

from producer.keys import GROUP
from worker.config import WorkerConfig
from worker.streams import WorkerStreams


def make_streams(server, worker_id: str, lease_s: float = 0.05) -> WorkerStreams:
    config = WorkerConfig(model_name="m", model_path="p", worker_id=worker_id, lease_s=lease_s)
    streams = WorkerStreams(fakeredis.FakeRedis(server=server), config)
    streams.ensure_group()
    return streams


@pytest.fixture
def server():
    return fakeredis.FakeServer()


def orphan(streams: WorkerStreams) -> str:
    """An entry read by a consumer that then went away."""
    entry_id = streams.redis.xadd(streams.requests_key, {"id": "r1"}).decode()
    streams.redis.xreadgroup(GROUP, "gone", {streams.requests_key: ">"}, count=1)
    time.sleep(streams.config.lease_s * 2)
    return entry_id


def test_reclaim_works_where_info_is_refused(server, caplog):
    streams = make_streams(server, "w1")
    entry_id = orphan(streams)  # fakeredis has no INFO, like an ACL without +info
    assert streams.has_orphans()
    assert [(e, n) for e, _, n in streams.reclaim(4)] == [(entry_id, 2)]
    assert "cannot read Redis uptime" in caplog.text


@pytest.mark.parametrize("uptime_s, expect_claimed", [(0, False), (3600, True)])
def test_no_reclaim_in_the_first_lease_after_a_restart(server, monkeypatch, uptime_s, expect_claimed):
    streams = make_streams(server, "w1")
    orphan(streams)
    monkeypatch.setattr(streams.redis, "info", lambda section: {"uptime_in_seconds": uptime_s})
    assert streams.has_orphans() is expect_claimed
    assert bool(streams.reclaim(4)) is expect_claimed
    if not expect_claimed:
        assert streams.reclaim_scan_done  # blocked: the loop does not retry at every iteration meanwhile


def test_uptime_is_asked_again_only_after_an_error(server, monkeypatch):
    streams = make_streams(server, "w1")
    monkeypatch.setattr(streams.redis, "info", lambda section: {"uptime_in_seconds": 3600})
    assert not streams.redis_restarted_recently()
    monkeypatch.setattr(streams.redis, "info", lambda section: {"uptime_in_seconds": 0})  # restarted meanwhile
    assert not streams.redis_restarted_recently()  # not asked: no error was seen
    streams.forget_uptime()
    assert streams.redis_restarted_recently()


def test_a_crash_hand_back_counts_as_a_delivery(server):
    first, second = make_streams(server, "w1", lease_s=30), make_streams(server, "w2", lease_s=30)
    entry_id = first.redis.xadd(first.requests_key, {"id": "r1"}).decode()
    first.redis.xreadgroup(GROUP, "w1", {first.requests_key: ">"}, count=1)
    first.hand_back([(entry_id, 1)], is_delivery=True)
    assert [(e, n) for e, _, n in second.reclaim(4)] == [(entry_id, 2)]


def test_hand_back_keeps_the_delivery_count(server):
    first, second = make_streams(server, "w1", lease_s=30), make_streams(server, "w2", lease_s=30)
    entry_id = first.redis.xadd(first.requests_key, {"id": "r1"}).decode()
    first.redis.xreadgroup(GROUP, "w1", {first.requests_key: ">"}, count=1)  # delivery 1
    first.hand_back([(entry_id, 1)])
    assert [(e, n) for e, _, n in second.reclaim(4)] == [(entry_id, 1)]  # at once, and still delivery 1
    second.hand_back([(entry_id, 1)])
    assert [(e, n) for e, _, n in first.reclaim(4)] == [(entry_id, 1)]


def test_a_pass_over_live_entries_takes_nothing_and_ends(server):
    streams = make_streams(server, "w1", lease_s=30)
    streams.redis.xadd(streams.requests_key, {"id": "r1"})
    streams.redis.xreadgroup(GROUP, "busy", {streams.requests_key: ">"}, count=1)  # fresh: not idle
    assert streams.reclaim(4) == [] and streams.reclaim_scan_done
