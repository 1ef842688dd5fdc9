"""compose.yaml is valid and keeps data: AOF, noeviction, ACL users, grace periods that match."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from producer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs Debian's docker-compose (.ci/run installs it)")
def test_compose_file_validates():
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"], capture_output=True,
                            text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"redis", "worker-llm", "worker-tiny-cpu", "gateway", "bulk-worker"} <= set(services)
    gateway, bulk = services["gateway"], services["bulk-worker"]
    assert gateway["command"][0] == "gateway" and "8000" in str(gateway["ports"])
    assert "/ready" in str(gateway["healthcheck"])
    assert bulk["command"][:2] == ["bulk", "worker"] and any(":/bulk" in str(v) for v in bulk["volumes"])
    for service in (gateway, bulk):
        assert service["image"] == services["worker-llm"]["image"] and service["depends_on"]["redis"]
        assert service["environment"]["REDBATCH_REDIS_URL"].endswith("@redis:6379/0")


def test_compose_commands_are_redbatch_commands():
    """Every service running the image's `redbatch` entrypoint gives arguments the CLI accepts."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    commands = {name: s["command"] for name, s in services.items() if s.get("image") == "redbatch:latest"
                and "entrypoint" not in s}
    assert {"worker-llm", "gateway", "bulk-worker"} <= set(commands)
    for name, command in commands.items():
        args = build_parser().parse_args([re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(a)) for a in command])
        assert args.command == command[0], name


def test_the_image_installs_the_gateway_and_bulk_extras():
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = re.search(r'pip install --no-cache-dir "\.\[([a-z,]+)\]"', dockerfile).group(1).split(",")
    assert {"worker", "gateway", "bulk"} <= set(extras)


def test_compose_and_redis_conf_keep_data():
    conf = (ROOT / "ops" / "redis.conf").read_text()
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    compose = (ROOT / "compose.yaml").read_text()
    assert "--grace-s\", \"30\"" in compose and "stop_grace_period: 40s" in compose
    assert "capabilities: [gpu]" in compose and 'profiles: ["cpu"]' in compose
    assert "restart: unless-stopped" in compose
