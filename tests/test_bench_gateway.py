"""bench/gateway.py at its smallest: real processes, every path; checks the table's shape, never the speed.

It takes 20-50 s on a 2-core machine (a worker, a gateway and the tiny model's build are real processes),
so the default run skips it:

    REDBATCH_BENCH_TESTS=1 python -m pytest tests/test_bench_gateway.py
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

pytestmark = [
    pytest.mark.redis, pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("REDBATCH_BENCH_TESTS"),
                       reason="20-50 s of real processes: REDBATCH_BENCH_TESTS=1 pytest tests/test_bench_gateway.py"),
]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_gateway_bench_streams_every_path_and_prints_its_table(tmp_path, capsys):
    from bench.gateway import main
    from bench.gateway_report import LABELS

    out = tmp_path / "gateway.json"
    rows = main(["--concurrency", "2,3", "--max-tokens", "4", "--prompt-len", "8", "--json", str(out)])
    assert [(r["concurrency"], r["path"]) for r in rows] == [(n, p) for n in (2, 3) for p in ("direct", "openai", "httpx")]
    for r in rows:
        assert r["streams"] == r["concurrency"] and r["tokens"] == 4 * r["concurrency"]  # ignore_eos: all max_tokens
        assert {"ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tok_s"} <= set(r)
        assert set(r["cpu_s_per_1k_tokens"]) == {"client", "worker", "gateway", "redis-server"}
        if r["path"] != "direct":
            assert r["same_text_as_direct"] == r["concurrency"]  # greedy: the gateway streams the same text
            assert r["redis_connections"]["gateway_events"] == 1  # one shared reader, whatever the streams
            assert 1 <= r["redis_connections"]["gateway_commands"] <= 32  # the bounded command pool
    assert json.loads(out.read_text()) == rows
    printed = capsys.readouterr().out
    assert printed.count("| path | tok/s | TTFT p50 ms |") == 2
    for label in LABELS.values():
        assert printed.count(f"| {label} |") == 2
    assert printed.count("| added by the gateway (openai) |") == 2 and "| added by the gateway (httpx) |" in printed
