"""Shared fixtures: a real Redis server for the tests.

`redis_url` points at a real Redis: the one on 127.0.0.1:6379 if it answers, else a
`redis-server` started here on a free port in a temporary folder (Debian package `redis-server`).
Tests use database 13 and a key prefix unique to the session (`redis_prefix` adds one per test), and
delete only keys under that prefix. `redis_process` starts a private server a test may stop and
restart (outage tests).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis

TEST_DB = 13
_DEFAULT_HOST, _DEFAULT_PORT = "127.0.0.1", 6379


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=timeout,
                                socket_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


class RedisProcess:
    """A `redis-server` child process on a fixed port, in its own folder, nothing kept on disk."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("No Redis answers on 127.0.0.1:6379 and `redis-server` is not installed "
                        "(apt-get install redis-server).", pytrace=False)
        self.binary = binary
        self.workdir = workdir
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{TEST_DB}"

    def start(self, timeout_s: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with code {self.proc.returncode} on port {self.port}.",
                            pytrace=False)
            if _answers("127.0.0.1", self.port, 0.2):
                return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s.", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis (database 13): the shared one on :6379, or one started for this session."""
    if os.environ.get("FSAR_TEST_REDIS_URL"):
        yield os.environ["FSAR_TEST_REDIS_URL"]
        return
    if _answers(_DEFAULT_HOST, _DEFAULT_PORT):
        yield f"redis://{_DEFAULT_HOST}:{_DEFAULT_PORT}/{TEST_DB}"
        return
    with tempfile.TemporaryDirectory(prefix="fsar-redis-") as workdir:
        server = RedisProcess(Path(workdir))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_session_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix owned by this test session; its keys are deleted at the end."""
    prefix = f"fsartest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    finally:
        client.close()


@pytest.fixture
def redis_prefix(redis_session_prefix: str) -> str:
    """A key prefix unique to one test (under the session prefix)."""
    return f"{redis_session_prefix}{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private, started `redis-server` that the test may `stop()` and `start()` again (same port)."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
