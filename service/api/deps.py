"""FastAPI dependencies: the service object the lifespan built, the caller's tenant, and upload reading."""
from __future__ import annotations

from typing import Annotated

from fastapi import Request, Security, UploadFile
from fastapi.security import APIKeyHeader

from service.auth import API_KEY_HEADER, TENANT_SCOPE_KEY
from service.core import FsarService, Upload
from service.errors import BackendUnavailable

# Declares the key in the OpenAPI schema (and the docs' "Authorize" button); the check itself happens in
# `service.auth.AccessMiddleware` before the body is read.
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, scheme_name="ApiKey",
    description="Required when the server has API keys configured (FSAR_API_KEYS); a key belongs to one tenant.")


def get_service(request: Request) -> FsarService:
    """The `FsarService` created in the app's lifespan (503 if start-up has not finished)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise BackendUnavailable("The gateway is still starting (model not loaded yet); retry shortly.")
    return service


def get_tenant(request: Request, _key: Annotated[str | None, Security(api_key_header)] = None) -> str | None:
    """The tenant the access middleware authenticated (None when the gateway runs without API keys)."""
    return request.scope.get(TENANT_SCOPE_KEY)


async def read_upload(file: UploadFile) -> Upload:
    """The bytes of an uploaded file (already size-limited by the body limit middleware), read in one
    piece: one allocation of the file's size (a list of chunks joined would need twice that at once)."""
    return Upload(filename=file.filename or "", data=await file.read())
