"""A real Triton Inference Server on this machine, without Docker (tests, demos, local runs).

The PyPI wheel ``nvidia-pytriton==0.7.0`` bundles a real ``tritonserver`` (Triton 2.51.0) with
the Python backend only. :func:`ensure_tritonserver` downloads the wheel once, unpacks it into a
cache folder and prepares two things the bundled server needs to run our Python-backend models:

* a backend folder holding the Python backend stub built for the running Python version;
* a *stub environment*: a small virtual environment that the stub's embedded interpreter adopts.
  The stub picks its ``sys.prefix`` by looking ``python3`` up on ``PATH`` (so it sees a
  virtualenv's site-packages when that virtualenv's ``bin`` comes first) and it ignores
  ``PYTHONPATH``. The stub is also built against NumPy 1.x: with NumPy 2 it reads every input
  tensor as a constant and rejects every output (``as_numpy`` gets a wrong item size). So the
  stub environment holds ``numpy<2`` first, then adds each folder listed in the ``FSAR_SYS_PATH``
  environment variable with ``site.addsitedir`` (a ``.pth`` file), which is how
  :class:`LocalTritonServer` hands it this project's site-packages (torch, open_clip) and the
  repository root (the ``training`` package). ``model.py`` files therefore import plainly, as they
  do in the production container where everything is installed into the image.

:class:`LocalTritonServer` starts the binary on free loopback ports, waits until
``/v2/health/ready`` answers, and always takes the server (and its stub processes) down again.
"""
from __future__ import annotations

import logging
import fcntl
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

from service.procs import free_port, kill_process_group, stop_process, wait_group_gone, with_parent_death_signal

PYTRITON_VERSION = "0.7.0"
TRITON_VERSION = "2.51.0"
MIN_GLIBC = (2, 35)
STUB_NUMPY_REQUIREMENT = "numpy<2"

log = logging.getLogger(__name__)
SYS_PATH_ENV = "FSAR_SYS_PATH"
_REPO_ROOT = Path(__file__).resolve().parents[1]
_DIST_DIRNAME = f"nvidia-pytriton-{PYTRITON_VERSION}"
_COMPLETE_MARKER = ".fsar-complete"
# Executed by the stub's interpreter at start-up (site.py runs `import` lines of .pth files).
# One line, no comprehension: .pth lines are exec'd in a function scope.
_SYS_PATH_PTH = (
    "import os, site; list(map(site.addsitedir, filter(None, "
    f"os.environ.get('{SYS_PATH_ENV}', '').split(os.pathsep))))\n"
)

PathLike = Union[str, os.PathLike]


class TritonUnavailableError(RuntimeError):
    """This platform cannot run the bundled Triton server (not x86_64 Linux, or glibc too old)."""


class TritonSetupError(RuntimeError):
    """Fetching or preparing the Triton distribution failed (download, unpack, stub environment)."""


class TritonStartError(RuntimeError):
    """The server exited or did not become ready in time; the message ends with its log tail."""


@dataclass(frozen=True)
class TritonDist:
    """Paths of an unpacked, ready-to-run Triton distribution.

    Attributes:
        root: the unpacked wheel (``pytriton/`` and ``nvidia_pytriton.libs/`` inside).
        tritonserver: the server binary.
        backends_dir: value for ``--backend-directory`` (``python/`` inside, with our stub).
        libs_dir: the wheel's bundled shared libraries (goes on ``LD_LIBRARY_PATH``).
        stub_env: virtual environment adopted by the Python backend stub (``bin/`` goes first
            on ``PATH``); it holds ``numpy<2`` and reads ``FSAR_SYS_PATH``.
        python_version: ``"3.11"`` style version the stub was chosen for.
    """

    root: Path
    tritonserver: Path
    backends_dir: Path
    libs_dir: Path
    stub_env: Path
    python_version: str


def check_platform() -> None:
    """Raise :class:`TritonUnavailableError` unless this is x86_64 Linux with glibc >= 2.35."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in ("x86_64", "amd64"):
        raise TritonUnavailableError(
            f"the bundled Triton server runs on x86_64 Linux only; this is {sys.platform}/{machine}. "
            "Run Triton in its container (nvcr.io/nvidia/tritonserver) instead."
        )
    libc, version = platform.libc_ver()
    if libc != "glibc":
        raise TritonUnavailableError(f"the bundled Triton server needs glibc; this system has {libc or 'an unknown libc'}.")
    found = tuple(int(part) for part in version.split(".")[:2])
    if found < MIN_GLIBC:
        raise TritonUnavailableError(
            f"the bundled Triton server needs glibc >= {MIN_GLIBC[0]}.{MIN_GLIBC[1]}; this system has {version}. "
            "Run Triton in its container (nvcr.io/nvidia/tritonserver) instead."
        )


def default_cache_dir() -> Path:
    """``$FSAR_CACHE_DIR/triton`` when set, else ``<repo>/.cache/triton``."""
    base = os.environ.get("FSAR_CACHE_DIR")
    return (Path(base) if base else _REPO_ROOT / ".cache") / "triton"


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialise preparation of one cache folder across processes."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise TritonSetupError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _find_or_download_wheel(cache: Path) -> Path:
    """The wheel from ``$FSAR_TRITON_WHEEL``, the cache, or ``pip download`` (in that order)."""
    explicit = os.environ.get("FSAR_TRITON_WHEEL")
    if explicit:
        if not Path(explicit).is_file():
            raise TritonSetupError(f"FSAR_TRITON_WHEEL={explicit} is not a file")
        return Path(explicit)
    wheels = cache / "wheels"
    pattern = f"nvidia_pytriton-{PYTRITON_VERSION}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              f"nvidia-pytriton=={PYTRITON_VERSION}", "-d", str(wheels)],
             f"downloading nvidia-pytriton=={PYTRITON_VERSION} from PyPI (or set FSAR_TRITON_WHEEL to a local copy)")
        found = sorted(wheels.glob(pattern))
        if not found:
            raise TritonSetupError(f"pip download finished but no {pattern} appeared in {wheels}")
    return found[-1]


def _unpack_wheel(wheel: Path, dest: Path) -> None:
    """Unzip ``wheel`` into ``dest`` (atomically via a temporary folder), keeping exec bits."""
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                target = archive.extract(info, tmp)
                mode = (info.external_attr >> 16) & 0o777
                if mode and not info.is_dir():
                    os.chmod(target, mode | 0o600)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for binary in (dest / "pytriton" / "tritonserver" / "bin").glob("*"):
        binary.chmod(binary.stat().st_mode | 0o755)


def _prepare_backends(server_dir: Path, py_version: str) -> Path:
    """A backend directory whose ``python/`` holds the stub for ``py_version``.

    One folder per Python version (``backends-py3.11``), beside the wheel's own ``backends/`` so
    the stub's relative RPATH to ``nvidia_pytriton.libs`` still resolves.
    """
    stub = server_dir / "python_backend_stubs" / py_version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (server_dir / "python_backend_stubs").iterdir())
        raise TritonSetupError(
            f"nvidia-pytriton {PYTRITON_VERSION} has no Python backend stub for Python {py_version} "
            f"(it has {', '.join(available)})"
        )
    backends = server_dir / f"backends-py{py_version}"
    python_dir = backends / "python"
    if not (python_dir / "triton_python_backend_stub").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=server_dir))
        shutil.copytree(server_dir / "backends" / "python", tmp / "python")
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        (tmp / "python" / "triton_python_backend_stub").chmod(0o755)
        if backends.exists():
            shutil.rmtree(backends)
        tmp.rename(backends)
    return backends


def _prepare_stub_env(cache: Path, py_version: str) -> Path:
    """The virtual environment the Python backend stub adopts (see the module docstring)."""
    env_dir = cache / f"stub-env-py{py_version}"
    base = getattr(sys, "_base_executable", sys.executable)
    stamp = f"{base}\n{sys.version}\n{STUB_NUMPY_REQUIREMENT}\n{_SYS_PATH_PTH}"
    marker = env_dir / _COMPLETE_MARKER
    if marker.is_file() and marker.read_text() == stamp:
        return env_dir
    if env_dir.exists():
        shutil.rmtree(env_dir)
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], "creating the stub environment")
    site_packages = env_dir / "lib" / f"python{py_version}" / "site-packages"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
          "--target", str(site_packages), STUB_NUMPY_REQUIREMENT],
         f"installing {STUB_NUMPY_REQUIREMENT} for the Python backend stub")
    (site_packages / "fsar_sys_path.pth").write_text(_SYS_PATH_PTH)
    marker.write_text(stamp)
    return env_dir


def ensure_tritonserver(cache_dir: Optional[PathLike] = None) -> TritonDist:
    """Find or fetch the ``nvidia-pytriton`` wheel's Triton server and make it runnable here.

    Args:
        cache_dir: where the wheel is unpacked; default :func:`default_cache_dir`. Reused when
            present, so only the first call downloads (about 55 MB) and unpacks (about 145 MB).

    Returns:
        The paths of the server, its backends, its libraries and the stub environment.

    Raises:
        TritonUnavailableError: this platform cannot run the bundled server.
        TritonSetupError: the wheel could not be downloaded or prepared.
    """
    check_platform()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache.resolve()
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with _locked(cache):
        root = cache / _DIST_DIRNAME
        if not (root / _COMPLETE_MARKER).is_file():
            _unpack_wheel(_find_or_download_wheel(cache), root)
            (root / _COMPLETE_MARKER).write_text(PYTRITON_VERSION)
        server_dir = root / "pytriton" / "tritonserver"
        backends = _prepare_backends(server_dir, py_version)
        stub_env = _prepare_stub_env(cache, py_version)
    return TritonDist(
        root=root,
        tritonserver=server_dir / "bin" / "tritonserver",
        backends_dir=backends,
        libs_dir=root / "nvidia_pytriton.libs",
        stub_env=stub_env,
        python_version=py_version,
    )


def default_sys_path() -> list[str]:
    """Folders the stub adds to its ``sys.path``: this interpreter's site-packages + repo root."""
    folders = [p for p in sysconfig.get_paths().values() if p.endswith("site-packages")]
    folders = list(dict.fromkeys(folders))  # purelib and platlib are often the same folder
    return folders + [str(_REPO_ROOT)]


class LocalTritonServer:
    """A ``tritonserver`` process on loopback ports, as a context manager.

    ``with LocalTritonServer(repo) as server:`` starts it, waits until every model is ready and
    stops it on exit. The server runs in its own process group (its Python backend stubs too),
    which :meth:`stop` kills; a finalizer (also run at interpreter exit) and a parent-death signal make sure no process
    outlives the Python process that started it (start it from the main thread: the kernel
    signals when the *starting thread* exits).

    Args:
        repository: the model repository folder.
        http_port, grpc_port, metrics_port: fixed ports; free ones are picked when ``None``.
        log_path: where the server's stdout/stderr go; default a temporary file.
        extra_env: extra environment variables for the server and its model stubs.
        models: names to load (``--load-model`` each); default every model (``'*'``).
        sys_path: folders the stubs add to ``sys.path`` (``FSAR_SYS_PATH``); default
            :func:`default_sys_path`.
        cache_dir: passed to :func:`ensure_tritonserver`.
        ready_timeout_s: how long :meth:`start` waits for ``/v2/health/ready``.
        exit_timeout_s: ``--exit-timeout-secs``: how long a stopping server waits for in-flight
            requests and model unloading. Python-backend models take about 5 s to unload; a
            local server need not wait for that (its stubs exit with it, shared memory is freed).
    """

    def __init__(
        self,
        repository: PathLike,
        *,
        http_port: Optional[int] = None,
        grpc_port: Optional[int] = None,
        metrics_port: Optional[int] = None,
        log_path: Optional[PathLike] = None,
        extra_env: Optional[Mapping[str, str]] = None,
        models: Optional[Sequence[str]] = None,
        sys_path: Optional[Sequence[str]] = None,
        cache_dir: Optional[PathLike] = None,
        ready_timeout_s: float = 180.0,
        exit_timeout_s: int = 1,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} is not a folder")
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.http_port = http_port or 0
        self.grpc_port = grpc_port or 0
        self.metrics_port = metrics_port or 0
        self._log_is_temp = log_path is None
        self.log_path = Path(log_path) if log_path is not None else None
        self.extra_env = dict(extra_env or {})
        self.models = list(models) if models else ["*"]
        self.sys_path = list(sys_path) if sys_path is not None else default_sys_path()
        self.cache_dir = cache_dir
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.startup_s: Optional[float] = None
        self._last_log = ""
        self._proc: Optional[subprocess.Popen] = None
        self._finalizer: Optional[weakref.finalize] = None

    # ------------------------------------------------------------------ addresses
    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc`` / ``tritonclient.grpc.aio``."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` for ``tritonclient.http`` (no scheme, as tritonclient expects)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> Optional[int]:
        """The server's process id (also its process group id), ``None`` when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def command(self, dist: TritonDist) -> list[str]:
        """The ``tritonserver`` command line for the current ports."""
        cmd = [
            str(dist.tritonserver),
            "--model-repository", str(self.repository),
            "--backend-directory", str(dist.backends_dir),
            "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
            "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
            "--model-control-mode", "explicit",
            # Our configs are complete; skipping auto-complete saves one stub start per model.
            "--disable-auto-complete-config",
            "--exit-timeout-secs", str(self.exit_timeout_s),
        ]
        for name in self.models:
            cmd += ["--load-model", name]
        return cmd

    def environment(self, dist: TritonDist) -> dict[str, str]:
        """The server's environment: libraries, the stub environment first on PATH, FSAR_SYS_PATH."""
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        ld_path = [str(dist.libs_dir), libdir, env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld_path if p)
        env["PATH"] = os.pathsep.join([str(dist.stub_env / "bin"), env.get("PATH", "")])
        env[SYS_PATH_ENV] = os.pathsep.join(self.sys_path)
        env.update(self.extra_env)
        return env

    def start(self) -> "LocalTritonServer":
        """Start the server and wait until it is ready; idempotent while it runs.

        Raises:
            TritonStartError: the server exited or was not ready within ``ready_timeout_s``.
        """
        if self.running:
            return self
        dist = ensure_tritonserver(self.cache_dir)
        attempts = 3
        for attempt in range(attempts):
            http_port, grpc_port, metrics_port = self._fixed_ports
            self.http_port = http_port or free_port()
            self.grpc_port = grpc_port or free_port()
            self.metrics_port = metrics_port or free_port()
            try:
                self._launch(dist)
                return self
            except TritonStartError as err:
                # A picked port taken between probing and binding; or the Python backend's intermittent
                # abort while its stubs start (boost::interprocess::lock_exception, seen once in ~20 local
                # starts; triton-inference-server/server#8882): both pass on a fresh start.
                # Also a crash by a signal before it was ready with nothing logged (SIGSEGV seen once when
                # a killed server was restarted on its ports under heavy load): a fresh start passes.
                retry_ports = "already in use" in str(err) and not all(self._fixed_ports)
                crashed = "exited with code -" in str(err)
                if attempt + 1 < attempts and (retry_ports or crashed or "lock_exception" in str(err)):
                    continue
                raise
        raise AssertionError("unreachable")

    def _launch(self, dist: TritonDist) -> None:
        if self._log_is_temp:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                with_parent_death_signal(self.command(dist)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(dist), cwd=str(self.repository),
                start_new_session=True,
            )
        pgid = self._proc.pid
        # Runs when this object is collected or, at the latest, when the interpreter exits.
        self._finalizer = weakref.finalize(self, kill_process_group, pgid)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {code} before it was ready "
                    f"(repository {self.repository}); log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - started > self.ready_timeout_s:
                raise TritonStartError(
                    f"tritonserver was not ready after {self.ready_timeout_s:.0f} s "
                    f"(repository {self.repository}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server (SIGTERM), then kill its whole process group. Safe to repeat."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc, timeout_s)  # the leader, and any stub left behind
        if not wait_group_gone(proc.pid):
            log.warning("processes of the Triton server's group %d were still alive after stop()", proc.pid)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_is_temp and self.log_path is not None and self.log_path.exists():
            kept = self.log_path.read_bytes()[-200_000:]
            self._last_log = kept.decode(errors="replace")
            self.log_path.unlink()

    def log_tail(self, max_lines: int = 25) -> str:
        """The server log's error lines, then its last ``max_lines`` lines, tables compacted."""
        if self.log_path is not None and self.log_path.exists():
            text = self.log_path.read_bytes()[-200_000:].decode(errors="replace")
        else:
            text = self._last_log
        lines = [re.sub(r"\s{2,}", " ", line).strip() for line in text.splitlines()]
        lines = [line for line in lines if line and not line.startswith(("+-", "| "))
                 or "UNAVAILABLE" in line]
        errors = [line for line in lines if re.match(r"E\d{4} ", line) or "UNAVAILABLE" in line]
        parts = []
        if errors:
            parts.append("errors:\n" + "\n".join(errors[-10:]))
        parts.append(f"last {max_lines} lines:\n" + "\n".join(lines[-max_lines:]))
        return "\n".join(parts)

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalTritonServer({self.repository}, grpc={self.grpc_url}, {state})"
