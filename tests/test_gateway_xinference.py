"""A drop-in for Xinference users: code written against Xinference's client runs unchanged on the gateway.

The client is the real `xinference-client` package (`from xinference_client import RESTfulClient as Client`),
against a real worker on the tiny model (and the tiny FLUX for text_to_image).
"""

from __future__ import annotations

import base64

import pytest

from producer import Client as RedbatchClient
from producer.keys import Keys

xinference_client = pytest.importorskip("xinference_client")
pytestmark = pytest.mark.redis
MESSAGES = [{"role": "user", "content": "What is Redis?"}]


@pytest.fixture
def xinference(worker_factory, gateway_factory):
    worker_factory(max_num_seqs=4).start()
    gateway = gateway_factory()
    return xinference_client.RESTfulClient(gateway.url), gateway


def test_get_model_chat_and_generate_as_with_xinference(xinference, redis_server_url, prefix):
    client, _ = xinference
    model = client.get_model("tiny")
    assert type(model).__name__ == "RESTfulChatModelHandle"  # from GET /v1/models/tiny: model_type LLM, ability chat
    reply = model.chat(MESSAGES, generate_config={"max_tokens": 8, "temperature": 0, "request_id": "xi-1"})
    assert reply["id"] == "xi-1" and reply["object"] == "chat.completion"
    with RedbatchClient(redis_server_url, prefix=prefix) as direct:
        oracle = direct.get_model("tiny").chat(MESSAGES, generate_config={"max_tokens": 8, "temperature": 0,
                                                                          "stream": False})
    assert reply["choices"][0]["message"]["content"] == oracle["choices"][0]["message"]["content"]
    completion = model.generate("Once upon a time", generate_config={"max_tokens": 5, "temperature": 0})
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 5
    assert "tiny" in client.list_models()


def test_streaming_chat_and_generate(xinference):
    client, _ = xinference
    model = client.get_model("tiny")
    whole = model.chat(MESSAGES, generate_config={"max_tokens": 10, "temperature": 0})
    chunks = list(model.chat(MESSAGES, generate_config={"max_tokens": 10, "temperature": 0, "stream": True}))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
        whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    pieces = list(model.generate("Once", generate_config={"max_tokens": 6, "temperature": 0, "stream": True}))
    assert len(pieces) >= 2 and pieces[-1]["choices"][0]["finish_reason"] == "length"


def test_abort_request_by_id_while_it_streams(xinference, rds, prefix):
    client, _ = xinference
    model = client.get_model("tiny")
    chunks = model.chat(MESSAGES, generate_config={"max_tokens": 900, "ignore_eos": True, "stream": True,
                                                   "request_id": "xi-abort"})
    first = next(chunks)
    assert first["id"] == "xi-abort"
    assert client.abort_request("tiny", "xi-abort")["aborted"] is True
    with pytest.raises(Exception, match="aborted"):  # Xinference's client raises the stream's error chunk
        for _ in chunks:
            pass
    assert rds.xrevrange(Keys(prefix).events("xi-abort"), count=1)[0][1][b"type"] == b"aborted"
    assert client.abort_request("tiny", "xi-abort")["aborted"] is False  # finished: a no-op


def test_errors_reach_xinference_clients_as_runtime_errors(xinference):
    client, _ = xinference
    with pytest.raises(RuntimeError, match="does not exist"):
        client.get_model("nope")
    with pytest.raises(RuntimeError, match="Unrecognized request argument supplied: max_tokenz"):
        client.get_model("tiny").chat(MESSAGES, generate_config={"max_tokenz": 3})


def test_api_key_with_xinferences_client(worker_factory, gateway_factory):
    worker_factory().start()
    gateway = gateway_factory(api_keys={"secret": ("tiny",)})
    keyed = xinference_client.RESTfulClient(gateway.url, api_key="secret")  # asks /v1/cluster/auth, then sends it
    reply = keyed.get_model("tiny").chat(MESSAGES, generate_config={"max_tokens": 2})
    assert reply["usage"]["completion_tokens"] == 2
    with pytest.raises(RuntimeError):
        xinference_client.RESTfulClient(gateway.url).get_model("tiny")


def test_text_to_image_with_xinferences_client(image_worker_factory, gateway_factory, redis_server_url, prefix):
    image_worker_factory("schnell").start()
    gateway = gateway_factory()
    model = xinference_client.RESTfulClient(gateway.url).get_model("flux")
    assert type(model).__name__ == "RESTfulImageModelHandle"
    out = model.text_to_image("a red cat", n=2, size="32*32", response_format="b64_json", num_inference_steps=2,
                              seed=5)  # extra keys travel in Xinference's `kwargs`
    with RedbatchClient(redis_server_url, prefix=prefix) as direct:
        oracle = direct.get_model("flux").text_to_image("a red cat", n=2, size="32*32", num_inference_steps=2, seed=5)
    assert [d["b64_json"] for d in out["data"]] == [d["b64_json"] for d in oracle["data"]]
    as_url = model.text_to_image("a red cat", n=2, size="32*32", num_inference_steps=2, seed=5)  # its default: url
    assert [d["url"] for d in as_url["data"]] == ["data:image/png;base64," + d["b64_json"] for d in oracle["data"]]
    assert base64.b64decode(out["data"][0]["b64_json"]).startswith(b"\x89PNG")
