"""FastAPI dependencies: the service object the lifespan built, and upload reading."""
from __future__ import annotations

from fastapi import Request, UploadFile

from service.core import FsarService, Upload
from service.errors import BackendUnavailable

READ_CHUNK = 1024 * 1024


def get_service(request: Request) -> FsarService:
    """The `FsarService` created in the app's lifespan (503 if start-up has not finished)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise BackendUnavailable("The gateway is still starting (model not loaded yet); retry shortly.")
    return service


async def read_upload(file: UploadFile) -> Upload:
    """The bytes of an uploaded file (already size-limited by the body limit middleware)."""
    chunks = []
    while chunk := await file.read(READ_CHUNK):
        chunks.append(chunk)
    return Upload(filename=file.filename or "", data=b"".join(chunks))
