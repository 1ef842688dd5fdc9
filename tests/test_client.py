from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from producer import Client, Model
from producer.errors import (
    DuplicateRequest,
    UnsupportedTask,
    InvalidRequest,
    ModelError,
    QueueFull,
    RequestAborted,
    RequestExpired,
    RequestTimeout,
    UnknownModel,
)
from producer.keys import Keys
from producer.protocol import (
    ChatBody,
    EventType,
    FinishReason,
    GenerateBody,
    TaskKind,
    Usage,
    decode_request,
    encode_event,
    event_stream_id,
)

KEYS = Keys()
MODEL = "tiny-llm"
USAGE = Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def redis_conn(server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    conn = fakeredis.FakeRedis(server=server)
    yield conn
    conn.close()


@pytest.fixture
def client(redis_conn: fakeredis.FakeRedis) -> Client:
    return Client(redis_client=redis_conn)


def register(conn: Any, name: str = MODEL, **info: Any) -> None:
    entry = {"tasks": ["generate", "chat"], "max_num_seqs": 4, "max_queue_len": 3} | info
    conn.hset(KEYS.models(), name, json.dumps(entry))
    conn.zadd(KEYS.model_workers(name), {"w1": int(time.time() * 1000)})  # a live worker: submits are accepted


@pytest.fixture
def model(client: Client, redis_conn: fakeredis.FakeRedis) -> Model:
    register(redis_conn)
    return client.get_model(MODEL)


def queued(conn: Any, name: str = MODEL) -> list[Any]:
    return [decode_request(fields) for _, fields in conn.xrange(KEYS.requests(name))]


def write_events(conn: Any, request_id: str, events: list[tuple[EventType, dict[str, Any]]]) -> None:
    """Publish events the way a worker does: explicit stream ids 0-1, 0-2, ... (seq + 1)."""
    for seq, (type_, fields) in enumerate(events):
        conn.xadd(KEYS.events(request_id), encode_event(seq, type_, **fields), id=event_stream_id(seq))


def tokens_then_done(*pieces: str, finish_reason: FinishReason = FinishReason.STOP) -> list[tuple[EventType, dict[str, Any]]]:
    events: list[tuple[EventType, dict[str, Any]]] = [(EventType.TOKEN, {"text": p, "token_ids": [i]}) for i, p in enumerate(pieces)]
    events.append((EventType.DONE, {"finish_reason": finish_reason, "text": "".join(pieces), "usage": USAGE}))
    return events


# ---------------------------------------------------------------- models


def test_get_model_unregistered_raises_unknown_model(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    with pytest.raises(UnknownModel):
        client.get_model(MODEL)
    register(redis_conn, "other-model")
    with pytest.raises(UnknownModel):
        client.get_model(MODEL)


@pytest.mark.parametrize("name", ["", "a b", "m*", "{m}", "é"])
def test_get_model_invalid_name_raises_invalid_request(client: Client, name: str) -> None:
    with pytest.raises(InvalidRequest):
        client.get_model(name)


def test_get_model_and_list_models(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    register(redis_conn)
    register(redis_conn, "img", tasks=["text_to_image"], max_queue_len=0)
    model = client.get_model(MODEL)
    assert model.name == MODEL
    assert model.info.tasks == ("generate", "chat")
    assert model.info.max_queue_len == 3
    listed = client.list_models()
    assert set(listed) == {MODEL, "img"}
    assert listed[MODEL]["max_num_seqs"] == 4


# ---------------------------------------------------------------- submit


def test_submit_generate_writes_a_decodable_entry(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    before = int(time.time() * 1000)
    request_id = model.submit(TaskKind.GENERATE, {"prompt": "Once"}, {"max_tokens": 5, "temperature": 0})
    [request] = queued(redis_conn)
    assert request.id == request_id
    assert request.task is TaskKind.GENERATE
    assert isinstance(request.body, GenerateBody)
    assert request.body.prompt == "Once"
    assert request.generate_config.max_tokens == 5
    assert request.generate_config.is_greedy
    assert before <= request.created_ms <= int(time.time() * 1000)
    assert request.deadline_ms is None


def test_submit_token_ids_and_deadline(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    model.submit(TaskKind.GENERATE, {"prompt_token_ids": [1, 2, 3]}, deadline_ms=1_900_000_000_000)
    [request] = queued(redis_conn)
    assert request.body.prompt_token_ids == [1, 2, 3]
    assert request.deadline_ms == 1_900_000_000_000


def test_submit_chat_with_images_and_tools(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request_id = model.submit(TaskKind.CHAT, {"messages": messages, "tools": tools, "tool_choice": "auto"})
    [request] = queued(redis_conn)
    assert request.id == request_id
    assert isinstance(request.body, ChatBody)
    assert request.body.messages[0].has_images
    assert request.body.tools == tools
    assert request.body.tool_choice == "auto"


def test_generated_request_ids_are_unique(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    ids = {model.submit(TaskKind.GENERATE, {"prompt": "x"}) for _ in range(3)}
    assert len(ids) == 3
    assert {r.id for r in queued(redis_conn)} == ids


def test_generate_config_request_id_sets_the_entry_id(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    assert model.submit(TaskKind.GENERATE, {"prompt": "x"}, {"request_id": "my-id.1"}) == "my-id.1"
    [request] = queued(redis_conn)
    assert request.id == "my-id.1"
    assert request.generate_config.request_id == "my-id.1"


def test_the_request_id_argument_names_a_chat_or_generate_request(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    assert model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": "hi"}]}, {"max_tokens": 2},
                        request_id="mine-1") == "mine-1"
    assert model.submit(TaskKind.GENERATE, {"prompt": "x"}, {"request_id": "mine-2"}, request_id="mine-2") == "mine-2"
    with pytest.raises(InvalidRequest, match="differs"):
        model.submit(TaskKind.GENERATE, {"prompt": "x"}, {"request_id": "a"}, request_id="b")
    assert [(r.id, r.generate_config.request_id) for r in queued(redis_conn)] == [("mine-1", "mine-1"),
                                                                                   ("mine-2", "mine-2")]


@pytest.mark.parametrize(
    "config",
    [{"max_token": 5}, {"max_tokens": 0}, {"max_tokens": "5"}, {"top_p": 0}, {"request_id": "not valid"}, {"temperature": float("nan")}],
)
def test_invalid_generate_config_is_refused_before_writing(model: Model, redis_conn: fakeredis.FakeRedis, config: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        model.submit(TaskKind.GENERATE, {"prompt": "x"}, config)
    with pytest.raises(InvalidRequest):
        model.chat(MESSAGES, generate_config=config)
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 0


def test_invalid_payload_is_refused_before_writing(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    with pytest.raises(InvalidRequest):
        model.chat([])
    with pytest.raises(InvalidRequest):
        model.chat([{"role": "wizard", "content": "x"}])
    with pytest.raises(InvalidRequest):
        model.generate([])
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 0


def test_queue_full_at_max_queue_len(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    for _ in range(3):
        model.submit(TaskKind.GENERATE, {"prompt": "x"})
    with pytest.raises(QueueFull):
        model.submit(TaskKind.GENERATE, {"prompt": "x"})
    with pytest.raises(QueueFull):
        model.chat(MESSAGES)
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 3
    # a worker acks and deletes one finished entry: there is room again
    first_id = redis_conn.xrange(KEYS.requests(MODEL), count=1)[0][0]
    redis_conn.xdel(KEYS.requests(MODEL), first_id)
    model.submit(TaskKind.GENERATE, {"prompt": "x"})
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 3


def test_max_queue_len_zero_is_unbounded(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    register(redis_conn, max_queue_len=0)
    model = client.get_model(MODEL)
    for _ in range(25):
        model.submit(TaskKind.GENERATE, {"prompt": "x"})
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 25


def test_unregistered_task_is_refused(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    register(redis_conn, tasks=["generate"])
    model = client.get_model(MODEL)
    with pytest.raises(UnsupportedTask, match="chat"):
        model.chat(MESSAGES)
    with pytest.raises(UnsupportedTask):
        model.submit(TaskKind.CHAT, {"messages": MESSAGES})
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 0
    model.submit(TaskKind.GENERATE, {"prompt": "x"})
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 1


def test_custom_prefix(redis_conn: fakeredis.FakeRedis) -> None:
    keys = Keys("staging")
    redis_conn.hset(keys.models(), MODEL, json.dumps({"tasks": ["generate"]}))
    redis_conn.zadd(keys.model_workers(MODEL), {"w1": int(time.time() * 1000)})
    client = Client(prefix="staging", redis_client=redis_conn)
    client.get_model(MODEL).submit(TaskKind.GENERATE, {"prompt": "x"})
    assert redis_conn.xlen(keys.requests(MODEL)) == 1
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 0
    with pytest.raises(UnknownModel):
        Client(redis_client=redis_conn).get_model(MODEL)


# ---------------------------------------------------------------- abort


def test_abort_sets_the_abort_key_with_a_ttl(redis_conn: fakeredis.FakeRedis) -> None:
    client = Client(redis_client=redis_conn, result_ttl_s=120)
    assert client.abort_request(MODEL, "req-1") is True
    assert redis_conn.exists(KEYS.abort("req-1")) == 1
    assert 0 < redis_conn.ttl(KEYS.abort("req-1")) <= 120


def test_abort_of_a_running_request(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-1", [(EventType.TOKEN, {"text": "a", "token_ids": [1]})])
    assert client.abort_request(MODEL, "req-1") is True
    assert redis_conn.exists(KEYS.abort("req-1")) == 1


@pytest.mark.parametrize(
    "terminal",
    [(EventType.DONE, {"finish_reason": FinishReason.STOP, "text": "a"}), (EventType.ERROR, {"code": "expired", "message": "late"}), (EventType.ABORTED, {})],
)
def test_abort_after_terminal_event_is_a_noop(client: Client, redis_conn: fakeredis.FakeRedis, terminal: tuple[EventType, dict[str, Any]]) -> None:
    write_events(redis_conn, "req-1", [(EventType.TOKEN, {"text": "a", "token_ids": [1]}), terminal])
    assert client.abort_request(MODEL, "req-1") is False
    assert redis_conn.exists(KEYS.abort("req-1")) == 0


def test_model_abort(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    request_id = model.submit(TaskKind.GENERATE, {"prompt": "x"})
    assert model.abort(request_id) is True
    assert redis_conn.exists(KEYS.abort(request_id)) == 1


def test_abort_with_invalid_names_writes_nothing(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    with pytest.raises(InvalidRequest):
        client.abort_request(MODEL, "bad id*")
    with pytest.raises(InvalidRequest):
        client.abort_request("bad model*", "req-1")
    assert redis_conn.keys("*") == []


# ---------------------------------------------------------------- events and wait


def test_events_yields_in_order_and_stops_at_terminal(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-1", tokens_then_done("Hel", "lo"))
    # nothing may follow a terminal event; a client must not read past one if it did
    redis_conn.xadd(KEYS.events("req-1"), encode_event(3, EventType.TOKEN, text="!"), id=event_stream_id(3))
    events = list(client.events("req-1", timeout_s=2))
    assert [e.seq for e in events] == [0, 1, 2]
    assert [e.type for e in events] == [EventType.TOKEN, EventType.TOKEN, EventType.DONE]
    assert [e.text for e in events] == ["Hel", "lo", "Hello"]
    assert events[0].token_ids == [0]
    assert events[-1].usage == USAGE


def test_events_resume_after_an_entry_id(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-1", tokens_then_done("a", "b", "c"))
    events = list(client.events("req-1", after=event_stream_id(1), timeout_s=2))
    assert [e.seq for e in events] == [2, 3]


def test_wait_returns_the_terminal_event(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-1", tokens_then_done("a", "b"))
    event = client.wait("req-1", timeout_s=2)
    assert event.type is EventType.DONE
    assert event.text == "ab"


def test_wait_times_out_when_nothing_arrives(client: Client) -> None:
    start = time.monotonic()
    with pytest.raises(RequestTimeout):
        client.wait("req-1", timeout_s=0.2)
    assert 0.15 <= time.monotonic() - start < 1.5


def test_events_time_out_without_a_terminal_event(client: Client, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-1", [(EventType.TOKEN, {"text": "a", "token_ids": [1]})])
    seen = []
    with pytest.raises(RequestTimeout):
        for event in client.events("req-1", timeout_s=0.2):
            seen.append(event.seq)
    assert seen == [0]


def test_wait_sees_events_written_later_by_a_worker_thread(client: Client, server: fakeredis.FakeServer) -> None:
    def worker() -> None:
        conn = fakeredis.FakeRedis(server=server)
        time.sleep(0.05)
        write_events(conn, "req-1", tokens_then_done("x", "y"))
        conn.close()

    thread = threading.Thread(target=worker)
    thread.start()
    event = client.wait("req-1", timeout_s=5)
    thread.join()
    assert event.type is EventType.DONE
    assert event.text == "xy"


# ---------------------------------------------------------------- chat / generate end to end


class FakeWorker(threading.Thread):
    """Reads one request from the model's stream and answers it like a worker would."""

    def __init__(self, server: fakeredis.FakeServer, events: list[tuple[EventType, dict[str, Any]]], delay_s: float = 0.02):
        super().__init__(daemon=True)
        self.conn = fakeredis.FakeRedis(server=server)
        self.events = events
        self.delay_s = delay_s
        self.request: Any = None

    def run(self) -> None:
        reply = self.conn.xread({KEYS.requests(MODEL): "0-0"}, count=1, block=5000)
        [(_, [(_, fields)])] = reply
        self.request = decode_request(fields)
        for seq, (type_, extra) in enumerate(self.events):
            time.sleep(self.delay_s)
            self.conn.xadd(KEYS.events(self.request.id), encode_event(seq, type_, **extra), id=event_stream_id(seq))
        self.conn.close()


def test_chat_stream_yields_openai_chunks(model: Model, server: fakeredis.FakeServer) -> None:
    worker = FakeWorker(server, tokens_then_done("Hel", "lo", "!"))
    worker.start()
    chunks = list(model.chat(MESSAGES, generate_config={"stream": True, "max_tokens": 3}, timeout_s=5))
    worker.join()
    assert worker.request.task is TaskKind.CHAT
    assert worker.request.generate_config.max_tokens == 3
    assert len(chunks) == 4
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == worker.request.id for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello!"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert chunks[-1]["usage"] == USAGE.model_dump()


def test_stream_is_the_default(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-s", tokens_then_done("a"))
    chunks = list(model.generate("x", generate_config={"request_id": "req-s"}, timeout_s=2))
    assert [c["choices"][0]["text"] for c in chunks] == ["a", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_request_is_enqueued_before_iteration(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-e", tokens_then_done("a"))
    chunks = model.chat(MESSAGES, generate_config={"request_id": "req-e", "stream": True})
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 1  # submitted eagerly, not on first next()
    assert len(list(chunks)) == 2


def test_chat_non_stream_returns_a_completion(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    tool_calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    write_events(redis_conn, "req-2", [(EventType.DONE, {"finish_reason": FinishReason.TOOL_CALLS, "text": "", "tool_calls": tool_calls, "usage": USAGE})])
    out = model.chat(MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}], generate_config={"stream": False, "request_id": "req-2"}, timeout_s=2)
    assert out["object"] == "chat.completion"
    assert out["id"] == "req-2"
    assert out["model"] == MODEL
    assert out["choices"][0]["message"]["tool_calls"] == tool_calls
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"] == USAGE.model_dump()
    [request] = queued(redis_conn)
    assert request.generate_config.stream is False
    assert request.body.tools == [{"type": "function", "function": {"name": "f"}}]


def test_generate_non_stream_from_a_worker_thread(model: Model, server: fakeredis.FakeServer) -> None:
    worker = FakeWorker(server, [(EventType.DONE, {"finish_reason": FinishReason.LENGTH, "text": " upon a time", "usage": USAGE})])
    worker.start()
    out = model.generate([5, 6, 7], generate_config={"stream": False, "max_tokens": 4}, timeout_s=5)
    worker.join()
    assert worker.request.body.prompt_token_ids == [5, 6, 7]
    assert out["object"] == "text_completion"
    assert out["id"] == worker.request.id
    assert out["choices"][0]["text"] == " upon a time"
    assert out["choices"][0]["finish_reason"] == "length"


def test_error_event_raises_typed_error(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-x", [(EventType.ERROR, {"code": "expired", "message": "deadline passed"})])
    with pytest.raises(RequestExpired, match="deadline passed") as info:
        model.generate("x", generate_config={"stream": False, "request_id": "req-x"}, timeout_s=2)
    assert info.value.request_id == "req-x"


def test_error_event_mid_stream_raises_after_the_tokens(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-y", [(EventType.TOKEN, {"text": "a", "token_ids": [1]}), (EventType.ERROR, {"code": "model_error", "message": "oom"})])
    chunks = model.chat(MESSAGES, generate_config={"request_id": "req-y"}, timeout_s=2)
    assert next(chunks)["choices"][0]["delta"]["content"] == "a"
    with pytest.raises(ModelError):
        next(chunks)


def test_aborted_event_raises_request_aborted(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    write_events(redis_conn, "req-z", [(EventType.ABORTED, {})])
    write_events(redis_conn, "req-z2", [(EventType.ABORTED, {})])
    with pytest.raises(RequestAborted):
        model.chat(MESSAGES, generate_config={"request_id": "req-z", "stream": False}, timeout_s=2)
    with pytest.raises(RequestAborted):
        list(model.chat(MESSAGES, generate_config={"request_id": "req-z2"}, timeout_s=2))


def test_reusing_an_id_is_refused_before_anything_is_written(model: Model, redis_conn: fakeredis.FakeRedis) -> None:
    model.submit(TaskKind.GENERATE, {"prompt": "x"}, {"request_id": "once"})
    with pytest.raises(DuplicateRequest):
        model.submit(TaskKind.GENERATE, {"prompt": "y"}, {"request_id": "once"})
    assert redis_conn.xlen(KEYS.requests(MODEL)) == 1


def test_non_stream_timeout(model: Model) -> None:
    with pytest.raises(RequestTimeout):
        model.generate("x", generate_config={"stream": False}, timeout_s=0.1)


# ---------------------------------------------------------------- import hygiene


def test_importing_the_producer_does_not_import_torch() -> None:
    root = Path(__file__).resolve().parent.parent
    code = "import sys, producer, producer.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
