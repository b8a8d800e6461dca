"""A real gateway process for tests: `fsar`'s `serve(settings)` under uvicorn on a free loopback port.

`LiveGateway(settings, workdir)` starts it (a context manager), waits for `/readyz`, and gives its
URL, its pid and those of its children (decode workers), their resident memory, and its log. The
process gets `TMPDIR=<workdir>/tmp`, so every temporary file it creates (spooled uploads included)
lands in a folder the test can inspect. `kill()` sends SIGKILL, `start()` starts it again on the same
port. Output goes to `<workdir>/gateway.log` (a file, so a chatty server never blocks on a full pipe).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children_of(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found += [int(child) for child in children.read().split()]
        except OSError:
            continue
    return found


class LiveGateway:
    """One gateway process serving `settings` (host and port are chosen here)."""

    def __init__(self, settings: Settings, workdir: Path, *, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": self.port, "workers": 1})
        self.workdir = Path(workdir)
        self.tmp_dir = self.workdir / "tmp"
        self.log_path = self.workdir / "gateway.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.tmp_at_start: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 180.0) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        script = ("from service.server import serve; from service.settings import Settings; "
                  f"serve(Settings.model_validate_json({self.settings.model_dump_json()!r}))")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FSAR_")}
        env.update(TMPDIR=str(self.tmp_dir), PYTHONUNBUFFERED="1", **self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with code {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.tmp_at_start = self.tmp_entries()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the gateway was not ready within {timeout_s:.0f} s:\n{self.log()[-3000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        return children_of(self.pid) if self.alive() else []

    def rss_mb(self) -> dict[str, float]:
        """`{"gateway": MB, "workers": MB of all child processes together}`."""
        return {"gateway": rss_mb(self.pid), "workers": sum(rss_mb(child) for child in self.children())}

    def tmp_entries(self) -> list[str]:
        """Names in the gateway's temporary folder."""
        return sorted(os.listdir(self.tmp_dir))

    def new_tmp_entries(self) -> list[str]:
        """Names in the temporary folder that were not there when the gateway became ready (torch makes a
        cache folder there at import)."""
        return sorted(set(self.tmp_entries()) - set(self.tmp_at_start))

    def open_tmp_files(self) -> list[str]:
        """Files under the temporary folder that the gateway holds open (deleted ones included)."""
        found = []
        fd_dir = f"/proc/{self.pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(str(self.tmp_dir)):
                found.append(target)
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if it takes more than 20 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as an OOM killer or a crashed host would."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "LiveGateway":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
