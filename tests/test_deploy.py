"""compose.yaml is valid and keeps data: AOF, noeviction, ACL users, grace periods that match."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs Debian's docker-compose (.ci/run installs it)")
def test_compose_file_validates():
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "worker-llm" in result.stdout and "redis" in result.stdout


def test_compose_and_redis_conf_keep_data():
    conf = (ROOT / "ops" / "redis.conf").read_text()
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    compose = (ROOT / "compose.yaml").read_text()
    assert "--grace-s\", \"30\"" in compose and "stop_grace_period: 40s" in compose
    assert "capabilities: [gpu]" in compose and 'profiles: ["cpu"]' in compose
    assert "restart: unless-stopped" in compose
