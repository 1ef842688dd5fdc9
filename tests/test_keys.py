from __future__ import annotations

import fnmatch
import io
import re
import tokenize
from pathlib import Path

import pytest

from producer.keys import DEFAULT_PREFIX, GROUP, Keys, check_model_name, check_request_id

REPO_ROOT = Path(__file__).resolve().parent.parent

BAD_NAMES = ["", "a*b", "a{b", "a}b", "a b", " a", "a\n", "é", "модель", "a/b", "a:b", "a" * 65, None, 5, b"abc"]
BAD_IDS = ["", "a*b", "a{b", "a}b", "a b", "a\tb", "é", "ид", "a/b", "a" * 129, None, 5, b"abc"]


def test_default_key_names() -> None:
    keys = Keys()
    assert DEFAULT_PREFIX == "rb"
    assert GROUP == "workers"
    assert keys.requests("qwen-0.5b") == "rb:{qwen-0.5b}:requests"
    assert keys.dead("qwen-0.5b") == "rb:{qwen-0.5b}:dead"
    assert keys.model_workers("qwen-0.5b") == "rb:{qwen-0.5b}:workers"
    assert keys.models() == "rb:models"
    assert keys.worker("host-1:1234") == "rb:worker:host-1:1234"
    assert keys.worker_pattern() == "rb:worker:*"
    assert keys.events("req-1") == "rb:req:{req-1}:events"
    assert keys.abort("req-1") == "rb:req:{req-1}:abort"


def test_each_priority_level_has_its_stream_in_the_models_slot() -> None:
    from producer.keys import PRIORITIES, Priority

    keys = Keys()
    assert keys.requests("m", Priority.INTERACTIVE) == keys.requests("m") == "rb:{m}:requests"
    assert keys.requests("m", "bulk") == "rb:{m}:requests:bulk"
    assert keys.requests("m", Priority.BACKGROUND) == "rb:{m}:requests:background"
    assert len({keys.requests("m", p) for p in PRIORITIES}) == len(PRIORITIES) == 3
    assert [p.rank for p in PRIORITIES] == [0, 1, 2]
    with pytest.raises(ValueError, match="invalid priority"):
        keys.requests("m", "urgent")


def test_custom_prefix_is_used_everywhere() -> None:
    keys = Keys("staging.v2")
    names = [keys.requests("m"), keys.dead("m"), keys.models(), keys.worker("w"), keys.events("r"), keys.abort("r")]
    assert all(name.startswith("staging.v2:") for name in names)
    assert not any(name.startswith("rb:") for name in names)


def test_model_keys_share_one_cluster_hash_tag() -> None:
    keys = Keys()
    for name in (keys.requests("m1"), keys.dead("m1"), keys.model_workers("m1")):
        # Redis Cluster hashes only what is between the first { and the next }.
        start = name.index("{")
        assert name[start + 1 : name.index("}", start)] == "m1"


@pytest.mark.parametrize("prefix", ["", "a b", "rb:", "{rb}", "a*", "x" * 33, "é"])
def test_invalid_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError):
        Keys(prefix)


@pytest.mark.parametrize("name", ["m", "Qwen2.5-0.5B_instruct", "a" * 64, "0", "a.b-c_d"])
def test_valid_model_names_pass(name: str) -> None:
    assert check_model_name(name) == name
    assert Keys().requests(name) == f"rb:{{{name}}}:requests"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_model_names_are_rejected(name: object) -> None:
    with pytest.raises(ValueError):
        check_model_name(name)
    if isinstance(name, str):
        for make in (Keys().requests, Keys().dead, Keys().model_workers):
            with pytest.raises(ValueError):
                make(name)


@pytest.mark.parametrize("request_id", ["r", "a" * 128, "0123abcdef", "chatcmpl-1:2.3_x", "A-Z.a_z:0-9"])
def test_valid_request_ids_pass(request_id: str) -> None:
    assert check_request_id(request_id) == request_id
    assert Keys().events(request_id) == f"rb:req:{{{request_id}}}:events"
    assert Keys().abort(request_id) == f"rb:req:{{{request_id}}}:abort"


def test_a_requests_keys_share_a_cluster_slot() -> None:
    from redis.crc import key_slot

    keys = Keys()
    for request_id in ("r1", "chatcmpl-1:2.3_x", "bulk.job.abc.1"):
        assert key_slot(keys.events(request_id).encode()) == key_slot(keys.abort(request_id).encode())
        assert key_slot(keys.events(request_id).encode()) == key_slot(request_id.encode())


@pytest.mark.parametrize("request_id", BAD_IDS)
def test_invalid_request_ids_are_rejected(request_id: object) -> None:
    with pytest.raises(ValueError):
        check_request_id(request_id)
    if isinstance(request_id, str):
        for make in (Keys().events, Keys().abort):
            with pytest.raises(ValueError):
                make(request_id)


@pytest.mark.parametrize("worker_id", ["", "w*", "w x", "a" * 129])
def test_invalid_worker_ids_are_rejected(worker_id: str) -> None:
    with pytest.raises(ValueError):
        Keys().worker(worker_id)


def _source_files() -> list[Path]:
    return sorted(p for top in ("producer", "worker", "bench", "ops") for p in (REPO_ROOT / top).rglob("*.py"))


# a string that spells a key: the default prefix, or a key segment (`…:requests`, `:req:…`) built by hand
_KEY_SHAPED = re.compile(r"rb:|:(requests|dead|workers|events|abort|models)\b|:(req|worker|id):")


def _key_shaped_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal (f-strings included; docstrings not) that looks like a key name."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        is_string = token.type == tokenize.STRING or token.type == getattr(tokenize, "FSTRING_MIDDLE", -1)
        if is_string and not token.string.lstrip("rbfuRBFU").startswith(('"""', "'''")) and _KEY_SHAPED.search(token.string):
            found.append((token.start[0], token.string))
    return found


def test_the_key_shape_scan_finds_hand_built_keys() -> None:
    assert _key_shaped_literals('x = f"{prefix}:req:{rid}:events"\ny = "rb:models"\n') == [
        (1, 'f"{prefix}:req:{rid}:events"'), (2, '"rb:models"')]
    assert _key_shaped_literals('k = f"{p}:{{*}}:workers"\n')
    assert not _key_shaped_literals('"""Docs may name rb:models."""\nmsg = "worker: stopped"\n')


def test_key_names_are_built_only_in_keys_module() -> None:
    files = _source_files()
    assert REPO_ROOT / "producer" / "keys.py" in files  # the scan looks where the code is
    offenders = []
    for path in files:
        if path == REPO_ROOT / "producer" / "keys.py":
            continue
        for number, text in _key_shaped_literals(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {text}")
    assert not offenders, "key names built outside producer/keys.py:\n" + "\n".join(offenders)


def test_patterns_match_the_keys_they_stand_for() -> None:
    keys = Keys("p1")
    samples = {"requests": keys.requests("m"), "dead": keys.dead("m"), "owner": keys.request_owner("m", "r"),
               "workers": keys.model_workers("m"), "models": keys.models(), "worker": keys.worker("w:1"),
               "events": keys.events("r"), "abort": keys.abort("r"), "bulk_lease": keys.bulk_lease("j-1"),
               "bulk_cancel": keys.bulk_cancel("j-1"), "requests_level": keys.requests("m", "bulk"),
               "gateway_wake": keys.gateway_wake("gw-1"), "redis_master": keys.redis_master(),
               "redis_failover": keys.redis_failover()}
    patterns = keys.patterns()
    assert set(patterns) == set(samples)
    for kind, name in samples.items():
        matching = {other for other, pattern in patterns.items() if fnmatch.fnmatchcase(name, pattern)}
        assert matching == {kind}, (name, matching)
