"""A real gateway process for tests: :class:`service.harness.LiveGateway` in a test's folder.

`LiveGateway(settings, workdir)` starts it (a context manager) on a free loopback port, waits for
`/readyz`, and gives its URL, its pid and those of its children (decode workers), their resident
memory, and its log. The process gets `TMPDIR=<workdir>/tmp`, so every temporary file it creates
(spooled uploads included) lands in a folder the test can inspect. `kill()` sends SIGKILL, `start()`
starts it again on the same port. Output goes to `<workdir>/gateway.log`.
"""
from __future__ import annotations

import os
from pathlib import Path

from service import harness
from service.harness import free_port
from service.settings import Settings

__all__ = ["LiveGateway", "free_port"]


class LiveGateway(harness.LiveGateway):
    """One gateway process serving `settings` (host and port are chosen here), in `workdir`."""

    def __init__(self, settings: Settings, workdir: Path, *, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        super().__init__(settings, env=env, log_path=self.workdir / "gateway.log", tmp_dir=self.workdir / "tmp")
        self.tmp_at_start: list[str] = []

    def start(self, timeout_s: float | None = None) -> LiveGateway:
        super().start(timeout_s)
        self.tmp_at_start = self.tmp_entries()
        return self

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
