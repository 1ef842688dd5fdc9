"""Tool-call parsers on strings: every format, malformed input, and every split point of the input."""

from __future__ import annotations

import json
import random

import pytest

from worker.models.tool_parsers import FORMATS, call_id, detect_parser, kept_special_ids, make_parser

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def run_whole(fmt: str, text: str, request_id: str = "req-1"):
    parser = make_parser(fmt, request_id, TOOLS)
    content, deltas = parser.feed(text)
    more, more_deltas, calls = parser.finish()
    return content + more, deltas + more_deltas, calls


def run_chunks(fmt: str, chunks: list[str], request_id: str = "req-1"):
    parser = make_parser(fmt, request_id, TOOLS)
    content, deltas = "", []
    for chunk in chunks:
        c, d = parser.feed(chunk)
        content, deltas = content + c, deltas + d
    c, d, calls = parser.finish()
    return content + c, deltas + d, calls


def assert_split_invariant(fmt: str, text: str) -> None:
    """Char by char, at every single split point, and in random chunks: the same concatenated output."""
    expected = run_whole(fmt, text)
    assert run_chunks(fmt, list(text)) == expected
    for i in range(len(text) + 1):
        assert run_chunks(fmt, [text[:i], text[i:]]) == expected, f"split at {i}"
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert run_chunks(fmt, pieces) == expected


def names_args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def assemble(deltas):
    """What an OpenAI-style client builds from the deltas."""
    out: dict[int, dict] = {}
    for d in deltas:
        call = out.setdefault(d["index"], {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
        call["id"] = d.get("id", call["id"])
        call["type"] = d.get("type", call["type"])
        call["function"]["name"] += d.get("function", {}).get("name", "")
        call["function"]["arguments"] += d.get("function", {}).get("arguments", "")
    return [out[i] for i in sorted(out)]


CASES = {
    "hermes": [
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         "Let me check.", [("get_weather", {"city": "Paris"})]),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
         "", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        ('<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>', "", [("get_time", {"tz": "CET"})]),
        ("plain answer, < not a tag <tool and <tool_cal", "plain answer, < not a tag <tool and <tool_cal", []),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', []),
        ('<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', []),
        ('<tool_call>not json</tool_call> after', "<tool_call>not json</tool_call> after", []),
        ('<tool_call>{"name": "unknown_fn", "arguments": {"x": 1}}</tool_call>', "", [("unknown_fn", {"x": 1})]),
        ('a <tool_call>{"name": "get_time"}</tool_call> b  ', "ab", [("get_time", {})]),
        ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>broken</tool_call>',
         "\n<tool_call>broken</tool_call>", [("get_time", {})]),
    ],
    "llama3_json": [
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}', "",
         [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        ('  {"name": "get_time", "arguments": {"tz": "a}b{"}}', "", [("get_time", {"tz": "a}b{"})]),
        ('{"answer": 42}', '{"answer": 42}', []),
        ('The JSON is {"name": "get_time", "parameters": {}}', 'The JSON is {"name": "get_time", "parameters": {}}', []),
        ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
        ('<|python_tag|>{"name": "get_time", "parameters": {', '<|python_tag|>{"name": "get_time", "parameters": {', []),
        ("hello <|python_t", "hello <|python_t", []),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]', "",
         [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', "Sure.",
         [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        ('[TOOL_CALLS]get_time[CALL_ID]abc123XYZ[ARGS]{"tz": "[x]"}', "", [("get_time", {"tz": "[x]"})]),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par', '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par', []),
        ("[TOOL_CALLS]oops", "[TOOL_CALLS]oops", []),
        ("[TOOLS] is not [TOOL_C", "[TOOLS] is not [TOOL_C", []),
    ],
    "glm4": [
        ("Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n"
         "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", "Checking.", [("get_weather", {"city": "123", "days": 3})]),
        ("<tool_call>get_time<arg_key>opts</arg_key><arg_value>{\"a\": [1, 2]}</arg_value></tool_call>"
         "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>", "",
         [("get_time", {"opts": {"a": [1, 2]}}), ("get_weather", {"city": "Paris"})]),
        ('<tool_call>get_time\n{"tz": "CET"}\n</tool_call>', "", [("get_time", {"tz": "CET"})]),
        ("<tool_call>get_time\n</tool_call>", "", [("get_time", {})]),
        ("<tool_call>get_time<arg_key>a</arg_key>junk</tool_call>", "<tool_call>get_time<arg_key>a</arg_key>junk</tool_call>", []),
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par", []),
    ],
}
ALL_CASES = [(fmt, *case) for fmt, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("fmt,text,content,calls", ALL_CASES)
def test_parse(fmt, text, content, calls):
    got_content, deltas, got_calls = run_whole(fmt, text)
    assert got_content == content
    assert names_args(got_calls) == calls
    assert assemble(deltas) == got_calls  # the streamed deltas build exactly the final tool_calls
    assert [c["id"] for c in got_calls] == [call_id("req-1", i) for i in range(len(calls))]
    assert all(c["type"] == "function" and isinstance(c["function"]["arguments"], str) for c in got_calls)


@pytest.mark.parametrize("fmt,text,content,calls", ALL_CASES)
def test_output_does_not_depend_on_how_the_text_is_split(fmt, text, content, calls):
    assert_split_invariant(fmt, text)


def test_markup_is_held_back_until_decided():
    parser = make_parser("hermes", "r", TOOLS)
    assert parser.feed("Hi <tool") == ("Hi", [])  # the space and "<tool" may be markup: held
    assert parser.feed("box> there") == (" <toolbox> there", [])
    content, deltas = parser.feed('\n<tool_call>{"name": "get_time", "arguments": {}}')
    assert (content, deltas) == ("", [])  # incomplete call: nothing yet
    content, deltas = parser.feed("</tool_call>")
    assert content == "" and [d["function"]["name"] for d in deltas] == ["get_time"]
    assert parser.finish()[:2] == ("", [])
    assert parser.content == "Hi <toolbox> there"


def test_text_without_calls_is_content_exactly():
    text = "  leading and trailing spaces, a { brace } and [brackets]\n\n"
    for fmt in FORMATS:
        if fmt == "llama3_json":
            continue  # a leading "{" would be a candidate call there
        assert run_whole(fmt, text)[0] == text


def test_ids_are_deterministic_per_request():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert run_whole("hermes", text, "a")[2] == run_whole("hermes", text, "a")[2]
    assert run_whole("hermes", text, "a")[2][0]["id"] != run_whole("hermes", text, "b")[2][0]["id"]
    assert call_id("a", 0).startswith("call_") and len(call_id("a", 0)) == 29


def test_glm4_string_parameters_stay_strings_others_parse_as_json():
    text = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>[1]</arg_value><arg_key>days</arg_key><arg_value>two</arg_value></tool_call>"
    assert names_args(run_whole("glm4", text)[2]) == [("get_weather", {"city": "[1]", "days": "two"})]


def test_unknown_format_is_an_error():
    with pytest.raises(ValueError, match="unknown tool-call format"):
        make_parser("nope", "r")


class FakeTokenizer:
    def __init__(self, template, vocab=()):
        self.chat_template = template
        self._vocab = {t: i for i, t in enumerate(vocab)}

    def get_vocab(self):
        return self._vocab


@pytest.mark.parametrize("template,vocab,expected", [
    ("{% if tools %}<tools></tools> reply with <tool_call>{{ x }}</tool_call>{% endif %}", (), "hermes"),
    ("<tool_call>{{ name }}<arg_key>{{ k }}</arg_key><arg_value>", (), "glm4"),
    ("{{ '[TOOL_CALLS]' }}", (), "mistral"),
    ("{%- if message.role == 'ipython' %}", (), "llama3_json"),
    ("{{ '<|python_tag|>' }}", (), "llama3_json"),
    ({"default": "plain", "tool_use": "<tool_call>"}, (), "hermes"),
    ("plain {{ messages }}", ("[TOOL_CALLS]",), "mistral"),
    ("plain {{ messages }}", (), None),
    (None, (), None),
])
def test_detect_parser(template, vocab, expected):
    assert detect_parser(FakeTokenizer(template, vocab)) == expected


def test_kept_special_ids_are_the_special_markup_tokens(tmp_path):
    from tokenizers import AddedToken

    from worker.models.tiny import make_tokenizer

    tokenizer = make_tokenizer(tmp_path)
    tokenizer.add_tokens([AddedToken("<tool_call>", special=True, normalized=False),
                          AddedToken("</tool_call>", special=False, normalized=False),
                          AddedToken("[TOOL_CALLS]", special=True, normalized=False)])
    kept = kept_special_ids(tokenizer, "hermes")
    assert kept == {tokenizer.convert_tokens_to_ids("<tool_call>")}  # the non-special one survives anyway
    assert kept_special_ids(tokenizer, "mistral") == {tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")}


FRAGMENTS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<arg_key>",
             "</arg_key>", "<arg_value>", "</arg_value>", '{"name": "get_time", "arguments": {}}', '{"name": "f"',
             '"parameters": {"a": [1, "x}"]}}', "{", "}", "[", "]", '"', "\\", ";", " ", "\n", "get_weather", "text",
             "<tool", "_call>", "<", "[TOOL", "city", "3"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzzed_markup_never_raises_and_never_depends_on_splits(fmt):
    rng = random.Random(FORMATS.index(fmt))
    schema_tools = TOOLS + [{"type": "function", "function": {"name": "get_weather", "parameters": {"properties": []}}}]
    for _ in range(150):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
        parser = make_parser(fmt, "r", schema_tools)
        content, deltas = parser.feed(text)
        more, more_deltas, calls = parser.finish()
        assert assemble(deltas + more_deltas) == calls
        assert run_chunks(fmt, list(text)) == run_whole(fmt, text)
        if not calls:
            assert content + more == text  # nothing parsed: every character is content, in order
