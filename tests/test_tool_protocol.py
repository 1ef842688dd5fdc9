"""The wire shapes of tool use: tools, tool_choice, assistant tool_calls and tool messages."""

from __future__ import annotations

import json

import pytest

from producer.protocol import BadEntry, TaskKind, decode_request

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def chat(**body) -> dict:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return {"v": "1", "id": "r1", "task": "chat", "body": json.dumps(body), "created": "0"}


def rejected(**body) -> str:
    with pytest.raises(BadEntry) as info:
        decode_request(chat(**body))
    return info.value.message


def test_multi_turn_tool_use_is_accepted():
    messages = [{"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {"a": 1}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for choice in (None, "none", "auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        request = decode_request(chat(messages=messages, tools=[TOOL, {"type": "function", "function": {"name": "f"}}],
                                      tool_choice=choice))
        assert request.task == TaskKind.CHAT and request.body.tool_choice == choice


@pytest.mark.parametrize("body,needle", [
    ({"tools": [{"type": "retrieval"}]}, '"type": "function"'),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "unknown keys"),
    ({"tools": [TOOL, TOOL]}, "unique"),
    ({"tool_choice": "always"}, "tool_choice must be one of"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "not in tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"}}, "named tool_choice"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "only assistant"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": CALL["function"]}]}]}, '"id"'),
    ({"messages": [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{bad"}}]}]},
     "not valid JSON"),
    ({"messages": [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1]"}}]}]},
     "JSON object"),
])
def test_bad_tool_shapes_are_invalid_requests_that_say_why(body, needle):
    assert needle in rejected(**body)


def test_worker_config_checks_the_tool_parser():
    from pydantic import ValidationError

    from worker.config import WorkerConfig

    assert WorkerConfig(model_name="m", model_path="p", tool_parser="glm4").tool_parser == "glm4"
    with pytest.raises(ValidationError, match="tool_parser"):
        WorkerConfig(model_name="m", model_path="p", tool_parser="qwen")


def test_cli_passes_the_tool_parser():
    from producer.cli import build_parser

    args = build_parser().parse_args(["worker", "--model-name", "m", "--model-path", "p", "--tool-parser", "none"])
    assert args.tool_parser == "none"
