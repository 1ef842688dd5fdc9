"""bench.cluster's table: every topology, the ratio against one Redis, and where the CPU went."""

from __future__ import annotations

import argparse

from bench.cluster import COLOCATED, SINGLE, SPREAD, table


def round_of(tokens: float, wall_s: float, producer: float, workers: float, redis: float) -> dict[str, float]:
    return {"tokens": tokens, "wall_s": wall_s, "producer_cpu_s": producer, "workers_cpu_s": workers,
            "redis_cpu_s": redis}


def test_the_table_has_every_topology_its_ratio_and_its_cpu_per_1k_tokens() -> None:
    args = argparse.Namespace(requests=32, max_tokens=32, rounds=2, max_num_seqs=16, threads=1)
    results = {SINGLE: [round_of(2048, 1.0, 0.8, 1.2, 0.2), round_of(2048, 1.2, 0.8, 1.2, 0.2)],
               COLOCATED: [round_of(2048, 1.1, 0.8, 1.4, 0.2), round_of(2048, 1.1, 0.8, 1.4, 0.2)],
               SPREAD: [round_of(2048, 2.2, 0.8, 1.6, 0.4), round_of(2048, 2.2, 0.8, 1.6, 0.4)]}
    lines = table(results, args).splitlines()
    assert lines[0].startswith("64 requests x 32 tokens per round") and "median of 2 rounds" in lines[0]
    rows = {line[:34].strip(): line[34:].split() for line in lines[2:]}
    assert list(rows) == [SINGLE, COLOCATED, SPREAD]
    # single: median of 2048/1.0 and 2048/1.2 tok/s; the others against it
    single_tps = (2048 / 1.0 + 2048 / 1.2) / 2
    assert float(rows[SINGLE][2]) == round(single_tps, 1) and rows[SINGLE][3] == "1.000"
    assert rows[COLOCATED][3] == f"{2048 / 1.1 / single_tps:.3f}"
    assert rows[SPREAD][3] == f"{2048 / 2.2 / single_tps:.3f}"
    assert rows[SPREAD][4:] == ["0.39", "0.78", "0.20"]  # CPU seconds per 1k tokens: producer, workers, redis
