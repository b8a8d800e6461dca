"""Local Redis topologies for tests: a Redis Cluster and a Sentinel-watched master, made of `redis-server`
processes (harness `RedisServer`) in a temporary folder. Nothing is kept on disk."""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from service.harness import RedisServer

_NO_DISK = ["--save", "", "--appendonly", "no"]


def missing_binaries(*names: str) -> str | None:
    """A one-line skip reason when a binary is not installed, else None."""
    absent = [name for name in names if shutil.which(name) is None]
    return f"{', '.join(absent)} not installed (Debian: apt-get install redis-server redis-tools)" if absent else None


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000, so below 55536) is free too."""
    while True:
        port = random.randint(20000, 45000)
        if not {port, port + 10000} & taken and _free(port) and _free(port + 10000):
            taken.update({port, port + 10000})
            return port


class LocalCluster:
    """`masters` masters with `replicas` replicas each, made by `redis-cli --cluster create`.

    `node_timeout_ms` is small so a killed master's replica takes over within a few seconds."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        taken: set[int] = set()
        self.servers = [
            RedisServer(workdir / f"node{i}", port=cluster_port(taken), args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), *_NO_DISK])
            for i in range(masters * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """A `redis+cluster://` URL naming two seed nodes (the client discovers the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:2])

    def start(self, timeout_s: float = 30.0) -> "LocalCluster":
        for server in self.servers:
            server.start()
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in self.servers],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout_s)
        self.wait_healthy(timeout_s)
        return self

    def client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=2, socket_connect_timeout=1)

    def alive(self) -> list[RedisServer]:
        return [s for s in self.servers if s.proc is not None]

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every running node sees the cluster up with every slot served and its replicas attached."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                infos = [self.client(s).cluster("info") for s in self.alive()]
                # redis-py parses CLUSTER INFO into a dict of strings
                if all(str(i.get("cluster_state")) == "ok" and str(i.get("cluster_slots_ok")) == "16384"
                       for i in infos) and self._replicas_in_sync():
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the local Redis Cluster did not become healthy")
            time.sleep(0.1)

    def _replicas_in_sync(self) -> bool:
        for master in self.masters():
            info = self.client(master).info("replication")
            if int(info.get("connected_slaves", 0)) < self.replicas:
                return False
            offset = int(info["master_repl_offset"])
            for n in range(self.replicas):
                if int(info[f"slave{n}"]["offset"]) != offset:
                    return False
        return True

    def masters(self) -> list[RedisServer]:
        return [s for s in self.alive() if self.client(s).info("replication")["role"] == "master"]

    def master_of(self, key: str) -> RedisServer:
        """The running master serving `key`'s slot."""
        slot = redis.crc.key_slot(key.encode())
        for server in self.masters():
            for start, end, *_ in self.client(server).cluster("slots"):
                if start <= slot <= end and _[0][1] == server.port:
                    return server
        raise LookupError(f"no master serves slot {slot}")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
