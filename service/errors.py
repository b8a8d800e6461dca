"""Errors the gateway reports to clients, and the one function that renders them (`render`).

Each `ApiError` carries an HTTP status, a stable machine-readable `code`, a human message and any
headers its response needs (`Retry-After`, `WWW-Authenticate`, ...). `render` is the one place an
error becomes a response, `{"error": {"code": ..., "message": ...}}`: the FastAPI exception handlers
and the pure-ASGI middlewares (authentication, rate limit, body size) all answer through it.

| status | code(s) | when |
| --- | --- | --- |
| 400 | `bad_request` | a field is present but unusable (e.g. a malformed body) |
| 401 | `missing_api_key`, `invalid_api_key` | no or unknown `X-API-Key` (`service/auth.py`) |
| 404 | `not_found`, `support_set_not_found` | unknown path or support set |
| 409 | `conflict` | the support set kept changing underneath an update past the retry budget (retry) |
| 409 | `support_set_unreadable` | the set's stored manifest is damaged (delete it and register again) |
| 413 | `too_large`, `too_long`, `too_many_pixels`, `too_many_files`, `too_many_labels` | upload over a limit |
| 415 | `not_a_video`, `no_video_stream`, `corrupted`, `timeout`, ... | not a decodable video |
| 422 | `validation_error`, `label_count_mismatch`, ... | missing or invalid fields |
| 429 | `rate_limited` | over the tenant's rate limit (`Retry-After` header) |
| 503 | `store_unavailable`, `backend_unavailable`, `decoder_unavailable`, `upload_storage_unavailable`, `not_ready` | Redis, the model or the decode workers are unreachable, or `upload_dir` is full or unwritable |
| 500 | `internal_error` | a bug (logged with its traceback); never for bad input |
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from training.video.errors import VideoDecodeError


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a readable message."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] | None = dict(headers) if headers else None


class InvalidField(ApiError):
    """A field failed validation (422)."""

    status, code = 422, "validation_error"


class NotFound(ApiError):
    status, code = 404, "not_found"


class SupportSetNotFound(NotFound):
    code = "support_set_not_found"

    def __init__(self, set_id: str) -> None:
        super().__init__(f"Support set '{set_id}' does not exist (it may have expired or been deleted).")
        self.set_id = set_id


class Conflict(ApiError):
    status, code = 409, "conflict"


class SupportSetUnreadable(Conflict):
    """A set whose stored manifest this gateway cannot read (damaged or foreign data under its key): it
    can only be deleted."""

    code = "support_set_unreadable"

    def __init__(self, set_id: str) -> None:
        super().__init__(f"Support set '{set_id}' is stored in a form this gateway cannot read; delete it "
                         "and register the videos again.")
        self.set_id = set_id


class PayloadTooLarge(ApiError):
    status, code = 413, "too_large"


class UnsupportedMedia(ApiError):
    status, code = 415, "not_a_video"


class ServiceUnavailable(ApiError):
    status, code = 503, "unavailable"


class StoreUnavailable(ServiceUnavailable):
    """The store (Redis) cannot be reached; the request may be retried when it is back."""

    code = "store_unavailable"


class BackendUnavailable(ServiceUnavailable):
    """The model backend (embedded model or Triton) is not loaded or not reachable."""

    code = "backend_unavailable"


#: The HTTP status of each decode error code (`training.video.errors`): over a limit is 413, anything
#: else the decoder refuses is 415. The decoder itself knows no statuses; this is the one table.
DECODE_STATUS: dict[str, int] = {
    "not_a_video": 415,
    "no_video_stream": 415,
    "corrupted": 415,
    "timeout": 415,
    "too_large": 413,
    "too_long": 413,
    "too_many_pixels": 413,
    "too_many_segments": 413,
}


def from_decode_error(err: "VideoDecodeError", filename: str | None = None) -> ApiError:
    """The API error for a decode failure: the decoder's code and message (prefixed with the upload's
    name), at the status `DECODE_STATUS` gives the code (415 for a code it does not list)."""
    message = f"{filename or 'upload'}: {err.message}"
    status = DECODE_STATUS.get(err.code, 415)
    error_type = PayloadTooLarge if status == 413 else UnsupportedMedia
    return error_type(message, code=err.code)


def render(error: ApiError, extra: Mapping[str, Any] | None = None) -> JSONResponse:
    """The response of an error: its status, its headers and the body
    `{"error": {"code": ..., "message": ...}}` (plus `extra` top-level fields, e.g. `/readyz`'s checks).

    A pure-ASGI middleware sends it with `await render(error)(scope, receive, send)`."""
    body: dict[str, Any] = {"error": {"code": error.code, "message": error.message}}
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=error.status, headers=error.headers)
