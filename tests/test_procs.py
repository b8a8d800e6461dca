"""Child processes started with the parent-death signal die with their parent, and starting them runs
no Python in the forked child (a preexec_fn there once hung a test run for good)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.procs import group_alive, with_parent_death_signal

ROOT = str(Path(__file__).resolve().parents[1])


def test_command_is_wrapped_with_setpriv_when_present() -> None:
    wrapped = with_parent_death_signal(["tritonserver", "--model-repository", "/m"])
    if shutil.which("setpriv") is None:
        assert wrapped == ["tritonserver", "--model-repository", "/m"]
    else:
        assert wrapped[1:] == ["--pdeathsig", "KILL", "--", "tritonserver", "--model-repository", "/m"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_child_dies_with_its_parent() -> None:
    parent = subprocess.run(
        [sys.executable, "-c",
         "import subprocess, sys\n"
         "from service.procs import with_parent_death_signal\n"
         "child = subprocess.Popen(with_parent_death_signal(['sleep', '60']), start_new_session=True)\n"
         "print(child.pid, flush=True)\n"],  # the parent exits at once, leaving its child behind
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert parent.returncode == 0, parent.stderr
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while group_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(child), "the child outlived its parent"
