"""Decoding off the event loop: a pool of `spawn`ed worker processes with a hard time limit per job.

Why processes and not threads: the decoder's own time budget (`DecodeLimits.time_budget_s`) is
checked between packets and frames, so it bounds every slow file we can make, but a PyAV/FFmpeg call
that wedges inside C (or crashes the interpreter) cannot be abandoned from a thread: it would keep a
decode thread forever, or take the whole gateway down. A worker process can be killed.

`ProcessDecodePool` (the default, setting `decode_isolation=process`):
- `workers` processes, each a fresh interpreter (fork+exec, as multiprocessing's `spawn`: a plain `fork`
  after PyAV was used in the parent can hang, docs/performance.md) that imports only numpy and `training.video`
  (no torch) and dies with the gateway;
- one job per worker at a time; the job's arguments and result travel through a socket pair (pickled
  by our own code on both ends, never data from a client). The gateway's uploads are files on disk
  (`service.api.deps.stored_uploads`): a job gets the file's path and the worker opens it
  (`decode_file`), so an upload's bytes never pass through the gateway's memory or the socket. Large
  byte arguments (in-process callers that decode bytes) are sent as raw bytes straight from the
  caller's buffer, with no pickled copy;
- a job that has not answered `hard_timeout_s` after it was sent is abandoned: its worker is killed
  (SIGKILL) and replaced, and the caller gets `DecodeTimeoutError` (415 `timeout`);
- a worker that dies during a job (a crash in C) is replaced and the caller gets
  `CorruptedVideoError` (415 `corrupted`);
- a worker is recycled after `max_jobs_per_worker` jobs or when its resident memory passes
  `max_worker_rss_mb`, so slow leaks in native code cannot grow without bound.
`ThreadDecodePool` (`decode_isolation=thread`) runs the same calls in threads, without the hard limit.

Both expose `await pool.run(fn, *args, **kwargs)`, where `fn` is a module-level function (it is sent
to the worker by reference), and `await pool.close()`.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Callable

from service.errors import ServiceUnavailable
from training.video import CorruptedVideoError, DecodeTimeoutError, VideoDecodeError, decode_clip

log = logging.getLogger(__name__)

#: How long a fresh worker may take to import its modules and say it is ready.
WORKER_START_TIMEOUT_S = 60.0
#: Byte arguments at least this long travel as raw bytes after the pickled job (no pickled copy).
BLOB_MIN_BYTES = 64 * 1024


class _Blob:
    """Stands in the pickled job for the `index`-th raw byte argument sent after it."""

    def __init__(self, index: int) -> None:
        self.index = index


def decode_file(path: str, *args: Any, **kwargs: Any) -> Any:
    """`decode_clip` of the upload stored at `path`, opened here (in the worker, or the decode thread).

    The file goes to FFmpeg as an open file object with no path-like name, exactly as bytes do (in
    a BytesIO): FFmpeg takes a source's name as its URL, and some demuxers act on it (HLS is only
    probed for names ending in .m3u8, concat resolves the files it lists relative to it), so the
    decoder sees the same thing whether the upload came as bytes or through a file. (`OSError` if the
    file is gone: the gateway removes it only once its request has ended.)"""
    with open(os.open(path, os.O_RDONLY), "rb") as file:  # its name: the descriptor's number, not the path
        return decode_clip(file, *args, **kwargs)


def decode_windows_file(path: str, *args: Any, **kwargs: Any) -> Any:
    """`decode_windows` of the upload stored at `path`, opened as `decode_file` opens it."""
    from training.video import decode_windows

    with open(os.open(path, os.O_RDONLY), "rb") as file:
        return decode_windows(file, *args, **kwargs)


class DecoderUnavailable(ServiceUnavailable):
    """No decode worker could be started (503)."""

    code = "decoder_unavailable"


def _worker_main(fd: int, parent_pid: int) -> None:
    """A decode worker: answer `(fn, args, kwargs)` jobs on the socket `fd` until told to stop (None)
    or the gateway goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server; the server stops us
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s decode-worker[{os.getpid()}] %(name)s: %(message)s")
    import training.video  # noqa: F401  (import once, before the first job's clock starts)

    conn = Connection(fd)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args, kwargs, blob_count = job
        blobs = [conn.recv_bytes() for _ in range(blob_count)]
        args = tuple(blobs[a.index] if isinstance(a, _Blob) else a for a in args)
        kwargs = {k: blobs[v.index] if isinstance(v, _Blob) else v for k, v in kwargs.items()}
        del blobs
        try:
            reply: tuple = ("ok", fn(*args, **kwargs))
        except VideoDecodeError as err:
            reply = ("error", err)
        except BaseException as err:  # a bug or bad arguments: reported, the worker lives on
            reply = ("failure", f"{type(err).__name__}: {err}")
        try:
            conn.send(reply)
        except Exception as err:  # an unpicklable result or exception
            conn.send(("failure", f"cannot send the result back: {type(err).__name__}: {err}"))


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when the gateway dies (even by SIGKILL), so a worker
    wedged in C is never orphaned. Elsewhere the closed socket ends idle workers.

    The kernel sends the signal when the *thread* that started the worker ends: workers are started
    from the thread that creates the pool or from the pool's own waiting threads, which both live as
    long as the pool."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the gateway died before prctl took effect
        os._exit(0)


def _rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class _Worker:
    """One worker process (a fresh interpreter: fork+exec, like multiprocessing's `spawn`, but without
    re-importing the gateway's `__main__`) and the gateway's end of its socket."""

    def __init__(self, number: int) -> None:
        parent_sock, child_sock = socket.socketpair()
        code = f"from service.decode_pool import _worker_main; _worker_main({child_sock.fileno()}, {os.getpid()})"
        # Workers parse untrusted bytes: they get no gateway settings (API keys, Redis password) in their
        # environment, and the gateway's import path so that they import the same code.
        env = {name: value for name, value in os.environ.items() if not name.startswith("FSAR_")}
        env["PYTHONPATH"] = os.pathsep.join(path or os.getcwd() for path in sys.path)
        try:
            self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child_sock.fileno()],
                                            env=env, stdin=subprocess.DEVNULL)
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.number = number
        self.ready = False
        self.jobs = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            raise DecoderUnavailable(f"a decode worker did not start within {timeout_s:g} s.")
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as err:
            raise DecoderUnavailable(f"a decode worker died while starting (exit code "
                                     f"{self.process.poll()}).") from err
        if message[0] != "ready":
            raise DecoderUnavailable(f"a decode worker sent {message[0]!r} instead of 'ready'.")
        self.ready = True

    def stop(self, timeout_s: float = 2.0) -> None:
        """Ask the worker to exit; kill it if it does not."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            log.error("decode worker pid %s did not die after SIGKILL", self.pid)
        self.conn.close()


class ProcessDecodePool:
    """Decode jobs in `workers` spawned processes; a job over `hard_timeout_s` kills its worker."""

    kind = "process"

    def __init__(self, workers: int, hard_timeout_s: float, *, max_jobs_per_worker: int = 1000,
                 max_worker_rss_mb: float = 1024.0,
                 on_restart: Callable[[str], None] | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if hard_timeout_s <= 0:
            raise ValueError("hard_timeout_s must be > 0")
        self.workers = workers
        self.hard_timeout_s = hard_timeout_s
        self.max_jobs_per_worker = max_jobs_per_worker
        self.max_worker_rss_mb = max_worker_rss_mb
        self._on_restart = on_restart
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._started = 0
        self._closed = False
        self.restarts: dict[str, int] = {"timeout": 0, "crash": 0, "recycled": 0}
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsar-decode-wait")
        for _ in range(workers):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        with self._lock:
            self._started += 1
            worker = _Worker(self._started)
            self._all.add(worker)
        return worker

    def _replace(self, worker: _Worker, reason: str, *, kill: bool) -> None:
        """Retire `worker` and put a fresh one in its place (unless the pool is closing)."""
        with self._lock:
            self._all.discard(worker)
        if kill:
            worker.kill()
        else:  # a healthy worker: let it exit in the background, the caller has its result
            threading.Thread(target=worker.stop, name="fsar-decode-retire", daemon=True).start()
        self.restarts[reason] += 1
        if self._on_restart is not None:
            self._on_restart(reason)
        if not self._closed:
            self._idle.put(self._spawn())

    # ------------------------------------------------------------------ running jobs
    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` in a worker process; raises what `fn` raised if it is a
        `VideoDecodeError`, `DecodeTimeoutError` after `hard_timeout_s`, `CorruptedVideoError` if the
        worker died, `RuntimeError` for any other failure inside `fn`."""
        if self._closed:
            raise DecoderUnavailable("The decoder is shutting down.")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(self._run_blocking, fn, args, kwargs))

    def _run_blocking(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        blobs: list[bytes | bytearray | memoryview] = []

        def lift(value: Any) -> Any:
            if isinstance(value, (bytes, bytearray, memoryview)) and len(value) >= BLOB_MIN_BYTES:
                blobs.append(value)
                return _Blob(len(blobs) - 1)
            return value

        job = (fn, tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}, len(blobs))
        worker = self._next_idle()
        returned = False
        try:
            for attempt in range(2):  # a worker that died while idle is replaced and the job sent again
                try:
                    worker.wait_ready(WORKER_START_TIMEOUT_S)
                    worker.conn.send(job)
                    for blob in blobs:
                        worker.conn.send_bytes(blob)
                    break
                except (DecoderUnavailable, OSError) as err:
                    log.warning("decode worker pid %s unusable (%s); replacing it", worker.pid, err)
                    self._replace(worker, "crash", kill=True)
                    returned = True
                    if attempt == 1 or self._closed:
                        raise DecoderUnavailable("no decode worker could take the job") from err
                    worker, returned = self._next_idle(), False
            worker.jobs += 1
            if not worker.conn.poll(self.hard_timeout_s):
                log.warning("decode job exceeded its hard limit of %.1f s: killing worker pid %s",
                            self.hard_timeout_s, worker.pid)
                self._replace(worker, "timeout", kill=True)
                returned = True
                raise DecodeTimeoutError(f"decoding took longer than the hard limit of {self.hard_timeout_s:g} s "
                                         "and was abandoned")
            try:
                status, value = worker.conn.recv()
            except (EOFError, OSError) as err:
                if self._closed:  # killed by close(): not the file's fault
                    returned = True
                    raise DecoderUnavailable("The decoder is shutting down; retry on another replica.") from err
                exitcode = worker.process.poll()
                log.warning("decode worker pid %s died during a job (exit code %s); replacing it",
                            worker.pid, exitcode)
                self._replace(worker, "crash", kill=True)
                returned = True
                raise CorruptedVideoError("the video cannot be decoded (the decoder crashed on it)") from err
            if worker.jobs >= self.max_jobs_per_worker or _rss_mb(worker.pid) > self.max_worker_rss_mb:
                self._replace(worker, "recycled", kill=False)
                returned = True
        finally:
            if not returned:
                self._idle.put(worker)
        if status == "ok":
            return value
        if status == "error":
            raise value
        raise RuntimeError(f"decode worker failure: {value}")

    def _next_idle(self) -> _Worker:
        """An idle worker (waits for one); `DecoderUnavailable` once the pool is closing."""
        while True:
            try:
                return self._idle.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    raise DecoderUnavailable("The decoder is shutting down; retry on another replica.") from None

    # ------------------------------------------------------------------ facts and shutdown
    def describe(self) -> dict[str, Any]:
        """`{"kind", "workers", "alive", "restarts": {reason: count}}` (alive: worker processes running)."""
        with self._lock:
            alive = sum(1 for worker in self._all if worker.is_alive())
        return {"kind": self.kind, "workers": self.workers, "alive": alive, "restarts": dict(self.restarts)}

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [worker.pid for worker in self._all]

    async def close(self) -> None:
        """Stop every worker (those busy with a job are killed) and release the waiting threads."""
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._close_blocking)

    def _close_blocking(self) -> None:
        deadline = time.monotonic() + 2.0
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        idle = set()
        while True:
            try:
                idle.add(self._idle.get_nowait())
            except queue.Empty:
                break
        for worker in workers:
            if worker in idle:
                worker.stop(max(0.1, deadline - time.monotonic()))
            else:
                worker.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)


class ThreadDecodePool:
    """The same interface on a thread pool: no process overhead, no hard limit (the decoder's own
    time budget, checked between packets, is the only bound)."""

    kind = "thread"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsar-decode")

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "workers": self.workers}

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


DecodePool = ProcessDecodePool | ThreadDecodePool


def hard_timeout_for(decode_timeout_s: float) -> float:
    """The hard limit of one decode job: the decoder's own budget plus a margin for moving the
    upload and the frames through the pipe, so the decoder's clean `timeout` error normally wins."""
    return decode_timeout_s * 1.25 + 2.0
