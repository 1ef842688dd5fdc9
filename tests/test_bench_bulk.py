"""bench/bulk.py at its smallest: real processes end to end; checks the report, never the speed."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("rq")

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_bulk_bench_runs_and_resumes(tmp_path) -> None:
    from bench.bulk import main

    out = tmp_path / "bulk.json"
    assert main(["--lines", "200", "--max-tokens", "4", "--max-num-seqs", "4", "--kill-at", "0.3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["clean"]["state"] == "complete" and report["clean"]["done"] == 200
    assert report["clean"]["tokens_per_step"] > 0 and report["clean"]["bulk_job_cpu_s"] >= 0
    killed = report["killed"]
    assert killed["second"]["state"] == "complete"
    assert killed["one_line_per_custom_id"] and killed["equals_clean_run"]
