"""Shared fixtures: a real Redis server for the tests.

`redis_url` points at a real Redis: the one on 127.0.0.1:6379 if it answers, else a
`redis-server` started here on a free port in a temporary folder (Debian package `redis-server`).
Tests use database 13 and a key prefix unique to the session (`redis_prefix` adds one per test), and
delete only keys under that prefix. `redis_process` starts a private server a test may stop and
restart (outage tests).
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis

from service.harness import RedisServer, RedisServerError, delete_redis_prefix

TEST_DB = 13

# Gateways built in tests run their encoders in torch unless a test asks for ONNX Runtime (the default
# `auto` would export ONNX graphs of every test model on its first start); tests/service/
# test_embedded_onnx.py and tests/training/test_onnx.py cover that runtime.
os.environ.setdefault("FSAR_RUNTIME", "torch")
_DEFAULT_HOST, _DEFAULT_PORT = "127.0.0.1", 6379


def _answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=timeout,
                                socket_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


class RedisProcess(RedisServer):
    """A `redis-server` child process on a fixed port, in its own folder, nothing kept on disk;
    database 13. A server that cannot start fails the test (no traceback)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port=port, args=["--save", "", "--appendonly", "no"], db=TEST_DB)

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        try:
            return super().start(timeout_s)
        except RedisServerError as err:
            hint = "No Redis answers on 127.0.0.1:6379 and " if "not installed" in str(err) else ""
            pytest.fail(f"{hint}{err}", pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis (database 13): the shared one on :6379, or one started for this session."""
    if os.environ.get("FSAR_TEST_REDIS_URL"):
        yield os.environ["FSAR_TEST_REDIS_URL"]
        return
    if _answers(_DEFAULT_HOST, _DEFAULT_PORT):
        yield f"redis://{_DEFAULT_HOST}:{_DEFAULT_PORT}/{TEST_DB}"
        return
    with tempfile.TemporaryDirectory(prefix="fsar-redis-") as workdir, RedisProcess(Path(workdir)) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_session_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix owned by this test session; its keys are deleted at the end."""
    prefix = f"fsartest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_redis_prefix(redis_url, prefix)


@pytest.fixture
def redis_prefix(redis_session_prefix: str) -> str:
    """A key prefix unique to one test (under the session prefix)."""
    return f"{redis_session_prefix}{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private, started `redis-server` that the test may `stop()` and `start()` again (same port)."""
    with RedisProcess(tmp_path / "redis") as server:
        yield server
