"""OpenAI Batch lines -> redbatch bodies, and events -> OpenAI batch output lines (pure, no Redis)."""

from __future__ import annotations

import pytest

from producer.bulk.openai_batch import (
    LineError,
    error_line,
    output_id,
    parse_json_line,
    result_line,
    translate,
)
from producer.protocol import (
    ChatBody,
    Event,
    EventType,
    FinishReason,
    GenerateBody,
    TaskKind,
    TextToImageBody,
    Usage,
)


def _line(url: str, body: dict, **extra) -> dict:
    return {"custom_id": "c1", "method": "POST", "url": url, "body": body, **extra}


def _chat(**body) -> dict:
    return _line("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})


def test_chat_fields_are_translated_into_generate_config() -> None:
    line = translate(_chat(max_completion_tokens=7, logprobs=True, top_logprobs=3, stop=["x"], seed=5,
                           temperature=0.0, top_p=0.9, n=1, user="u", metadata={"a": "b"},
                           response_format={"type": "json_object"}), 0)
    assert line.task == TaskKind.CHAT and isinstance(line.body, ChatBody)
    config = line.body.generate_config
    assert (config.max_tokens, config.logprobs, config.stop, config.seed, config.temperature, config.top_p) == \
        (7, 3, ["x"], 5, 0.0, 0.9)
    assert config.stream is False and config.response_format.type == "json_object"


def test_chat_tools_and_tool_choice_pass_through() -> None:
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    line = translate(_chat(tools=tools, tool_choice="auto"), 0)
    assert line.body.tools == tools and line.body.tool_choice == "auto"


def test_boolean_logprobs_without_top_logprobs_means_chosen_token_only() -> None:
    assert translate(_chat(logprobs=True), 0).body.generate_config.logprobs == 0
    assert translate(_chat(logprobs=False), 0).body.generate_config.logprobs is None


def test_completions_prompt_forms() -> None:
    url = "/v1/completions"
    assert translate(_line(url, {"prompt": "a", "max_tokens": 3, "logprobs": 2}), 0).body.prompt == "a"
    assert translate(_line(url, {"prompt": ["a"]}), 0).body.prompt == "a"
    body = translate(_line(url, {"prompt": [1, 2, 3]}), 0).body
    assert isinstance(body, GenerateBody) and body.prompt_token_ids == [1, 2, 3]
    assert body.generate_config.stream is False
    with pytest.raises(LineError, match="2 prompts"):
        translate(_line(url, {"prompt": ["a", "b"]}), 0)


def test_images_size_is_translated() -> None:
    body = translate(_line("/v1/images/generations", {"prompt": "cat", "n": 2, "size": "64x32"}), 0).body
    assert isinstance(body, TextToImageBody) and (body.size, body.n) == ("64*32", 2)
    with pytest.raises(LineError, match="response_format"):
        translate(_line("/v1/images/generations", {"prompt": "cat", "response_format": "url"}), 0)


@pytest.mark.parametrize(("raw", "match"), [
    (_chat(frobnicate=1), "unknown body field.*frobnicate"),
    (_chat(n=2), "'n'=2"),
    (_chat(n=True), "'n'=true"),
    (_chat(stream=True), "'stream'"),
    (_chat(top_logprobs=2), "needs logprobs"),
    (_chat(max_tokens=3, max_completion_tokens=4), "differ"),
    (_chat(presence_penalty=0.5), "presence_penalty"),
    (_chat(temperature=-1), "temperature"),
    (_line("/v1/embeddings", {}), "unknown url"),
    (_line("/v1/chat/completions", []), "body must be a JSON object"),
    ({"custom_id": "", "url": "/v1/completions", "body": {}}, "custom_id"),
    ({**_chat(), "extra": 1}, "unknown line field"),
    ({**_chat(), "method": "GET"}, "POST"),
    (_chat(messages=[]), "messages"),
    (_line("/v1/completions", {"prompt": "a", "echo": True}), "echo"),
])
def test_bad_lines_are_line_errors_that_name_the_problem(raw: dict, match: str) -> None:
    with pytest.raises(LineError, match=match):
        translate(raw, 0)


def test_bad_json_is_a_line_error() -> None:
    with pytest.raises(LineError, match="not valid JSON"):
        parse_json_line(b"{nope")
    with pytest.raises(LineError, match="JSON object"):
        parse_json_line(b"[1]")


def _done(text: str, logprobs=None) -> Event:
    return Event(seq=0, type=EventType.DONE, text=text, finish_reason=FinishReason.STOP, logprobs=logprobs,
                 usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5))


def test_chat_result_line_has_openai_shape() -> None:
    line = translate(_chat(), 0)
    rows = [{"token_id": 5, "token": "a", "logprob": -0.5, "top_logprobs": [{"token_id": 5, "token": "a", "logprob": -0.5}]}]
    out = result_line("batch_req_x", line, "rid", "tiny", [_done("hello", rows)])
    assert out["id"] == "batch_req_x" and out["custom_id"] == "c1" and out["error"] is None
    assert out["response"]["status_code"] == 200 and out["response"]["request_id"] == "rid"
    body = out["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"] == "chatcmpl-rid"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hello", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"]["content"][0] == {"token": "a", "logprob": -0.5, "bytes": [97],
                                                "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_completion_result_line_uses_the_legacy_logprobs_shape() -> None:
    line = translate(_line("/v1/completions", {"prompt": "a", "logprobs": 1}), 0)
    rows = [{"token": "ab", "logprob": -1.0, "top_logprobs": [{"token": "ab", "logprob": -1.0}]},
            {"token": "c", "logprob": -2.0, "top_logprobs": []}]
    body = result_line("i", line, "rid", "tiny", [_done("abc", rows)])["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "abc"
    assert body["choices"][0]["logprobs"] == {"tokens": ["ab", "c"], "token_logprobs": [-1.0, -2.0],
                                              "top_logprobs": [{"ab": -1.0}, {}], "text_offset": [0, 2]}


def test_error_and_aborted_events_become_error_lines() -> None:
    line = translate(_chat(), 0)
    failed = result_line("i", line, "rid", "m", [Event(seq=0, type=EventType.ERROR, code="invalid_request", message="too long")])
    assert failed["response"] is None and failed["error"] == {"code": "invalid_request", "message": "too long"}
    aborted = result_line("i", line, "rid", "m", [Event(seq=0, type=EventType.ABORTED)])
    assert aborted["error"]["code"] == "aborted"
    assert error_line("i", None, "c", "m") == {"id": "i", "custom_id": None, "response": None,
                                               "error": {"code": "c", "message": "m"}}


def test_image_result_line() -> None:
    line = translate(_line("/v1/images/generations", {"prompt": "cat"}), 0)
    events = [Event(seq=0, type=EventType.IMAGE, index=0, format="png", data=b"\x89PNG"),
              Event(seq=1, type=EventType.DONE)]
    body = result_line("i", line, "rid", "m", events)["response"]["body"]
    assert body["data"] == [{"b64_json": "iVBORw=="}]


def test_output_ids_are_deterministic_per_job_and_line() -> None:
    assert output_id("job1", "a") == output_id("job1", "a") != output_id("job2", "a")
