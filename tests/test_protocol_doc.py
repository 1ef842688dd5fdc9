"""docs/protocol.md is the contract other languages implement from: its tables are held against the code.

Each test reads one table of the doc and compares its first column (or its field names) with the
enum or wire model the code uses, so a field added to the code without the doc, or a doc row the
code does not know, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from producer.keys import Keys
from producer.protocol import (
    ChatBody,
    ChatMessage,
    ErrorCode,
    Event,
    EventType,
    GenerateBody,
    GenerateConfig,
    ModelRegistration,
    TaskKind,
    TextToImageBody,
    encode_request,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _tables_after(marker: str) -> list[list[list[str]]]:
    """Every markdown table between the line `marker` and the next heading of the same or higher level."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(marker)
    level = len(marker) - len(marker.lstrip("#")) if marker.startswith("#") else 6
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in lines[start + 1:]:
        if line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
            break
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = []
                tables.append(current)
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        else:
            current = None
    return [t[1:] for t in tables]  # without the header row


def _first_column(marker: str, which: int = 0) -> list[str]:
    rows = _tables_after(marker)[which]
    return [re.fullmatch(r"`([^`]+)`", row[0]).group(1) for row in rows]


def test_the_table_reader_reads_tables():
    keys = _first_column("## 1. Keys")
    assert "rb:models" in keys and len(keys) >= 8


def test_key_table_matches_producer_keys():
    k = Keys()
    code = {k._model_key("<model>", "requests"), k._model_key("<model>", "requests:<priority>"),
            k._model_key("<model>", "dead"), k._model_key("<model>", "workers"),
            k._model_key("<model>", "id:<id>"), k.models(), k._worker_key("<worker_id>"),
            k._request_key("<id>", "events"), k._request_key("<id>", "abort"), k._gateway_key("<gateway_id>", "wake"),
            k.redis_master(), k.redis_failover()}
    assert set(_first_column("## 1. Keys")) == code


def test_registry_table_matches_the_wire_model():
    assert set(_first_column("## 3. Model discovery")) == set(ModelRegistration.model_fields)


def test_request_entry_table_matches_encode_request():
    fields = encode_request("r1", TaskKind.GENERATE, GenerateBody(prompt="x"), deadline_ms=1, user="u")
    assert set(_first_column("### 4.1 Request entry")) == set(fields)


@pytest.mark.parametrize("marker, model", [
    ("**`generate`**", GenerateBody), ("**`chat`**", ChatBody), ("message:", ChatMessage),
])
def test_body_tables_match_the_body_models(marker, model):
    assert set(_first_column(marker)) == set(model.model_fields)


def test_text_to_image_body_table_matches_its_model():
    lines = DOC.read_text(encoding="utf-8").splitlines()
    marker = next(line for line in lines if line.startswith("**`text_to_image`**"))
    assert set(_first_column(marker)) == set(TextToImageBody.model_fields)


def test_generate_config_table_matches_its_model():
    assert set(_first_column("### 4.3 `generate_config`")) == set(GenerateConfig.model_fields)


def test_event_table_matches_event_types_and_fields():
    rows = _tables_after("### 5.2 Fields")[0]
    types = {re.fullmatch(r"`([^`]+)`", row[0]).group(1): row[1] for row in rows}
    assert set(types) == {t.value for t in EventType}
    documented: set[str] = set()
    for cell in types.values():
        # a field is a backticked name that a colon, a parenthesis or a comma follows
        documented |= set(re.findall(r"`(\w+)`(?=:| \(|,)", cell))
    assert documented == set(Event.model_fields) - {"seq", "type"}


def test_priority_table_matches_the_levels_and_their_streams():
    from producer.keys import PRIORITIES

    rows = _tables_after("### 4.8 Priority levels")[0]
    assert [re.fullmatch(r"`([^`]+)`", row[0]).group(1) for row in rows] == [p.value for p in PRIORITIES]
    documented = [re.match(r"`([^`]+)`", row[1]).group(1) for row in rows]
    assert documented == [Keys().requests("model", p).replace("{model}", "{<model>}") for p in PRIORITIES]


def test_error_code_table_matches_the_enum():
    assert set(_first_column("## 6. Error codes")) == {c.value for c in ErrorCode}


def test_the_doc_says_logprobs_never_hold_infinity():
    """The worker leaves -inf alternatives out (worker/engines/outputs.py); the doc must not say otherwise."""
    text = DOC.read_text(encoding="utf-8")
    assert "appears as the bare token `-Infinity`" not in text
