"""A Python client of the gateway, on httpx: `FsarClient` (blocking) and `AsyncFsarClient` (asyncio).

    from service.client import FsarClient

    with FsarClient("http://127.0.0.1:8000", api_key="...") as fsar:
        created = fsar.register(["a.mp4", "b.mp4"], ["open valve", "wave hand"], name="plant")
        result = fsar.classify("query.mp4", support_set_id=created["id"])
        job = fsar.wait(fsar.submit_job("long.mp4", labels=["falling", "walking"]).id)

Videos are given as paths (opened here and streamed, never read whole) or open binary files. A 429
or 503 with `Retry-After` is retried after that delay (at most `max_retries` times, each wait capped
at `max_retry_wait_s`); any other error raises `FsarError(status, code, message)` with the API's error
body. Results are plain dicts (the API's JSON bodies) except jobs, which are `Job`s.
"""
from __future__ import annotations

import asyncio
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Mapping, Sequence, Union

import httpx

__all__ = ["AsyncFsarClient", "FsarClient", "FsarError", "Job", "JobTimeout"]

Video = Union[str, "os.PathLike[str]", IO[bytes]]
#: Job states after which nothing changes.
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
API_KEY_HEADER = "X-API-Key"


class FsarError(Exception):
    """An error answer of the gateway: its HTTP status, stable code and message."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


class JobTimeout(TimeoutError):
    """`wait` gave up before the job finished (the job goes on; `job` is its last state)."""

    def __init__(self, job: "Job") -> None:
        super().__init__(f"job {job.id} still {job.state}")
        self.job = job


@dataclass(frozen=True)
class Job:
    """A job as the gateway describes it (`raw`: the whole body)."""

    id: str
    state: str
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    status: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> "Job":
        return cls(id=body["id"], state=body["state"], progress=body.get("progress"), result=body.get("result"),
                   error=body.get("error"), status=body.get("status"), raw=dict(body))

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def raise_for_failure(self) -> "Job":
        """The job itself if it succeeded, else `FsarError` with the error it ended with."""
        if self.state != "succeeded":
            error = self.error or {"code": self.state, "message": f"the job is {self.state}"}
            raise FsarError(self.status or 409, error["code"], error["message"])
        return self


# ---------------------------------------------------------------------------- shared parts
def _form(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Form fields without the unset ones, booleans as 'true'/'false'."""
    form: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = [str(item) for item in value]
        else:
            value = str(value)
        form[name] = value
    return form


def _files(stack: ExitStack, name: str, videos: Iterable[Video]) -> list[tuple[str, tuple[str, IO[bytes], str]]]:
    """Multipart parts for `videos`: paths are opened (closed with `stack`), open files rewound to where
    they were first seen (a retry sends them again)."""
    parts = []
    for video in videos:
        if isinstance(video, (str, os.PathLike)):
            handle: IO[bytes] = stack.enter_context(open(video, "rb"))
            filename = os.path.basename(os.fspath(video))
        else:
            handle = video
            if not hasattr(handle, "_fsar_start"):
                try:
                    handle._fsar_start = handle.tell()  # type: ignore[attr-defined]
                except (AttributeError, OSError):
                    handle._fsar_start = None  # type: ignore[attr-defined]
            start = getattr(handle, "_fsar_start", None)
            if start is not None:
                handle.seek(start)
            filename = os.path.basename(str(getattr(handle, "name", "video")))
        parts.append((name, (filename, handle, "application/octet-stream")))
    return parts


def _error(response: httpx.Response) -> FsarError:
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500] or response.reason_phrase
    return FsarError(response.status_code, code, message, response.headers)


def _retry_after(response: httpx.Response, cap_s: float) -> float | None:
    """Seconds to wait before retrying a 429/503 (None: do not retry)."""
    if response.status_code not in (429, 503):
        return None
    try:
        return min(cap_s, max(0.0, float(response.headers.get("Retry-After", "1"))))
    except ValueError:
        return min(cap_s, 1.0)


def _body(response: httpx.Response) -> Any:
    if response.is_success:
        return None if response.status_code == 204 or not response.content else response.json()
    raise _error(response)


class _Base:
    def __init__(self, base_url: str, *, api_key: str | None, max_retries: int, max_retry_wait_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s

    @staticmethod
    def _classify_form(support_set_id: str | None, labels: Sequence[str] | None, top_k: int | None,
                       text_weight: float | None, explain: bool | None, extra: Mapping[str, Any]) -> dict[str, Any]:
        return _form({"support_set_id": support_set_id, "labels": list(labels) if labels else None, "top_k": top_k,
                      "text_weight": text_weight, "explain": explain, **extra})


# ---------------------------------------------------------------------------- blocking
class FsarClient(_Base):
    """The gateway's API, blocking. Use as a context manager (or call `close`)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 3, max_retry_wait_s: float = 30.0, transport: httpx.BaseTransport | None = None
                 ) -> None:
        super().__init__(base_url, api_key=api_key, max_retries=max_retries, max_retry_wait_s=max_retry_wait_s)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FsarClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, data: Mapping[str, Any] | None = None,
                videos: Sequence[tuple[str, Video]] = ()) -> Any:
        """One call, retried on 429/503 with Retry-After; the JSON body (None for 204)."""
        for attempt in range(self.max_retries + 1):
            with ExitStack() as stack:
                files = [part for name, video in videos for part in _files(stack, name, [video])] or None
                response = self._http.request(method, path, data=data, files=files)
            wait_s = _retry_after(response, self.max_retry_wait_s)
            if wait_s is None or attempt == self.max_retries:
                return _body(response)
            time.sleep(wait_s)
        raise AssertionError("unreachable")

    # support sets
    def register(self, videos: Sequence[Video], labels: Sequence[str], *, name: str | None = None,
                 metric: str | None = None, ttl_seconds: int | None = None) -> dict[str, Any]:
        data = _form({"labels": list(labels), "name": name, "metric": metric, "ttl_seconds": ttl_seconds})
        return self.request("POST", "/support-sets", data=data, videos=[("videos", v) for v in videos])

    def add_videos(self, set_id: str, videos: Sequence[Video], labels: Sequence[str]) -> dict[str, Any]:
        return self.request("POST", f"/support-sets/{set_id}/videos", data=_form({"labels": list(labels)}),
                            videos=[("videos", v) for v in videos])

    def list_support_sets(self) -> list[dict[str, Any]]:
        return self.request("GET", "/support-sets")["support_sets"]

    def get_support_set(self, set_id: str) -> dict[str, Any]:
        return self.request("GET", f"/support-sets/{set_id}")

    def delete_support_set(self, set_id: str) -> None:
        self.request("DELETE", f"/support-sets/{set_id}")

    # classification
    def classify(self, video: Video, *, support_set_id: str | None = None, labels: Sequence[str] | None = None,
                 top_k: int | None = None, text_weight: float | None = None, explain: bool | None = None,
                 **extra: Any) -> dict[str, Any]:
        """Few-shot (`support_set_id`), zero-shot (`labels`) or hybrid (both); `extra`: any other
        `/classify` field."""
        form = self._classify_form(support_set_id, labels, top_k, text_weight, explain, extra)
        return self.request("POST", "/classify", data=form, videos=[("video", video)])

    # jobs
    def submit_job(self, video: Video, *, support_set_id: str | None = None, labels: Sequence[str] | None = None,
                   top_k: int | None = None, text_weight: float | None = None, explain: bool | None = None,
                   callback_url: str | None = None, **extra: Any) -> Job:
        """`POST /jobs` with the fields of `classify` (and a `callback_url`)."""
        form = self._classify_form(support_set_id, labels, top_k, text_weight, explain,
                                   {**extra, "callback_url": callback_url})
        return Job.from_body(self.request("POST", "/jobs", data=form, videos=[("video", video)]))

    def get_job(self, job_id: str) -> Job:
        return Job.from_body(self.request("GET", f"/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> Job | None:
        """Cancel a job (its new state) or delete a finished one (None)."""
        body = self.request("DELETE", f"/jobs/{job_id}")
        return None if body is None else Job.from_body(body)

    def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> Job:
        """Poll until the job finishes (JobTimeout after `timeout_s`); the finished job."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(job)
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


# ---------------------------------------------------------------------------- asyncio
class AsyncFsarClient(_Base):
    """The gateway's API for asyncio; the same methods as `FsarClient`, awaited."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 3, max_retry_wait_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key=api_key, max_retries=max_retries, max_retry_wait_s=max_retry_wait_s)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout_s,
                                       transport=transport)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncFsarClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def request(self, method: str, path: str, *, data: Mapping[str, Any] | None = None,
                      videos: Sequence[tuple[str, Video]] = ()) -> Any:
        for attempt in range(self.max_retries + 1):
            with ExitStack() as stack:
                files = [part for name, video in videos for part in _files(stack, name, [video])] or None
                response = await self._http.request(method, path, data=data, files=files)
            wait_s = _retry_after(response, self.max_retry_wait_s)
            if wait_s is None or attempt == self.max_retries:
                return _body(response)
            await asyncio.sleep(wait_s)
        raise AssertionError("unreachable")

    async def register(self, videos: Sequence[Video], labels: Sequence[str], *, name: str | None = None,
                       metric: str | None = None, ttl_seconds: int | None = None) -> dict[str, Any]:
        data = _form({"labels": list(labels), "name": name, "metric": metric, "ttl_seconds": ttl_seconds})
        return await self.request("POST", "/support-sets", data=data, videos=[("videos", v) for v in videos])

    async def add_videos(self, set_id: str, videos: Sequence[Video], labels: Sequence[str]) -> dict[str, Any]:
        return await self.request("POST", f"/support-sets/{set_id}/videos", data=_form({"labels": list(labels)}),
                                  videos=[("videos", v) for v in videos])

    async def list_support_sets(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/support-sets"))["support_sets"]

    async def get_support_set(self, set_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/support-sets/{set_id}")

    async def delete_support_set(self, set_id: str) -> None:
        await self.request("DELETE", f"/support-sets/{set_id}")

    async def classify(self, video: Video, *, support_set_id: str | None = None,
                       labels: Sequence[str] | None = None, top_k: int | None = None,
                       text_weight: float | None = None, explain: bool | None = None, **extra: Any) -> dict[str, Any]:
        form = self._classify_form(support_set_id, labels, top_k, text_weight, explain, extra)
        return await self.request("POST", "/classify", data=form, videos=[("video", video)])

    async def submit_job(self, video: Video, *, support_set_id: str | None = None,
                         labels: Sequence[str] | None = None, top_k: int | None = None,
                         text_weight: float | None = None, explain: bool | None = None,
                         callback_url: str | None = None, **extra: Any) -> Job:
        form = self._classify_form(support_set_id, labels, top_k, text_weight, explain,
                                   {**extra, "callback_url": callback_url})
        return Job.from_body(await self.request("POST", "/jobs", data=form, videos=[("video", video)]))

    async def get_job(self, job_id: str) -> Job:
        return Job.from_body(await self.request("GET", f"/jobs/{job_id}"))

    async def cancel_job(self, job_id: str) -> Job | None:
        body = await self.request("DELETE", f"/jobs/{job_id}")
        return None if body is None else Job.from_body(body)

    async def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> Job:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.get_job(job_id)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(job)
            await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
