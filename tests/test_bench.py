"""The benchmark: its pure parts (workloads, exactness cut, roofline replay, targets) in milliseconds, then
every workload and contender end to end at the smallest size.

The end-to-end tests check structure, not speed: a benchmark's ratios are for one quiet run, never a timed test.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from bench import bench, redbatch_runs, report, roofline, workloads
from bench.report import NAMES, Row, WorkloadResult
from bench.workloads import BenchRequest

EOS = frozenset({2, 4})


def test_normalize_cuts_at_max_tokens_and_after_the_first_eos_only_when_eos_is_honoured():
    honours = BenchRequest("r", [5, 6], max_tokens=5, ignore_eos=False)
    ignores = BenchRequest("r", [5, 6], max_tokens=5, ignore_eos=True)
    assert workloads.normalize([7, 4, 0, 0, 0, 9], honours, EOS) == [7, 4]
    assert workloads.normalize([7, 4, 8, 2, 9, 9], ignores, EOS) == [7, 4, 8, 2, 9]


def test_workloads_follow_their_definitions():
    w3 = workloads.w3(512, 400, seed=1)
    assert all(8 <= len(r.prompt_ids) <= 384 and 8 <= r.max_tokens <= 256 and not r.ignore_eos for r in w3.requests)
    assert 40 < sum(r.max_tokens for r in w3.requests) / 400 < 70  # 8 + exp(mean 50), capped
    w4 = workloads.w4(512, 10, seed=2, prefix_len=384)
    assert len({tuple(r.prompt_ids[:384]) for r in w4.requests}) == 1
    assert all(16 <= len(r.prompt_ids) - 384 <= 64 for r in w4.requests)
    w1 = workloads.w1(512, 8, seed=0)
    w2 = workloads.w2(w1, 8, rate_per_s=2.0, seed=3)
    arrivals = [r.arrival_s for r in w2.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert [r.key for r in w2.requests] == [r.key for r in w1.requests]  # W2 reuses W1's reference outputs
    assert all(min(r.prompt_ids) >= workloads.FIRST_PLAIN_ID for r in w1.requests + w3.requests)


def _per_step_cost() -> roofline.CostModel:
    return roofline.CostModel([1.0, 0.0, 0.0, 0.0, 0.0], [], 0.0, 0.0)  # every forward costs 1 s


def test_ideal_schedule_folds_prefill_chunks_into_decode_steps():
    # budget 16: step 1 = A's prompt (10) + 6 of B's; step 2 = A's decode + B's last 4 (B's first token);
    # steps 3 and 4 decode the rest (3 tokens each)
    assert roofline.ideal_s(_per_step_cost(), [10, 10], [3, 3], max_num_seqs=4, token_budget=16) == 4
    # one running sequence at a time: a prefill step and a decode step per request
    assert roofline.ideal_s(_per_step_cost(), [10, 10], [2, 2], max_num_seqs=1, token_budget=16) == 4


def test_ideal_schedule_skips_a_cached_prefix_once_it_was_computed():
    cost = roofline.CostModel([0.0, 1.0, 0.0, 0.0, 0.0], [], 0.0, 0.0)  # 1 s per computed token
    no_cache = roofline.ideal_s(cost, [40, 40], [1, 1], max_num_seqs=1, token_budget=64)
    cached = roofline.ideal_s(cost, [40, 40], [1, 1], max_num_seqs=1, token_budget=64, cached_prefix=32)
    assert (no_cache, cached) == (80, 48)


def test_cost_model_fit_recovers_known_coefficients(monkeypatch):
    truth = [2e-3, 1e-4, 5e-4, 2e-6, 1e-8]
    monkeypatch.setattr(roofline, "_measure", lambda model, b, q, p, repeats: sum(
        k * f for k, f in zip(truth, roofline.shape_of(b, q, p).features)))
    fitted = roofline.fit(None, max_num_seqs=16, token_budget=512, max_len=1024)
    assert fitted.rms_rel_error < 1e-6
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(fitted.coefficients, truth))


def test_engine_config_passes_prefix_caching_only_where_the_engine_has_it(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class FutureConfig:
        max_num_seqs: int = 16
        max_num_batched_tokens: int = 2048
        block_size: int = 16
        enable_prefix_caching: bool = True

    monkeypatch.setattr(redbatch_runs, "LLMEngineConfig", FutureConfig)
    assert redbatch_runs.block_size() == 16
    assert redbatch_runs.engine_config(4, 64, False).enable_prefix_caching is False
    assert redbatch_runs.engine_config(4, 64, None).enable_prefix_caching is True


def _result(tok_s: dict[str, float]) -> WorkloadResult:
    rows = [Row(c, tokens=int(v * 10), wall_s=10.0) for c, v in tok_s.items()]
    return WorkloadResult("default", "w1", "W1", rows, ideal_s=5.0)


def test_a_peer_slower_than_sequential_is_flagged_and_voids_the_targets():
    result = _result({"a": 20.0, "b": 50.0, "c": 15.0, "d": 90.0, "e": 80.0})
    report.flag_misconfigured_peers(result)
    assert [r.contender for r in result.rows if r.warning] == ["c"]
    ratio = next(t for t in report.targets([result]) if "best tuned peer" in t.name)
    assert ratio.status.startswith("INVALID") and math.isclose(ratio.measured, 80 / 50)


def test_targets_pass_and_fail_against_the_best_tuned_peer():
    result = _result({"a": 20.0, "b": 50.0, "c": 60.0, "d": 95.0, "e": 91.0})
    report.flag_misconfigured_peers(result)
    by_name = {t.name.split(") ", 1)[1]: t for t in report.targets([result])}
    assert by_name["redbatch e2e / best tuned peer (c)"].status == "pass"  # 91 / 60 >= 1.5
    assert by_name["in process / roofline"].status == "FAIL"  # ideal 5 s against 10 s

TINY = ["--models", "fast", "--fast-hidden", "32", "--fast-layers", "1", "--fast-heads", "2",
        "--num-requests", "5", "--w4-requests", "4", "--w4-prefix", "48", "--w2-requests", "4",
        "--max-tokens-cap", "6", "--max-num-seqs", "3", "--max-num-batched-tokens", "64", "--threads", "1",
        # num_blocks 1 (256 tokens) cannot hold W1's longer prompts: the sweep must report it, not crash
        "--hf-batch-tokens", "64", "--hf-num-blocks", "1,16", "--calib-requests", "4"]


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory, redis_server_url):
    out = tmp_path_factory.mktemp("bench")
    path = out / "bench.json"
    assert bench.main([*TINY, "--model-dir", str(out), "--redis-url", redis_server_url, "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.redis
@pytest.mark.slow
def test_every_workload_has_every_contender_with_checked_tokens(bench_report):
    by_name = {w["workload"]: w for w in bench_report["workloads"]}
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


@pytest.mark.redis
@pytest.mark.slow
def test_offline_workloads_report_sweep_and_roofline(bench_report):
    offline = [w for w in bench_report["workloads"] if w["workload"] != "w2"]
    for result in offline:
        assert result["ideal_s"] and result["ideal_s"] > 0
        assert len(result["sweep"]) == 2 and any(p["tok_s"] for p in result["sweep"])
    w1 = next(w for w in offline if w["workload"] == "w1")
    assert any(p["tok_s"] is None and p["error"] for p in w1["sweep"]), "the too-small cache was not reported"
    w4 = next(w for w in offline if w["workload"] == "w4")
    assert all(p["allow_block_sharing"] for p in w4["sweep"])
    assert len(bench_report["roofline"]["fast"]["coefficients"]) == len(bench_report["roofline"]["fast"]["terms"])


@pytest.mark.redis
@pytest.mark.slow
def test_targets_cover_every_workload(bench_report):
    names = [t["name"] for t in bench_report["targets"]]
    for prefix in ("W1 (fast) redbatch e2e / best tuned peer", "W3 (fast) redbatch e2e", "W4 (fast) redbatch e2e",
                   "W1 (fast) e2e / in process", "W3 (fast) in process / roofline", "W2 (fast) p50 TTFT"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert all(t["status"] for t in bench_report["targets"])


@pytest.mark.redis
@pytest.mark.slow
def test_the_end_to_end_run_reports_the_cpu_that_worker_and_client_spent(bench_report):
    for result in bench_report["workloads"]:
        notes = [n for n in result["notes"] if n.startswith("(e) CPU during the run:")]
        assert len(notes) == 1, result["workload"]
        assert "worker " in notes[0] and "client " in notes[0]
