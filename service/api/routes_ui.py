"""The page for people (`/ui`) and the one endpoint it adds, `POST /thumbnails`.

The page is three static files in `service/ui/` (no build step, no external resources). They are
served by `UiMiddleware`, which the app places *outside* the API-key check: a browser loads the page
without a key, and the page then asks for one and sends it in the `X-API-Key` header of every API
call (kept in the tab's sessionStorage, never in a URL). Every page response carries
`UI_SECURITY_HEADERS` (a Content-Security-Policy allowing only this origin's scripts and styles and
`data:`/`blob:` images). A browser asking for `/` (Accept prefers text/html) is redirected (307) to
`/ui`; other clients get what they got before (404, or 401 without a key).

`POST /thumbnails` is an API call like the others (key, rate limit): the JPEG thumbnails of the
frames the model samples from one video, so the page shows what the model will see of each clip.
"""
from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import get_service, get_tenant, stored_uploads
from service.api.schemas import ErrorResponse
from service.core import FsarService
from service.core.explain import THUMBNAIL_PX

#: URL path -> (file in service/ui, media type).
UI_FILES = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
UI_SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}

router = APIRouter(tags=["ui"])


class Thumbnails(BaseModel):
    """The frames the model samples from a video, as small JPEGs."""

    num_frames: int
    size: int = Field(description="Side of each thumbnail in pixels.")
    thumbnails: list[str] = Field(description="Base64 JPEGs, in frame order.")


@router.post("/thumbnails", response_model=Thumbnails, summary="Thumbnails of the frames the model samples",
             responses={status: {"model": ErrorResponse} for status in (401, 413, 415, 422, 429, 503)})
async def thumbnails(
    video: Annotated[UploadFile, File(description="A video.")],
    service: Annotated[FsarService, Depends(get_service)],
    _tenant: Annotated[str | None, Depends(get_tenant)],
) -> dict:
    """Decoded with the same sampling and limits as `POST /classify`; nothing is stored."""
    async with stored_uploads([video], service.settings.upload_dir) as (upload,):
        frames = await service.explainer.thumbnails(upload)
    return {"num_frames": len(frames), "size": THUMBNAIL_PX, "thumbnails": frames}


def prefers_html(accept: str) -> bool:
    """Whether an Accept header ranks text/html at least as high as application/json (and above 0)."""
    quality: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = [piece.strip() for piece in part.split(";")]
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    html = quality.get("text/html", 0.0)
    json_q = max(quality.get("application/json", 0.0), quality.get("*/*", 0.0) if html == 0.0 else 0.0)
    return html > 0.0 and html >= json_q


def _read(name: str) -> bytes:
    return resources.files("service.ui").joinpath(name).read_bytes()


class UiMiddleware:
    """Serves the page's files (GET/HEAD) and redirects browsers from `/` to `/ui`; passes the rest on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cache: dict[str, bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in UI_FILES:
            name, media_type = UI_FILES[path]
            body = self._cache.get(name)
            if body is None:
                body = self._cache[name] = _read(name)
            await _respond(send, 200, {"content-type": media_type}, b"" if scope["method"] == "HEAD" else body,
                           len(body))
            return
        if path == "/" and prefers_html(_header(scope, b"accept")):
            await _respond(send, 307, {"location": "/ui"}, b"", 0)
            return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


async def _respond(send: Send, status: int, headers: dict[str, str], body: bytes, length: int) -> None:
    all_headers = {**UI_SECURITY_HEADERS, **headers, "content-length": str(length)}
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()]})
    await send({"type": "http.response.body", "body": body})
