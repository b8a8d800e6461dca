"""Child-process helpers shared by the product and its test/benchmark harness (standard library only).

- :func:`free_port`: a TCP port nobody listens on right now;
- :func:`with_parent_death_signal`: a command that the kernel kills with its parent (``setpriv --pdeathsig``);
- :func:`group_alive`, :func:`wait_group_gone`, :func:`kill_process_group`: a child started with
  ``start_new_session=True`` leads its own process group, and these see and end the whole group
  (its own children included);
- :func:`stop_process`: SIGTERM a group leader, wait, then SIGKILL whatever is left of its group.

This module imports nothing heavy, so production code (``service.triton_local``, ``service.demo``)
and ``service.harness`` can both use it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Sequence

__all__ = ["free_port", "group_alive", "kill_process_group", "stop_process", "wait_group_gone",
           "with_parent_death_signal"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def with_parent_death_signal(command: Sequence[str]) -> list[str]:
    """``command`` run through ``setpriv --pdeathsig KILL`` (util-linux), which asks the kernel to
    SIGKILL it when the thread that started it dies, then execs it (same process, same pid); the
    command unchanged where ``setpriv`` is missing (the child then outlives a crashed parent).

    This replaces a ``preexec_fn`` calling ``prctl``: with a ``preexec_fn`` CPython runs Python in the
    forked child of a multi-threaded parent, and the child hung there deallocating another thread's
    PyAV reformatter (``sws_freeContext`` joining slice threads that only exist in the parent), which
    stalled a test run for good.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(command)
    return [setpriv, "--pdeathsig", "KILL", "--", *command]


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` still exists (a group we may not signal counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_group_gone(pgid: int, timeout_s: float = 10.0) -> bool:
    """Wait until no process of group ``pgid`` is left (killed children are reaped asynchronously);
    False when some are still there after ``timeout_s``, or the group belongs to someone else."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        time.sleep(0.05)
    return False


def kill_process_group(pgid: int) -> None:
    """SIGKILL every process of group ``pgid``; nothing when the group is gone or not ours."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """Stop a child started with ``start_new_session=True``: SIGTERM it, wait up to ``timeout_s``,
    then SIGKILL whatever is left of its process group (the leader, or children it left behind)
    and reap the leader. Safe on a process that has already exited, and on None."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    kill_process_group(proc.pid)
    proc.wait()
