"""`/jobs`: a classification worked in the background, polled (or called back) for its result.

`POST /jobs` takes exactly the fields of `POST /classify` (the `classify_fields` dependency) plus an
optional `callback_url`, and answers 202 at once with the job and a `Location` header; `GET /jobs/{id}`
gives its state, progress and, once finished, the `/classify` body (`result`) or the error body and
status it would have had (`error`, `status`); `DELETE /jobs/{id}` cancels a job that has not finished
(200, the job) or deletes a finished one (204). See `service.core.jobs`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from service.api.deps import get_service, get_tenant, stored_uploads
from service.api.routes_classify import ClassifyFields, classification_body
from service.api.schemas import ClassifyResponse, ErrorDetail, ErrorResponse
from service.core import FsarService, Upload
from service.core.jobs import Jobs, Progress, Runner
from service.errors import BackendUnavailable
from service.webhooks import MAX_URL_CHARS

router = APIRouter(tags=["jobs"])

_ERRORS = {status: {"model": ErrorResponse} for status in (401, 404, 413, 422, 429, 503)}


class JobProgress(BaseModel):
    done_s: float = Field(description="Video-seconds classified so far.")
    total_s: float | None = Field(None, description="Video-seconds in all (None until the video was probed).")


class CallbackOutcome(BaseModel):
    state: Literal["delivered", "failed"]
    attempts: int
    last_status: int | None = None
    last_error: str | None = None


class Job(BaseModel):
    """A job, as `POST /jobs`, `GET /jobs/{id}` and a callback give it."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: JobProgress | None = None
    request: dict[str, Any] | None = Field(None, description="The classification fields the job was given.")
    result: ClassifyResponse | None = Field(None, description="state succeeded: the POST /classify body.")
    error: ErrorDetail | None = Field(None, description="state failed (or cancelled): the API's error.")
    status: int | None = Field(None, description="state failed: the HTTP status POST /classify would have had.")
    callback_url: str | None = None
    callback: CallbackOutcome | None = Field(None, description="How the callback's delivery went.")


def get_jobs(request: Request) -> Jobs:
    """The job queue the lifespan started (503 while the gateway starts)."""
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise BackendUnavailable("The gateway is still starting (model not loaded yet); retry shortly.")
    return jobs


def classification_runner(service: FsarService) -> Runner:
    """The work of a job: probe the video's length (progress 0 of it), classify it like `POST /classify`
    (progress: all of it), and render the `/classify` body. A runner that classifies in windows can
    report each one through `progress`."""

    async def run(upload: Upload, tenant: str | None, fields: Mapping[str, Any], progress: Progress) -> dict:
        total_s = await service.video_seconds(upload)
        await progress(0.0, total_s)
        # With segment_seconds the classification reports each piece of windows it has done.
        windowed = fields.get("segment_seconds") is not None
        result = await service.classify(upload, tenant=tenant, progress=progress if windowed else None, **fields)
        await progress(total_s, total_s)
        return classification_body(result)

    return run


@router.post("/jobs", status_code=202, response_model=Job, responses=_ERRORS, summary="Submit a classification job")
async def submit_job(
    video: Annotated[UploadFile, File(description="The query video.")],
    service: Annotated[FsarService, Depends(get_service)],
    jobs: Annotated[Jobs, Depends(get_jobs)],
    tenant: Annotated[str | None, Depends(get_tenant)],
    fields: ClassifyFields,
    callback_url: Annotated[str | None, Form(
        min_length=1, max_length=MAX_URL_CHARS,
        description="POSTed the finished job (signed: X-Fsar-Timestamp, X-Fsar-Signature). Public http(s) "
                    "addresses only, unless the server allows private ones.")] = None,
) -> JSONResponse:
    """Takes every field `POST /classify` takes; answers 202 at once. Poll `GET /jobs/{id}` (the
    `Location` header) or wait for the callback."""
    if callback_url is not None:
        await jobs.check_callback(callback_url, tenant)
    async with stored_uploads([video], service.settings.upload_dir) as (upload,):
        job = await jobs.submit(upload, fields, tenant=tenant, callback_url=callback_url)
    return JSONResponse(job, status_code=202, headers={"Location": f"/jobs/{job['id']}"})


@router.get("/jobs/{job_id}", response_model=Job, responses=_ERRORS, summary="A job's state and result")
async def get_job(job_id: str, jobs: Annotated[Jobs, Depends(get_jobs)],
                  tenant: Annotated[str | None, Depends(get_tenant)]) -> JSONResponse:
    return JSONResponse(await jobs.get(job_id, tenant=tenant))


@router.delete("/jobs/{job_id}", response_model=Job, responses={**_ERRORS, 204: {"description": "Deleted."}},
               summary="Cancel a job, or delete a finished one")
async def delete_job(job_id: str, jobs: Annotated[Jobs, Depends(get_jobs)],
                     tenant: Annotated[str | None, Depends(get_tenant)]) -> Response:
    """A queued or running job is cancelled (200, the job, state `cancelled`; a running one stops at
    its next step); a finished one is deleted (204)."""
    job = await jobs.cancel(job_id, tenant=tenant)
    return Response(status_code=204) if job is None else JSONResponse(job)
