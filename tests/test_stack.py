"""`make stack` for real: scripts/stack.py starts Redis, Triton and the gateway as processes, the smoke
script passes against it, and Ctrl-C (SIGINT) takes all three down, process groups included."""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from service.harness import free_port, group_alive, kill_process_group
from tests.triton_util import require_triton_platform

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 150  # a tiny checkpoint, its export and three Triton models on 2 busy cores
pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 120)


class Output:
    """The stack's stdout and stderr lines, read in a thread so waiting on them can time out."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no '{prefix}' line within {timeout_s:.0f} s; output:\n" + "\n".join(self.lines[-40:]))
            if line is None:
                pytest.fail("the stack exited early; output:\n" + "\n".join(self.lines[-40:]))
            self.lines.append(line)
            if line.startswith(prefix):
                return line


@pytest.fixture
def stack_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Output, Path]]:
    require_triton_platform()
    state_dir = tmp_path / "stack"
    env = {key: value for key, value in os.environ.items() if not key.startswith("FSAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "stack.py"), "--checkpoint", "tiny", "--port", str(free_port()),
         "--state-dir", str(state_dir), "--ready-timeout", str(START_TIMEOUT_S)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield proc, Output(proc), state_dir
    finally:
        if proc.poll() is None:  # the test failed midway: its children die with it (parent-death signal)
            kill_process_group(proc.pid)
            proc.wait()


def test_stack_serves_the_smoke_test_and_stops_cleanly(stack_process) -> None:
    proc, output, state_dir = stack_process
    line = output.wait_for("FSAR_STACK ", timeout_s=START_TIMEOUT_S + 30)
    stack = json.loads(line.removeprefix("FSAR_STACK "))
    pids = {name: stack[name]["pid"] for name in ("gateway", "triton", "redis")}
    assert all(group_alive(pid) for pid in pids.values()), pids
    # The gateway ran with the compose file's environment, pointed at the local Triton and Redis.
    assert any("FSAR_BACKEND=triton" in text and f"FSAR_TRITON_URL={stack['triton']['grpc']}" in text
               and f"FSAR_REDIS_URL={stack['redis']['url']}" in text and "FSAR_WORKERS=2" in text
               for text in output.lines)

    smoke = subprocess.run([sys.executable, str(ROOT / "scripts" / "smoke.py"), "--url", stack["gateway"]["url"]],
                           cwd=ROOT, capture_output=True, text=True, timeout=90)
    print(smoke.stdout)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "smoke test passed" in smoke.stdout and smoke.stdout.count("few-shot first = own label") == 3

    proc.send_signal(signal.SIGINT)  # Ctrl-C
    output.wait_for("[stack] stopped", timeout_s=60)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while any(group_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in pids.items() if group_alive(pid)], "processes left behind"
    # Redis ran with the compose command: an append-only file in the stack's state folder.
    assert any((state_dir / "redis" / "appendonlydir").iterdir())


def test_stack_reads_the_gateway_environment_from_compose(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fsar_stack_script", ROOT / "scripts" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        "services:\n"
        "  gateway:\n"
        "    env_file: [{path: .env, required: false}]\n"
        "    environment:\n"
        "      FSAR_BACKEND: triton\n"
        "      FSAR_PORT: \"${FSAR_PORT:-8080}\"\n"
        "      FSAR_WORKERS: \"${FSAR_WORKERS:-2}\"\n"
        "      FSAR_REDIS_URL: \"${FSAR_REDIS_URL-redis://redis:6379/0}\"\n"
        "      PRICE: \"$$5\"\n"
        "  redis:\n"
        "    command: [\"redis-server\", \"--appendonly\", \"yes\"]\n")
    (tmp_path / ".env").write_text("# comment\nFSAR_WORKERS=3\nFSAR_LOG_LEVEL='debug'\n")
    env = stack.gateway_environment(compose, base_env={"FSAR_PORT": "9000"})
    assert env == {"FSAR_LOG_LEVEL": "debug", "FSAR_BACKEND": "triton", "FSAR_PORT": "9000", "FSAR_WORKERS": "3",
                   "FSAR_REDIS_URL": "redis://redis:6379/0", "PRICE": "$5"}
    assert stack.redis_command(compose) == ["redis-server", "--appendonly", "yes"]
    # The real compose file: the gateway service uses Triton and Redis.
    real = stack.gateway_environment(base_env={})
    assert real["FSAR_BACKEND"] == "triton" and real["FSAR_TRITON_URL"] and real["FSAR_REDIS_URL"]
    assert "--appendonly" in stack.redis_command()
