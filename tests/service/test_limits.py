"""The body size limit counts bytes as they stream in, before multipart parsing, chunked bodies included."""
from __future__ import annotations

from typing import Annotated, AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, File, UploadFile

from service.limits import BodySizeLimitMiddleware

LIMIT = 10_000


def _app() -> tuple[FastAPI, dict]:
    seen: dict = {"calls": 0, "bytes": 0}
    app = FastAPI()

    @app.post("/upload")
    async def upload(files: Annotated[list[UploadFile], File()]) -> dict:
        seen["calls"] += 1
        sizes = [len(await f.read()) for f in files]
        seen["bytes"] += sum(sizes)
        return {"sizes": sizes}

    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=LIMIT)
    return app, seen


async def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _multipart(size: int) -> tuple[bytes, str]:
    boundary = "fsarboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.mp4\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode() + b"x" * size + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def test_small_upload_passes() -> None:
    app, seen = _app()
    async with await _client(app) as client:
        response = await client.post("/upload", files=[("files", ("a.mp4", b"x" * 1000, "video/mp4"))])
    assert response.status_code == 200, response.text
    assert response.json() == {"sizes": [1000]} and seen["calls"] == 1


async def test_declared_content_length_over_limit_is_refused_unread() -> None:
    app, seen = _app()
    async with await _client(app) as client:
        response = await client.post("/upload", files=[("files", ("a.mp4", b"x" * (LIMIT + 1), "video/mp4"))])
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "too_large" and "limit" in error["message"]
    assert seen["calls"] == 0


@pytest.mark.parametrize("chunk", [1000, 4096])
async def test_chunked_body_without_content_length_is_cut_off(chunk: int) -> None:
    app, seen = _app()
    body, content_type = _multipart(LIMIT * 3)
    sent = {"bytes": 0}

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), chunk):
            sent["bytes"] += len(body[start:start + chunk])
            yield body[start:start + chunk]

    async with await _client(app) as client:
        response = await client.post("/upload", content=stream(), headers={"content-type": content_type})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert seen["calls"] == 0 and seen["bytes"] == 0  # the endpoint never ran
    # Reading stopped at the chunk that crossed the limit.
    assert sent["bytes"] <= LIMIT + chunk


async def test_chunked_body_under_limit_passes() -> None:
    app, seen = _app()
    body, content_type = _multipart(3000)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start:start + 512]

    async with await _client(app) as client:
        response = await client.post("/upload", content=stream(), headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert response.json() == {"sizes": [3000]}


async def test_get_requests_are_untouched() -> None:
    app, _ = _app()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    async with await _client(app) as client:
        response = await client.get("/ping")
    assert response.status_code == 200 and response.json() == {"ok": True}


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        BodySizeLimitMiddleware(FastAPI(), max_body_bytes=-1)
