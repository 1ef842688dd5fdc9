"""Every redis-cli recipe in docs/operations.md, run as written against a live worker."""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

from producer import Client
from producer.keys import Keys
from producer.protocol import EventType, TaskKind
from tests.conftest import StepGate

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def _recipes() -> dict[str, list[str]]:
    """heading -> the redis-cli commands under it, in order."""
    text = DOC.read_text().split("## redis-cli recipes", 1)[1].split("\n## ", 1)[0]
    recipes: dict[str, list[str]] = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        heading, body = section.split("\n", 1)
        recipes[heading.strip()] = re.findall(r"```sh\n(redis-cli [^\n]+)\n```", body)
    return recipes


class Recipes:
    def __init__(self, url: str, prefix: str, worker_id: str):
        self.url, self.prefix, self.worker_id = url, prefix, worker_id
        self.all = _recipes()

    def run(self, heading: str, index: int = 0, request_id: str = "") -> list[str]:
        command = self.all[heading][index]
        command = command.replace("rb:", f"{self.prefix}:").replace("REQUEST_ID", request_id)
        command = command.replace("WORKER_ID", self.worker_id)
        argv = shlex.split(command)
        done = subprocess.run([argv[0], "-u", self.url, *argv[1:]], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and not done.stdout.startswith("ERR"), (command, done.stdout, done.stderr)
        return done.stdout.splitlines()


def test_the_docs_list_every_recipe_the_issue_asks_for():
    assert set(_recipes()) == {
        "Queue depth", "Pending and lag of the consumer group", "Pending entries and their idle time",
        "Registered models and their live workers", "A worker's heartbeat", "A request's events", "Dead letters",
        "Abort a request by hand",
    }
    assert all(_recipes().values())


def test_each_redis_cli_recipe_against_a_live_worker(worker_factory, redis_server_url, prefix, rds):
    keys = Keys(prefix)
    worker = worker_factory(max_num_seqs=2, heartbeat_interval_s=0.1)
    gate = StepGate(worker.worker.engine, hold={2})
    worker.start()
    worker_id = worker.worker.config.worker_id
    recipes = Recipes(redis_server_url, prefix, worker_id)
    client = Client(redis_server_url, prefix=prefix)
    request_id = client.get_model("tiny").submit(TaskKind.GENERATE, {"prompt": "x"},
                                                 {"max_tokens": 50, "ignore_eos": True})
    gate.wait_entered(2)  # the request is running and held: one pending entry

    assert recipes.run("Queue depth") == ["1"]
    groups = recipes.run("Pending and lag of the consumer group")
    info = dict(zip(groups[::2], groups[1::2]))
    assert info["name"] == "workers" and info["pending"] == "1" and info["lag"] == "0"
    pending = recipes.run("Pending entries and their idle time")
    entry_id = rds.xrange(keys.requests("tiny"))[0][0].decode()
    assert pending[0] == entry_id and pending[1] == worker_id and int(pending[2]) >= 0 and pending[3] == "1"
    models = recipes.run("Registered models and their live workers", 0)
    assert models[0] == "tiny" and '"heartbeat_ttl_s"' in models[1]
    assert recipes.run("Registered models and their live workers", 1)[0] == worker_id
    deadline = time.monotonic() + 30
    while not rds.exists(keys.worker(worker_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    heartbeat = recipes.run("A worker's heartbeat")
    fields = dict(zip(heartbeat[::2], heartbeat[1::2]))
    assert fields["model"] == "tiny" and int(fields["kv_blocks"]) > 0 and int(fields["max_num_seqs"]) == 2

    assert recipes.run("Abort a request by hand", request_id=request_id) == ["OK"]
    gate.release_all()
    final = client.wait(request_id, timeout_s=60)
    assert final.type == EventType.ABORTED
    events = recipes.run("A request's events", request_id=request_id)
    assert "aborted" in events and events.index("aborted") > max(i for i, v in enumerate(events) if v == "token")
    assert recipes.run("Queue depth") == ["0"]

    rds.xadd(keys.requests("tiny"), {"no_id_here": "1"})  # unreadable: the worker dead-letters it
    deadline = time.monotonic() + 30
    while not rds.xlen(keys.dead("tiny")) and time.monotonic() < deadline:
        time.sleep(0.05)
    dead = recipes.run("Dead letters")
    assert "reason" in dead and "no_id_here" in dead
