"""bench/priority.py's figures and table from made-up phases (the end-to-end run takes a minute: not here)."""

from __future__ import annotations

import argparse

from bench.priority import Phase, _figures, quantile, table


def _phase(name: str, ttft_ms: list[float], steps: int, step_ms: float, bulk_tokens: int, seconds: float) -> Phase:
    phase = Phase(name, ttft_ms=ttft_ms, bulk_tokens=bulk_tokens, seconds=seconds)
    phase.add_heartbeats({"steps": 0, "step_ms": 0, "tokens": 0}, {"steps": steps, "step_ms": step_ms,
                                                                   "tokens": steps * 15, "preemptions": 3})
    return phase


def test_the_table_has_both_ttft_rows_the_delta_in_steps_and_the_bulk_loss() -> None:
    args = argparse.Namespace(max_num_seqs=4, threads=1, bulk_max_tokens=16, chat_max_tokens=4, gap_s=0.1,
                              windows=1, window_s=2.0, idle_chats=3)
    idle = _phase("idle", [10.0, 12.0, 30.0], 30, 5.0, 0, 0.0)
    alone = _phase("bulk alone", [], 200, 10.0, 2000, 2.0)
    mixed = _phase("bulk + interactive", [20.0, 25.0, 40.0, 22.0], 190, 10.0, 1800, 2.0)
    report = _figures(args, idle, alone, mixed)
    assert report["interactive_idle"]["p50_ms"] == 12.0 and report["interactive_idle"]["step_ms"] == 5.0
    assert report["interactive_under_bulk"]["p50_steps"] == 2.2  # p50 22 ms over 10 ms steps
    assert report["p50_delta_steps"] == 1.0  # (22 - 12) / 10
    assert round(report["bulk_loss"], 3) == 0.1
    assert report["bulk_with_interactive"]["preemptions"] == 3
    text = table(report).splitlines()
    assert any(row.startswith("idle worker") for row in text) and any(row.startswith("under bulk load") for row in text)
    assert any("decode steps under load: 1.00  (target <= 2: met)" in row for row in text)
    assert text[-1] == "bulk throughput loss with the trickle: 10.0 %"


def test_quantile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == 50.0 and quantile(values, 0.99) == 99.0 and quantile([3.0], 0.99) == 3.0
    assert quantile([], 0.5) is None
