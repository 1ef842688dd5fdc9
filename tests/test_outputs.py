"""A request's output side in the engine: text deltas, stops and resume, on a rigged tiny Llama whose greedy
reply is a fixed text with characters split across tokens (conftest's multibyte_llama)."""

from __future__ import annotations

import pytest

from producer.protocol import GenerateBody, GenerateConfig, Request, TaskKind
from tests.conftest import MULTIBYTE_PROMPT, MULTIBYTE_TEXT
from worker.engines.llm import LLMEngine
from worker.engines.text import REPLACEMENT_CHAR
from worker.request import Resume, Sequence, StepOutput


@pytest.fixture(scope="module")
def engine(multibyte_llama):
    _, (model, tokenizer) = multibyte_llama
    return LLMEngine(model, tokenizer)


def generate(request_id: str, **config) -> Request:
    body = GenerateBody(prompt=MULTIBYTE_PROMPT, generate_config=GenerateConfig(temperature=0, **config))
    return Request(id=request_id, task=TaskKind.GENERATE, body=body, created_ms=0)


def run(engine, request: Request, resume: Resume | None = None) -> tuple[list[StepOutput], Sequence]:
    """(step outputs, sequence) of one request, continuing after `resume` the way a reclaiming worker does."""
    seq = engine.add(request, resume)
    done = engine.finish_if_complete(seq) if resume is not None else None
    if done is not None:
        return [done], seq
    outputs = []
    while engine.num_active:
        outputs += [out for out in engine.step() if out.seq is seq]
    return outputs, seq


def resumed_everywhere(engine, request: Request):
    """Run `request` whole, then resumed after each of its published tokens (0 to all): yields (number of
    tokens published before the resume, the outputs a consumer read: before and after, the resumed sequence,
    the whole one)."""
    whole, whole_seq = run(engine, request)
    assert all(len(out.token_ids) == 1 for out in whole)  # one token per output: k outputs published k tokens
    for k in range(len(whole_seq.output_ids) + 1):
        before = whole[:k]
        resume = Resume(output_ids=[t for out in before for t in out.token_ids], text=text_of(before), next_seq=k,
                        tool_calls=[d for out in before for d in (out.tool_calls or [])])
        after, seq = run(engine, request, resume)  # the same id: tool-call ids derive from it
        assert seq.output_ids == whole_seq.output_ids
        yield k, before + after, seq, whole_seq


def text_of(outputs) -> str:
    return "".join(out.text for out in outputs)


def test_the_reply_splits_characters_across_tokens(engine, multibyte_llama):
    _, (_, tokenizer) = multibyte_llama
    outputs, seq = run(engine, generate("probe", max_tokens=32))
    assert tokenizer.decode(seq.output_ids, skip_special_tokens=True) == seq.text == MULTIBYTE_TEXT
    assert sum(tokenizer.decode([t]).endswith(REPLACEMENT_CHAR) for t in seq.output_ids) >= 4
    assert sum(out.text == "" for out in outputs) >= 4  # text held back for incomplete characters


@pytest.mark.parametrize("max_tokens", [32, 9])  # 9: the reply ends by length in the middle of ∞
def test_text_read_across_a_resume_at_every_token_is_the_decoded_output(engine, multibyte_llama, max_tokens):
    _, (_, tokenizer) = multibyte_llama
    for k, outputs, seq, whole in resumed_everywhere(engine, generate("r", max_tokens=max_tokens)):
        expected = tokenizer.decode(whole.output_ids, skip_special_tokens=True)
        assert text_of(outputs) == seq.text == whole.text == expected, f"resumed after {k} tokens"
    assert (max_tokens == 9) == expected.endswith(REPLACEMENT_CHAR)


@pytest.mark.parametrize("stop", ["∞λ", "λ e", "東京"])
def test_stop_strings_across_a_resume_at_every_token(engine, stop):
    for k, outputs, seq, _ in resumed_everywhere(engine, generate("s", max_tokens=32, stop=stop)):
        assert text_of(outputs) == seq.text == MULTIBYTE_TEXT[:MULTIBYTE_TEXT.index(stop)], f"resumed after {k} tokens"
        assert seq.finish_reason.value == "stop"


def test_a_stop_token_is_not_text_after_a_resume_either(engine, multibyte_llama):
    _, (_, tokenizer) = multibyte_llama
    space = tokenizer.encode(" ", add_special_tokens=False)[0]  # an ordinary token, the one before "end"
    for k, outputs, seq, _ in resumed_everywhere(engine, generate("t", max_tokens=32, stop_token_ids=[space])):
        assert text_of(outputs) == seq.text == "😀東京 naïve ∑∞λ", f"resumed after {k} tokens"
        assert seq.output_ids[-1] == space and seq.finish_reason.value == "stop"
