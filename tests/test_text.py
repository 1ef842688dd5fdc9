"""Incremental detokenization (with a real byte-level BPE tokenizer) and stop strings."""

from __future__ import annotations

import pytest

from worker.engines.text import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher
from worker.models.tiny import make_tokenizer

TEXTS = [
    "😀🚀東京",
    "hello 東京 café 😀 world",
    "日本語 naïve straße ∑∞λ",
    "the cat 😀😀 🚀🚀 über 中文 one",
    "hello , world . it 's ok ! don't",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, ids: list[int], step: int = 1) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return deltas, detok.flush()


# ---------------------------------------------------------------- IncrementalDetokenizer


def test_the_texts_split_characters_across_tokens(tokenizer):
    # Proves the tests below exercise the hold-back: some tokens are partial characters.
    pieces = [tokenizer.decode([i]) for i in encode(tokenizer, "😀🚀東京")]
    assert any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert len(pieces) > 4  # more tokens than characters


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_rebuild_the_text(tokenizer, text):
    ids = encode(tokenizer, text)
    deltas, tail = stream(tokenizer, ids)

    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert tail == ""  # the texts end on a complete character, so nothing is left to flush


@pytest.mark.parametrize("step", [2, 3])
def test_pushing_several_ids_at_once(tokenizer, step):
    text = TEXTS[3]
    ids = encode(tokenizer, text)
    deltas, tail = stream(tokenizer, ids, step)
    assert "".join(deltas) + tail == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_partial_character_is_held_back_then_released(tokenizer):
    ids = encode(tokenizer, "😀")
    assert len(ids) >= 2 and tokenizer.decode(ids[:1]) == REPLACEMENT_CHAR
    detok = IncrementalDetokenizer(tokenizer)

    deltas = [detok.push([i]) for i in ids]

    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "😀"


@pytest.mark.parametrize("text", TEXTS[:4])
def test_every_prefix_of_ids_matches_a_full_decode(tokenizer, text):
    # generation may end anywhere, even mid-character: flush then releases what decode would show
    ids = encode(tokenizer, text)
    for n in range(1, len(ids) + 1):
        deltas, tail = stream(tokenizer, ids[:n])
        assert "".join(deltas) + tail == tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_flush_releases_an_unfinished_character(tokenizer):
    ids = encode(tokenizer, "a😀")
    detok = IncrementalDetokenizer(tokenizer)
    released = "".join(detok.push([i]) for i in ids[:-1])
    tail = detok.flush()

    assert REPLACEMENT_CHAR in tail and REPLACEMENT_CHAR not in released
    assert released + tail == tokenizer.decode(ids[:-1])
    assert detok.flush() == ""


def test_special_tokens_are_skipped(tokenizer):
    text = "hello 東京 world"
    ids = [tokenizer.bos_token_id, *encode(tokenizer, text), tokenizer.eos_token_id]
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == text


def test_special_tokens_kept_when_asked(tokenizer):
    ids = [*encode(tokenizer, "hello"), tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == "hello<|eos|>"


def test_kept_special_tokens_survive_skip_special_tokens(tmp_path):
    from tokenizers import AddedToken

    tokenizer = make_tokenizer(tmp_path)
    tokenizer.add_tokens([AddedToken("<|python_tag|>", special=True, normalized=False)])
    tag = tokenizer.convert_tokens_to_ids("<|python_tag|>")
    ids = [tokenizer.bos_token_id, *encode(tokenizer, "call 東京"), tag, *encode(tokenizer, " now"), tokenizer.eos_token_id]

    def text_of(detok):
        return "".join(detok.push([i]) for i in ids) + detok.flush()

    assert text_of(IncrementalDetokenizer(tokenizer)) == "call 東京 now"  # the tag is dropped by default
    assert text_of(IncrementalDetokenizer(tokenizer, keep_special_ids=frozenset({tag}))) == "call 東京<|python_tag|> now"


def test_resumed_ids_then_new_ids_continue_the_text(tokenizer):
    ids = encode(tokenizer, "hello 東京 café 😀 world")
    detok = IncrementalDetokenizer(tokenizer)
    detok.push(ids[:3])  # output carried over from an earlier worker
    rest = "".join(detok.push([i]) for i in ids[3:]) + detok.flush()
    assert tokenizer.decode(ids[:3]) + rest == tokenizer.decode(ids)


@pytest.mark.parametrize("text", TEXTS[:4])
def test_resume_at_every_token_keeps_an_incomplete_character_pending(tokenizer, text):
    # An earlier worker pushed ids[:k] one at a time and published its deltas; another resumes from ids[:k].
    ids = encode(tokenizer, text)
    for k in range(len(ids) + 1):
        published, _ = stream(tokenizer, ids[:k])
        detok = IncrementalDetokenizer(tokenizer)
        assert detok.resume(ids[:k]) == "".join(published), f"resumed after {k} tokens"
        rest = "".join(detok.push([i]) for i in ids[k:]) + detok.flush()
        assert "".join(published) + rest == text


# ---------------------------------------------------------------- StopStringMatcher


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> list[str]:
    return [matcher.feed(d) for d in deltas]


def test_no_stop_strings_releases_everything_at_once():
    matcher = StopStringMatcher([])
    assert feed_all(matcher, ["ab", "c", "END"]) == ["ab", "c", "END"]
    assert matcher.finish() == ""
    assert not matcher.is_stopped


def test_stop_text_never_released_and_text_before_it_is():
    matcher = StopStringMatcher(["END"])
    out = feed_all(matcher, ["hello END world"])
    assert out == ["hello "]
    assert matcher.is_stopped
    assert matcher.finish() == ""


def test_partial_match_held_back_then_released_when_not_a_stop():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abc") == "abc"
    assert matcher.feed("E") == ""
    assert matcher.feed("N") == ""
    assert matcher.feed("x") == "ENx"
    assert not matcher.is_stopped


def test_held_back_only_the_possible_stop_prefix():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abcE") == "abc"
    assert matcher.feed("EN") == "E"  # "EEN": the first E can no longer start a stop
    assert matcher.feed("D more") == ""
    assert matcher.is_stopped


def test_stop_split_across_many_deltas():
    matcher = StopStringMatcher(["<stop>"])
    out = feed_all(matcher, ["ok ", "<", "s", "t", "o", "p", ">", " after"])
    assert "".join(out) == "ok "
    assert matcher.is_stopped


def test_stop_spanning_released_boundary_after_long_text():
    matcher = StopStringMatcher(["STOP"])
    out = feed_all(matcher, ["x" * 50, "ST", "O", "Ptail"])
    assert "".join(out) == "x" * 50


def test_earliest_stop_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == "hel"
    assert matcher.is_stopped


def test_earliest_stop_wins_across_deltas():
    matcher = StopStringMatcher(["CD", "ABCDE"])
    out = feed_all(matcher, ["xAB", "CDE"])
    assert "".join(out) == "x"  # ABCDE starts before CD


def test_longest_partial_over_all_stops_is_held():
    matcher = StopStringMatcher(["xyz", "abcd"])
    assert matcher.feed("--abc") == "--"
    assert matcher.feed("x") == "abc"
    assert matcher.feed("y") == ""
    assert matcher.feed("z") == ""
    assert matcher.is_stopped


def test_finish_releases_held_text():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("the EN") == "the "
    assert matcher.finish() == "EN"
    assert matcher.finish() == ""


def test_nothing_released_after_stop():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("aEND") == "a"
    assert matcher.feed("more text") == ""
    assert matcher.feed("END") == ""
    assert matcher.finish() == ""


def test_empty_stop_strings_are_ignored():
    matcher = StopStringMatcher(["", "Z"])
    assert matcher.feed("abc") == "abc"
    assert matcher.feed("yZ") == "y"


def test_detokenizer_and_stop_matcher_together(tokenizer):
    text = "hello 東京 café 😀 world"
    ids = encode(tokenizer, text)
    detok, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher(["😀"])
    out = "".join(matcher.feed(detok.push([i])) for i in ids)
    assert out == "hello 東京 café "
    assert matcher.is_stopped
