"""The bulk runner against a real Redis and a real worker on the tiny model (no rq: BulkRunner directly)."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from producer import Client
from producer.bulk.runner import BulkRunner, recover_output, request_id_for
from producer.bulk.state import JobInputError, JobSpec
from producer.keys import Keys
from tests.conftest import StepGate

pytestmark = pytest.mark.redis

PROMPTS = ["the cat", "a dog runs", "hello there", "one two three", "zebra", "quiet night", "red blue", "x y z"]


def _chat_line(i: int, max_tokens: int = 6) -> dict:
    return {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" {i}"}],
                     "max_completion_tokens": max_tokens, "temperature": 0}}


def _completion_line(i: int) -> dict:
    return {"custom_id": f"cmpl-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 5, "temperature": 0}}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


class Saved:
    """save_progress: keeps the last progress dict, checks the window each time, can stop the runner."""

    def __init__(self, rds, keys: Keys, max_in_flight: int | None = None, crash_after: int | None = None):
        self.rds, self.keys, self.max_in_flight, self.crash_after = rds, keys, max_in_flight, crash_after
        self.last: dict = {}
        self.max_queued = 0

    def __call__(self, progress: dict) -> None:
        self.last = progress
        self.max_queued = max(self.max_queued, self.rds.xlen(self.keys.requests("tiny")))
        if self.crash_after is not None and progress["done"] >= self.crash_after:
            raise KeyboardInterrupt  # a runner that dies mid-job: no cleanup of its requests


def _runner(rds, prefix, tmp_path, input_path, job_id=None, previous_runs=0, **spec) -> tuple[BulkRunner, Saved]:
    spec.setdefault("lease_s", 1.0)
    job_spec = JobSpec(input_path=str(input_path), output_path=str(tmp_path / f"{job_id or 'out'}.jsonl"), model="tiny",
                       prefix=prefix, **spec)
    saved = Saved(rds, Keys(prefix), spec.get("max_in_flight"), None)
    return BulkRunner(rds, job_id or uuid.uuid4().hex, job_spec, previous_runs, saved), saved


def _texts(lines: list[dict]) -> dict[str, object]:
    out = {}
    for line in lines:
        body = (line["response"] or {}).get("body")
        if body is None:
            out[line["custom_id"]] = line["error"]
            continue
        choice = body["choices"][0]
        out[line["custom_id"]] = (choice.get("message") or {}).get("content", choice.get("text"))
    return out


def test_mixed_file_gives_one_line_per_input_line(worker_factory, rds, prefix, tmp_path) -> None:
    worker_factory(max_num_seqs=4).start()
    lines = [_chat_line(0), _completion_line(1), "{not json", "", _chat_line(2) | {"body": {"messages": [], "frob": 1}},
             _chat_line(0),  # duplicate custom_id
             _chat_line(3) | {"body": {**_chat_line(3)["body"], "n": 2}},
             {"custom_id": "img", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "cat"}},
             {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {}}]
    runner, _saved = _runner(rds, prefix, tmp_path, _write(tmp_path / "in.jsonl", lines))
    summary = runner.run()
    out = _read(Path(runner.spec.output_path))
    assert len(out) == 8 and summary["state"] == "complete" and summary["total"] == 8
    assert len({line["id"] for line in out}) == 8
    by_id = {line["custom_id"]: line for line in out if line["custom_id"] and line["error"] is None}
    assert set(by_id) == {"chat-0", "cmpl-1"} and summary["failed"] == 6
    chat = by_id["chat-0"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 6
    expected = Client(redis_client=rds, prefix=prefix).get_model("tiny").chat(
        _chat_line(0)["body"]["messages"], generate_config={"max_tokens": 6, "temperature": 0, "stream": False})
    assert chat["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert by_id["cmpl-1"]["response"]["body"]["object"] == "text_completion"
    errors = {line["custom_id"]: line["error"] for line in out if line["error"] is not None}
    assert "not valid JSON" in errors[None]["message"] and "line 3" in errors[None]["message"]
    assert "frob" in errors["chat-2"]["message"]
    assert "duplicate custom_id" in errors["chat-0"]["message"]
    assert "'n'=2" in errors["chat-3"]["message"]
    assert errors["img"]["code"] == "unsupported_task" and "unknown url" in errors["emb"]["message"]


def test_window_bounds_what_is_enqueued_and_queue_full_is_waited_out(worker_factory, rds, prefix, tmp_path) -> None:
    worker_factory(max_num_seqs=2, max_queue_len=3).start()
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(i, max_tokens=3) for i in range(12)])
    runner, saved = _runner(rds, prefix, tmp_path, input_path, max_in_flight=5)
    assert runner.run()["done"] == 12
    assert saved.max_queued <= 3  # QueueFull (max_queue_len 3) bounded it below the window of 5
    assert all(line["error"] is None for line in _read(Path(runner.spec.output_path)))


def test_default_window_follows_the_live_workers(worker_factory, rds, prefix, tmp_path) -> None:
    worker_factory(max_num_seqs=6).start()
    runner, _ = _runner(rds, prefix, tmp_path, _write(tmp_path / "in.jsonl", [_chat_line(0)]))
    runner.run()
    assert runner.progress.max_in_flight == 12


def test_resume_after_a_crash_matches_a_clean_run(worker_factory, rds, prefix, tmp_path) -> None:
    worker_factory(max_num_seqs=3).start()
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(i) for i in range(10)])
    clean, _ = _runner(rds, prefix, tmp_path, input_path, job_id="clean")
    clean.run()
    job_id = "crashy"
    crashed, saved = _runner(rds, prefix, tmp_path, input_path, job_id=job_id, max_in_flight=4)
    saved.crash_after = 2
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    output = Path(crashed.spec.output_path)
    with open(output, "a") as f:
        f.write('{"id": "torn')  # a line cut by the crash
    resumed, _ = _runner(rds, prefix, tmp_path, input_path, job_id=job_id, previous_runs=1, max_in_flight=4)
    summary = resumed.run()
    out = _read(output)
    assert sorted(line["custom_id"] for line in out) == sorted(f"chat-{i}" for i in range(10))
    assert summary["done"] == 10 and summary["recomputed"] == 0
    assert summary["submitted"] < 10  # only what the crashed run had not enqueued
    assert _texts(out) == _texts(_read(Path(clean.spec.output_path)))


def test_resume_after_the_events_expired_uses_the_output_file(worker_factory, rds, prefix, tmp_path) -> None:
    worker_factory(max_num_seqs=3).start()
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(i) for i in range(4)])
    first, _ = _runner(rds, prefix, tmp_path, input_path, job_id="ttl")
    first.run()
    keys = Keys(prefix)
    for i in range(4):  # as if the events streams' TTL had passed
        rds.delete(keys.events(request_id_for("ttl", f"chat-{i}", 0)))
    again, _ = _runner(rds, prefix, tmp_path, input_path, job_id="ttl", previous_runs=1)
    assert again.run()["submitted"] == 0
    assert len(_read(Path(again.spec.output_path))) == 4


def test_cancel_aborts_in_flight_and_resume_finishes(worker_factory, rds, prefix, tmp_path) -> None:
    handle = worker_factory(max_num_seqs=2)
    gate = StepGate(handle.worker.engine, hold={3})
    handle.start()
    input_path = _write(tmp_path / "in.jsonl", [_chat_line(i, max_tokens=12) for i in range(10)])
    runner, _saved = _runner(rds, prefix, tmp_path, input_path, job_id="cancel", max_in_flight=4)
    thread = threading.Thread(target=lambda: setattr(runner, "summary", runner.run()))
    thread.start()
    gate.wait_entered(3)  # requests are in flight, none finished
    keys = Keys(prefix)
    rds.set(keys.bulk_cancel("cancel"), b"1")
    thread.join(30)
    gate.release_all()
    out = _read(Path(runner.spec.output_path))
    assert runner.summary["state"] == "cancelled" and len(out) < 10
    aborted = [request_id_for("cancel", f"chat-{i}", 0) for i in range(4)]
    assert all(rds.exists(keys.abort(r)) for r in aborted)  # what was in flight is aborted
    rds.delete(keys.bulk_cancel("cancel"))
    resumed, _ = _runner(rds, prefix, tmp_path, input_path, job_id="cancel", previous_runs=1, max_in_flight=4)
    summary = resumed.run()
    out = _read(Path(resumed.spec.output_path))
    assert summary["state"] == "complete" and summary["recomputed"] >= 1
    assert sorted(line["custom_id"] for line in out) == sorted(f"chat-{i}" for i in range(10))
    assert all(line["error"] is None for line in out)  # aborted by the cancel: resubmitted, not error lines


def test_a_fresh_job_refuses_a_foreign_output(rds, prefix, tmp_path, worker_factory) -> None:
    worker_factory().start()
    runner, _ = _runner(rds, prefix, tmp_path, _write(tmp_path / "in.jsonl", [_chat_line(0)]), job_id="j")
    Path(runner.spec.output_path).write_text('{"id": "other"}\n')
    with pytest.raises(JobInputError, match="did not write"):
        runner.run()


def test_recover_output_cuts_a_torn_last_line(tmp_path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "error": null}\n{"id": "b", "error": {"code": "x"}}\n{"id": "c", "err')
    written, num_failed = recover_output(path, "job")
    assert written == {"a", "b"} and num_failed == 1
    assert path.read_text().endswith("}\n")


def test_only_one_runner_holds_a_job(rds, prefix, tmp_path, worker_factory) -> None:
    from producer.bulk.state import JobBusy, Lease

    worker_factory().start()
    holder = Lease(rds, Keys(prefix).bulk_lease("busy"), 5.0)
    holder.acquire(wait_s=0)
    runner, _ = _runner(rds, prefix, tmp_path, _write(tmp_path / "in.jsonl", [_chat_line(0)]), job_id="busy")
    runner.spec = runner.spec.model_copy(update={"lease_s": 0.6})
    with pytest.raises(JobBusy):
        runner.run()
    holder.release()
    assert threading.active_count() >= 1


def test_producers_without_rq_still_import(tmp_path) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['rq'] = None\n"
            "import producer, producer.bulk, producer.cli\n"
            "producer.cli.build_parser()\n"
            "try:\n"
            "    producer.bulk.submit('in.jsonl', model='m', output_path='out.jsonl')\n"
            "except producer.bulk.BulkError as exc:\n"
            "    print(exc)\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "redbatch[bulk]" in done.stdout
