"""Jobs: classifications worked in the background (`POST /jobs`), with progress, cancel and callbacks.

A job is one JSON record in the store (`keys.job_key`, tenant-scoped, `job_ttl_s` from its last
change) plus its video, moved out of the request's temporary file into `{job_dir}/{id}/video` so it
outlives the request; the folder is removed when the job ends. States:

    queued -> running -> succeeded | failed        (cancelled from queued or running)

Every change is a guarded write (`revision`), so a cancel and a finishing worker never both win.

Ownership: a job is worked by the gateway process that received it (its video is on that replica's
disk); the record says so (`owner` = host name and job folder). Replicas sharing Redis see and
cancel each other's jobs (a cancel is written to the record; the owner's worker polls it), but
only the owner works them. On start-up a process re-queues its own `queued` and `running` jobs
whose video is still in `job_dir`, and fails those whose video is gone (`job_upload_lost`) or that
were started `MAX_STARTS` times already (`job_interrupted`: a video that kills the gateway cannot
crash-loop it). A replica that never comes back leaves its jobs queued until `job_ttl_s`: give each
replica a stable host name and a persistent `job_dir`.

The queue is per process (`max_queued_jobs`, then 429 with `Retry-After`) and worked by
`job_workers` tasks; the work itself is a `Runner` given by the API layer (a classification,
rendered as the `POST /classify` body), which reports progress through a `Progress` callback.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping, Protocol

from service.core import keys
from service.core.uploads import Upload
from service.errors import ApiError, NotFound, StoreUnavailable
from service.settings import Settings
from service.store.base import Batch, Store, StoreConflict, StoreDataError
from service.webhooks import CallbackRefused, check_callback_url, deliver, parse_secrets, tenant_secret

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})
#: How often a running job's record is read for a cancel written by another replica.
CANCEL_POLL_S = 0.5
#: Starts of one job (re-queued after restarts) before it is failed as `job_interrupted`.
MAX_STARTS = 3
#: How long a worker keeps retrying a write while the store is unreachable.
STORE_RETRY_S = 120.0
#: The file a job's video is kept in, inside its folder.
VIDEO_NAME = "video"
#: Fields of a record that are shown to clients (`public`).
PUBLIC_FIELDS = ("id", "state", "created_at", "updated_at", "started_at", "finished_at", "progress", "request",
                 "result", "error", "status", "callback_url", "callback")


class Progress(Protocol):
    """Called by a runner: `done_s` of `total_s` video-seconds are done (total None: not known yet)."""

    def __call__(self, done_s: float, total_s: float | None) -> Awaitable[None]: ...


#: The work of one job: (video, tenant, request fields, progress) -> the result body.
Runner = Callable[[Upload, "str | None", Mapping[str, Any], Progress], Awaitable[dict[str, Any]]]


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job '{job_id}' does not exist (it may have expired or been deleted).")


class JobQueueFull(ApiError):
    """This gateway's job queue is full (429 with Retry-After)."""

    status, code = 429, "job_queue_full"


class JobCancelled(Exception):
    """The job's record says it was cancelled (or it is gone): stop working on it."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def public(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a client sees of a job record (absent fields stay absent)."""
    return {name: record[name] for name in PUBLIC_FIELDS if record.get(name) is not None}


def default_job_dir(settings: Settings) -> str:
    """`job_dir`, else `fsar-jobs` in `upload_dir` (else in the system temporary folder)."""
    return settings.job_dir or os.path.join(settings.upload_dir or tempfile.gettempdir(), "fsar-jobs")


class Jobs:
    """The job queue of one gateway process: submit, read, cancel, work, recover."""

    def __init__(self, settings: Settings, store: Store, runner: Runner) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.directory = os.path.abspath(default_job_dir(settings))
        self.owner = f"{socket.gethostname()}:{self.directory}"
        self.secrets = parse_secrets(settings.webhook_secrets)
        self._queue: asyncio.Queue[tuple[str | None, str]] = asyncio.Queue()
        self._waiting: set[str] = set()  # ids queued here and not cancelled; with _reserved: max_queued_jobs
        self._reserved = 0  # submissions in progress
        self._workers: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._running: dict[str, asyncio.Task] = {}
        self._run_s = 5.0  # moving average of a job's duration, for Retry-After
        self._closing = False

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Start the workers and, in the background, recover this replica's jobs. (The job folder is made
        with the first job, so a gateway that runs none leaves nothing in `upload_dir`.)"""
        self._workers = [asyncio.create_task(self._work(), name=f"fsar-job-worker-{n}")
                         for n in range(self.settings.job_workers)]
        self._spawn(self._recover_when_reachable())

    async def close(self) -> None:
        """Stop the workers; a job running now stays `running` in the store and is re-queued on start-up."""
        self._closing = True
        tasks = [*self._workers, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()

    def describe(self) -> dict[str, Any]:
        return {"workers": self.settings.job_workers, "waiting": len(self._waiting), "running": len(self._running)}

    # ------------------------------------------------------------------ the API's operations
    async def check_callback(self, url: str, tenant: str | None) -> None:
        """Refuse (422) a callback URL that cannot be signed or may not be called."""
        if tenant_secret(self.secrets, tenant) is None:
            raise CallbackRefused("callback_url: callbacks are not configured on this server (webhook_secrets).")
        await check_callback_url(url, allow_private=self.settings.webhook_allow_private)

    async def submit(self, upload: Upload, request: Mapping[str, Any], *, tenant: str | None,
                     callback_url: str | None = None) -> dict[str, Any]:
        """Queue a job for `upload` (a file on disk, moved into the job's folder) with the request
        fields `request`; returns its public record. JobQueueFull (429) past `max_queued_jobs`."""
        if upload.path is None:
            raise ValueError("a job's upload must be a file")
        self._reserve()
        job_id = uuid.uuid4().hex
        folder = os.path.join(self.directory, job_id)
        try:
            path = await asyncio.to_thread(self._keep, upload.path, folder)
            created = _now()
            record = {"id": job_id, "state": QUEUED, "revision": 1, "created_at": created, "updated_at": created,
                      "request": dict(request), "callback_url": callback_url, "tenant": tenant,
                      "owner": self.owner, "starts": 0, "progress": {"done_s": 0.0, "total_s": None},
                      "upload": {"path": path, "filename": upload.filename, "size": upload.size,
                                 "sha256": upload.sha256}}
            await self.store.write_batch(Batch().json(keys.job_key(tenant, job_id), record),
                                         self.settings.job_ttl_s, guard=(keys.job_key(tenant, job_id), None))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            self._reserved -= 1
        self._enqueue(tenant, job_id)
        return public(record)

    async def get(self, job_id: str, *, tenant: str | None) -> dict[str, Any]:
        """The public record of a job of `tenant` (JobNotFound otherwise)."""
        record = await self._load(tenant, job_id)
        if record is None:
            raise JobNotFound(job_id)
        return public(record)

    async def cancel(self, job_id: str, *, tenant: str | None) -> dict[str, Any] | None:
        """Cancel a queued or running job (its record, `cancelled`, is returned) or delete a finished
        one (None). A running job stops at its next await (cooperatively)."""
        for _ in range(5):
            record = await self._load(tenant, job_id)
            if record is None:
                raise JobNotFound(job_id)
            if record["state"] in FINISHED:
                await self.store.delete([keys.job_key(tenant, job_id)])
                return None
            try:
                record = await self._write(record, state=CANCELLED, finished_at=_now(),
                                           error={"code": "cancelled", "message": "The job was cancelled."})
            except StoreConflict:
                continue  # it changed meanwhile (progress, finished): look again
            self._waiting.discard(job_id)
            task = self._running.get(job_id)
            if task is not None:
                task.cancel()
            elif record.get("owner") == self.owner:
                self._remove_files(record)
            self._spawn(self._callback(record))
            return public(record)
        raise StoreConflict(f"Job '{job_id}' kept changing; retry the request.")

    # ------------------------------------------------------------------ queue
    def _reserve(self) -> None:
        waiting = len(self._waiting) + self._reserved
        if waiting >= self.settings.max_queued_jobs:
            wait_s = min(600, max(1, math.ceil(self._run_s * waiting / self.settings.job_workers)))
            raise JobQueueFull(f"The job queue is full ({waiting} jobs waiting); retry in {wait_s} s.",
                               headers={"Retry-After": str(wait_s)})
        self._reserved += 1

    def _enqueue(self, tenant: str | None, job_id: str) -> None:
        self._waiting.add(job_id)
        self._queue.put_nowait((tenant, job_id))

    @staticmethod
    def _keep(source: str, folder: str) -> str:
        """Move the request's upload file into the job's folder (it outlives the request there)."""
        os.makedirs(folder, mode=0o700)
        target = os.path.join(folder, VIDEO_NAME)
        try:
            os.replace(source, target)
        except OSError:  # another file system: copy, then the request removes its own file
            shutil.copyfile(source, target)
        return target

    async def _work(self) -> None:
        while True:
            tenant, job_id = await self._queue.get()
            self._waiting.discard(job_id)
            try:
                await self._run_one(tenant, job_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a worker survives anything one job does
                log.exception("job %s: unexpected error in its worker", job_id)

    async def _run_one(self, tenant: str | None, job_id: str) -> None:
        record = await self._retrying(lambda: self._load(tenant, job_id))
        if record is None or record["state"] != QUEUED:
            if record is None or record["state"] in FINISHED:
                self._remove_files(record or {"id": job_id})
            return
        holder = {"record": record}
        running = await self._retrying(lambda: self._advance(
            holder, state=RUNNING, started_at=_now(), starts=record.get("starts", 0) + 1,
            progress={"done_s": 0.0, "total_s": None}))
        if running is None:
            self._remove_files(record)  # cancelled meanwhile
            return
        started = time.monotonic()
        task = asyncio.create_task(self._execute(holder, tenant))
        self._running[job_id] = task
        try:
            outcome = await self._watch(task, tenant, job_id)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise  # shutdown: the record stays `running`; start-up re-queues it
        finally:
            self._running.pop(job_id, None)
        self._run_s = 0.8 * self._run_s + 0.2 * (time.monotonic() - started)
        if outcome is not None:
            final = await self._retrying(lambda: self._advance(holder, **outcome, finished_at=_now()))
            if final is not None:  # else cancelled or deleted meanwhile
                self._spawn(self._callback(final))
        self._remove_files(holder["record"])

    async def _watch(self, task: asyncio.Task, tenant: str | None, job_id: str) -> dict[str, Any] | None:
        """Wait for the job's task, cancelling it when its record says cancelled; the final fields
        (None: cancelled)."""
        while True:
            done, _ = await asyncio.wait({task}, timeout=CANCEL_POLL_S)
            if done:
                break
            try:
                current = await self._load(tenant, job_id)
            except StoreUnavailable:
                continue
            if current is None or current["state"] == CANCELLED:
                task.cancel()
        if task.cancelled():
            return None
        error = task.exception()
        if error is None:
            return {"state": SUCCEEDED, "result": task.result()}
        if isinstance(error, JobCancelled):
            return None
        if isinstance(error, ApiError):
            return {"state": FAILED, "error": {"code": error.code, "message": error.message}, "status": error.status}
        log.error("job %s failed with an unexpected error", job_id, exc_info=error)
        return {"state": FAILED, "status": 500,
                "error": {"code": "internal_error", "message": "Internal server error; it has been logged."}}

    async def _execute(self, holder: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        record = holder["record"]
        stored = record["upload"]
        upload = Upload(stored["filename"], path=stored["path"], size=stored["size"], sha256=stored["sha256"])

        async def progress(done_s: float, total_s: float | None) -> None:
            value = {"done_s": round(float(done_s), 3), "total_s": None if total_s is None else round(float(total_s), 3)}
            try:
                if await self._advance(holder, progress=value) is None:
                    raise JobCancelled()
            except StoreUnavailable:
                log.warning("job %s: progress not recorded (store unreachable)", record["id"])

        deadline, pause = time.monotonic() + STORE_RETRY_S, 0.5
        while True:  # an outage of the store is waited out, not reported as the job's failure
            try:
                result = await self.runner(upload, tenant, record.get("request") or {}, progress)
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
        done = holder["record"].get("progress") or {}
        total = done.get("total_s")
        holder["record"]["progress"] = {"done_s": total if total is not None else done.get("done_s", 0.0),
                                        "total_s": total}
        return result

    # ------------------------------------------------------------------ records
    async def _load(self, tenant: str | None, job_id: str) -> dict[str, Any] | None:
        if not keys.valid_job_id(job_id):
            return None
        try:
            record = await self.store.get_json(keys.job_key(tenant, job_id))
        except StoreDataError:
            return None
        return record if isinstance(record, dict) and "state" in record else None

    async def _write(self, record: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """Write `record` with `changes` if nobody changed it since it was read (StoreConflict else)."""
        updated = {**record, **changes, "revision": record["revision"] + 1, "updated_at": _now()}
        key = keys.job_key(record.get("tenant"), record["id"])
        await self.store.write_batch(Batch().json(key, updated), self.settings.job_ttl_s,
                                     guard=(key, record["revision"]))
        return updated

    async def _advance(self, holder: dict[str, Any], **changes: Any) -> dict[str, Any] | None:
        """Write `changes` on the job in `holder` (kept up to date there) unless it was cancelled or
        deleted meanwhile (None then). A write that changed the record without saying so (the
        connection dropped after Redis applied it) is read back and written on top of."""
        for _ in range(10):
            try:
                holder["record"] = await self._write(holder["record"], **changes)
                return holder["record"]
            except StoreConflict:
                record = holder["record"]
                current = await self._load(record.get("tenant"), record["id"])
                if current is None or current["state"] in FINISHED:
                    return None
                holder["record"] = current
        raise StoreConflict(f"job {holder['record']['id']} kept changing")

    async def _retrying(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        """`operation()`, retried with backoff for `STORE_RETRY_S` while the store is unreachable."""
        deadline, pause = time.monotonic() + STORE_RETRY_S, 0.25
        while True:
            try:
                return await operation()
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _remove_files(self, record: Mapping[str, Any]) -> None:
        folder = os.path.join(self.directory, str(record.get("id", "")))
        if keys.valid_job_id(str(record.get("id", ""))):
            shutil.rmtree(folder, ignore_errors=True)

    def _sweep(self, keep: set[str], before: float) -> None:
        """Remove job folders made before `before` that hold no job in `keep`."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                if keys.valid_job_id(name) and name not in keep and os.stat(path).st_mtime < before:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                continue

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ callbacks
    async def _callback(self, record: dict[str, Any]) -> None:
        """Deliver a finished job to its callback URL and note the outcome in its record."""
        url = record.get("callback_url")
        secret = tenant_secret(self.secrets, record.get("tenant"))
        if not url or secret is None:
            return
        outcome = await deliver(url, public(record), secret=secret, job_id=record["id"],
                                allow_private=self.settings.webhook_allow_private,
                                max_attempts=self.settings.webhook_max_attempts,
                                timeout_s=self.settings.webhook_timeout_s)
        for _ in range(5):
            current = await self._load(record.get("tenant"), record["id"])
            if current is None:
                return
            try:
                await self._write(current, callback=outcome.as_dict())
                return
            except StoreConflict:
                continue
            except StoreUnavailable:
                return

    # ------------------------------------------------------------------ start-up
    async def _recover_when_reachable(self) -> None:
        pause = 1.0
        while True:
            try:
                await self._recover()
                return
            except StoreUnavailable as err:
                log.warning("jobs: cannot recover queued jobs yet (%s); retrying", err.message)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)

    async def _recover(self) -> None:
        """Re-queue this replica's unfinished jobs whose video is still here; fail the others; remove
        the folders of jobs that ended while the gateway was being stopped."""
        began = time.time()
        found: list[dict[str, Any]] = []
        for pattern in keys.job_patterns():
            for key in await self.store.keys(pattern):
                parsed = keys.job_of_key(key)
                if parsed is None:
                    continue
                record = await self._load(*parsed)
                if record and record.get("owner") == self.owner and record["state"] not in FINISHED:
                    found.append(record)
        found.sort(key=lambda record: record.get("created_at", ""))
        requeued = failed = 0
        for record in found:
            path = (record.get("upload") or {}).get("path", "")
            if record.get("starts", 0) >= MAX_STARTS:
                error = {"code": "job_interrupted", "message": f"The job was interrupted {MAX_STARTS} times "
                         "(the gateway stopped while it ran); it is not tried again."}
            elif not path or not os.path.isfile(path):
                error = {"code": "job_upload_lost", "message": "The gateway restarted and this job's video is no "
                         "longer on its disk; submit the job again."}
            else:
                error = None
            try:
                if error is None:
                    await self._write(record, state=QUEUED, progress={"done_s": 0.0, "total_s": None})
                    self._enqueue(record.get("tenant"), record["id"])
                    requeued += 1
                else:
                    final = await self._write(record, state=FAILED, error=error, status=503, finished_at=_now())
                    self._remove_files(record)
                    self._spawn(self._callback(final))
                    failed += 1
            except StoreConflict:
                continue
        self._sweep({record["id"] for record in found}, began)
        if found:
            log.info("jobs: %d unfinished job(s) of this replica re-queued, %d failed", requeued, failed)

