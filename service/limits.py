"""Request body size limit, enforced while the body streams in (before multipart parsing).

Neither FastAPI nor python-multipart limits upload size, and a Content-Length check alone is bypassed
by chunked bodies. `BodySizeLimitMiddleware` therefore:
1. answers 413 at once when a declared Content-Length is over the limit (nothing is read), and
2. wraps the ASGI `receive` callable and counts the bytes of every `http.request` message; the
   message that crosses the limit raises `UploadTooLarge` instead of being handed to the parser, so
   at most `max_body_bytes` (+ one chunk) are ever buffered, chunked bodies included.
If the application converted the error into some other response, the middleware still replaces it
with the 413 JSON error (`{"error": {"code": "too_large", ...}}`) as long as nothing was sent yet.
"""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, render


class UploadTooLarge(PayloadTooLarge, HTTPException):
    """The request body is over the limit (413, `Connection: close`: the rest of the body is not read).
    Also a Starlette HTTPException so that frameworks that re-raise HTTP exceptions from body parsing
    (FastAPI does) let it through unchanged."""

    def __init__(self, limit_bytes: int) -> None:
        message = (f"Request body is larger than the limit of {_human(limit_bytes)} "
                   f"(setting max_upload_mb / FSAR_MAX_UPLOAD_MB).")
        headers = {"connection": "close"}
        HTTPException.__init__(self, status_code=413, detail=message, headers=headers)
        PayloadTooLarge.__init__(self, message, code="too_large", headers=headers)
        self.limit_bytes = limit_bytes


def _human(num_bytes: int) -> str:
    mb = num_bytes / (1024 * 1024)
    return f"{mb:g} MB" if mb >= 1 else f"{num_bytes} bytes"


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: refuse request bodies larger than `max_body_bytes` with a 413 JSON error."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await render(UploadTooLarge(self.max_body_bytes))(scope, receive, send)
            return

        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                # The app asks again after the error: tell it the client is gone.
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise UploadTooLarge(self.max_body_bytes)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded and not response_started:
                # Whatever the app answers after an over-limit body, the client gets our 413.
                response_started = True
                await render(UploadTooLarge(self.max_body_bytes))(scope, receive, send)
                return
            if exceeded:
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except UploadTooLarge as err:
            if not response_started:
                response_started = True
                await render(err)(scope, receive, send)
        except Exception:
            if exceeded and not response_started:
                # A parser wrapped our error in its own exception: still a 413, not a 500.
                response_started = True
                await render(UploadTooLarge(self.max_body_bytes))(scope, receive, send)
                return
            raise


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

