"""The HTTP gateway with the official `openai` SDK as the client, against a real worker on the tiny model."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from producer import Client
from producer.keys import Keys
from producer.protocol import TaskKind

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.redis

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}  # bounded, so the tiny model's enforced call ends within max_tokens
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}}]


def sdk(gateway, **kwargs) -> "openai.OpenAI":
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


@pytest.fixture
def served(worker_factory, gateway_factory):
    """A worker on the tiny model and a gateway in front of it."""
    worker = worker_factory(max_num_seqs=4, tool_parser="hermes").start()
    return worker, gateway_factory()


def direct(redis_server_url, prefix, request: dict) -> dict:
    """The same request through the Python client (the oracle for what the gateway must return)."""
    client = Client(redis_server_url, prefix=prefix)
    try:
        return client.get_model("tiny").chat(request["messages"], generate_config=request["config"])
    finally:
        client.close()


def test_chat_completion_equals_the_python_clients(served, redis_server_url, prefix):
    _, gateway = served
    reply = sdk(gateway).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    oracle = direct(redis_server_url, prefix, {"messages": MESSAGES,
                                               "config": {"max_tokens": 12, "temperature": 0, "stream": False}})
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == oracle["choices"][0]["message"]["content"]
    assert reply.choices[0].message.content  # the tiny model does say something
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_chat_stream_is_openais_chunks_and_the_same_text(served):
    _, gateway = served
    client = sdk(gateway)
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16  # include_usage: a last chunk
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_sse_bytes_end_with_done(served):
    _, gateway = served
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    parsed = [json.loads(block[len("data: "):]) for block in events[:-1]]
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in parsed[-1]  # OpenAI sends usage in a stream only with stream_options.include_usage


def test_completions_stream_and_not(served):
    _, gateway = served
    client = sdk(gateway)
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.usage.completion_tokens == 10


def test_completion_logprobs_have_the_legacy_shape(served):
    _, gateway = served
    reply = sdk(gateway).completions.create(model="tiny", prompt="Once", max_tokens=3, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 3
    assert all(len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


def test_tool_calls_stream_and_not(served):
    _, gateway = served
    client = sdk(gateway)
    named = {"type": "function", "function": {"name": "get_weather"}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                           max_tokens=300, temperature=0)
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Oslo") and 1 <= arguments["days"] <= 7
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                                 max_tokens=300, temperature=0, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_request_id_user_and_extra_sampling_keys_pass_through(served, rds, prefix):
    _, gateway = served
    client = sdk(gateway)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, user="alice",
                                           extra_body={"request_id": "pass-1", "top_k": 1, "repetition_penalty": 1.1,
                                                       "temperature": 0.7, "seed": 3})
    assert reply.id == "pass-1"
    events = rds.xrange(Keys(prefix).events("pass-1"))
    assert events[-1][1][b"type"] == b"done"
    greedy = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                            extra_body={"repetition_penalty": 1.1})
    assert reply.choices[0].message.content == greedy.choices[0].message.content  # top_k 1 is greedy


def test_user_reaches_the_request_entry(worker_factory, gateway_factory, rds, prefix):
    """Without a worker running, the entry stays in the stream where its fields can be read."""
    worker_factory().start().stop()  # the model is registered; a fresh heartbeat lets the gateway enqueue
    rds.zadd(Keys(prefix).model_workers("tiny"), {"fake": int(time.time() * 1000)})
    gateway = gateway_factory(request_timeout_s=0.5)
    with pytest.raises(openai.APIStatusError):
        sdk(gateway).chat.completions.create(model="tiny", messages=MESSAGES, user="bob",
                                             extra_body={"request_id": "u-1"})
    [(_, fields)] = rds.xrange(Keys(prefix).requests("tiny"))
    assert fields[b"user"] == b"bob" and fields[b"id"] == b"u-1"


# ---------------------------------------------------------------- errors


def test_unknown_and_invalid_fields_are_openai_shaped_400s(served):
    _, gateway = served
    client = sdk(gateway)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"max_tokenz": 3})
    assert info.value.body["message"] == "Unrecognized request argument supplied: max_tokenz"
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == "max_tokenz"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    assert "temperature" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    response = httpx.post(gateway.url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_unknown_model_is_404(served):
    _, gateway = served
    with pytest.raises(openai.NotFoundError) as info:
        sdk(gateway).chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"


def test_queue_full_is_429_with_retry_after(worker_factory, gateway_factory, rds, prefix, redis_server_url):
    worker_factory(max_queue_len=1).start().stop()  # registered with max_queue_len 1, then gone
    rds.zadd(Keys(prefix).model_workers("tiny"), {"fake": int(time.time() * 1000)})  # counts as live
    with Client(redis_server_url, prefix=prefix) as client:
        client.get_model("tiny").submit(TaskKind.GENERATE, {"prompt": "x"})  # the queue is full now
    gateway = gateway_factory(retry_after_s=7)
    with pytest.raises(openai.RateLimitError) as info:
        sdk(gateway).chat.completions.create(model="tiny", messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.body["code"] == "queue_full"
    assert rds.xlen(Keys(prefix).requests("tiny")) == 1


def test_deadline_passed_is_504(served):
    _, gateway = served
    with pytest.raises(openai.APIStatusError) as info:
        sdk(gateway).chat.completions.create(model="tiny", messages=MESSAGES,
                                             extra_body={"deadline_ms": int(time.time() * 1000) - 1000})
    assert info.value.status_code == 504 and info.value.body["code"] == "deadline_exceeded"
    with pytest.raises(openai.APIStatusError) as info:  # streaming too: the error comes before the first chunk
        list(sdk(gateway).chat.completions.create(model="tiny", messages=MESSAGES, stream=True,
                                                  extra_body={"deadline_ms": int(time.time() * 1000) - 1000}))
    assert info.value.status_code == 504


def test_models_lists_only_models_with_a_live_worker(served, rds, prefix):
    worker, gateway = served
    rds.hset(Keys(prefix).models(), "ghost", json.dumps({"tasks": ["chat"]}))  # registered once, no worker now
    listed = [m.id for m in sdk(gateway).models.list()]
    assert listed == ["tiny"]
    worker.stop()
    assert [m.id for m in sdk(gateway).models.list()] == []


def test_abort_by_request_id(served, rds, prefix):
    _, gateway = served
    stream = sdk(gateway).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=900, stream=True,
                                                  extra_body={"request_id": "ab-1", "ignore_eos": True})
    first = next(iter(stream))
    assert first.id == "ab-1"
    reply = httpx.post(gateway.url + "/v1/requests/ab-1/abort", timeout=10).json()
    assert reply["aborted"] is True
    with pytest.raises(openai.APIError, match="aborted"):
        for _ in stream:
            pass
    assert rds.xrevrange(Keys(prefix).events("ab-1"), count=1)[0][1][b"type"] == b"aborted"
    assert httpx.post(gateway.url + "/v1/requests/ab-1/abort", timeout=10).json()["aborted"] is False


def test_health_and_readiness(gateway_factory):
    gateway = gateway_factory()
    assert httpx.get(gateway.url + "/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(gateway.url + "/ready", timeout=10).status_code == 200
    dead = gateway_factory(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert httpx.get(dead.url + "/health", timeout=10).status_code == 200
    assert httpx.get(dead.url + "/ready", timeout=10).status_code == 503


# ---------------------------------------------------------------- API keys


def test_api_keys_gate_every_endpoint_and_map_to_models(worker_factory, gateway_factory, rds, prefix):
    worker_factory().start()
    gateway = gateway_factory(api_keys={"k-all": ("*",), "k-tiny": ("tiny",), "k-other": ("other",)})
    keyless = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"  # no key, no access
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, api_key="wrong").models.list()
    for key in ("k-all", "k-tiny"):
        reply = sdk(gateway, api_key=key).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert reply.usage.completion_tokens == 2
        assert [m.id for m in sdk(gateway, api_key=key).models.list()] == ["tiny"]
    other = sdk(gateway, api_key="k-other")
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert [m.id for m in other.models.list()] == []
    # abort: a key limited to other models cannot stop this model's requests
    stream = sdk(gateway, api_key="k-tiny").chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=900, stream=True, extra_body={"request_id": "keyed-1",
                                                                               "ignore_eos": True})
    next(iter(stream))
    denied = httpx.post(gateway.url + "/v1/requests/keyed-1/abort", headers={"Authorization": "Bearer k-other"})
    assert denied.status_code == 404 and not rds.exists(Keys(prefix).abort("keyed-1"))
    allowed = httpx.post(gateway.url + "/v1/requests/keyed-1/abort", headers={"Authorization": "Bearer k-tiny"})
    assert allowed.status_code == 200 and allowed.json()["aborted"] is True
    stream.close()
    assert httpx.get(gateway.url + "/health").status_code == 200  # probes need no key


# ---------------------------------------------------------------- images: the real text_to_image worker


def test_images_through_the_sdk_equal_the_python_clients(image_worker_factory, gateway_factory, redis_server_url,
                                                         prefix):
    import base64
    import io

    from PIL import Image

    image_worker_factory("schnell").start()
    gateway = gateway_factory()
    client = sdk(gateway)
    reply = client.images.generate(model="flux", prompt="a red cat", n=2, size="32x32", response_format="b64_json",
                                   extra_body={"num_inference_steps": 2, "seed": 5})
    assert len(reply.data) == 2
    images = [base64.b64decode(d.b64_json) for d in reply.data]
    assert all(Image.open(io.BytesIO(png)).size == (32, 32) for png in images)
    with Client(redis_server_url, prefix=prefix) as direct:
        oracle = direct.get_model("flux").text_to_image("a red cat", n=2, size="32*32", num_inference_steps=2, seed=5)
    assert [d.b64_json for d in reply.data] == [d["b64_json"] for d in oracle["data"]]  # same seed, same images
    as_url = client.images.generate(model="flux", prompt="a red cat", n=2, size="32x32",
                                    extra_body={"num_inference_steps": 2, "seed": 5})  # url: data URLs, no files
    assert [d.url for d in as_url.data] == ["data:image/png;base64," + d.b64_json for d in reply.data]
    with pytest.raises(openai.BadRequestError):  # a size the worker does not serve: the worker's own 400
        client.images.generate(model="flux", prompt="x", size="33x7", extra_body={"num_inference_steps": 2})
    with pytest.raises(openai.BadRequestError):  # a sampling key is not an image field
        client.images.generate(model="flux", prompt="x", extra_body={"num_inference_steps": 2, "max_tokens": 3})


# ---------------------------------------------------------------- many requests at once (bench.gateway's findings)


def _gateway_with_lookup(lookup):
    from producer.gateway.config import GatewayConfig
    from producer.gateway.service import Gateway

    gateway = Gateway(GatewayConfig(redis_url="redis://127.0.0.1:1/0"))  # never connects: the lookup is replaced
    gateway.client.get_model = lookup
    return gateway


def test_requests_arriving_together_read_the_models_registration_once():
    import asyncio

    calls = []

    async def lookup(name):
        calls.append(name)
        await asyncio.sleep(0.05)
        return f"model {name}"

    async def main():
        gateway = _gateway_with_lookup(lookup)
        first = [asyncio.ensure_future(gateway.model("tiny")) for _ in range(50)]
        await asyncio.sleep(0.01)
        first[0].cancel()  # a client that left does not cancel the read the others wait for
        results = await asyncio.gather(*first[1:])
        return results, await gateway.model("tiny"), gateway._lookups

    results, cached, in_flight = asyncio.run(main())
    assert results == ["model tiny"] * 49 and cached == "model tiny"
    assert calls == ["tiny"] and in_flight == {}


def test_an_unknown_model_fails_every_waiting_request_and_is_read_again_next_time():
    import asyncio

    from producer.errors import UnknownModel
    from producer.gateway.errors import HTTPError

    calls = []

    async def lookup(name):
        calls.append(name)
        await asyncio.sleep(0.01)
        raise UnknownModel(f"no model {name}")

    async def main():
        gateway = _gateway_with_lookup(lookup)
        together = await asyncio.gather(*(gateway.model("nope") for _ in range(5)), return_exceptions=True)
        again = await asyncio.gather(gateway.model("nope"), return_exceptions=True)
        return together, again

    together, again = asyncio.run(main())
    assert all(isinstance(e, HTTPError) and e.status == 404 for e in together + again)
    assert calls == ["nope", "nope"]


def test_no_free_redis_connection_in_time_is_an_openai_shaped_503_not_a_bare_500():
    import asyncio
    from types import SimpleNamespace

    from redis.exceptions import ConnectionError as RedisConnectionError

    from producer.gateway.errors import HTTPError

    async def lookup(name):
        raise RedisConnectionError("No connection available.")  # redis-py's BlockingConnectionPool, timed out

    gateway = _gateway_with_lookup(lookup)
    with pytest.raises(HTTPError) as info:
        asyncio.run(gateway.serve(None, SimpleNamespace(model="tiny")))
    assert info.value.status == 503 and info.value.code == "redis_unavailable"
    assert info.value.headers == {"Retry-After": "1"} and "nothing was enqueued" in info.value.message
