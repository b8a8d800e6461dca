"""The FastAPI app factory: `create_app(settings)`.

The lifespan creates the store (one Redis pool), the rate limiter and the backend (loads the model; a
failure stops the server at start-up), wires them into an `FsarService` and closes everything on
shutdown. API keys are read when the app is created (a bad key configuration stops it there).
Every error leaves as `{"error": {"code": ..., "message": ...}}` (see `service/errors.py`).

Middleware, outermost first: request metrics -> the API docs' files (`docs.DocsAssetsMiddleware`) ->
the page's static files (`routes_ui.UiMiddleware`) ->
access (API key 401, rate limit 429) -> body size limit (413) -> multipart closing boundary (400) ->
routes. Access and size checks answer before the body is read.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import routes_classify, routes_jobs, routes_ops, routes_support_sets, routes_ui
from service.api.docs import DocsAssetsMiddleware, install_docs
from service.api.multipart import MultipartEndMiddleware
from service.auth import AccessMiddleware, describe_access, load_key_ring
from service.backends import create_backend
from service.core import FsarService
from service.core.jobs import Jobs
from service.errors import ApiError, render
from service.limits import BodySizeLimitMiddleware
from service.telemetry import Metrics, RequestMetricsMiddleware
from service.ratelimit import create_rate_limiter
from service.settings import Settings
from service.store import create_store

log = logging.getLogger("service.api")

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
               409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "validation_error",
               429: "rate_limited", 503: "unavailable"}


def create_app(settings: Settings | None = None) -> FastAPI:
    """A gateway app for `settings` (default: from the environment). Nothing is loaded until the
    lifespan starts (uvicorn does it; tests use `app.router.lifespan_context(app)`)."""
    settings = settings or Settings()
    metrics = Metrics()
    key_ring = load_key_ring(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = create_store(settings)
        backend = create_backend(settings)
        try:
            await backend.start()
        except Exception as err:
            # One line that says why (e.g. pretrained weights not cached offline), then stop.
            log.error("the gateway cannot start: %s", err)
            await store.close()
            raise
        except BaseException:
            await store.close()
            raise
        service = FsarService(settings, store, backend, metrics)
        app.state.service = service
        app.state.rate_limiter = create_rate_limiter(settings, store)
        jobs = Jobs(settings, store, routes_jobs.classification_runner(service))
        await jobs.start()
        app.state.jobs = jobs
        card = service.model_card()
        log.info("serving %s (fingerprint %s) with the %s backend; store: %s", card["description"],
                 str(card["fingerprint"])[:16], settings.backend, card["store"])
        access = describe_access(key_ring, settings)
        (log.info if key_ring.enabled else log.warning)("access: %s", access)
        try:
            yield
        finally:
            app.state.service = None
            app.state.rate_limiter = None
            app.state.jobs = None
            await jobs.close()
            await service.close()
            await backend.close()
            await store.close()

    app = FastAPI(
        title="fsar gateway",
        summary="Few-shot and zero-shot video action recognition.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by service.api.docs, with files from the package (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.state.rate_limiter = None
    app.state.jobs = None
    app.state.key_ring = key_ring
    app.include_router(routes_support_sets.router)
    app.include_router(routes_classify.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_ui.router)
    app.include_router(routes_jobs.router)
    install_docs(app)
    install_error_handlers(app)
    # Outermost last: metrics see every response, including 401/429s and 413s from the body limit.
    app.add_middleware(MultipartEndMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_upload_bytes)
    app.add_middleware(AccessMiddleware, key_ring=key_ring, metrics=metrics)
    # The page (/ui, its files, with its Content-Security-Policy) loads without a key; it then asks for one.
    app.add_middleware(routes_ui.UiMiddleware)
    app.add_middleware(DocsAssetsMiddleware)  # the API docs' files, open like the docs pages
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Render every error as `{"error": {"code", "message"}}` with the right status."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        kinds = set()
        for error in exc.errors():
            location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path"))
            kinds.add(error.get("type"))
            problems.append(f"{location or 'request'}: {error.get('msg', 'invalid')}")
        code = "missing_field" if kinds == {"missing"} else "validation_error"
        return render(ApiError("; ".join(problems) or "Invalid request.", code=code, status=422))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"No such endpoint: {request.method} {request.url.path}"
        return render(ApiError(message, code=code, status=exc.status_code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return render(ApiError("Internal server error; it has been logged.", code="internal_error", status=500))
