"""Real processes for the benchmark scripts: a redis-server of their own, child environments, CPU and RSS."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from producer.connection import connect

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int) -> dict[str, str]:
    """The environment of a worker or client process: this repository first, torch's threads set and passive."""
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
                OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")


def wait_ping(url: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    with connect(url) as client:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class RedisServer:
    """A redis-server of the benchmark's own (free loopback port, its own directory, no persistence), or `url`."""

    def __init__(self, url: str | None = None, workdir: str | Path | None = None):
        self.url, self.proc, self.dir = url, None, None
        if url is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit("this benchmark needs redis-server (apt-get install redis-server) or --redis-url")
            port = free_port()
            self.dir = str(workdir) if workdir is not None else tempfile.mkdtemp(prefix="redbatch-bench-redis-")
            self.proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                 "--appendonly", "no", "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL)
            self.url = f"redis://127.0.0.1:{port}/0"
        wait_ping(self.url)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def stop_all(procs: list[subprocess.Popen], timeout_s: float = 30) -> None:
    """SIGTERM each process (last started first), SIGKILL what is still there after `timeout_s`."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a process started with start_new_session and its children)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
