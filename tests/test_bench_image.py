"""bench/image.py at its smallest: every contender on a few requests; checks the report, never the speed."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("diffusers")

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_the_workloads_follow_their_definitions():
    from bench.image import make_requests, with_arrivals

    mixed = with_arrivals(make_requests("mixed", 40, ["32*32", "48*32"], seed=3), rate_per_s=5.0, seed=3)
    steps = [r.num_steps for r in mixed]
    assert steps.count(4) == 20 and all(20 <= s <= 28 for s in steps if s != 4)
    assert {r.size for r in mixed} == {"32*32", "48*32"}
    arrivals = [r.arrival_s for r in mixed]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals) and arrivals[-1] > 0
    assert {r.num_steps for r in make_requests("schnell", 8, ["32*32"], seed=0)} == {4}
    assert all(20 <= r.num_steps <= 28 for r in make_requests("sd3", 8, ["32*32"], seed=0))


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_image_bench_runs_every_contender_and_the_images_agree(tmp_path, capsys):
    from bench.image import NAMES, PHASES, main, redbatch_name, static_name

    out = tmp_path / "image.json"
    rows = main(["--num-requests", "3", "--workloads", "schnell", "--threads", "1", "--static-batch-sizes", "1,2",
                 "--max-num-seqs", "2,4", "--repeats", "2", "--json", str(out)])
    assert [r.contender for r in rows] == [NAMES["a"], static_name(1), static_name(2), redbatch_name("d", 2),
                                           redbatch_name("e", 2), redbatch_name("d", 4), redbatch_name("e", 4)]
    assert all(r.num_images == 3 and r.images_per_s > 0 and r.p99_s >= r.p50_s > 0 for r in rows)
    assert [r.same_images for r in rows] == ["-"] + ["yes"] * 6
    for redbatch in rows[3:]:
        assert set(redbatch.profile) == set(PHASES) and redbatch.profile["forward_s"] > 0
        assert redbatch.forward_s == redbatch.profile["forward_s"]
    printed = capsys.readouterr().out
    assert "| (e) redbatch end to end, max_num_seqs 4 |" in printed and "(d) redbatch engine, in process, " in printed
    assert "(e) redbatch end to end, max_num_seqs 2 over its" in printed and "best end to end: (e)" in printed
    assert all(r.notes.startswith("median of ") and r.notes.count(",") == 1 for r in rows[1:]) and not rows[0].notes
    assert len(json.loads(out.read_text())) == 7
    sd3 = main(["--num-requests", "2", "--workloads", "sd3", "--threads", "1", "--static-batch-sizes", "2",
                "--max-num-seqs", "4", "--repeats", "1"])
    assert [r.contender for r in sd3] == [NAMES["a"], static_name(2), redbatch_name("d", 4), redbatch_name("e", 4)]
    assert [r.same_images for r in sd3] == ["-", "yes", "yes", "yes"]  # redbatch's SD3 images are the stock ones
    assert "## sd3: tiny Stable Diffusion 3" in capsys.readouterr().out
