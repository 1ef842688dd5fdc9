from __future__ import annotations

import json
from typing import Any

import pytest

from producer.protocol import (
    PROTOCOL_VERSION,
    BadEntry,
    ChatBody,
    Event,
    EventType,
    FinishReason,
    GenerateBody,
    GenerateConfig,
    Request,
    TaskKind,
    TextToImageBody,
    Usage,
    decode_event,
    decode_request,
    encode_event,
    encode_request,
    event_stream_id,
    read_request_id,
)

IMAGE_URL = "data:image/png;base64,iVBORw0KGgo="
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def as_wire(fields: dict[str, Any]) -> dict[bytes, bytes]:
    """What redis-py hands a worker for an XADDed entry: bytes keys and values."""
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in fields.items()}


def roundtrip(request_id: str, task: TaskKind, body: Any, **kwargs: Any) -> Request:
    fields = encode_request(request_id, task, body, **kwargs)
    assert all(isinstance(v, str) for v in fields.values())  # flat strings, any language can XADD them
    return decode_request(as_wire(fields))


def raw_entry(body: Any = None, *, task: str | None = "generate", **overrides: Any) -> dict[bytes, bytes]:
    """A hand-written entry, as another language's producer would XADD it. An override of None leaves a field out."""
    fields: dict[str, Any] = {"v": "1", "id": "req-1", "created": "1700000000000"}
    fields["body"] = body if isinstance(body, (str, bytes)) else json.dumps({"prompt": "hi"} if body is None else body)
    for name, value in {"task": task, **overrides}.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return as_wire(fields)


def bad(fields: dict[Any, Any], **kwargs: Any) -> BadEntry:
    with pytest.raises(BadEntry) as info:
        decode_request(fields, **kwargs)
    return info.value


# ---------------------------------------------------------------- request round trips


def test_generate_prompt_roundtrip() -> None:
    config = GenerateConfig(max_tokens=32, temperature=0.0, top_p=0.9, top_k=40, stop=["\n\n", "END"], seed=7, stream=False)
    body = GenerateBody(prompt="Once upon a time", generate_config=config)
    request = roundtrip("req-1", TaskKind.GENERATE, body, created_ms=1_700_000_000_123)
    assert request.id == "req-1"
    assert request.task is TaskKind.GENERATE
    assert request.body == body
    assert request.created_ms == 1_700_000_000_123
    assert request.deadline_ms is None
    assert request.generate_config.max_tokens == 32
    assert request.generate_config.is_greedy
    assert request.generate_config.stop_strings == ["\n\n", "END"]
    assert request.generate_config.stream is False


def test_generate_token_ids_roundtrip() -> None:
    body = GenerateBody(prompt_token_ids=[0, 5, 17, 50256], generate_config=GenerateConfig(stop_token_ids=[2]))
    request = roundtrip("tok.ids:1", TaskKind.GENERATE, body)
    assert isinstance(request.body, GenerateBody)
    assert request.body.prompt is None
    assert request.body.prompt_token_ids == [0, 5, 17, 50256]
    assert request.generate_config.stop_token_ids == [2]


def test_chat_with_image_parts_and_tools_roundtrip() -> None:
    body = ChatBody.model_validate(
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "low"}},
                    ],
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": TOOLS,
            "tool_choice": "auto",
            "generate_config": {"max_tokens": 8, "stop": "STOP"},
        }
    )
    request = roundtrip("chat-1", TaskKind.CHAT, body, deadline_ms=1_700_000_060_000)
    assert request.task is TaskKind.CHAT
    assert request.body == body
    assert isinstance(request.body, ChatBody)
    assert request.body.messages[1].has_images
    assert not request.body.messages[0].has_images
    assert request.body.messages[1].content[1].image_url.url == IMAGE_URL  # type: ignore[union-attr,index]
    assert request.body.tools == TOOLS
    assert request.body.tool_choice == "auto"
    assert request.deadline_ms == 1_700_000_060_000
    assert request.generate_config.stop_strings == ["STOP"]


def test_text_to_image_roundtrip() -> None:
    body = TextToImageBody(prompt="a red fox", n=2, size="512*512", num_inference_steps=4, seed=3)
    request = roundtrip("img-1", TaskKind.TEXT_TO_IMAGE, body)
    assert request.body == body
    assert request.generate_config == GenerateConfig()  # image bodies have no generate_config


def test_decode_accepts_str_fields() -> None:
    # redis-py with decode_responses=True hands str, not bytes
    fields = encode_request("req-1", TaskKind.GENERATE, GenerateBody(prompt="x"), created_ms=1)
    assert decode_request(fields).body == GenerateBody(prompt="x")


def test_encode_request_fields() -> None:
    fields = encode_request("req-1", TaskKind.GENERATE, GenerateBody(prompt="x"), created_ms=5, deadline_ms=9)
    assert fields["v"] == PROTOCOL_VERSION == "1"
    assert fields["task"] == "generate"
    assert fields["created"] == "5"
    assert fields["deadline"] == "9"
    assert json.loads(fields["body"]) == {"prompt": "x"}  # defaults are not spelled on the wire


def test_encode_request_fills_created_with_now() -> None:
    import time

    before = int(time.time() * 1000)
    fields = encode_request("req-1", TaskKind.GENERATE, GenerateBody(prompt="x"))
    assert before <= int(fields["created"]) <= int(time.time() * 1000)
    assert "deadline" not in fields


@pytest.mark.parametrize("request_id", ["", "a b", "a*", "{x}", "x" * 129])
def test_encode_request_refuses_invalid_id(request_id: str) -> None:
    with pytest.raises(ValueError):
        encode_request(request_id, TaskKind.GENERATE, GenerateBody(prompt="x"))


def test_hand_written_entry_decodes() -> None:
    request = decode_request(raw_entry({"prompt": "hi", "generate_config": {"max_tokens": 3, "temperature": 0}}, deadline="1700000001000"))
    assert request.id == "req-1"
    assert request.generate_config.max_tokens == 3
    assert request.generate_config.is_greedy
    assert request.created_ms == 1_700_000_000_000
    assert request.deadline_ms == 1_700_000_001_000


# ---------------------------------------------------------------- bad entries: id unreadable


@pytest.mark.parametrize("request_id", [None, "", "a b", "a*b", "{m}", "x" * 129, "é", b"\xff\xfe"])
def test_missing_or_invalid_id_has_no_request_id(request_id: Any) -> None:
    fields = raw_entry(id=request_id)  # None: the field is left out
    assert read_request_id(fields) is None
    assert bad(fields).request_id is None


# ---------------------------------------------------------------- bad entries: id readable


def bad_with_id(fields: dict[Any, Any], **kwargs: Any) -> str:
    exc = bad(fields, **kwargs)
    assert exc.request_id == "req-1"
    return exc.message


@pytest.mark.parametrize("version", [None, "2", "0", "", "v1", "1.0"])
def test_missing_or_unknown_version(version: str | None) -> None:
    assert "version" in bad_with_id(raw_entry(v=version))


@pytest.mark.parametrize("task", [None, "embed", "", "GENERATE", "chat "])
def test_unknown_task(task: str | None) -> None:
    assert "task" in bad_with_id(raw_entry(task=task))


def test_missing_body() -> None:
    fields = {k: v for k, v in raw_entry().items() if k != b"body"}
    assert "body" in bad_with_id(fields)


@pytest.mark.parametrize("body", ["{not json", "", '{"prompt": "x"', "{'prompt': 'x'}"])
def test_body_not_json(body: str) -> None:
    assert "JSON" in bad_with_id(raw_entry(body))


@pytest.mark.parametrize("body", ["[]", '"prompt"', "42", "null", "true"])
def test_body_not_an_object(body: str) -> None:
    assert "object" in bad_with_id(raw_entry(body))


def test_deeply_nested_body() -> None:
    bad_with_id(raw_entry("[" * 100_000 + "]" * 100_000))


def test_oversized_body() -> None:
    body = json.dumps({"prompt": "x" * 200})
    assert decode_request(raw_entry(body), max_body_bytes=len(body)).body == GenerateBody(prompt="x" * 200)
    assert "limit" in bad_with_id(raw_entry(body), max_body_bytes=len(body) - 1)


def test_oversized_body_counts_bytes_not_characters() -> None:
    body = json.dumps({"prompt": "é" * 100}, ensure_ascii=False)  # 100 chars of 2 bytes each
    str_fields = {k.decode(): v.decode() for k, v in raw_entry(body).items()}
    for fields in (raw_entry(body), str_fields):
        with pytest.raises(BadEntry, match="limit"):
            decode_request(fields, max_body_bytes=150)


def test_default_body_limit_is_one_mib() -> None:
    body = json.dumps({"prompt": "x" * (1 << 20)})
    assert "limit" in bad_with_id(raw_entry(body))


def test_body_invalid_utf8() -> None:
    assert "UTF-8" in bad_with_id(raw_entry(b'{"prompt": "\xff\xfe"}'))


@pytest.mark.parametrize(
    "config",
    [
        {"max_tokens": "5"},
        {"max_tokens": True},
        {"max_tokens": 5.0},
        {"temperature": "0.5"},
        {"stream": "false"},
        {"stream": 0},
        {"seed": "1"},
        {"stop": 5},
        {"stop_token_ids": ["1"]},
        {"top_k": 1.5},
        {"logprobs": True},
    ],
)
def test_wrong_types_are_rejected_strictly(config: dict[str, Any]) -> None:
    message = bad_with_id(raw_entry({"prompt": "hi", "generate_config": config}))
    assert next(iter(config)) in message


@pytest.mark.parametrize("config", [{"max_token": 5}, {"temprature": 0.5}, {"n": 2}, {"best_of": 2}])
def test_unknown_generate_config_keys_are_rejected(config: dict[str, Any]) -> None:
    assert next(iter(config)) in bad_with_id(raw_entry({"prompt": "hi", "generate_config": config}))


def test_unknown_body_keys_are_rejected() -> None:
    bad_with_id(raw_entry({"prompt": "hi", "max_tokens": 5}))
    bad_with_id(raw_entry({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, task="chat"))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_temperature_is_rejected(literal: str) -> None:
    body = '{"prompt": "hi", "generate_config": {"temperature": %s}}' % literal
    assert "temperature" in bad_with_id(raw_entry(body))


@pytest.mark.parametrize(
    "config",
    [
        {"max_tokens": 0},
        {"max_tokens": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"temperature": -0.1},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"seed": -1},
        {"stop": ""},
        {"stop": ["ok", ""]},
        {"stop": ["s"] * 17},
        {"stop": "x" * 257},
        {"stop_token_ids": [-1]},
        {"logprobs": 21},
    ],
)
def test_out_of_range_values_are_rejected(config: dict[str, Any]) -> None:
    bad_with_id(raw_entry({"prompt": "hi", "generate_config": config}))


def test_boundary_values_are_accepted() -> None:
    config = {"max_tokens": 1, "top_p": 1.0, "temperature": 0, "top_k": 0, "stop": ["s"] * 16, "logprobs": 20}
    request = decode_request(raw_entry({"prompt": "hi", "generate_config": config}))
    assert request.generate_config.max_tokens == 1
    assert len(request.generate_config.stop_strings) == 16


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "prompt_token_ids": [1, 2]},
        {},
        {"generate_config": {"max_tokens": 1}},
        {"prompt_token_ids": []},
        {"prompt_token_ids": [1, -2]},
        {"prompt": None},
    ],
)
def test_exactly_one_of_prompt_and_token_ids(body: dict[str, Any]) -> None:
    bad_with_id(raw_entry(body))


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "text": "x"}]}]},
        {"messages": "hi"},
    ],
)
def test_invalid_chat_bodies(body: dict[str, Any]) -> None:
    bad_with_id(raw_entry(body, task="chat"))


def test_generate_config_request_id_must_match_entry_id() -> None:
    same = {"prompt": "hi", "generate_config": {"request_id": "req-1"}}
    assert decode_request(raw_entry(same)).generate_config.request_id == "req-1"
    other = {"prompt": "hi", "generate_config": {"request_id": "req-2"}}
    assert "request_id" in bad_with_id(raw_entry(other))
    invalid = {"prompt": "hi", "generate_config": {"request_id": "not valid"}}
    bad_with_id(raw_entry(invalid))


@pytest.mark.parametrize("created", [None, "", "abc", "1.5", "1e3", "+5", "--5", " 5", "5 ", "١٢٣", "9" * 20])
def test_created_must_be_an_integer(created: str | None) -> None:
    assert "created" in bad_with_id(raw_entry(created=created))


@pytest.mark.parametrize("deadline", ["soon", "1.5", "--1", "", "2024-01-01"])
def test_deadline_must_be_an_integer(deadline: str) -> None:
    assert "deadline" in bad_with_id(raw_entry(deadline=deadline))


def test_deadline_parses() -> None:
    assert decode_request(raw_entry(deadline="1700000005000")).deadline_ms == 1_700_000_005_000
    assert decode_request(raw_entry()).deadline_ms is None


# ---------------------------------------------------------------- events


def ev_roundtrip(seq: int, type: EventType, **fields: Any) -> Event:
    encoded = encode_event(seq, type, **fields)
    assert encoded["seq"] == str(seq) and encoded["type"] == EventType(type).value
    return decode_event(as_wire(encoded))


def test_token_event_roundtrip() -> None:
    event = ev_roundtrip(3, EventType.TOKEN, text=" wor", token_ids=[995, 11])
    assert event.seq == 3
    assert event.type is EventType.TOKEN
    assert event.text == " wor"
    assert event.token_ids == [995, 11]
    assert not event.is_terminal
    assert event.finish_reason is None and event.usage is None


def test_token_ids_are_json_on_the_wire() -> None:
    encoded = encode_event(0, EventType.TOKEN, text="a", token_ids=[1, 2])
    assert json.loads(encoded["token_ids"]) == [1, 2]


def test_done_event_roundtrip_with_usage_model_and_dict() -> None:
    usage = Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)
    tool_calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    for given in (usage, usage.model_dump()):
        event = ev_roundtrip(7, EventType.DONE, finish_reason=FinishReason.TOOL_CALLS, text="whole", usage=given, tool_calls=tool_calls)
        assert event.type is EventType.DONE
        assert event.finish_reason is FinishReason.TOOL_CALLS
        assert event.text == "whole"
        assert event.usage == usage
        assert event.tool_calls == tool_calls
        assert event.is_terminal
    assert json.loads(encode_event(1, EventType.DONE, usage=usage)["usage"]) == usage.model_dump()


def test_done_event_finish_reason_is_a_plain_string_on_the_wire() -> None:
    assert encode_event(1, EventType.DONE, finish_reason=FinishReason.LENGTH)["finish_reason"] == "length"
    assert decode_event(as_wire({"seq": "1", "type": "done", "finish_reason": "stop"})).finish_reason is FinishReason.STOP


def test_error_event_roundtrip() -> None:
    event = ev_roundtrip(0, EventType.ERROR, code="invalid_request", message="max_tokens: must be >= 1")
    assert event.type is EventType.ERROR
    assert event.code == "invalid_request"
    assert event.message == "max_tokens: must be >= 1"
    assert event.is_terminal


def test_aborted_event_roundtrip() -> None:
    event = ev_roundtrip(4, EventType.ABORTED)
    assert event.type is EventType.ABORTED
    assert event.seq == 4
    assert event.is_terminal


def test_image_and_progress_events_roundtrip() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\xff"
    image = ev_roundtrip(2, EventType.IMAGE, index=1, format="png", data=png)
    assert image.data == png and image.index == 1 and image.format == "png"
    assert not image.is_terminal
    progress = ev_roundtrip(1, EventType.PROGRESS, step=4, total=28)
    assert (progress.step, progress.total) == (4, 28)
    assert not progress.is_terminal


def test_encode_event_skips_none_fields() -> None:
    assert encode_event(0, EventType.TOKEN, text="a", token_ids=None) == {"seq": "0", "type": "token", "text": "a"}


def test_decode_event_ignores_unknown_fields_and_accepts_str() -> None:
    event = decode_event({"seq": "2", "type": "token", "text": "x", "worker": "w1"})
    assert event.seq == 2 and event.text == "x"


def test_event_stream_id() -> None:
    assert event_stream_id(0) == "0-1"
    assert event_stream_id(41) == "0-42"
    ids = [event_stream_id(seq) for seq in range(12)]
    # strictly increasing as Redis stream ids compare, so XADD with them keeps seq order
    assert sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) == ids
    assert len(set(ids)) == len(ids)


def test_terminal_event_types() -> None:
    terminal = {t for t in EventType if Event(seq=0, type=t).is_terminal}
    assert terminal == {EventType.DONE, EventType.ERROR, EventType.ABORTED}


def test_task_and_event_enums_are_str_on_the_wire() -> None:
    assert TaskKind("text_to_image") is TaskKind.TEXT_TO_IMAGE
    assert EventType.TOKEN == "token"
    assert isinstance(TaskKind.CHAT, str)


def test_dead_letter_fields_round_trip_even_when_entry_fields_clash_with_the_metadata():
    from producer.protocol import dead_letter_fields, split_dead_letter

    entry = {b"id": b"r1", b"body": b"{}", b"reason": b"mine", "worker": "w0"}
    written = dead_letter_fields(entry, "delivered 4 times", "1-0", "worker-a", 123, priority="bulk")
    assert written["reason"] == b"delivered 4 times" and written["orig_reason"] == b"mine"
    meta, fields = split_dead_letter(written)
    assert meta == {"reason": "delivered 4 times", "entry_id": "1-0", "worker": "worker-a", "ts": "123",
                    "priority": "bulk"}
    assert fields == {"id": b"r1", "body": b"{}", "reason": b"mine", "worker": b"w0"}


def test_model_registration_keeps_unknown_fields_and_defaults_missing_ones():
    from producer.protocol import DEFAULT_HEARTBEAT_TTL_S, ModelRegistration

    old = ModelRegistration.parse('{"tasks": ["chat"], "max_queue_len": 5, "future_field": [1]}')
    assert (old.tasks, old.max_queue_len, old.heartbeat_ttl_s) == (["chat"], 5, DEFAULT_HEARTBEAT_TTL_S)
    assert '"future_field":[1]' in old.to_json()
