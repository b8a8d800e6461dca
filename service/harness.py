"""Real processes around the gateway, for tests, benchmarks, ``fsar demo`` and ``scripts/stack.py``.

- :class:`LiveGateway`: the gateway (uvicorn) in a child process, ready on enter, stopped on exit;
- :class:`RedisServer`: a private ``redis-server`` child process; :func:`delete_redis_prefix`;
- :func:`process_tree`, :func:`children`, :func:`process_memory`, :func:`process_tree_memory`,
  :func:`process_tree_cpu_seconds`, :func:`reset_peak_rss`, :func:`rss_mb`: memory and CPU of a process and its
  descendants, from Linux ``/proc``;
- re-exported from :mod:`service.procs`: :func:`free_port`, :func:`with_parent_death_signal`,
  :func:`group_alive`, :func:`wait_group_gone`, :func:`kill_process_group`, :func:`stop_process`.

Imports only the standard library and :mod:`service.procs`, so product code (``fsar demo``) may
use it. Children start in their own process group (Ctrl-C in a terminal reaches only the parent,
and stopping one ends everything it started) with a parent-death signal: the kernel kills them
when the thread that started them ends, so start them from the main thread.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from service.procs import (
    free_port,
    group_alive,
    kill_process_group,
    stop_process,
    wait_group_gone,
    with_parent_death_signal,
)

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = [
    "GatewayError", "LiveGateway", "RedisServer", "RedisServerError", "children", "delete_redis_prefix",
    "free_port", "group_alive", "kill_process_group", "process_memory", "process_tree", "process_tree_cpu_seconds",
    "process_tree_memory", "reset_peak_rss", "rss_mb", "stop_process", "wait_group_gone", "with_parent_death_signal",
]

MIB = 1024 * 1024
#: The folder holding the ``service`` package: a checkout's root, or site-packages when installed.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ /proc readings
def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (empty when it is gone)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listed:
                found += [int(child) for child in listed.read().split()]
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children(parent)]
        tree += frontier
    return tree


def process_memory(pid: int) -> dict[str, int]:
    """``{"rss_bytes", "peak_rss_bytes"}`` (``VmRSS``, ``VmHWM``) of one process from
    ``/proc/<pid>/status``. Raises OSError when it is gone, KeyError for a zombie."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024  # kB
    return {"rss_bytes": fields["VmRSS"], "peak_rss_bytes": fields["VmHWM"]}


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MiB (0 when it is gone)."""
    try:
        return process_memory(pid)["rss_bytes"] / MIB
    except (OSError, KeyError):
        return 0.0


def process_tree_memory(pid: int) -> dict[str, int]:
    """Summed :func:`process_memory` of ``pid`` and its descendants, with their count
    (``processes``). The summed ``peak_rss_bytes`` is an upper bound of the tree's peak, since
    processes peak at different times."""
    total = {"rss_bytes": 0, "peak_rss_bytes": 0, "processes": 0}
    for member in process_tree(pid):
        try:
            memory = process_memory(member)
        except (OSError, KeyError):  # ended meanwhile, or a zombie without memory fields
            continue
        total["rss_bytes"] += memory["rss_bytes"]
        total["peak_rss_bytes"] += memory["peak_rss_bytes"]
        total["processes"] += 1
    return total


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants, including
    children they have reaped (``/proc/<pid>/stat`` fields 14-17)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return total / ticks


def reset_peak_rss(pid: int) -> None:
    """Restart the peak-RSS count (``VmHWM``) of ``pid`` and its descendants from their current RSS
    (Linux ``clear_refs`` 5)."""
    for member in process_tree(pid):
        try:
            Path(f"/proc/{member}/clear_refs").write_text("5")
        except OSError:  # the process ended meanwhile
            pass


# ------------------------------------------------------------------------------------ children
def _spawn(command: Sequence[str], log: IO[bytes] | int, env: Mapping[str, str] | None,
           cwd: str | os.PathLike | None) -> subprocess.Popen:
    """``command`` in its own session (process group), killed by the kernel when this thread ends."""
    return subprocess.Popen(with_parent_death_signal(command), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(env) if env is not None else None, cwd=cwd,
                            start_new_session=True)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


class _Child:
    """A child process started with :func:`_spawn` (``proc``: None when not started or stopped)."""

    proc: subprocess.Popen | None = None
    #: How long :meth:`stop` waits after SIGTERM before it kills the process group.
    stop_timeout_s = 20.0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL of its process group after ``timeout_s``
        (default :attr:`stop_timeout_s`). Safe to repeat."""
        proc, self.proc = self.proc, None
        stop_process(proc, self.stop_timeout_s if timeout_s is None else timeout_s)


class GatewayError(RuntimeError):
    """The gateway process exited or did not become ready; the message ends with its log tail."""


class LiveGateway(_Child):
    """The gateway in a child process on ``host:port``, as a context manager: started and ready on
    enter, stopped (and its temporary log deleted) on exit.

    Given ``settings``, the child runs ``service.server.serve(settings)`` with one uvicorn worker
    (the child's pid is the server's, so :meth:`memory` covers the server and its decode workers);
    host and port are set here. Given ``command`` instead (e.g. ``fsar serve`` configured through
    ``FSAR_*`` variables in ``env``), the child runs that and must listen on ``host:port``.

    The child's environment is this process's without its ``FSAR_*`` variables (so only
    ``settings`` or ``env`` count), plus ``PYTHONUNBUFFERED=1``, ``TMPDIR=tmp_dir`` when given and
    ``env``. Its output goes to ``log_path`` (appended; a file, so a chatty server never blocks on
    a full pipe), by default a temporary file.

    Args:
        settings: the gateway's settings (``workers`` must be 1).
        host, port: where it listens; port default: a free one, kept across restarts.
        env: more environment variables for the child.
        command: the child's command line instead of ``serve(settings)``.
        log_path: where its output goes (kept); None: a temporary file, deleted by :meth:`close`.
        tmp_dir: the child's ``TMPDIR`` (created), so a test can see the files it creates.
        cwd: the child's working folder; default: the folder holding the ``service`` package, so
            the child imports the same code as this process.
        ready_path: the endpoint that answers 200 once it is ready (``/readyz`` or ``/healthz``).
        ready_timeout_s: how long :meth:`start` waits for it.
    """

    def __init__(self, settings: Settings | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 env: Mapping[str, str] | None = None, command: Sequence[str] | None = None,
                 log_path: str | os.PathLike | None = None, tmp_dir: str | os.PathLike | None = None,
                 cwd: str | os.PathLike | None = None, ready_path: str = "/readyz",
                 ready_timeout_s: float = 180.0) -> None:
        if (settings is None) == (command is None):
            raise ValueError("LiveGateway needs settings or a command, not both")
        self.host = host
        self.port = port or free_port(host)
        if settings is not None:
            if settings.workers != 1:
                raise ValueError("LiveGateway runs one worker (memory is read from its process tree)")
            settings = settings.model_copy(update={"host": host, "port": self.port})
            script = ("from service.server import serve; from service.settings import Settings; "
                      f"serve(Settings.model_validate_json({settings.model_dump_json()!r}))")
            command = [sys.executable, "-c", script]
        self.settings = settings
        self.command = list(command or [])
        self.extra_env = dict(env or {})
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else None
        self.cwd = Path(cwd) if cwd is not None else PACKAGE_ROOT
        self.ready_path = ready_path
        self.ready_timeout_s = ready_timeout_s
        self._log_is_temp = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="fsar-gateway-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise GatewayError("the gateway is not running")
        return self.proc.pid

    def environment(self) -> dict[str, str]:
        """The child's environment (see the class docstring)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("FSAR_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.tmp_dir is not None:
            env["TMPDIR"] = str(self.tmp_dir)
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ lifecycle
    def launch(self) -> LiveGateway:
        """Start the child without waiting for it (see :meth:`wait_ready`)."""
        if self.tmp_dir is not None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._launched = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = _spawn(self.command, log, self.environment(), self.cwd)
        return self

    def wait_ready(self, timeout_s: float | None = None, check: Callable[[], None] | None = None) -> None:
        """Poll :attr:`ready_path` until it answers 200; ``check()`` runs on every poll (it may raise,
        e.g. when a process the gateway needs has died). Raises :class:`GatewayError` when the child
        exits or is not ready within ``timeout_s`` (default ``ready_timeout_s``; then it is stopped)."""
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            if check is not None:
                check()
            if not self.alive():
                code = self.proc.returncode if self.proc is not None else None
                raise GatewayError(f"the gateway exited with code {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}{self.ready_path}", timeout=2) as response:
                    if response.status == 200:
                        self.startup_s = time.monotonic() - self._launched
                        return
            except urllib.error.HTTPError as err:
                last = f"{self.ready_path} {err.code}: {err.read()[:300].decode(errors='replace')}"
            except (urllib.error.URLError, OSError) as err:
                last = str(err)
            if time.monotonic() > deadline:
                self.stop()
                raise GatewayError(f"the gateway was not ready within {timeout_s:g} s ({last}); "
                                   f"its log:\n{self.log_tail()}")
            time.sleep(0.2)

    def start(self, timeout_s: float | None = None) -> LiveGateway:
        """Start the child and wait until it is ready (:meth:`launch`, then :meth:`wait_ready`)."""
        self.launch()
        self.wait_ready(timeout_s)
        return self

    def kill(self) -> None:
        """SIGKILL the server process alone, as an OOM killer or a crashed host would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def close(self) -> None:
        """:meth:`stop`, and delete the log when it is a temporary file."""
        self.stop()
        if self._log_is_temp:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> LiveGateway:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ readings
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log(), lines)

    def children(self) -> list[int]:
        """The server's child processes (decode workers)."""
        return children(self.pid) if self.alive() else []

    def rss_mb(self) -> dict[str, float]:
        """``{"gateway": MiB, "workers": MiB of all its child processes together}``."""
        return {"gateway": rss_mb(self.pid), "workers": sum(rss_mb(child) for child in self.children())}

    def memory(self) -> dict[str, int]:
        """:func:`process_tree_memory` of the server and its children (decode workers)."""
        return process_tree_memory(self.pid)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server process and its children."""
        return process_tree_cpu_seconds(self.pid)

    def reset_peak(self) -> None:
        """:func:`reset_peak_rss` of the server and its children."""
        reset_peak_rss(self.pid)


# ---------------------------------------------------------------------------------------- Redis
def delete_redis_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` in ``redis_url`` (one run's own keys only); how many."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        return len(keys)
    finally:
        client.close()


class RedisServerError(RuntimeError):
    """``redis-server`` is missing, exited, or did not answer in time."""


class RedisServer(_Child):
    """A private ``redis-server`` on ``127.0.0.1:port`` with its data in ``workdir``, as a context
    manager. ``stop()`` (SIGTERM: it writes its append-only file) and ``start()`` again reuse the
    port; ``kill()`` is a SIGKILL.

    Args:
        workdir: its ``--dir`` (created).
        port: default: a free one.
        args: more ``redis-server`` arguments (``["--appendonly", "yes"]``).
        db: the database :attr:`url` names.
        binary: the executable, looked up on ``PATH``.
        log_path: where its output goes (appended); None: discarded.
    """

    def __init__(self, workdir: str | os.PathLike, *, port: int | None = None, args: Sequence[str] = (),
                 db: int = 0, binary: str = "redis-server", log_path: str | os.PathLike | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.args = [str(arg) for arg in args]
        self.db = db
        self.binary = binary
        self.log_path = Path(log_path) if log_path is not None else None
        self.stop_timeout_s = 15.0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    @property
    def command(self) -> list[str]:
        import shutil

        binary = shutil.which(self.binary)
        if binary is None:
            raise RedisServerError(f"{self.binary} is not installed (Debian: apt-get install redis-server)")
        return [binary, *self.args, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--dir", str(self.workdir)]

    def answers(self, timeout_s: float = 1.0) -> bool:
        """Whether it answers ``PING``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        """Start it and wait until it answers ``PING`` (raises :class:`RedisServerError`)."""
        command = self.command
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.proc = _spawn(command, subprocess.DEVNULL, None, None)
        else:
            with open(self.log_path, "ab") as log:
                self.proc = _spawn(command, log, None, None)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = _tail(self.log_path.read_text(errors="replace"), 20) if self.log_path else ""
                raise RedisServerError(f"redis-server exited with code {self.proc.returncode} on port "
                                       f"{self.port}" + (f":\n{tail}" if tail else "."))
            if self.answers(0.2):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout_s:g} s.")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as an OOM killer or a crashed host would."""
        proc, self.proc = self.proc, None
        if proc is not None:
            kill_process_group(proc.pid)
            proc.wait(5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

