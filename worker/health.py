"""A health file for process supervisors (Kubernetes probes): is the loop turning, does Redis answer?

The worker writes a small JSON file (atomically: write then rename) at most once per second:
`loop` is when the loop last turned, `redis` when a heartbeat last reached Redis, `state` is
`serving` or `draining`. `redbatch worker --health` (liveness) passes while the loop turned
recently, whatever Redis does: restarting a worker cannot fix a Redis outage, and its requests
would be handed around for nothing. `--ready` (readiness) also wants a recent heartbeat and a
worker that is not draining.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

WRITE_INTERVAL_S = 1.0


class HealthFile:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._state = {"loop": 0.0, "redis": 0.0, "state": "starting", "pid": os.getpid()}
        self._loop_written_at = float("-inf")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def loop_turned(self) -> None:
        """The loop thread, every iteration: cheap unless a write is due."""
        now = time.time()
        if now - self._loop_written_at < WRITE_INTERVAL_S:
            return
        self._loop_written_at = now
        with self._lock:
            self._state["loop"] = now
            self._write()

    def heartbeat_written(self, draining: bool) -> None:
        """The I/O thread, after a heartbeat reached Redis."""
        with self._lock:
            self._state.update(redis=time.time(), state="draining" if draining else "serving")
            self._write()

    def _write(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".health-")
        with os.fdopen(fd, "w") as f:
            json.dump(self._state, f)
        os.replace(tmp, self.path)


def check(path: str | os.PathLike[str], ready: bool, max_age_s: float, now: float | None = None) -> tuple[bool, str]:
    """(ok, why) for a liveness (ready=False) or readiness probe over a worker's health file."""
    now = time.time() if now is None else now
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return False, f"no readable health file at {path}: {exc}"
    loop_age = now - float(state.get("loop", 0))
    if loop_age > max_age_s:
        return False, f"the worker loop has not turned for {loop_age:.0f} s (limit {max_age_s:.0f} s)"
    if not ready:
        return True, f"loop turned {loop_age:.1f} s ago"
    redis_age = now - float(state.get("redis", 0))
    if redis_age > max_age_s:
        return False, f"no heartbeat reached Redis for {redis_age:.0f} s (limit {max_age_s:.0f} s)"
    if state.get("state") != "serving":
        return False, f"the worker is {state.get('state')}"
    return True, f"serving; loop {loop_age:.1f} s, heartbeat {redis_age:.1f} s ago"
