"""Delivery guarantees when things go wrong: reclaim and resume, dead letters, duplicates,
hand-back on shutdown, lease renewal, Redis restarts. Real Redis, real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch

from producer import Client, DuplicateRequest
from producer import admin
from producer.keys import GROUP, Keys
from producer.protocol import EventType, GenerateBody, GenerateConfig, TaskKind, decode_event, encode_event, encode_request
from producer.results import Shaper
from tests.conftest import MULTIBYTE_PROMPT, MULTIBYTE_TEXT, StepGate, _free_port, build_worker_thread
from tests.test_loop import events_of, wait_for

pytestmark = pytest.mark.redis


@pytest.fixture
def client(redis_server_url, prefix):
    c = Client(redis_server_url, prefix=prefix)
    yield c
    c.close()


def reference(tiny_llama, prompt: str, max_tokens: int) -> list[int]:
    model, tokenizer = tiny_llama
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def streamed_ids(events) -> list[int]:
    return [t for e in events if e.type == EventType.TOKEN for t in (e.token_ids or [])]


def assert_clean_stream(events) -> None:
    assert [e.seq for e in events] == list(range(len(events))), "gap or duplicate in seq"
    assert sum(e.is_terminal for e in events) == 1 and events[-1].is_terminal


# ---------------------------------------------------------------- hand-back, resume, lease renewal


def test_unfinished_requests_are_handed_back_and_resumed_exactly(worker_factory, client, tiny_llama):
    first = worker_factory(grace_s=0.3, lease_s=30).start()
    model = client.get_model("tiny")
    prompts = [f"resume me {i} river" for i in range(3)]
    ids = [model.submit(TaskKind.GENERATE, {"prompt": p}, {"max_tokens": 400, "ignore_eos": True, "temperature": 0}) for p in prompts]
    wait_for(lambda: all(len(events_of(client, i)) >= 5 for i in ids))
    first.stop()  # grace runs out: the three are handed back unfinished
    assert all(not events_of(client, i)[-1].is_terminal for i in ids)
    second = worker_factory(lease_s=30).start()  # lease 30 s, yet it takes them at once: they were handed back
    for request_id, prompt in zip(ids, prompts):
        events = list(client.events(request_id, timeout_s=60))
        assert_clean_stream(events)
        assert streamed_ids(events) == reference(tiny_llama, prompt, 400)
        assert events[-1].usage.completion_tokens == 400
    assert second.worker.stats.num_reclaimed == 3


def test_rolling_restarts_never_dead_letter_a_request(worker_factory, client, tiny_llama, rds, prefix):
    """Each graceful hand-back is not a failed delivery: four restarts with max_deliveries 1 still finish.

    Each worker is stopped while its sixth step is held, and with no grace that step is its last:
    it publishes at most six tokens, so the request cannot finish before the fourth restart however
    fast the machine is."""
    prompt, max_tokens = "rolling restart lake", 100
    request_id, seen = None, 0
    for generation in range(4):
        handle = worker_factory(grace_s=0, lease_s=1, max_deliveries=1)
        gate = StepGate(handle.worker.engine, hold={6})
        handle.start()
        if request_id is None:
            request_id = client.get_model("tiny").submit(TaskKind.GENERATE, {"prompt": prompt},
                                                         {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
        try:
            gate.wait_entered(6)
            handle.worker.request_stop()
        finally:
            gate.release_all()
        handle.stop()
        events = events_of(client, request_id)
        assert seen < len(events) <= seen + 6 and not events[-1].is_terminal, f"restart {generation}"
        seen = len(events)
    last = worker_factory(lease_s=1, max_deliveries=1).start()
    events = list(client.events(request_id, timeout_s=60))
    assert_clean_stream(events)
    assert events[-1].type == EventType.DONE
    assert streamed_ids(events) == reference(tiny_llama, prompt, max_tokens)
    assert last.worker.stats.num_reclaimed == 1 and rds.xlen(Keys(prefix).dead("tiny")) == 0


def test_a_crash_hands_back_as_a_delivery(worker_factory, client, rds, prefix):
    """Only a clean stop discounts the hand-back: a request that crashes workers still reaches the dead letters."""
    handle = worker_factory(lease_s=0.3)
    handle.worker.streams.ensure_group()
    handle.worker.streams.register(["generate"])
    client.get_model("tiny").submit(TaskKind.GENERATE, {"prompt": "crash"},
                                    {"max_tokens": 400, "ignore_eos": True, "temperature": 0})

    def broken_renew(entry_ids):
        if entry_ids:
            raise redis.ResponseError("simulated bug")

    handle.worker.streams.renew = broken_renew
    with pytest.raises(redis.ResponseError):
        handle.worker.run()
    rows = rds.xpending_range(Keys(prefix).requests("tiny"), GROUP, "-", "+", 10)
    assert [row["times_delivered"] for row in rows] == [1]  # a clean stop would have left 0


def test_live_workers_renew_their_leases(worker_factory, client):
    busy = worker_factory(lease_s=0.6).start()
    idle = worker_factory(lease_s=0.6).start()
    model = client.get_model("tiny")
    request_id = model.submit(TaskKind.GENERATE, {"prompt": "long"}, {"max_tokens": 300, "ignore_eos": True, "temperature": 0})
    assert client.wait(request_id, timeout_s=60).type == EventType.DONE  # takes several leases of time
    assert busy.worker.stats.num_reclaimed + idle.worker.stats.num_reclaimed == 0
    assert_clean_stream(events_of(client, request_id))


def test_orphans_resume_ahead_of_new_requests(worker_factory, client, rds, prefix):
    """A full worker notices orphaned entries and gives them each slot that frees, before new entries."""
    keys, worker = Keys(prefix), worker_factory(max_num_seqs=2, lease_s=0.4)
    worker.worker.streams.ensure_group()
    worker.worker.streams.register(["generate"])
    model = client.get_model("tiny")
    config = {"max_tokens": 8, "ignore_eos": True, "temperature": 0}
    orphans = [model.submit(TaskKind.GENERATE, {"prompt": f"orphan {i}"}, config) for i in range(2)]
    rds.xreadgroup(GROUP, "dead-worker", {keys.requests("tiny"): ">"}, count=2)  # taken, then never renewed
    # Two long requests fill both slots and finish one step apart, long after the orphans' lease ran out.
    running = [model.submit(TaskKind.GENERATE, {"prompt": "long"}, {**config, "max_tokens": n}) for n in (200, 201)]
    newer = [model.submit(TaskKind.GENERATE, {"prompt": f"new {i}"}, config) for i in range(3)]
    step = worker.worker.engine.step
    worker.worker.engine.step = lambda: (time.sleep(0.005), step())[1]  # 200 steps outlast the lease anywhere
    admitted, admit = [], worker.worker.intake.admit
    worker.worker.intake.admit = lambda taken, outbox: (admitted.extend(e.request_id for e, _ in taken),
                                                        admit(taken, outbox))
    worker.start()
    for request_id in orphans + running + newer:
        assert client.wait(request_id, timeout_s=60).type == EventType.DONE
    assert sorted(admitted[2:4]) == sorted(orphans) and admitted[4:] == newer, admitted
    assert worker.worker.stats.num_reclaimed == 2


def _worker_process(url, prefix, model_path, worker_id, lease_s=1.0):
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", "tiny", "--model-path", str(model_path),
           "--redis-url", url, "--prefix", prefix, "--threads", "1", "--max-num-seqs", "4",
           "--lease-s", str(lease_s), "--worker-id", worker_id]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_9_mid_generation_loses_and_duplicates_nothing(redis_server_url, prefix, rds, client, tiny_llama,
                                                           tiny_llama_path):
    keys = Keys(prefix)
    procs = {name: _worker_process(redis_server_url, prefix, tiny_llama_path, name) for name in ("victim", "survivor")}
    try:
        wait_for(lambda: rds.zcard(keys.model_workers("tiny")) >= 2, timeout_s=90)
        model = client.get_model("tiny")
        prompts = [f"kill test {i} mountain" for i in range(6)]
        ids = [model.submit(TaskKind.GENERATE, {"prompt": p}, {"max_tokens": 500, "ignore_eos": True, "temperature": 0}) for p in prompts]
        victims = wait_for(lambda: [r["message_id"] for r in rds.xpending_range(keys.requests("tiny"), GROUP, "-", "+", 10,
                                                                                 consumername="victim")])
        wait_for(lambda: all(len(events_of(client, i)) >= 10 for i in ids), timeout_s=60)
        procs["victim"].send_signal(signal.SIGKILL)
        procs["victim"].wait()
        for request_id, prompt in zip(ids, prompts):
            events = list(client.events(request_id, timeout_s=120))
            assert_clean_stream(events)
            assert streamed_ids(events) == reference(tiny_llama, prompt, 500)
        assert victims and int(rds.hgetall(keys.worker("survivor"))[b"reclaimed"]) >= 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_reclaimed_request_whose_events_cannot_be_read_fails_alone(worker_factory, client, rds, prefix, tiny_llama):
    """A malformed events stream fails its own request (dead letter + error), not the reclaiming worker."""
    keys = Keys(prefix)
    stream = keys.requests("tiny")
    rds.xgroup_create(stream, GROUP, id="0", mkstream=True)
    config = GenerateConfig(max_tokens=6, ignore_eos=True, temperature=0)
    entries = {rid: rds.xadd(stream, encode_request(rid, TaskKind.GENERATE, GenerateBody(
        prompt=f"reclaim {rid}", generate_config=config))).decode() for rid in ("bad-json", "not-a-stream", "fine")}
    rds.xreadgroup(GROUP, "crashed-worker", {stream: ">"})
    rds.xclaim(stream, GROUP, "crashed-worker", 0, list(entries.values()), idle=60_000)  # orphans now
    expected = reference(tiny_llama, "reclaim fine", 6)
    rds.xadd(keys.events("fine"), encode_event(0, EventType.TOKEN, text="", token_ids=expected[:1]), id="0-1")
    rds.xadd(keys.events("bad-json"), encode_event(0, EventType.TOKEN, text="a", token_ids=[5]), id="0-1")
    rds.xadd(keys.events("bad-json"), {**encode_event(1, EventType.TOKEN, text="b"), "token_ids": "[not json"}, id="0-2")
    rds.set(keys.events("not-a-stream"), "not a stream")
    handle = worker_factory(lease_s=1, max_deliveries=5).start()

    events = list(client.events("fine", timeout_s=60))
    assert_clean_stream(events) and streamed_ids(events) == expected  # resumed after its published token
    wait_for(lambda: rds.xlen(stream) == 0 and rds.xpending(stream, GROUP)["pending"] == 0)
    (last_id, last), = rds.xrevrange(keys.events("bad-json"), count=1)  # the client cannot read the bad event
    failed = decode_event(last)
    assert last_id == b"0-3" and failed.type == EventType.ERROR and failed.code == "dead_letter" and failed.seq == 2
    letters = {d.request_id: d.reason for d in admin.list_dead(rds, keys, "tiny")}
    assert set(letters) == {"bad-json", "not-a-stream"} and all("cannot be read" in r for r in letters.values())
    assert rds.get(keys.events("not-a-stream")) == b"not a stream"  # nothing could be written there
    assert handle.is_alive and handle.worker.stats.num_reclaimed == 3


BROKEN_DEVICE_WORKER = """
import sys
import torch
from worker.engines.llm import LLMEngine

def broken_step(self):
    raise torch.OutOfMemoryError("simulated: out of memory, and preempting did not clear it")

LLMEngine.step = broken_step
from producer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_whose_steps_keep_failing_exits_non_zero(redis_server_url, prefix, rds, tiny_llama_path):
    """The real `redbatch worker` command: a supervisor must see the failure and restart the process."""
    from worker.main import EXIT_ENGINE_FAILED

    keys = Keys(prefix)
    stream = keys.requests("tiny")
    body = GenerateBody(prompt="on a broken device", generate_config=GenerateConfig(max_tokens=3))
    rds.xadd(stream, encode_request("victim", TaskKind.GENERATE, body))  # before the worker creates the group
    cmd = [sys.executable, "-c", BROKEN_DEVICE_WORKER, "worker", "--model-name", "tiny", "--model-path",
           str(tiny_llama_path), "--redis-url", redis_server_url, "--prefix", prefix, "--threads", "1",
           "--max-consecutive-step-failures", "2", "--worker-id", "broken"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == EXIT_ENGINE_FAILED, proc.stderr[-3000:]
    assert "2 steps in a row failed" in proc.stderr
    assert not rds.exists(keys.events("victim"))  # the step failed before it ran: still queued, not answered
    (row,) = rds.xpending_range(stream, GROUP, "-", "+", 10)
    assert row["consumer"] == b"broken" and row["time_since_delivered"] >= 30_000  # handed back: reclaimable now
    assert row["times_delivered"] == 1  # its reclaim will count the delivery


# ---------------------------------------------------------------- dead letters and duplicates


def test_too_many_deliveries_go_to_the_dead_letters_and_can_be_requeued(worker_factory, client, rds, prefix):
    keys = Keys(prefix)
    client.redis.hset(keys.models(), "tiny", json.dumps({"tasks": ["generate"], "max_queue_len": 0}))
    stream = keys.requests("tiny")
    rds.xgroup_create(stream, GROUP, id="0", mkstream=True)
    body = GenerateBody(prompt="poison", generate_config=GenerateConfig(max_tokens=3))
    entry_id = rds.xadd(stream, encode_request("poison-1", TaskKind.GENERATE, body)).decode()
    rds.xreadgroup(GROUP, "crashed-worker", {stream: ">"})  # delivery 1
    for _ in range(3):  # three more workers took it and died: deliveries 2..4
        rds.xclaim(stream, GROUP, "crashed-worker", 0, [entry_id], idle=60_000)
    worker_factory(lease_s=1, max_deliveries=3).start()
    final = client.wait("poison-1", timeout_s=30)
    assert final.type == EventType.ERROR and final.code == "dead_letter"
    (letter,) = admin.list_dead(rds, keys, "tiny")
    assert letter.request_id == "poison-1" and "5 times" in letter.reason  # 4 crashed + this one
    wait_for(lambda: rds.xpending(stream, GROUP)["pending"] == 0)
    assert admin.requeue_dead(rds, keys, "tiny") == 1
    assert client.wait("poison-1", timeout_s=30).type == EventType.DONE  # a fresh start after the requeue
    assert admin.list_dead(rds, keys, "tiny") == []
    rds.xadd(keys.dead("tiny"), {"reason": "x"})
    assert admin.purge_dead(rds, keys, "tiny") == 1


def test_duplicate_ids_are_refused_and_never_run_twice(worker_factory, client, rds, prefix):
    worker_factory().start()
    model = client.get_model("tiny")
    model.generate("once", generate_config={"max_tokens": 3, "stream": False, "request_id": "dup-1"})
    with pytest.raises(DuplicateRequest):  # finished within the result TTL
        model.generate("again", generate_config={"max_tokens": 3, "request_id": "dup-1"})
    # a producer that bypasses the client: two entries with one id reach the stream
    body = GenerateBody(prompt="raw", generate_config=GenerateConfig(max_tokens=4, ignore_eos=True))
    stream = Keys(prefix).requests("tiny")
    rds.xadd(stream, encode_request("dup-2", TaskKind.GENERATE, body))
    rds.xadd(stream, encode_request("dup-2", TaskKind.GENERATE, body))
    assert client.wait("dup-2", timeout_s=30).type == EventType.DONE
    wait_for(lambda: rds.xlen(stream) == 0)
    events = events_of(client, "dup-2")
    assert_clean_stream(events)
    assert len(streamed_ids(events)) == 4


# ---------------------------------------------------------------- Redis restarts


class PrivateRedis:
    """A redis-server of this test's own, with AOF, that the test stops and starts."""

    def __init__(self, workdir):
        self.port = _free_port()
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
                     "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        wait_for(self._answers, timeout_s=10)

    def _answers(self) -> bool:
        try:
            with redis.Redis.from_url(self.url) as r:
                return r.ping()
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # a clean shutdown: AOF flushed
        self.proc.wait(10)


@pytest.mark.skipif(not __import__("shutil").which("redis-server"), reason="needs a redis-server binary")
def test_redis_restart_mid_run_loses_nothing(tmp_path, prefix, tiny_llama, tiny_llama_path):
    from tests.conftest import build_worker_thread

    server = PrivateRedis(tmp_path)
    server.start()
    handle = build_worker_thread(server.url, prefix, tiny_llama, tiny_llama_path, lease_s=30).start()
    client = Client(server.url, prefix=prefix)
    try:
        model = client.get_model("tiny")
        prompts = [f"restart {i} sun" for i in range(3)]
        ids = [model.submit(TaskKind.GENERATE, {"prompt": p}, {"max_tokens": 250, "ignore_eos": True, "temperature": 0}) for p in prompts]
        wait_for(lambda: all(len(events_of(client, i)) >= 5 for i in ids))
        server.stop()
        time.sleep(1.0)  # the worker keeps its requests and retries
        assert handle.is_alive
        server.start()
        for request_id, prompt in zip(ids, prompts):
            events = list(client.events(request_id, timeout_s=120))
            assert_clean_stream(events)
            assert streamed_ids(events) == reference(tiny_llama, prompt, 250)
    finally:
        handle.stop()
        client.close()
        server.stop()


@pytest.mark.skipif(not __import__("shutil").which("redis-server"), reason="needs a redis-server binary")
def test_outage_longer_than_the_lease_steals_nothing_from_live_workers(tmp_path, prefix, tiny_llama, tiny_llama_path):
    """An outage ages every pending entry by its length; live workers keep what they run anyway."""
    from tests.conftest import build_worker_thread

    server = PrivateRedis(tmp_path)
    server.start()
    busy = build_worker_thread(server.url, prefix, tiny_llama, tiny_llama_path, lease_s=1.0, worker_id="busy").start()
    client = Client(server.url, prefix=prefix)
    idle = None
    try:
        model = client.get_model("tiny")
        prompts = [f"outage {i} moon" for i in range(3)]
        config = {"max_tokens": 300, "ignore_eos": True, "temperature": 0}
        ids = [model.submit(TaskKind.GENERATE, {"prompt": p}, config) for p in prompts]
        wait_for(lambda: all(len(events_of(client, i)) >= 3 for i in ids))
        server.stop()
        time.sleep(2.5)  # longer than the lease
        server.start()
        # A worker that starts now reclaims at once, while the busy one may still wait out its backoff.
        idle = build_worker_thread(server.url, prefix, tiny_llama, tiny_llama_path, lease_s=1.0,
                                   worker_id="idle").start()
        for request_id, prompt in zip(ids, prompts):
            events = list(client.events(request_id, timeout_s=120))
            assert_clean_stream(events)
            assert streamed_ids(events) == reference(tiny_llama, prompt, 300)
        assert idle.worker.stats.num_reclaimed == 0 and busy.worker.stats.num_reclaimed == 0
    finally:
        for handle in (busy, idle):
            if handle is not None:
                handle.stop()
        client.close()
        server.stop()


def test_a_reclaim_pass_ends_over_a_long_pending_list(redis_server_url, prefix, rds):
    """Real Redis scans COUNT*10 pending entries per XAUTOCLAIM: a pass over many live entries still ends."""
    from worker.config import WorkerConfig
    from worker.streams import WorkerStreams

    streams = WorkerStreams(rds, WorkerConfig(model_name="tiny", model_path="p", prefix=prefix, worker_id="r",
                                              lease_s=30))
    streams.ensure_group()
    streams.redis_restarted_recently = lambda: False  # the test server may be younger than the lease
    for i in range(60):
        rds.xadd(streams.requests_key, {"id": f"live-{i}"})
    rds.xreadgroup(GROUP, "busy", {streams.requests_key: ">"}, count=60)  # all running, none idle
    calls = 0
    while True:
        calls += 1
        assert streams.reclaim(2) == []
        if streams.reclaim_scan_done:
            break
        assert calls < 10, "the pass never ends: a worker with a free slot would reclaim at every step"
    assert calls > 1  # it took several windows: the case a single-call check misses


# ---------------------------------------------------------------- text across a resume mid-character


def keep_first_events(rds, key: str, num_kept: int) -> None:
    """What a replica promoted by a failover may hold: the first events only (and no trace of the others)."""
    kept = rds.xrange(key)[:num_kept]
    rds.delete(key)
    for entry_id, fields in kept:
        rds.xadd(key, fields, id=entry_id)


@pytest.mark.parametrize("num_kept", [3, 9])  # the text of the first 3 (or 9) tokens ends inside 東 (inside ∞)
def test_text_read_across_a_resume_mid_character_is_the_decoded_output(redis_server_url, prefix, rds, client,
                                                                       multibyte_llama, num_kept):
    """A worker publishes past `num_kept` tokens and stops; a failover keeps only the first `num_kept` events;
    another worker resumes from them. The consumer's text is the decoded output, nothing repeated."""
    path, (model, tokenizer) = multibyte_llama
    workers = [build_worker_thread(redis_server_url, prefix, None, path, model=(model, tokenizer), grace_s=0, lease_s=1)
               for _ in range(2)]
    gate = StepGate(workers[0].worker.engine, hold={num_kept + 3})
    workers[0].start()
    request_id = client.get_model("tiny").submit(TaskKind.GENERATE, {"prompt": MULTIBYTE_PROMPT},
                                                 {"temperature": 0, "max_tokens": 32})
    try:
        gate.wait_entered(num_kept + 3)
        wait_for(lambda: len(events_of(client, request_id)) > num_kept)
        workers[0].worker.request_stop()
    finally:
        gate.release_all()
    workers[0].stop()
    keep_first_events(rds, client.keys.events(request_id), num_kept)
    kept_ids = streamed_ids(events_of(client, request_id))
    assert tokenizer.decode(kept_ids).endswith("\ufffd"), "the resume point must split a character"
    try:
        workers[1].start()
        events = list(client.events(request_id, timeout_s=60))
    finally:
        workers[1].stop()
    assert_clean_stream(events)
    read = "".join(e.text or "" for e in events if e.type == EventType.TOKEN)
    assert read == tokenizer.decode(streamed_ids(events), skip_special_tokens=True) == events[-1].text == MULTIBYTE_TEXT
    shaper = Shaper(request_id, "tiny", TaskKind.GENERATE)  # the client's chunks and completion agree
    chunks = [shaper.chunk(e) for e in events]
    completion = shaper.completion(events[-1])["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c) == completion == read
    assert workers[1].worker.stats.num_reclaimed == 1
