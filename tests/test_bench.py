"""The benchmark runs every workload and contender end to end at the smallest size and reports a full table.

It checks structure, not speed: a benchmark's ratios are for one quiet run, never a timed test.
"""

from __future__ import annotations

import json

import pytest

from bench import bench
from bench.report import NAMES

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TINY = ["--models", "fast", "--fast-hidden", "32", "--fast-layers", "1", "--fast-heads", "2",
        "--num-requests", "5", "--w4-requests", "4", "--w4-prefix", "48", "--w2-requests", "4",
        "--max-tokens-cap", "6", "--max-num-seqs", "3", "--max-num-batched-tokens", "64", "--threads", "1",
        # num_blocks 1 (256 tokens) cannot hold W1's longer prompts: the sweep must report it, not crash
        "--hf-batch-tokens", "64", "--hf-num-blocks", "1,16", "--calib-requests", "4"]


@pytest.fixture(scope="module")
def report(tmp_path_factory, redis_server_url):
    out = tmp_path_factory.mktemp("bench")
    path = out / "bench.json"
    assert bench.main([*TINY, "--model-dir", str(out), "--redis-url", redis_server_url, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_every_workload_has_every_contender_with_checked_tokens(report):
    by_name = {w["workload"]: w for w in report["workloads"]}
    assert set(by_name) == {"w1", "w3", "w4", "w2"}
    for name, result in by_name.items():
        expected = {"b", "c", "d", "e"} if name == "w2" else set(NAMES)
        rows = {row["contender"]: row for row in result["rows"]}
        assert set(rows) == expected, name
        for contender, row in rows.items():
            assert not row["error"], (name, contender, row["error"])
            assert row["tokens"] > 0 and row["tok_s"] > 0
            # greedy fp32: every contender returns exactly sequential generate's tokens, for every request
            matching, total = row["same_tokens"].split("/")
            assert matching == total and int(total) == (4 if name in ("w4", "w2") else 5), (name, contender, total)


def test_offline_workloads_report_sweep_and_roofline(report):
    offline = [w for w in report["workloads"] if w["workload"] != "w2"]
    for result in offline:
        assert result["ideal_s"] and result["ideal_s"] > 0
        assert len(result["sweep"]) == 2 and any(p["tok_s"] for p in result["sweep"])
    w1 = next(w for w in offline if w["workload"] == "w1")
    assert any(p["tok_s"] is None and p["error"] for p in w1["sweep"]), "the too-small cache was not reported"
    w4 = next(w for w in offline if w["workload"] == "w4")
    assert all(p["allow_block_sharing"] for p in w4["sweep"])
    assert len(report["roofline"]["fast"]["coefficients"]) == len(report["roofline"]["fast"]["terms"])


def test_targets_cover_every_workload(report):
    names = [t["name"] for t in report["targets"]]
    for prefix in ("W1 (fast) redbatch e2e / best tuned peer", "W3 (fast) redbatch e2e", "W4 (fast) redbatch e2e",
                   "W1 (fast) e2e / in process", "W3 (fast) in process / roofline", "W2 (fast) p50 TTFT"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert all(t["status"] for t in report["targets"])
