"""Redis off the critical path: step N's round (publish, abort check, read) runs while step N+1 computes.

Shown without timing: engine steps wait on events the test sets, and the test looks at Redis while
a step is held.
"""

from __future__ import annotations

import threading

import pytest

from producer import Client
from producer.keys import GROUP
from producer.protocol import EventType, TaskKind, encode_event, event_stream_id
from tests.conftest import StepGate
from tests.test_loop import events_of, wait_for

pytestmark = pytest.mark.redis
WAIT_S = 30


@pytest.fixture
def client(redis_server_url, prefix):
    c = Client(redis_server_url, prefix=prefix)
    yield c
    c.close()


def submit(client: Client, request_id: str, max_tokens: int = 500) -> str:
    config = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "request_id": request_id}
    return client.get_model("tiny").submit(TaskKind.GENERATE, {"prompt": f"overlap {request_id}"}, config)


def pending(rds, client: Client) -> list:
    return rds.xpending_range(client.keys.requests("tiny"), GROUP, "-", "+", 10)


def test_a_steps_events_are_published_and_entries_read_while_the_next_step_computes(worker_factory, client, rds):
    handle = worker_factory(max_num_seqs=2)
    gate = StepGate(handle.worker.engine, hold={3})
    streams, real_flush = handle.worker.streams, handle.worker.streams.flush
    may_flush = threading.Event()

    def flush(outbox):  # step 2's token (seq 1) waits until the test has seen step 3 start
        if any(rid == "first" and seq == 1 for rid, seq, _, _ in outbox.events):
            if not may_flush.wait(WAIT_S):
                raise RuntimeError("the test never let step 2's round go on")
        return real_flush(outbox)

    streams.flush = flush
    handle.start()
    try:
        submit(client, "first")
        gate.wait_entered(3)  # step 3 started before step 2's events were written
        assert len(events_of(client, "first")) == 1
        submit(client, "second", max_tokens=4)
        may_flush.set()
        wait_for(lambda: len(events_of(client, "first")) == 2, timeout_s=WAIT_S)
        wait_for(lambda: len(pending(rds, client)) == 2, timeout_s=WAIT_S)  # the new entry is read too
        assert gate.num_calls == 3  # all of it while step 3 computes
        gate.release(3)
        assert client.wait("second", timeout_s=WAIT_S).type == EventType.DONE
    finally:
        gate.release_all()
        may_flush.set()


def test_an_abort_seen_during_the_next_step_drops_that_steps_tokens(worker_factory, client, rds):
    handle = worker_factory(max_num_seqs=1)
    gate = StepGate(handle.worker.engine, hold={3, 4})
    handle.start()
    try:
        request_id = submit(client, "aborted")
        gate.wait_entered(3)
        wait_for(lambda: len(events_of(client, request_id)) == 2, timeout_s=WAIT_S)  # steps 1-2 published
        assert client.abort_request("tiny", request_id) is True  # set while step 3 computes
        gate.release(3)
        gate.wait_entered(4)  # step 3's round (its abort check, its writes) runs during step 4
        wait_for(lambda: events_of(client, request_id)[-1].is_terminal, timeout_s=WAIT_S)
        gate.release(4)  # step 4 computed a token for a request this worker knows is aborted
        wait_for(lambda: handle.worker.engine.num_active == 0, timeout_s=WAIT_S)
        handle.stop()  # every round has landed
    finally:
        gate.release_all()
    events = events_of(client, request_id)
    assert [(e.seq, e.type) for e in events] == [(0, EventType.TOKEN), (1, EventType.TOKEN), (2, EventType.ABORTED)]
    assert rds.xlen(client.keys.requests("tiny")) == 0  # acked after the aborted event


def test_a_refused_token_write_stops_the_done_of_the_same_flush(worker_factory, client, rds):
    handle = worker_factory(max_num_seqs=1)
    gate = StepGate(handle.worker.engine, hold={3})
    handle.start()
    try:
        request_id = submit(client, "fenced", max_tokens=3)  # step 3 makes its last token and its `done`
        gate.wait_entered(3)
        wait_for(lambda: len(events_of(client, request_id)) == 2, timeout_s=WAIT_S)
        theirs = encode_event(2, EventType.TOKEN, text="theirs", token_ids=[1])
        rds.xadd(client.keys.events(request_id), theirs, id=event_stream_id(2))  # a worker that reclaimed it
        gate.release(3)
        wait_for(lambda: handle.worker.engine.num_active == 0, timeout_s=WAIT_S)
        handle.stop()  # every round has landed
    finally:
        gate.release_all()
    assert [e.text for e in events_of(client, request_id)][2:] == ["theirs"]  # no `done` of ours after it
    assert rds.xpending(client.keys.requests("tiny"), GROUP)["pending"] == 1  # not acked: it is the other's


@pytest.mark.parametrize("ended_by", ["abort", "another worker"])
def test_a_step_that_fails_beside_the_round_that_ends_its_request_adds_nothing(worker_factory, client, rds,
                                                                               monkeypatch, ended_by):
    """Step 4 fails while step 3's round writes `aborted` (or is refused): no model_error follows it."""
    from tests.test_loop import _fail_steps

    handle = worker_factory(max_num_seqs=1)
    _fail_steps(handle.worker.engine, monkeypatch, failing={4})
    gate = StepGate(handle.worker.engine, hold={3})
    handle.start()
    try:
        request_id = submit(client, "ended")
        gate.wait_entered(3)
        wait_for(lambda: len(events_of(client, request_id)) == 2, timeout_s=WAIT_S)
        if ended_by == "abort":
            client.abort_request("tiny", request_id)
        else:
            theirs = encode_event(2, EventType.TOKEN, text="theirs", token_ids=[1])
            rds.xadd(client.keys.events(request_id), theirs, id=event_stream_id(2))
        gate.release(3)
        wait_for(lambda: handle.worker.engine.num_active == 0, timeout_s=WAIT_S)
        handle.stop()
    finally:
        gate.release_all()
    third = EventType.ABORTED if ended_by == "abort" else EventType.TOKEN
    assert [e.type for e in events_of(client, request_id)] == [EventType.TOKEN, EventType.TOKEN, third]
