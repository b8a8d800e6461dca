"""`MultipartEndMiddleware`: a multipart body must end with its closing boundary.

python-multipart (through Starlette) hands over every part it has seen when a body simply stops, so a
body cut off after its last part's delimiter but before the closing `--boundary--` would be taken as
complete. This pure ASGI middleware watches the bytes of a `multipart/form-data` request as they
stream in (keeping only a boundary's length of them) and, when the last body message arrives without
the closing delimiter having passed, raises `IncompleteMultipart`: a 400 `malformed_body` JSON error
(also a Starlette HTTPException, so that FastAPI's form parsing lets it through unchanged).
"""
from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, render

_MESSAGE = "The multipart body ends before its closing boundary ('--<boundary>--'); send the whole body."


class IncompleteMultipart(ApiError, HTTPException):
    """A multipart body without its closing boundary (400)."""

    def __init__(self) -> None:
        HTTPException.__init__(self, status_code=400, detail=_MESSAGE)
        ApiError.__init__(self, _MESSAGE, code="malformed_body", status=400)


def multipart_boundary(scope: Scope) -> bytes | None:
    """The boundary of a `multipart/form-data` request, None for any other request."""
    content_type = Headers(scope=scope).get("content-type", "")
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary" and value.strip():
            return value.strip().strip('"').encode("latin-1", "replace")
    return None


class MultipartEndMiddleware:
    """Refuse a multipart body that ends without its closing delimiter (400 JSON)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        boundary = multipart_boundary(scope) if scope["type"] == "http" else None
        if boundary is None:
            await self.app(scope, receive, send)
            return
        closing = b"--" + boundary + b"--"
        tail = b""
        closed = False

        async def checking_receive() -> Message:
            nonlocal tail, closed
            message = await receive()
            if message["type"] == "http.request":
                if not closed:
                    window = tail + message.get("body", b"")
                    closed = closing in window
                    tail = window[-(len(closing) - 1):]
                if not message.get("more_body", False) and not closed:
                    raise IncompleteMultipart()
            return message

        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, checking_receive, tracking_send)
        except IncompleteMultipart as err:
            if response_started:
                raise
            await render(err)(scope, receive, send)
