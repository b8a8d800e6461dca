"""The API docs, offline: `/docs` (Swagger UI) and `/redoc` with their scripts and styles served by the
gateway from the `fastapi-offline` package (MIT; it ships the Swagger UI and ReDoc bundles), so the
pages make no request to another host.

The pages are open paths (`service.auth.OPEN_PATHS`); their files are served under `ASSETS_PATH` by
`DocsAssetsMiddleware`, which sits outside the access check like the page at /ui.
"""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Where the docs' files are served.
ASSETS_PATH = "/docs/assets"
#: Served files: name -> media type.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}


def _asset(name: str) -> bytes:
    return resources.files("fastapi_offline").joinpath("static", name).read_bytes()


def install_docs(app: FastAPI) -> None:
    """Add `/docs`, `/docs/oauth2-redirect` and `/redoc` (the app is created with docs_url=None,
    redoc_url=None); add `DocsAssetsMiddleware` for their files."""
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect_url}",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters)

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png", with_google_fonts=False)


class DocsAssetsMiddleware:
    """Serves the docs' files (GET/HEAD under `ASSETS_PATH`, cached for a day); passes the rest on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cache: dict[str, bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        name = path[len(ASSETS_PATH) + 1:] if path.startswith(ASSETS_PATH + "/") else None
        if name not in ASSETS or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        body = self._cache.get(name)  # type: ignore[arg-type]
        if body is None:
            body = self._cache[name] = _asset(name)  # type: ignore[index]
        headers = [(b"content-type", ASSETS[name].encode()), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"public, max-age=86400"), (b"x-content-type-options", b"nosniff")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
