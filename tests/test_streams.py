"""WorkerStreams: reclaim, the restart guard, hand-back delivery counts (fakeredis); fenced writes (real Redis)."""

from __future__ import annotations

import time

import fakeredis
import pytest

from producer.keys import DEFAULT_PRIORITY, GROUP, Priority
from producer.protocol import EventType, decode_event, encode_event, event_stream_id
from worker.config import WorkerConfig
from worker.outbox import Outbox
from worker.streams import MAX_BACKOFF_S, EntryRef, WorkerStreams


def make_streams(server, worker_id: str, lease_s: float = 0.05) -> WorkerStreams:
    config = WorkerConfig(model_name="m", model_path="p", worker_id=worker_id, lease_s=lease_s)
    streams = WorkerStreams(fakeredis.FakeRedis(server=server), config)
    streams.ensure_group()
    return streams


@pytest.fixture
def server():
    return fakeredis.FakeServer()


def orphan(streams: WorkerStreams, priority: Priority = DEFAULT_PRIORITY, request_id: str = "r1") -> EntryRef:
    """An entry read by a consumer that then went away."""
    key = streams.request_keys[priority]
    entry_id = streams.redis.xadd(key, {"id": request_id}).decode()
    streams.redis.xreadgroup(GROUP, "gone", {key: ">"}, count=1)
    time.sleep(streams.config.lease_s * 2)
    return EntryRef(priority, entry_id)


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
    entry_id = EntryRef(DEFAULT_PRIORITY, first.redis.xadd(first.requests_key, {"id": "r1"}).decode())
    first.redis.xreadgroup(GROUP, "w1", {first.requests_key: ">"}, count=1)
    first.hand_back([(entry_id, 1)], is_delivery=True)
    assert [(e, n) for e, _, n in second.reclaim(4)] == [(entry_id, 2)]


def test_hand_back_keeps_the_delivery_count(server):
    first, second = make_streams(server, "w1", lease_s=30), make_streams(server, "w2", lease_s=30)
    entry_id = EntryRef(DEFAULT_PRIORITY, first.redis.xadd(first.requests_key, {"id": "r1"}).decode())
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


# ---------------------------------------------------------------- fenced writes (real Redis: scripts, id refusals)


def _running_entry(streams: WorkerStreams, request_id: str) -> EntryRef:
    entry_id = streams.redis.xadd(streams.requests_key, {"id": request_id}).decode()
    streams.redis.xreadgroup(GROUP, streams.config.worker_id, {streams.requests_key: ">"}, count=1)
    return EntryRef(DEFAULT_PRIORITY, entry_id)


def _token_outbox(request_id: str, entry_id: EntryRef, first_seq: int, num_tokens: int) -> Outbox:
    outbox = Outbox()
    for seq in range(first_seq, first_seq + num_tokens):
        outbox.event(request_id, seq, EventType.TOKEN, text=f"t{seq}", token_ids=[seq])
    outbox.event(request_id, first_seq + num_tokens, EventType.DONE, finish_reason="length", text="whole")
    outbox.ack(entry_id, request_id)
    return outbox


@pytest.fixture
def real_streams(rds, prefix) -> WorkerStreams:
    streams = WorkerStreams(rds, WorkerConfig(model_name="m", model_path="p", prefix=prefix, worker_id="w1"))
    streams.ensure_group()
    return streams


@pytest.mark.redis
def test_a_refused_event_stops_that_requests_later_events(real_streams, rds):
    keys = real_streams.keys
    stalled, other = _running_entry(real_streams, "stalled"), _running_entry(real_streams, "other")
    for seq in range(4):  # the worker that reclaimed "stalled" is one event ahead of this one
        rds.xadd(keys.events("stalled"), encode_event(seq, EventType.TOKEN, text="x", token_ids=[9]),
                 id=event_stream_id(seq))
    outbox = _token_outbox("stalled", stalled, first_seq=2, num_tokens=2)  # seq 2, 3 refused; done at 4 free
    for _, seq, type, fields in _token_outbox("other", other, first_seq=0, num_tokens=1).events:
        outbox.event("other", seq, type, **fields)
    outbox.ack(other, "other")
    assert real_streams.flush(outbox) == {"stalled"}
    assert [decode_event(f).text for _, f in rds.xrange(keys.events("stalled"))] == ["x"] * 4  # no `done` of ours
    assert [decode_event(f).type for _, f in rds.xrange(keys.events("other"))] == [EventType.TOKEN, EventType.DONE]
    pending = [row["message_id"].decode() for row in rds.xpending_range(real_streams.requests_key, GROUP, "-", "+", 9)]
    assert pending == [stalled.id]  # only the request that landed is acked


@pytest.mark.redis
def test_a_resend_skips_its_own_events_and_still_refuses_anothers(real_streams, rds):
    keys = real_streams.keys
    entry = _running_entry(real_streams, "r1")
    outbox = _token_outbox("r1", entry, first_seq=0, num_tokens=2)
    half = Outbox(events=outbox.events[:2])
    assert real_streams.flush(half) == set()  # the first try landed, its reply was lost
    outbox.is_resend = True
    assert real_streams.flush(outbox) == set()
    assert [decode_event(f).seq for _, f in rds.xrange(keys.events("r1"))] == [0, 1, 2]
    assert real_streams.redis.xlen(real_streams.requests_key) == 0  # acked and deleted
    assert 0 < rds.ttl(keys.events("r1")) <= real_streams.config.result_ttl_s

    entry = _running_entry(real_streams, "r2")
    rds.xadd(keys.events("r2"), encode_event(0, EventType.TOKEN, text="theirs", token_ids=[1]), id=event_stream_id(0))
    resend = _token_outbox("r2", entry, first_seq=0, num_tokens=1)
    resend.is_resend = True
    assert real_streams.flush(resend) == {"r2"}  # not our event under that id: fenced even on a resend
    assert rds.xlen(keys.events("r2")) == 1


@pytest.mark.redis
def test_events_are_written_when_redis_does_not_know_the_script(real_streams, rds):
    """EVALSHA without the SCRIPT EXISTS round trip: a restarted Redis (empty script cache) gets it loaded."""
    rds.script_flush()
    entry = _running_entry(real_streams, "r1")
    assert real_streams.flush(_token_outbox("r1", entry, first_seq=0, num_tokens=1)) == set()
    assert [decode_event(f).type for _, f in rds.xrange(real_streams.keys.events("r1"))] == [EventType.TOKEN,
                                                                                            EventType.DONE]
    assert rds.xlen(real_streams.requests_key) == 0


def test_reads_take_the_highest_level_first_within_the_free_slots(server):
    streams = make_streams(server, "w1")
    for i in range(3):
        streams.redis.xadd(streams.request_keys[Priority.BULK], {"id": f"b{i}"})
    streams.redis.xadd(streams.request_keys[Priority.BACKGROUND], {"id": "g0"})
    streams.redis.xadd(streams.request_keys[Priority.INTERACTIVE], {"id": "i0"})
    # full of bulk work: one slot for interactive (it preempts), none for bulk or background
    taken = streams.read({Priority.INTERACTIVE: 2, Priority.BULK: 0, Priority.BACKGROUND: 0}, None)
    assert [(e.priority, f[b"id"]) for e, f in taken] == [(Priority.INTERACTIVE, b"i0")]
    taken = streams.read({Priority.INTERACTIVE: 3, Priority.BULK: 3, Priority.BACKGROUND: 3}, None)
    assert [f[b"id"] for _, f in taken] == [b"b0", b"b1", b"b2"]
    taken = streams.read({Priority.INTERACTIVE: 3, Priority.BULK: 3, Priority.BACKGROUND: 3}, None)
    assert [(e.priority, f[b"id"]) for e, f in taken] == [(Priority.BACKGROUND, b"g0")]


def test_reclaim_renew_and_hand_back_work_on_every_level(server):
    streams = make_streams(server, "w1")
    bulk = orphan(streams, Priority.BULK, "rb")
    interactive = orphan(streams, Priority.INTERACTIVE, "ri")
    assert streams.has_orphans()
    claimed = streams.reclaim({p: 4 for p in Priority})
    assert [(e, n) for e, _, n in claimed] == [(interactive, 2), (bulk, 2)]  # higher level first
    streams.renew([bulk, interactive])
    assert not streams.has_orphans()
    streams.hand_back([(bulk, 2)])
    other = make_streams(server, "w2")
    assert [(e, n) for e, _, n in other.reclaim(4)] == [(bulk, 2)]
    outbox = Outbox()
    outbox.ack(bulk, None)
    other.flush(outbox)
    assert other.redis.xlen(other.request_keys[Priority.BULK]) == 0
    assert other.redis.xlen(other.requests_key) == 1  # the interactive entry is untouched


def test_a_dead_letter_keeps_its_level_and_is_requeued_to_it(server):
    from producer import admin

    streams = make_streams(server, "w1")
    entry = orphan(streams, Priority.BULK, "poison")
    outbox = Outbox()
    outbox.dead_letter(entry, {b"id": b"poison", b"v": b"1"}, "delivered too often")
    streams.flush(outbox)
    assert streams.redis.xlen(streams.request_keys[Priority.BULK]) == 0
    [letter] = admin.list_dead(streams.redis, streams.keys, "m")
    assert (letter.request_id, letter.priority) == ("poison", "bulk")
    assert admin.requeue_dead(streams.redis, streams.keys, "m") == 1
    assert streams.redis.xlen(streams.request_keys[Priority.BULK]) == 1
    assert streams.redis.xlen(streams.requests_key) == 0


@pytest.mark.redis
def test_no_event_is_written_after_a_gap(real_streams, rds):
    """A promoted replica may lack the last events the old master took: the worker writes nothing after the gap
    (a later reader would miss those seqs), drops the request and leaves its entry pending to be reclaimed."""
    keys = real_streams.keys
    entry = _running_entry(real_streams, "r1")
    rds.xadd(keys.events("r1"), encode_event(0, EventType.TOKEN, text="a", token_ids=[1]), id=event_stream_id(0))
    outbox = _token_outbox("r1", entry, first_seq=3, num_tokens=1)  # seq 1 and 2 were lost with the old master
    assert real_streams.flush(outbox) == {"r1"}
    assert [decode_event(f).seq for _, f in rds.xrange(keys.events("r1"))] == [0]
    pending = [row["message_id"].decode() for row in rds.xpending_range(real_streams.requests_key, GROUP, "-", "+", 9)]
    assert pending == [entry.id]
    fresh = _running_entry(real_streams, "r2")  # nothing published yet and the write starts above seq 0: a gap too
    assert real_streams.flush(_token_outbox("r2", fresh, first_seq=2, num_tokens=1)) == {"r2"}
    assert not rds.exists(keys.events("r2"))
    assert real_streams.flush(_token_outbox("r1", entry, first_seq=1, num_tokens=1)) == set()  # contiguous: lands
    assert [decode_event(f).seq for _, f in rds.xrange(keys.events("r1"))] == [0, 1, 2]


def _with_info(streams: WorkerStreams, monkeypatch, uptime_s: float, replid: str) -> None:
    sections = {"server": {"uptime_in_seconds": uptime_s}, "replication": {"master_replid": replid}}
    monkeypatch.setattr(streams.redis, "info", lambda section: sections[section])


def test_a_new_master_holds_off_reclaim_for_a_lease_window(server, monkeypatch):
    """A replica promoted by a failover has been up for long; its new replication id is what tells."""
    streams = make_streams(server, "w1", lease_s=0.05)
    orphan(streams)
    _with_info(streams, monkeypatch, uptime_s=3600, replid="a" * 40)
    assert not streams.redis_restarted_recently()  # the first master any worker saw: nothing to wait for
    assert streams.redis.get(streams.keys.redis_master()) == b"a" * 40
    _with_info(streams, monkeypatch, uptime_s=3600, replid="b" * 40)  # failed over meanwhile
    streams.forget_uptime()  # the failover showed as a Redis error
    assert streams.redis_restarted_recently()
    assert streams.reclaim(4) == [] and not streams.has_orphans()
    window_ms = streams.redis.pttl(streams.keys.redis_failover())
    assert 0 < window_ms <= (0.05 + MAX_BACKOFF_S + 1) * 1000

    newcomer = make_streams(server, "w2", lease_s=0.05)  # started after the failover: never saw the old master
    _with_info(newcomer, monkeypatch, uptime_s=3600, replid="b" * 40)
    assert newcomer.redis_restarted_recently()

    streams.redis.delete(streams.keys.redis_failover())  # the window is over
    streams.forget_uptime()
    assert not streams.redis_restarted_recently()
    assert [n for _, _, n in streams.reclaim(4)] == [2]
