"""Turning an LLM request into prompt token ids, and checking it fits the worker's limits."""

from __future__ import annotations

import json
from typing import Any

from producer.protocol import ChatBody, ErrorCode, GenerateBody, Request, TaskKind
from worker.engines.base import RequestRejected


def prompt_ids(request: Request, tokenizer, tasks: tuple[TaskKind, ...], vocab_size: int,
               accepts_images: bool = False) -> list[int]:
    """The prompt's token ids; for a chat with images, one placeholder token per image (the caller expands it)."""
    body = request.body
    if request.task not in tasks:
        raise RequestRejected(ErrorCode.UNSUPPORTED_TASK,
                              f"this worker serves {[t.value for t in tasks]}, not {request.task.value!r}")
    if isinstance(body, GenerateBody):
        ids = body.prompt_token_ids if body.prompt_token_ids is not None else tokenizer(body.prompt).input_ids
    elif isinstance(body, ChatBody):
        ids = chat_ids(body, tokenizer, accepts_images)
    else:
        raise RequestRejected(ErrorCode.INVALID_REQUEST, "body does not match the task")
    if not ids:
        raise RequestRejected(ErrorCode.INVALID_REQUEST, "the prompt is empty")
    if max(ids) >= vocab_size:
        raise RequestRejected(ErrorCode.INVALID_REQUEST, f"token id {max(ids)} is outside the vocabulary ({vocab_size})")
    return list(ids)


def chat_ids(body: ChatBody, tokenizer, accepts_images: bool = False) -> list[int]:
    if not accepts_images and any(m.has_images for m in body.messages):
        raise RequestRejected(ErrorCode.INVALID_REQUEST, "this model does not accept image inputs")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestRejected(ErrorCode.INVALID_REQUEST, "this model's tokenizer has no chat template")
    messages = [template_message(m.as_template_dict()) for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tools=body.tools, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # template errors are the request's fault (e.g. roles it forbids)
        raise RequestRejected(ErrorCode.INVALID_REQUEST, f"chat template failed: {exc}") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sends a tool call's arguments as a JSON string; HF chat templates render them with `tojson`
    and want the object (a string would come out double-encoded). ChatMessage checked that it parses.
    Image parts become {"type": "image"}, what the templates of vision models look for."""
    if isinstance(message.get("content"), list):
        parts = [{"type": "image"} if p["type"] == "image_url" else p for p in message["content"]]
        message = {**message, "content": parts}
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        arguments = call["function"]["arguments"]
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        fixed.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": fixed}


def check_lengths(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, max_tokens_limit: int) -> int:
    """The request's max_tokens (the room left in the context when it gave none)."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise RequestRejected(ErrorCode.INVALID_REQUEST,
                              f"the prompt has {num_prompt_tokens} tokens; this worker's context is {max_model_len}")
    if max_tokens is None:
        return min(room, max_tokens_limit)
    if max_tokens > max_tokens_limit:
        raise RequestRejected(ErrorCode.INVALID_REQUEST,
                              f"max_tokens {max_tokens} is over this worker's limit {max_tokens_limit}")
    if max_tokens > room:
        raise RequestRejected(ErrorCode.INVALID_REQUEST,
                              f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the context "
                              f"({max_model_len})")
    return max_tokens
