"""The worker loop end to end: a real Redis server, the tiny model, the producer client."""

from __future__ import annotations

import json
import time

import pytest
import redis

from producer import Client, InvalidRequest, QueueFull, RequestAborted, RequestExpired, UnknownModel
from producer.keys import Keys
from producer.results import check_terminal
from producer.protocol import EventType, decode_event, encode_request, GenerateBody, GenerateConfig, TaskKind, now_ms
from tests.conftest import StepGate

pytestmark = pytest.mark.redis


@pytest.fixture
def client(redis_server_url, prefix):
    c = Client(redis_server_url, prefix=prefix)
    yield c
    c.redis.close()


def events_of(client: Client, request_id: str) -> list:
    return [decode_event(fields) for _, fields in client.redis.xrange(client.keys.events(request_id))]


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError("condition not met in time")


def register(client: Client, name: str = "tiny", **info) -> None:
    """Register a model as a worker would, without starting one."""
    client.redis.hset(client.keys.models(), name, json.dumps({"tasks": ["generate", "chat"], "max_queue_len": 0, **info}))
    client.redis.zadd(client.keys.model_workers(name), {"registering": now_ms()})  # live, as on registration


def test_chat_streams_tokens_and_a_final_chunk(worker_factory, client):
    worker_factory(max_num_seqs=4).start()
    model = client.get_model("tiny")
    chunks = list(model.chat([{"role": "user", "content": "hello world"}],
                             generate_config={"max_tokens": 12, "temperature": 0}, timeout_s=30))
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    request_id = final["id"]
    done = events_of(client, request_id)[-1]
    assert done.type == EventType.DONE and done.text == streamed
    assert final["usage"]["completion_tokens"] == len(chunks) - 1
    seqs = [e.seq for e in events_of(client, request_id)]
    assert seqs == list(range(len(seqs)))


def test_generate_matches_model_generate(worker_factory, client, tiny_llama):
    import torch

    worker_factory(max_num_seqs=4).start()
    hf_model, tokenizer = tiny_llama
    model = client.get_model("tiny")
    prompts = ["the river and the mountain", "redis stream worker", "café 東京 😀", "one two three four five six"]
    results = [model.generate(p, generate_config={"max_tokens": 10, "temperature": 0, "stream": False}, timeout_s=30)
               for p in prompts]
    for prompt, result in zip(prompts, results):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        expected = tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert result["object"] == "text_completion"
        assert result["choices"][0]["text"] == expected
        assert result["usage"]["prompt_tokens"] == ids.shape[1]


def test_concurrent_requests_share_batches(worker_factory, client):
    handle = worker_factory(max_num_seqs=8).start()
    model = client.get_model("tiny")
    ids = [model.submit(TaskKind.GENERATE, {"prompt": f"request {i} river"}, {"max_tokens": 16, "temperature": 0})
           for i in range(8)]
    finals = [client.wait(i, timeout_s=30) for i in ids]
    assert all(f.type == EventType.DONE for f in finals)
    # 8 requests x 16 tokens in far fewer than 128 steps: they ran side by side
    assert handle.worker.stats.num_steps < 64


def test_queued_request_aborted_before_it_starts_never_runs(worker_factory, client):
    register(client)
    model = client.get_model("tiny")
    request_id = model.submit(TaskKind.GENERATE, {"prompt": "never run"}, {"max_tokens": 8})
    assert client.abort_request("tiny", request_id) is True
    worker_factory().start()
    final = client.wait(request_id, timeout_s=30)
    assert final.type == EventType.ABORTED
    assert [e.type for e in events_of(client, request_id)] == [EventType.ABORTED]


def test_running_request_aborted_publishes_nothing_after_and_frees_its_slot(worker_factory, client):
    handle = worker_factory(max_num_seqs=1).start()
    model = client.get_model("tiny")
    long_id = model.submit(TaskKind.GENERATE, {"prompt": "a long one"}, {"max_tokens": 900, "ignore_eos": True})
    next_id = model.submit(TaskKind.GENERATE, {"prompt": "next in line"}, {"max_tokens": 4})
    wait_for(lambda: len(events_of(client, long_id)) >= 3)
    assert client.abort_request("tiny", long_id) is True
    assert client.wait(long_id, timeout_s=30).type == EventType.ABORTED
    num_events = len(events_of(client, long_id))
    assert client.wait(next_id, timeout_s=30).type == EventType.DONE  # the slot went to the next request
    events = events_of(client, long_id)
    assert len(events) == num_events < 900  # nothing after the terminal event
    assert events[-1].type == EventType.ABORTED and sum(e.is_terminal for e in events) == 1
    assert [e.seq for e in events] == list(range(len(events)))
    assert client.abort_request("tiny", long_id) is False  # already ended: a no-op
    assert handle.is_alive


def test_abort_after_finish_is_a_noop(worker_factory, client):
    worker_factory().start()
    model = client.get_model("tiny")
    result = model.generate("short", generate_config={"max_tokens": 2, "stream": False, "request_id": "done-1"})
    assert result["id"] == "done-1"
    assert client.abort_request("tiny", "done-1") is False
    assert not client.redis.exists(client.keys.abort("done-1"))


def test_abort_while_streaming_raises_after_the_tokens(worker_factory, client):
    worker_factory().start()
    model = client.get_model("tiny")
    stream = model.chat([{"role": "user", "content": "go"}],
                        generate_config={"max_tokens": 900, "ignore_eos": True, "request_id": "ab-2"})
    received = [next(stream), next(stream)]
    client.abort_request("tiny", "ab-2")
    with pytest.raises(RequestAborted):
        for chunk in stream:
            received.append(chunk)
    events = events_of(client, "ab-2")
    tokens = [e for e in events if e.type == EventType.TOKEN]
    assert events[-1].type == EventType.ABORTED and len(tokens) == len(events) - 1 < 900
    assert len(received) == len(tokens)  # every token published before the abort reached the caller, then it raised
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in received) == "".join(t.text for t in tokens)


def test_bad_entries_never_kill_the_worker(worker_factory, client, rds):
    handle = worker_factory().start()
    register(client)
    stream = client.keys.requests("tiny")
    good = GenerateBody(prompt="fine", generate_config=GenerateConfig(max_tokens=3))
    bad_entries = {
        "bad-json": {"v": "1", "id": "bad-json", "task": "generate", "body": "{not json", "created": "1"},
        "bad-task": {"v": "1", "id": "bad-task", "task": "paint", "body": "{}", "created": "1"},
        "bad-type": {"v": "1", "id": "bad-type", "task": "generate", "created": "1",
                     "body": json.dumps({"prompt": "x", "generate_config": {"max_tokens": "5"}})},
        "bad-key": {"v": "1", "id": "bad-key", "task": "generate", "created": "1",
                    "body": json.dumps({"prompt": "x", "generate_config": {"max_tokns": 5}})},
        "no-body": {"v": "1", "id": "no-body", "task": "generate", "created": "1"},
        "bad-version": {"v": "9", "id": "bad-version", "task": "generate", "body": "{}", "created": "1"},
        "too-big": {"v": "1", "id": "too-big", "task": "generate", "created": "1",
                    "body": json.dumps({"prompt": "x" * (2 << 20)})},
        "too-long": {"v": "1", "id": "too-long", "task": "generate", "created": "1",
                     "body": json.dumps({"prompt_token_ids": [5] * 5000})},
        "bad-utf8": {"v": "1", "id": "bad-utf8", "task": "generate", "created": "1", "body": b"\xff\xfe{}"},
        "huge-int": {"v": "1", "id": "huge-int", "task": "generate", "created": "1",
                     "body": '{"prompt_token_ids": [' + "9" * 5000 + "]}"},
        "image-task": {"v": "1", "id": "image-task", "task": "text_to_image", "created": "1",
                       "body": json.dumps({"prompt": "a cat"})},
    }
    for fields in bad_entries.values():
        rds.xadd(stream, fields)
    rds.xadd(stream, {"v": "1", "task": "generate", "body": "{}"})  # no id at all
    rds.xadd(stream, {"v": "1", "id": "has space", "task": "generate", "body": "{}"})  # unreadable id
    rds.xadd(stream, encode_request("good-1", TaskKind.GENERATE, good))
    assert client.wait("good-1", timeout_s=30).type == EventType.DONE
    for request_id in bad_entries:
        events = [e for e in (client.wait(request_id, timeout_s=10),)]
        assert events[0].type == EventType.ERROR, request_id
        assert len(events_of(client, request_id)) == 1
    assert events_of(client, "image-task")[0].code == "unsupported_task"
    dead = rds.xrange(client.keys.dead("tiny"))
    assert len(dead) == 2 and all(b"reason" in fields for _, fields in dead)
    wait_for(lambda: rds.xlen(stream) == 0)  # every entry acked and deleted
    assert rds.xpending(stream, "workers")["pending"] == 0
    assert handle.is_alive


def test_unknown_model_is_refused_at_submit(redis_server_url, client):
    with pytest.raises(UnknownModel):
        client.get_model("nobody-serves-this")


def test_unknown_generate_config_key_is_refused_before_enqueue(client):
    register(client)
    with pytest.raises(InvalidRequest):
        client.get_model("tiny").generate("x", generate_config={"max_tokns": 3})
    assert client.redis.xlen(client.keys.requests("tiny")) == 0


def test_queue_full_is_a_clear_error(client):
    register(client, max_queue_len=2)
    model = client.get_model("tiny")
    model.submit(TaskKind.GENERATE, {"prompt": "a"})
    model.submit(TaskKind.GENERATE, {"prompt": "b"})
    with pytest.raises(QueueFull):
        model.submit(TaskKind.GENERATE, {"prompt": "c"})


def test_expired_deadline_is_answered_without_running(worker_factory, client):
    register(client)
    model = client.get_model("tiny")
    request_id = model.submit(TaskKind.GENERATE, {"prompt": "late"}, {"max_tokens": 3}, deadline_ms=now_ms() - 1)
    worker_factory().start()
    final = client.wait(request_id, timeout_s=30)
    assert final.type == EventType.ERROR and final.code == "expired"
    with pytest.raises(RequestExpired):
        check_terminal(final, request_id)
    assert len(events_of(client, request_id)) == 1


def test_worker_registers_and_heartbeats(worker_factory, client):
    handle = worker_factory(max_num_seqs=3).start()
    info = wait_for(lambda: client.list_models().get("tiny"))
    assert info["max_num_seqs"] == 3 and set(info["tasks"]) == {"generate", "chat"}
    key = client.keys.worker(handle.worker.config.worker_id)
    beat = wait_for(lambda: client.redis.hgetall(key))
    assert beat[b"model"] == b"tiny" and int(beat[b"max_num_seqs"]) == 3
    assert 0 < client.redis.ttl(key) <= handle.worker.config.heartbeat_ttl_s
    handle.stop()
    assert not client.redis.exists(key)


def test_graceful_stop_finishes_running_requests(worker_factory, client):
    handle = worker_factory(grace_s=30)
    gate = StepGate(handle.worker.engine, hold={3})
    handle.start()
    model = client.get_model("tiny")
    request_id = model.submit(TaskKind.GENERATE, {"prompt": "finish me"}, {"max_tokens": 40, "ignore_eos": True})
    try:
        gate.wait_entered(3)  # two tokens in, 38 to go
        handle.worker.request_stop()
    finally:
        gate.release_all()
    handle.stop()
    events = events_of(client, request_id)
    assert events[-1].type == EventType.DONE and events[-1].usage.completion_tokens == 40
    assert [e.seq for e in events] == list(range(41))


def test_async_client_chat(worker_factory, client, redis_server_url, prefix):
    import asyncio

    from producer import AsyncClient

    worker_factory().start()
    messages = [{"role": "user", "content": "hi"}]
    config = {"max_tokens": 6, "ignore_eos": True, "temperature": 0}

    async def main():
        aclient = AsyncClient(redis_server_url, prefix=prefix)
        model = await aclient.get_model("tiny")
        whole = await model.chat(messages, generate_config={**config, "stream": False})
        chunks = [c async for c in await model.chat(messages, generate_config=config)]
        await aclient.aclose()
        return whole, chunks

    whole, chunks = asyncio.run(main())
    text = whole["choices"][0]["message"]["content"]
    assert whole["object"] == "chat.completion" and whole["usage"]["completion_tokens"] == 6
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and len(chunks) == 6 + 1  # a chunk per token, then the end
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 6
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    sync = client.get_model("tiny").chat(messages, generate_config={**config, "stream": False})
    assert sync["choices"][0]["message"]["content"] == text  # the same answer the sync client gets


def test_keys_use_the_configured_prefix_only(worker_factory, client, rds, prefix):
    before = set(rds.scan_iter("*"))  # whatever other tests left, under their own prefixes
    worker_factory().start()
    client.get_model("tiny").generate("x", generate_config={"max_tokens": 2, "stream": False, "request_id": "k-1"})
    written = {k.decode() for k in set(rds.scan_iter("*")) - before}
    keys = Keys(prefix)
    assert {keys.requests("tiny"), keys.models(), keys.events("k-1"), keys.model_workers("tiny")} <= written
    assert all(k.startswith(f"{prefix}:") for k in written), sorted(written)


def test_model_error_fails_that_steps_requests_and_the_worker_goes_on(worker_factory, client, monkeypatch):
    handle = worker_factory().start()
    engine = handle.worker.engine
    real_step = engine.step
    calls = {"n": 0}

    def broken_once():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated CUDA error")
        return real_step()

    monkeypatch.setattr(engine, "step", broken_once)
    model = client.get_model("tiny")
    victim = model.submit(TaskKind.GENERATE, {"prompt": "victim"}, {"max_tokens": 20, "ignore_eos": True})
    final = client.wait(victim, timeout_s=30)
    assert final.type == EventType.ERROR and final.code == "model_error" and "simulated" in final.message
    assert sum(e.is_terminal for e in events_of(client, victim)) == 1
    after = model.generate("after", generate_config={"max_tokens": 3, "stream": False}, timeout_s=30)
    assert after["usage"]["completion_tokens"] == 3
    assert handle.is_alive and engine.blocks.num_free_blocks == engine.blocks.num_blocks


def _fail_steps(engine, monkeypatch, failing: set[int] | None = None) -> dict:
    """engine.step raises at the calls numbered in `failing` (1-based; None: at every call), after the
    scheduler has made its requests running, as a failed forward would."""
    real_step, calls = engine.step, {"n": 0}

    def step():
        calls["n"] += 1
        outputs = real_step()
        if failing is None or calls["n"] in failing:
            raise RuntimeError(f"simulated device error at step {calls['n']}")
        return outputs

    monkeypatch.setattr(engine, "step", step)
    return calls


def test_a_successful_step_resets_the_count_of_failed_steps(worker_factory, client, monkeypatch):
    handle = worker_factory(max_num_seqs=1, max_consecutive_step_failures=3)
    calls = _fail_steps(handle.worker.engine, monkeypatch, failing={2, 3, 5, 6})  # never three in a row
    handle.start()
    model = client.get_model("tiny")
    ids = [model.submit(TaskKind.GENERATE, {"prompt": f"r{i}"}, {"max_tokens": 3, "ignore_eos": True}) for i in range(6)]
    finals = [client.wait(request_id, timeout_s=30) for request_id in ids]
    assert [f.code for f in finals[:4]] == ["model_error"] * 4  # r1 fails at its step 2, r2 at 3, r3 at 5, r4 at 6
    assert [f.type for f in finals[4:]] == [EventType.DONE] * 2
    assert handle.is_alive and calls["n"] == 12


def test_steps_that_keep_failing_stop_the_worker_and_hand_its_requests_back(worker_factory, client, rds, monkeypatch):
    """A broken device must not turn the worker into a black hole that answers everything with model_error."""
    from worker.loop import EngineFailed

    register(client)
    model = client.get_model("tiny")
    ids = [model.submit(TaskKind.GENERATE, {"prompt": f"r{i}"}, {"max_tokens": 3}) for i in range(8)]
    broken = worker_factory(max_num_seqs=2, max_consecutive_step_failures=3, lease_s=1, worker_id="broken")
    _fail_steps(broken.worker.engine, monkeypatch)
    broken.start().thread.join(30)
    assert not broken.is_alive and isinstance(broken.error, EngineFailed)
    assert [client.wait(i, timeout_s=5).code for i in ids[:4]] == ["model_error"] * 4  # failed steps 1 and 2
    assert all(not events_of(client, i) for i in ids[4:])
    rows = client.redis.xpending_range(client.keys.requests("tiny"), "workers", "-", "+", 10)
    assert [(r["consumer"], r["times_delivered"]) for r in rows] == [(b"broken", 1)] * 2  # step 3's, handed back
    assert all(r["time_since_delivered"] >= 1000 for r in rows)  # marked idle past the lease: reclaimable now
    assert rds.xlen(client.keys.requests("tiny")) == 4  # those two, and two it never read: it stopped reading

    worker_factory(lease_s=1, max_deliveries=1).start()  # the hand-back counted: 2 deliveries > 1
    assert [client.wait(i, timeout_s=30).code for i in ids[4:6]] == ["dead_letter"] * 2
    assert [client.wait(i, timeout_s=30).type for i in ids[6:]] == [EventType.DONE] * 2


def test_entries_read_but_never_run_are_handed_back_without_a_delivery(worker_factory, client, rds, monkeypatch):
    """The round in flight when the engine breaks may have read entries: they go back, uncounted."""
    register(client)
    model = client.get_model("tiny")
    first = model.submit(TaskKind.GENERATE, {"prompt": "ran"}, {"max_tokens": 3})
    handle = worker_factory(max_num_seqs=2, max_consecutive_step_failures=1, worker_id="broken")
    _fail_steps(handle.worker.engine, monkeypatch)
    streams, real_read, reads = handle.worker.streams, handle.worker.streams.read, []

    def read(count, block_ms):  # the second request arrives once the first is read: the next round takes it
        entries = real_read(count, block_ms)
        reads.append(len(entries))
        if len(reads) == 1:
            model.submit(TaskKind.GENERATE, {"prompt": "never ran"}, {"max_tokens": 3, "request_id": "second"})
        return entries

    monkeypatch.setattr(streams, "read", read)
    handle.start().thread.join(30)
    assert not handle.is_alive and reads == [1, 1]  # the round beside the failing step read "second"
    rows = rds.xpending_range(client.keys.requests("tiny"), "workers", "-", "+", 10)
    assert [r["times_delivered"] for r in rows] == [1, 0]  # first: a delivery; second: never ran here
    assert not events_of(client, first) and not events_of(client, "second")


def test_non_streamed_logprobs_reach_the_caller(worker_factory, client):
    worker_factory().start()
    result = client.get_model("tiny").generate("x", generate_config={"max_tokens": 3, "stream": False, "logprobs": 2})
    entries = result["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3 and all(len(e["top_logprobs"]) == 2 for e in entries)


def test_transient_flush_failures_lose_and_duplicate_nothing(worker_factory, client, monkeypatch):
    handle = worker_factory().start()
    streams = handle.worker.streams
    real_write = streams._write
    calls = {"n": 0}

    def flaky_write(outbox):
        calls["n"] += 1
        owners, results = real_write(outbox)  # the writes land, then the reply is "lost"
        if calls["n"] % 3 == 0:
            raise redis.ConnectionError("simulated connection reset")
        return owners, results

    monkeypatch.setattr(streams, "_write", flaky_write)
    model = client.get_model("tiny")
    ids = [model.submit(TaskKind.GENERATE, {"prompt": f"p{i}"}, {"max_tokens": 12, "ignore_eos": True}) for i in range(3)]
    for request_id in ids:
        assert client.wait(request_id, timeout_s=30).type == EventType.DONE
        events = events_of(client, request_id)
        assert [e.seq for e in events] == list(range(13)) and sum(e.is_terminal for e in events) == 1
    assert calls["n"] >= 6 and handle.is_alive


def test_redis_out_of_memory_is_waited_out(worker_factory, client, rds):
    handle = worker_factory().start()
    model = client.get_model("tiny")
    request_id = model.submit(TaskKind.GENERATE, {"prompt": "oom"}, {"max_tokens": 200, "ignore_eos": True})
    wait_for(lambda: len(events_of(client, request_id)) >= 2)
    rds.config_set("maxmemory-policy", "noeviction")
    rds.config_set("maxmemory", 1)  # every write is now refused with OOM
    try:
        time.sleep(0.5)
        assert handle.is_alive
    finally:
        rds.config_set("maxmemory", 0)
    assert client.wait(request_id, timeout_s=30).type == EventType.DONE
    events = events_of(client, request_id)
    assert [e.seq for e in events] == list(range(201)) and handle.is_alive


def test_the_heartbeat_carries_the_engines_kv_gauges(worker_factory, client, rds, prefix):
    handle = worker_factory().start()
    model = client.get_model("tiny")
    system = "the river and the mountain " * 6
    for i in range(3):  # the same long prompt three times: the later ones hit the prefix cache
        model.generate(system + str(i), generate_config={"max_tokens": 2, "stream": False}, timeout_s=30)
    key = Keys(prefix).worker(handle.worker.config.worker_id)
    fields = wait_for(lambda: (f := rds.hgetall(key)) and int(f.get(b"prefix_hit_tokens", 0)) > 0 and f)
    engine = handle.worker.engine
    assert int(fields[b"kv_blocks"]) == engine.blocks.num_blocks
    assert int(fields[b"kv_blocks_free"]) <= engine.blocks.num_blocks
    assert int(fields[b"prefix_hit_tokens"]) >= 16


def test_an_interactive_request_is_served_while_bulk_work_fills_the_worker(worker_factory, client, rds):
    """Bulk requests fill every slot and more wait in their stream: a chat is still read at once (its
    level has a free slot), preempts a bulk request, and finishes while every bulk request runs on."""
    from producer import admin

    handle = worker_factory(max_num_seqs=2).start()
    model = client.get_model("tiny")
    bulk = [model.submit(TaskKind.GENERATE, {"prompt": f"bulk {i}"}, {"max_tokens": 400, "ignore_eos": True},
                         priority="bulk") for i in range(5)]
    wait_for(lambda: sum(bool(client.redis.xlen(client.keys.events(r))) for r in bulk) == 2)
    status = admin.system_status(client.redis, client.keys)["models"]["tiny"]
    assert status["priorities"]["bulk"]["queue_len"] == 5 and status["priorities"]["bulk"]["pending"] == 2
    assert status["priorities"]["interactive"]["queue_len"] == 0 and status["queue_len"] == 5

    reply = model.chat([{"role": "user", "content": "hi"}], generate_config={"max_tokens": 4, "stream": False},
                       timeout_s=30)

    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any(events_of(client, r) and events_of(client, r)[-1].is_terminal for r in bulk)  # none finished
    assert handle.worker.engine.num_preemptions >= 1
    for request_id in bulk:
        client.abort_request("tiny", request_id)
    for request_id in bulk:
        assert client.wait(request_id, timeout_s=30).type == EventType.ABORTED
