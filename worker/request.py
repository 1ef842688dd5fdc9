"""One in-flight request's state: ids, params, tokens, progress through the cache, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator

from producer.protocol import DEFAULT_PRIORITY, ErrorCode, EventType, FinishReason, GenerateConfig, Priority, Usage
from worker.out_events import OutEvent, error_event, token_event


class SeqStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A generation request as the engine and scheduler see it.

    Invariant: the KV cache holds the first `num_computed` tokens of `all_ids`, in the
    blocks of `block_table` (position p in block p // block_size); the next forward must
    compute `all_ids[num_computed:]`.
    """

    request_id: str
    prompt_ids: list[int]
    params: GenerateConfig
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # KV cache blocks, in position order
    block_hashes: list[int] = field(default_factory=list)  # prefix hashes of its full blocks (memo)
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_computed: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    finish_reason: FinishReason | None = None
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    num_resumed_tokens: int = 0  # output tokens carried over from an earlier worker
    num_preemptions: int = 0
    priority: Priority = DEFAULT_PRIORITY  # a waiting higher level is scheduled first and preempts lower running work
    # The owner's bookkeeping (the worker loop sets these at admission; the engine never reads them).
    entry_id: Any = None  # worker.streams.EntryRef: the entry that carries it, acked after its terminal event
    num_deliveries: int = 1  # times the stream delivered that entry (a crash hand-back counts one more)
    next_seq: int = 0  # seq of the request's next event
    is_stream: bool = True  # token events as they come; False: only the terminal event, with the whole output
    task: str = "unknown"  # the request's task kind (a metrics label)
    # The whole output, set by the engine when the request finishes (for the `done` event).
    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None  # every output token's row, when the request asked for them
    image_spans: list[tuple[int, int, str]] = field(default_factory=list)  # per image: first token, end, pixel digest
    mrope: list[list[int]] | None = None  # [3][num_prompt_tokens] M-RoPE positions (t, h, w) of the prompt
    rope_delta: int = 0  # with mrope: token p past the prompt sits at position p + rope_delta

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (decode steps ask for one token)."""
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return self.output_ids[start - num_prompt : end - num_prompt]
        return self.all_ids[start:end]

    def chunk_end(self, start: int, end: int) -> int:
        """Where a chunk computing tokens [start, end) must stop so that no image's tokens are split across
        chunks: at the start of an image it would cut (start itself when the chunk begins there: wait for a
        bigger budget). A chunk that begins inside an image (after a cached prefix ending there) goes on."""
        for first, last, _ in self.image_spans:
            if first < end < last and first >= start:
                return first
        return end

    def rope_positions(self, start: int, end: int) -> list[list[int]]:
        """[3][end - start] M-RoPE positions of tokens start..end-1 (text tokens: the same on all three axes)."""
        num_prompt = len(self.prompt_ids)
        if self.mrope is None:
            flat = list(range(start + self.rope_delta, end + self.rope_delta))
            return [flat, flat, flat]
        tail = list(range(max(start, num_prompt) + self.rope_delta, end + self.rope_delta))
        return [axis[start:min(end, num_prompt)] + tail for axis in self.mrope]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED


@dataclass(frozen=True)
class Resume:
    """What an earlier worker published for a request before it was reclaimed."""

    output_ids: list[int]
    text: str
    next_seq: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # the tool-call deltas published, in order
    num_images: int = 0  # image events published (text_to_image: those images are not sent again)


@dataclass
class StepOutput:
    """What one step produced for one request: new tokens, the text they release, and maybe the end."""

    seq: Sequence
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI delta.tool_calls items decided in this step
    error: str | None = None  # the request failed alone in this step (e.g. its grammar rejected a token)
    error_code: ErrorCode = ErrorCode.MODEL_ERROR

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def events(self) -> Iterator[OutEvent]:
        """`token` (when the request streams and there is something to say), then `done` at the end;
        `error` alone when the request failed in this step."""
        seq = self.seq
        if self.error is not None:
            yield error_event(self.error, self.error_code)
            return
        is_stream = seq.is_stream
        if is_stream and (self.token_ids or self.text or self.tool_calls):
            yield token_event(self.text, self.token_ids, self.logprobs, self.tool_calls)
        if self.is_finished:
            usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                          total_tokens=seq.num_tokens)
            yield OutEvent(EventType.DONE, {
                "finish_reason": self.finish_reason, "text": seq.text, "usage": usage, "tool_calls": seq.tool_calls,
                "logprobs": None if is_stream else seq.logprobs})
