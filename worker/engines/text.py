"""Incremental detokenization and stop strings, per request."""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (`prefix_offset` on) rather than the whole output, and
    holds a delta back while it ends in U+FFFD: the bytes of a multi-byte character
    split across tokens are released only once the character is complete.

    `keep_special_ids`: special tokens decoded even with skip_special_tokens (the markup a
    tool-call parser reads, e.g. `<|python_tag|>`); the other special tokens are dropped.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True, keep_special_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped_ids = special_ids(tokenizer) - keep_special_ids if skip_special_tokens and keep_special_ids else None
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        if self._skipped_ids is not None:
            return self.tokenizer.decode([i for i in ids if i not in self._skipped_ids], skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]

    def resume(self, ids: list[int]) -> str:
        """Take over the ids an earlier worker pushed one at a time (on a fresh detokenizer); return the
        text they release. The bytes of a trailing incomplete character stay pending, as they did there:
        one push of all the ids would hold back the text before them too, and release it again later."""
        num_complete = len(ids)
        while num_complete and self._decode(ids[:num_complete]).endswith(REPLACEMENT_CHAR):
            num_complete -= 1
        text = self.push(ids[:num_complete])
        self.ids.extend(ids[num_complete:])
        return text

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]


def special_ids(tokenizer) -> frozenset[int]:
    """What skip_special_tokens drops: the named special tokens and every added token marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


class StopStringMatcher:
    """Finds stop strings in the generated text and decides how much text is safe to release.

    The stop text itself is never released; only a suffix that could still grow into a
    stop string is held back.
    """

    def __init__(self, stop_strings: list[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self.max_stop_len = max((len(s) for s in self.stop_strings), default=0)
        self.text = ""
        self.num_released = 0
        self.is_stopped = False

    def feed(self, delta: str) -> str:
        """Add new text; return the text that can be released now."""
        if self.is_stopped:
            return ""
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += delta
        if not self.stop_strings:
            return self._release(len(self.text))
        hit = self._find_stop(search_from)
        if hit is not None:
            self.text = self.text[:hit]
            self.is_stopped = True
            return self._release(hit)
        return self._release(len(self.text) - self._held_back())

    def finish(self) -> str:
        """Release everything held back (generation ended without a stop string)."""
        return self._release(len(self.text))

    def _find_stop(self, search_from: int) -> int | None:
        hits = [i for s in self.stop_strings if (i := self.text.find(s, search_from)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        tail = self.text[-self.max_stop_len :]
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.num_released)
        out = self.text[self.num_released : upto]
        self.num_released = upto
        return out
