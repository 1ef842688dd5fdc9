"""The soak script end to end on a small run: real redis-server, two real workers, nothing left behind."""

from __future__ import annotations

import shutil

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]


def test_soak_leaves_nothing_behind(capsys):
    from bench.soak import main

    status = main(["--requests", "300", "--workers", "2", "--window", "64", "--result-ttl-s", "3"])
    out = capsys.readouterr().out
    assert "left per request after the TTL: owner 0, events 0, abort 0, request_entries 0, pending 0" in out
    assert "| 300 | 2 |" in out and "done 300" in out
    assert status == 0, out
