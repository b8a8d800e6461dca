"""FastAPI dependencies: the service object the lifespan built, the caller's tenant, and uploads on disk."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator, BinaryIO, Sequence

from fastapi import Request, Security, UploadFile
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from service.auth import API_KEY_HEADER, TENANT_SCOPE_KEY
from service.core import FsarService, Upload
from service.errors import BackendUnavailable, ServiceUnavailable

log = logging.getLogger(__name__)

#: An upload is copied to its file in pieces of this size: all the gateway holds of it at a time.
UPLOAD_CHUNK_BYTES = 1024 * 1024
#: Upload files are named `fsar-upload-<random>.video`: never after the client's file name or extension,
#: which FFmpeg could act on (it probes HLS only for names ending in .m3u8, for one).
UPLOAD_FILE_PREFIX = "fsar-upload-"
UPLOAD_FILE_SUFFIX = ".video"

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


class UploadStorageUnavailable(ServiceUnavailable):
    """An upload cannot be written to the upload folder (disk full, folder missing or not writable): 503,
    a problem of this server and not of the request; another replica, or a retry later, may succeed."""

    code = "upload_storage_unavailable"


@asynccontextmanager
async def stored_uploads(files: Sequence[UploadFile], directory: str | None) -> AsyncIterator[list[Upload]]:
    """The request's uploaded files, each streamed to its own temporary file in `directory` (None: the
    system temporary folder) and given as an `Upload` of that path, with its size and sha256 computed
    while streaming, so the gateway never holds a whole upload in memory.

    Every file is removed when the block exits, however it exits: a response, a 4xx from any check, a
    decode error, a storage error half-way through the files, or a cancelled request (removal needs no
    `await`, so a cancellation cannot skip it). Raises `UploadStorageUnavailable` (503) when a file cannot
    be created or written."""
    paths: list[str] = []
    try:
        uploads = [await _store(file, directory, paths) for file in files]
        yield uploads
    finally:
        for path in paths:
            _remove(path)


async def _store(file: UploadFile, directory: str | None, paths: list[str]) -> Upload:
    """One upload copied to a new file in `directory` (its path appended to `paths` before anything is
    written, so the caller removes it whatever happens next)."""
    try:
        try:
            fd, path = tempfile.mkstemp(prefix=UPLOAD_FILE_PREFIX, suffix=UPLOAD_FILE_SUFFIX, dir=directory)
            paths.append(path)
            with open(fd, "wb") as target:  # closed here however the copy ends: the gateway keeps no descriptor
                # One thread for the whole copy: reading Starlette's spooled copy, hashing and writing
                # release the GIL for 1 MiB pieces, and the event loop stays free meanwhile.
                size, sha256 = await run_in_threadpool(_copy, file.file, target)
        except OSError as err:
            raise _storage_error(err, directory) from err
    finally:
        # Starlette's own spooled copy is not needed any more: release it (and its disk, past 1 MB) now
        # rather than after the response.
        await file.close()
    return Upload(file.filename or "", path=path, size=size, sha256=sha256)


def _copy(source: BinaryIO, target: BinaryIO) -> tuple[int, str]:
    """Copy `source` from its start into `target` in `UPLOAD_CHUNK_BYTES` pieces, flushed; returns the
    size and the sha256 (hex) of what was copied."""
    digest = hashlib.sha256()
    size = 0
    source.seek(0)
    while chunk := source.read(UPLOAD_CHUNK_BYTES):
        digest.update(chunk)
        target.write(chunk)
        size += len(chunk)
    target.flush()
    return size, digest.hexdigest()


def _storage_error(err: OSError, directory: str | None) -> UploadStorageUnavailable:
    """The 503 for an upload that cannot be stored; the folder goes to the log, not to the client."""
    folder = directory or tempfile.gettempdir()
    log.error("cannot store an upload in %s (setting upload_dir / FSAR_UPLOAD_DIR): %s", folder, err)
    reason = err.strerror or type(err).__name__
    return UploadStorageUnavailable(f"The server cannot store uploads right now ({reason}); retry later.")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:  # never hide the request's own outcome behind a clean-up problem
        log.error("cannot remove the upload file %s: %s", path, err)
