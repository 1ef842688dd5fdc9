"""Real Redis topologies for tests: redis-server processes on free loopback ports, each in a directory of its own.

SentinelTopology: a master, replicas and sentinels watching them (the sentinels run `redis-server --sentinel`).
LocalCluster: a Redis Cluster of masters only, joined with `redis-cli --cluster create`.
Every wait here is on a condition with a generous timeout, never a sleep sized to the machine's speed.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

SERVICE_NAME = "rbmaster"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str):
    """predicate's first truthy value; Redis errors count as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
            if value:
                return value
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def has_redis_server() -> bool:
    return shutil.which("redis-server") is not None


class SentinelTopology:
    """A master, `num_replicas` replicas and `num_sentinels` sentinels (quorum: a majority) under `workdir`.

    `password`: requirepass/masterauth of the data nodes (and the sentinels' auth-pass to them);
    `sentinel_password`: requirepass of the sentinels. Short down-after and failover timeouts, so a
    killed master is replaced within a few seconds."""

    def __init__(self, workdir: Path, num_replicas: int = 1, num_sentinels: int = 3, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000, password: str | None = None, sentinel_password: str | None = None):
        self.dir = Path(workdir)
        self.password, self.sentinel_password = password, sentinel_password
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.quorum = num_sentinels // 2 + 1
        self.data_ports = [free_port() for _ in range(1 + num_replicas)]  # the first one starts as master
        self.sentinel_ports = [free_port() for _ in range(num_sentinels)]
        self.procs: dict[int, subprocess.Popen] = {}

    # ------------------------------------------------------------ addresses

    def url(self, scheme: str = "redis+sentinel", db: int = 0, credentials: bool = True, **query: str) -> str:
        userinfo = f":{self.password}@" if credentials and self.password else ""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        if credentials and self.sentinel_password:
            query.setdefault("sentinel_password", self.sentinel_password)
        tail = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        return f"{scheme}://{userinfo}{hosts}/{SERVICE_NAME}/{db}{tail}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=5)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.sentinel_password, socket_timeout=5)

    def master_port(self) -> int:
        """The master's port as the sentinels agree on it (all of them that answer)."""
        ports = set()
        for port in self.sentinel_ports:
            if self.procs[port].poll() is None:
                with self.sentinel(port) as s:
                    ports.add(int(s.sentinel_get_master_addr_by_name(SERVICE_NAME)[1]))
        if len(ports) != 1:
            raise redis.ConnectionError(f"the sentinels disagree on the master: {sorted(ports)}")
        return ports.pop()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> SentinelTopology:
        master, *replicas = self.data_ports
        self._start_data_node(master, replica_of=None)
        for port in replicas:
            self._start_data_node(port, replica_of=master)
        for port in self.sentinel_ports:
            self._start_sentinel(port, master)
        wait_until(self._is_ready, START_TIMEOUT_S, "the replicas to sync and the sentinels to find each other")
        return self

    def _start_data_node(self, port: int, replica_of: int | None) -> None:
        node_dir = self.dir / f"node-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir), "--save", "",
                "--appendonly", "no", "--maxmemory-policy", "noeviction", "--logfile", str(node_dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _start_sentinel(self, port: int, master: int) -> None:
        node_dir = self.dir / f"sentinel-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {node_dir}", f"logfile {node_dir / 'sentinel.log'}",
                 f"sentinel monitor {SERVICE_NAME} 127.0.0.1 {master} {self.quorum}",
                 f"sentinel down-after-milliseconds {SERVICE_NAME} {self.down_after_ms}",
                 f"sentinel failover-timeout {SERVICE_NAME} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {SERVICE_NAME} 1"]
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE_NAME} {self.password}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        config = node_dir / "sentinel.conf"  # sentinels rewrite their config file: each has its own
        config.write_text("\n".join(lines) + "\n")
        self.procs[port] = subprocess.Popen(["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)

    def _is_ready(self) -> bool:
        for port, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"redis process on port {port} exited with {proc.returncode}; see {self.dir}")
        for port in self.data_ports[1:]:
            with self.node(port) as replica:
                if replica.info("replication").get("master_link_status") != "up":
                    return False
        for port in self.sentinel_ports:
            with self.sentinel(port) as s:
                state = s.sentinel_master(SERVICE_NAME)
            if state["num-slaves"] < len(self.data_ports) - 1 or state["num-other-sentinels"] < len(
                    self.sentinel_ports) - 1:
                return False
        return True

    def kill(self, port: int) -> None:
        """SIGKILL: no shutdown, nothing more written or replicated."""
        self.procs[port].kill()
        self.procs[port].wait(30)

    def wait_for_new_master(self, old_port: int, timeout_s: float = 60.0) -> int:
        """The port of the replica the sentinels promoted in old_port's place, once it answers as a master."""
        def promoted() -> int | None:
            port = self.master_port()
            if port == old_port:
                return None
            with self.node(port) as node:
                return port if node.info("replication").get("role") == "master" else None

        return wait_until(promoted, timeout_s, "the sentinels to promote a replica")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- Redis Cluster

CLUSTER_BUS_OFFSET = 10000  # a cluster node also listens on its port + 10000 (the cluster bus)


class LocalCluster:
    """`num_masters` redis-server --cluster-enabled nodes under `workdir`, joined with redis-cli --cluster create
    (no replicas): with three, the slots split at 5461 and 10923."""

    def __init__(self, workdir: Path, num_masters: int = 3):
        self.dir = Path(workdir)
        self.ports = self._ports(num_masters)
        self.procs: dict[int, subprocess.Popen] = {}

    @staticmethod
    def _ports(count: int) -> list[int]:
        taken: set[int] = set()
        ports = []
        for _ in range(count):
            port = _pair_port(taken)
            taken |= {port, port + CLUSTER_BUS_OFFSET}
            ports.append(port)
        return ports

    def url(self, scheme: str = "redis+cluster") -> str:
        return f"{scheme}://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def port_of_slot(self, slot: int) -> int:
        with self.node(self.ports[0]) as node:
            for start, end, master, *_ in node.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise LookupError(f"slot {slot} is not served")

    def start(self) -> LocalCluster:
        for port in self.ports:
            node_dir = self.dir / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                    "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                    "--maxmemory-policy", "noeviction", "--logfile", str(node_dir / "redis.log")]
            self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            wait_until(lambda port=port: self._alive(port) and self.node(port).ping(), START_TIMEOUT_S,
                       f"node {port} to start")
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                  "--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        wait_until(self._is_ready, START_TIMEOUT_S, "cluster_state:ok on every node")
        return self

    def _alive(self, port: int) -> bool:
        if self.procs[port].poll() is not None:
            raise RuntimeError(f"cluster node {port} exited with {self.procs[port].returncode}; see {self.dir}")
        return True

    def _is_ready(self) -> bool:
        for port in self.ports:
            with self.node(port) as node:
                info = node.cluster("info")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < len(self.ports):
                    return False
        return True

    def flush(self) -> None:
        for port in self.ports:
            with self.node(port) as node:
                node.flushall()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _pair_port(taken: set[int]) -> int:
    """A free loopback port P below 55536 with P + 10000 free too (the cluster bus)."""
    for _ in range(500):
        port = random.randrange(20000, 45000)  # P + 10000 stays below 65536
        if port in taken or port + CLUSTER_BUS_OFFSET in taken:
            continue
        if _is_free(port) and _is_free(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair (P, P + 10000) for a cluster node")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
