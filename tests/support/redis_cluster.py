"""A real three-master Redis Cluster from Debian's ``redis-server`` 7, for the tests that need one.

Each node listens on a free loopback port with its cluster bus on another, keeps its
files under ``data_dir``, and is one of this process's children, so ``stop()`` ends
exactly what ``start()`` began. The slots are split in three ranges, node ``i`` owning
range ``i``, so a test knows where a key lives from its slot alone.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from .ports import free_port

REDIS_SERVER = "/usr/bin/redis-server"
SLOTS = 16384
MASTERS = 3


@dataclass
class ClusterNodeProcess:
    port: int
    bus_port: int
    first_slot: int
    last_slot: int
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        """A plain connection to this node alone (no redirects followed)."""
        return redis.Redis(port=self.port, socket_timeout=2)

    def answers(self) -> bool:
        with self.client() as client:
            return bool(client.ping())

    def owns(self, slot: int) -> bool:
        return self.first_slot <= slot <= self.last_slot


@dataclass
class LocalRedisCluster:
    data_dir: Path
    nodes: list[ClusterNodeProcess] = field(default_factory=list)

    def url(self, first: int = 0) -> str:
        """The ``redis+cluster://`` URL listing every node, node ``first`` first."""
        order = self.nodes[first:] + self.nodes[:first]
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in order)

    def node(self, port: int) -> ClusterNodeProcess:
        return next(node for node in self.nodes if node.port == port)

    def owner(self, key: str) -> ClusterNodeProcess:
        """The node whose slots hold ``key``."""
        with self.nodes[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        return next(node for node in self.nodes if node.owns(slot))

    def start(self, within: float = 20.0) -> None:
        self.data_dir = self.data_dir.absolute()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        per_node = SLOTS // MASTERS
        for i in range(MASTERS):
            last = SLOTS - 1 if i == MASTERS - 1 else (i + 1) * per_node - 1
            node = ClusterNodeProcess(free_port(), free_port(), i * per_node, last)
            node_dir = self.data_dir / str(node.port)
            node_dir.mkdir(parents=True)
            log = (node_dir / "redis.log").open("ab")
            options = {
                "bind": "127.0.0.1",
                "port": node.port,
                "cluster-enabled": "yes",
                "cluster-port": node.bus_port,
                "cluster-config-file": node_dir / "nodes.conf",
                "cluster-node-timeout": 5000,
                "dir": node_dir,
                "save": "",
                "appendonly": "no",
            }
            argv = [REDIS_SERVER, *(part for name, value in options.items() for part in (f"--{name}", str(value)))]
            node.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.nodes.append(node)
        deadline = time.monotonic() + within
        for node in self.nodes:
            self._wait(deadline, node.answers)
        for node in self.nodes:
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", node.first_slot, node.last_slot)
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        self._wait(deadline, self._formed)

    def _formed(self) -> bool:
        """Every node sees the cluster whole: all slots served, all masters known."""
        for node in self.nodes:
            with node.client() as client:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text or f"cluster_known_nodes:{MASTERS}" not in text:
                    return False
        return True

    def _wait(self, deadline: float, ready: Callable[[], bool]) -> None:
        while True:
            try:
                if ready():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the Redis Cluster under {self.data_dir} did not form; see its nodes' redis.log")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)
