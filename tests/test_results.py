from __future__ import annotations

import time
from typing import Any

import pytest

from producer.errors import (
    DeadLettered,
    InvalidRequest,
    ModelError,
    RedbatchError,
    RequestAborted,
    RequestError,
    RequestExpired,
    UnknownModel,
    UnsupportedTask,
)
from producer.protocol import Event, EventType, FinishReason, TaskKind, Usage
from producer.results import Shaper, check_terminal

USAGE = Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)
TOOL_CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]


def token(seq: int, text: str, **extra: Any) -> Event:
    return Event(seq=seq, type=EventType.TOKEN, text=text, token_ids=[seq], **extra)


def done(seq: int = 3, text: str = "Hello world", finish_reason: FinishReason = FinishReason.STOP, **extra: Any) -> Event:
    return Event(seq=seq, type=EventType.DONE, text=text, finish_reason=finish_reason, usage=USAGE, **extra)


def test_chat_completion_is_openai_shaped() -> None:
    before = int(time.time())
    out = Shaper("req-1", "qwen", TaskKind.CHAT).completion(done())
    assert out["id"] == "req-1"
    assert out["object"] == "chat.completion"
    assert out["model"] == "qwen"
    assert before <= out["created"] <= int(time.time())
    assert len(out["choices"]) == 1
    choice = out["choices"][0]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "Hello world"}
    assert choice["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_chat_completion_with_tool_calls() -> None:
    out = Shaper("req-1", "qwen", TaskKind.CHAT).completion(done(text="", finish_reason=FinishReason.TOOL_CALLS, tool_calls=TOOL_CALLS))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == TOOL_CALLS
    assert choice["message"]["content"] is None
    assert choice["message"]["role"] == "assistant"


def test_generate_completion_is_openai_shaped() -> None:
    out = Shaper("req-2", "gpt2", TaskKind.GENERATE).completion(done(text=" upon a time", finish_reason=FinishReason.LENGTH))
    assert out["id"] == "req-2"
    assert out["object"] == "text_completion"
    assert out["model"] == "gpt2"
    choice = out["choices"][0]
    assert choice["text"] == " upon a time"
    assert choice["finish_reason"] == "length"
    assert "message" not in choice
    assert out["usage"]["total_tokens"] == 8


def test_completion_carries_logprobs_when_given() -> None:
    logprobs = [{"token": "a", "logprob": -0.1}]
    out = Shaper("r", "m", TaskKind.GENERATE).completion(done(), logprobs=logprobs)
    assert out["choices"][0]["logprobs"] == {"content": logprobs}


def test_chat_stream_chunks() -> None:
    shaper = Shaper("req-1", "qwen", TaskKind.CHAT)
    first = shaper.chunk(token(0, "Hel"))
    second = shaper.chunk(token(1, "lo"))
    last = shaper.chunk(done(seq=2, text="Hello"))
    assert first is not None and second is not None and last is not None
    for chunk in (first, second, last):
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == "req-1"
        assert chunk["model"] == "qwen"
        assert chunk["choices"][0]["index"] == 0
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert first["choices"][0]["finish_reason"] is None
    assert second["choices"][0]["delta"] == {"content": "lo"}  # role only once
    assert last["choices"][0]["finish_reason"] == "stop"
    assert "content" not in last["choices"][0]["delta"]  # the done chunk repeats no text
    assert last["usage"] == USAGE.model_dump()
    # all chunks of one stream share id and created, as OpenAI's do
    assert first["created"] == second["created"] == last["created"]


def test_chat_stream_done_first_still_sends_role_and_tool_calls() -> None:
    shaper = Shaper("req-1", "qwen", TaskKind.CHAT)
    chunk = shaper.chunk(done(seq=0, text="", finish_reason=FinishReason.TOOL_CALLS, tool_calls=TOOL_CALLS))
    assert chunk is not None
    delta = chunk["choices"][0]["delta"]
    assert delta["role"] == "assistant"
    assert delta["tool_calls"] == [{"index": i, **c} for i, c in enumerate(TOOL_CALLS)]  # delta shape: with index
    assert chunk["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_stream_tool_call_deltas_come_from_token_events_and_are_not_repeated_at_done() -> None:
    shaper = Shaper("req-1", "qwen", TaskKind.CHAT)
    deltas = [{"index": 0, **TOOL_CALLS[0]}]
    first = shaper.chunk(token(0, "Checking."))
    second = shaper.chunk(token(1, "", tool_calls=deltas))
    last = shaper.chunk(done(seq=2, text="Checking.", finish_reason=FinishReason.TOOL_CALLS, tool_calls=TOOL_CALLS))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Checking."}
    assert second["choices"][0]["delta"] == {"tool_calls": deltas}  # no empty content beside the call
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "tool_calls"


def test_generate_stream_chunks() -> None:
    shaper = Shaper("req-2", "gpt2", TaskKind.GENERATE)
    first = shaper.chunk(token(0, " upon"))
    last = shaper.chunk(done(seq=1, text=" upon", finish_reason=FinishReason.LENGTH))
    assert first is not None and last is not None
    assert first["object"] == last["object"] == "text_completion"
    assert first["choices"][0]["text"] == " upon"
    assert first["choices"][0]["finish_reason"] is None
    assert last["choices"][0]["text"] == ""
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] == USAGE.model_dump()
    assert "delta" not in first["choices"][0]


@pytest.mark.parametrize("task", [TaskKind.GENERATE, TaskKind.CHAT])
def test_chunk_texts_add_up_to_the_completion_across_a_resume(task: TaskKind) -> None:
    # A worker held back the first bytes of 東 (""), died; the next sent an empty event on resume, then 東京.
    events = [token(0, "😀"), token(1, ""), Event(seq=2, type=EventType.TOKEN, text="", token_ids=[]),
              token(3, "東京"), done(seq=4, text="😀東京")]
    shaper = Shaper("r", "m", task)
    chunks = [c["choices"][0] for c in map(shaper.chunk, events) if c is not None]
    read = "".join(c["delta"].get("content") or "" if task == TaskKind.CHAT else c["text"] for c in chunks)
    completion = shaper.completion(events[-1])["choices"][0]
    assert read == (completion["message"]["content"] if task == TaskKind.CHAT else completion["text"]) == "😀東京"


def test_token_logprobs_are_passed_through_in_chunks() -> None:
    logprobs = [{"token": "a", "logprob": -0.5, "top_logprobs": []}]
    chunk = Shaper("r", "m", TaskKind.CHAT).chunk(token(0, "a", logprobs=logprobs))
    assert chunk is not None
    assert chunk["choices"][0]["logprobs"] == {"content": logprobs}


def test_progress_events_have_no_chunk() -> None:
    assert Shaper("r", "m", TaskKind.GENERATE).chunk(Event(seq=0, type=EventType.PROGRESS, step=1, total=4)) is None


@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        ("invalid_request", InvalidRequest),
        ("unknown_model", UnknownModel),
        ("expired", RequestExpired),
        ("model_error", ModelError),
        ("dead_letter", DeadLettered),
        ("unsupported_task", UnsupportedTask),
    ],
)
@pytest.mark.parametrize("task", [TaskKind.CHAT, TaskKind.GENERATE])
def test_error_events_raise_typed_errors(code: str, exc_type: type[RequestError], task: TaskKind) -> None:
    event = Event(seq=2, type=EventType.ERROR, code=code, message="it went wrong")
    for call in (Shaper("req-9", "m", task).completion, Shaper("req-9", "m", task).chunk):
        with pytest.raises(exc_type) as info:
            call(event)
        assert type(info.value) is exc_type
        assert info.value.code == code
        assert info.value.message == "it went wrong"
        assert info.value.request_id == "req-9"


def test_unknown_error_code_raises_base_request_error() -> None:
    event = Event(seq=0, type=EventType.ERROR, code="gpu_on_fire", message="hot")
    with pytest.raises(RequestError) as info:
        check_terminal(event, "req-1")
    assert type(info.value) is RequestError
    assert info.value.code == "gpu_on_fire"
    assert info.value.message == "hot"
    assert isinstance(info.value, RedbatchError)


def test_error_without_code_or_message_still_raises() -> None:
    with pytest.raises(RequestError) as info:
        check_terminal(Event(seq=0, type=EventType.ERROR), "req-1")
    assert type(info.value) is RequestError
    assert info.value.message


def test_aborted_raises_request_aborted() -> None:
    event = Event(seq=5, type=EventType.ABORTED)
    for task in (TaskKind.CHAT, TaskKind.GENERATE):
        with pytest.raises(RequestAborted) as info:
            Shaper("req-7", "m", task).completion(event)
        assert info.value.request_id == "req-7"
        with pytest.raises(RequestAborted):
            Shaper("req-7", "m", task).chunk(event)
    assert not issubclass(RequestAborted, RequestError)  # an abort is not a failure of the request


def test_check_terminal_passes_non_error_events() -> None:
    check_terminal(token(0, "a"), "r")
    check_terminal(done(), "r")


def test_event_cursor_stops_at_the_terminal_event_and_remembers_where_it_read() -> None:
    from producer.protocol import encode_event
    from producer.results import EventCursor

    cursor = EventCursor("k", "req-1", timeout_s=None)
    reply = [(b"k", [(b"0-1", encode_event(0, EventType.TOKEN, text="a", token_ids=[1])),
                     (b"0-2", encode_event(1, EventType.ABORTED)),
                     (b"0-3", encode_event(2, EventType.TOKEN, text="never", token_ids=[2]))])]
    assert [e.type for e in cursor.take(reply)] == [EventType.TOKEN, EventType.ABORTED]
    assert cursor.is_done and cursor.after == b"0-2"


def test_event_cursor_times_out_without_a_terminal_event() -> None:
    from producer.errors import RequestTimeout
    from producer.results import READ_BLOCK_MS, EventCursor

    assert EventCursor("k", "r", timeout_s=None).block_ms() == READ_BLOCK_MS
    cursor = EventCursor("k", "r", timeout_s=0.0)
    assert cursor.block_ms() == 1
    with pytest.raises(RequestTimeout):
        list(cursor.take(None))
    assert not cursor.is_done
