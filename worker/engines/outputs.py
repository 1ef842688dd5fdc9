"""One LLM request's output side: sampled tokens in, text deltas and the finish decision out.

Host work after the step's one device->host transfer: incremental detokenization, stop
strings with hold-back, EOS / stop_token_ids / max_tokens, logprob rows, and for chat requests
with tools the tool-call parser over the released text (after stop strings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from producer.protocol import FinishReason
from worker.engines.text import IncrementalDetokenizer, StopStringMatcher
from worker.models.tool_parsers import ToolParser
from worker.request import Resume, Sequence, StepOutput


@dataclass
class OutputState:
    """Per-request state that lives only in the engine."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    seed: int  # the sampler's per-request seed (counter-based: the n-th output token uses counter n)
    stop_token_ids: frozenset[int]
    eos_ids: frozenset[int]
    seen_row: int | None = None  # row in the repetition-penalty mask, once scheduled
    logprobs: list[dict] = field(default_factory=list)
    tools: ToolParser | None = None  # chat requests with tools (tool_choice not "none")
    unsent: tuple[str, list[dict[str, Any]]] = ("", [])  # parsed again at resume, not yet published
    num_sent_chars: int = 0  # content the client had at resume (tool-call requests)
    num_parsed_chars: int = 0  # content the parser has produced here
    sent_calls: frozenset[int] = frozenset()  # indices of the tool calls published before the resume

    def resume(self, seq: Sequence, resume: Resume) -> None:
        """Continue after tokens an earlier worker published: same text state; the sampler's counter
        is the output index, so the random stream continues by itself.

        The client has `resume.text`, and text events concatenate to the whole output across resumes:
        what is released here beyond it is still owed, and nothing of it is released twice."""
        seq.output_ids = list(resume.output_ids)
        seq.num_resumed_tokens = len(resume.output_ids)
        ids = resume.output_ids
        if ids and self._is_stop_token(seq, ids[-1]):
            ids = ids[:-1]  # advance() never decodes a stop token
        released = self.stops.feed(self.detok.resume(ids))
        if self.tools is None:
            # Counted, not clamped to the text here: an output that ended mid-character was flushed there.
            self.stops.num_released = len(resume.text)
            return
        # The wire text is the parser's content, not the raw text. The old worker fed its parser a prefix
        # of `released`; a parser's output on a prefix is a prefix of its output on the whole (it never
        # takes back), and each call is published whole, in one event: what is beyond the published
        # content and calls is still owed to the client.
        self.num_sent_chars = len(resume.text)
        self.sent_calls = frozenset(d["index"] for d in resume.tool_calls)
        self.unsent = self._owed(*self.tools.feed(released))

    def finish_resumed(self, seq: Sequence) -> StepOutput | None:
        """A resumed request whose published tokens already end it (the old worker died before `done`)."""
        if not seq.output_ids:
            return None
        if self._is_stop_token(seq, seq.output_ids[-1]) or self.stops.is_stopped:
            finish = FinishReason.STOP
        elif seq.num_output_tokens >= seq.max_tokens:
            finish = FinishReason.LENGTH
        else:
            return None
        raw = "" if self.stops.is_stopped else self.stops.feed(self.detok.flush()) + self.stops.finish()
        text, deltas = self._parse(raw, is_final=True)
        finish = self._end(seq, finish)
        seq.logprobs = None
        return StepOutput(seq=seq, token_ids=[], text=text, finish_reason=finish, tool_calls=deltas)

    def end(self, seq: Sequence) -> StepOutput:
        """The generator stopped by itself (the sequential engine's generate returned): release the held-back
        text and finish."""
        finish = FinishReason.LENGTH if seq.num_output_tokens >= seq.max_tokens else FinishReason.STOP
        raw = "" if self.stops.is_stopped else self.stops.feed(self.detok.flush()) + self.stops.finish()
        text, deltas = self._parse(raw, is_final=True)
        finish = self._end(seq, finish)
        seq.logprobs = self.logprobs or None
        return StepOutput(seq=seq, token_ids=[], text=text, finish_reason=finish, tool_calls=deltas)

    def advance(self, seq: Sequence, token: int, logprob: dict | None) -> StepOutput:
        """Append one sampled token; decide whether the request is done and what text it releases."""
        seq.output_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        finish = None
        text = ""
        if self._is_stop_token(seq, token):
            finish = FinishReason.STOP
        else:
            text = self.stops.feed(self.detok.push([token]))
            if self.stops.is_stopped:
                finish = FinishReason.STOP
        if finish is None and seq.num_output_tokens >= seq.max_tokens:
            finish = FinishReason.LENGTH
        if finish is not None and not self.stops.is_stopped:
            text += self.stops.feed(self.detok.flush())
            text += self.stops.finish()
            if self.stops.is_stopped:
                finish = FinishReason.STOP
        text, deltas = self._parse(text, is_final=finish is not None)
        if finish is not None:
            finish = self._end(seq, finish)
            seq.logprobs = self.logprobs or None
        return StepOutput(seq=seq, token_ids=[token], text=text, finish_reason=finish,
                          logprobs=[logprob] if logprob is not None else None, tool_calls=deltas)

    def _parse(self, text: str, is_final: bool) -> tuple[str, list[dict[str, Any]] | None]:
        """Released raw text -> (content, tool-call deltas); plain requests pass through."""
        if self.tools is None:
            return text, None
        content, deltas = self.tools.feed(text)
        if is_final:
            more, more_deltas, _ = self.tools.finish()
            content, deltas = content + more, deltas + more_deltas
        content, deltas = self._owed(content, deltas)
        if self.unsent != ("", []):
            content, deltas = self.unsent[0] + content, self.unsent[1] + deltas
            self.unsent = ("", [])
        return content, deltas or None

    def _owed(self, content: str, deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        """Parsed content and calls less what the client had at resume."""
        start, self.num_parsed_chars = self.num_parsed_chars, self.num_parsed_chars + len(content)
        return content[max(0, self.num_sent_chars - start):], [d for d in deltas if d["index"] not in self.sent_calls]

    def _end(self, seq: Sequence, finish: FinishReason) -> FinishReason:
        """Record the whole output for `done`; a request that made a tool call finishes with `tool_calls`."""
        calls = self.tools.calls if self.tools is not None else []
        if calls:
            finish = FinishReason.TOOL_CALLS
        seq.finish_reason = finish
        seq.text = self.tools.content if self.tools is not None else self.stops.text
        seq.tool_calls = [dict(c) for c in calls] or None
        return finish

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        return (token in self.eos_ids and not seq.params.ignore_eos) or token in self.stop_token_ids


def logprob_row(tokenizer, token: int, logprob: float, top_ids: list[int], top_logprobs: list[float], n: int) -> dict:
    return {
        "token_id": token, "token": tokenizer.decode([token]), "logprob": logprob,
        "top_logprobs": [{"token_id": t, "token": tokenizer.decode([t]), "logprob": v}
                         for t, v in zip(top_ids[:n], top_logprobs[:n]) if v != float("-inf")],
    }
