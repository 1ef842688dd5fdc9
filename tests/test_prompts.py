"""Chat prompts: content shapes, the chat template's absence, and image parts on a text-only model."""

from __future__ import annotations

import pytest

from producer.protocol import ChatBody, ErrorCode, TaskKind
from worker.engines.base import RequestRejected
from worker.engines.prompts import chat_ids


def body(*messages) -> ChatBody:
    return ChatBody.model_validate({"messages": list(messages)})


def test_content_as_a_string_or_a_list_of_text_parts_renders_the_same(tiny_llama):
    _, tokenizer = tiny_llama
    as_string = chat_ids(body({"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}),
                         tokenizer)
    as_parts = chat_ids(body({"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                             {"role": "user", "content": [{"type": "text", "text": "hello "},
                                                          {"type": "text", "text": "world"}]}), tokenizer)
    assert as_string == as_parts
    assert "hello world" in tokenizer.decode(as_string)


def test_image_parts_become_the_templates_image_type(tiny_llama):
    from worker.engines.prompts import template_message

    message = body({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                                {"type": "text", "text": "what?"}]}).messages[0]
    assert template_message(message.as_template_dict())["content"] == [{"type": "image"},
                                                                       {"type": "text", "text": "what?"}]
    _, tokenizer = tiny_llama
    with pytest.raises(RequestRejected, match="does not accept image inputs"):
        chat_ids(body(message.as_template_dict()), tokenizer)


@pytest.mark.redis
def test_a_model_without_a_chat_template_fails_chat_clearly_and_still_generates(worker_factory, tiny_llama,
                                                                                tiny_llama_path, redis_server_url,
                                                                                prefix):
    """No guessed template: chat is an invalid_request that says why; generate on the same worker works."""
    from transformers import AutoTokenizer

    from producer import Client

    model, _ = tiny_llama
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    tokenizer.chat_template = None
    worker_factory(model=(model, tokenizer)).start()
    client = Client(redis_server_url, prefix=prefix)
    handle = client.get_model("tiny")
    chat = handle.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": "hi"}]}, {"max_tokens": 4})
    generate = handle.submit(TaskKind.GENERATE, {"prompt": "hello world"}, {"max_tokens": 4, "temperature": 0})
    failed = client.wait(chat, timeout_s=60)
    assert failed.type.value == "error" and failed.code == ErrorCode.INVALID_REQUEST
    assert "no chat template" in failed.message
    assert client.wait(generate, timeout_s=60).type.value == "done"
    client.close()
