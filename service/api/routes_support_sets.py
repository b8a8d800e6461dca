"""`/support-sets`: register, list, read, delete support sets and add videos to them."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Response, UploadFile

from service.api.deps import get_service, get_tenant, stored_uploads
from service.api.schemas import ErrorResponse, Label, SupportSet, SupportSetList
from service.bounds import (MAX_LABELS, MAX_METRIC_CHARS, MAX_NAME_CHARS, MAX_SET_ID_CHARS, MAX_TTL_S,
                            SET_ID_PATTERN)
from service.core import FsarService

router = APIRouter(prefix="/support-sets", tags=["support sets"])

_ERRORS = {status: {"model": ErrorResponse} for status in (401, 404, 409, 413, 415, 422, 429, 503)}

Service = Annotated[FsarService, Depends(get_service)]
Tenant = Annotated[str | None, Depends(get_tenant)]
Videos = Annotated[list[UploadFile], File(description="Video files (repeat the field), one per label.")]
Labels = Annotated[list[Label], Form(max_length=MAX_LABELS,
                                     description="One label per video, same order (repeat the field).")]
SetId = Annotated[str, Path(min_length=1, max_length=MAX_SET_ID_CHARS, pattern=SET_ID_PATTERN,
                            description="The support set's id (as `POST /support-sets` returned it).")]


@router.post("", status_code=201, response_model=SupportSet, responses=_ERRORS,
             summary="Register a support set")
async def create_support_set(
    videos: Videos,
    labels: Labels,
    service: Service,
    tenant: Tenant,
    name: Annotated[str | None, Form(max_length=MAX_NAME_CHARS, description="A name for humans.")] = None,
    metric: Annotated[str | None, Form(max_length=MAX_METRIC_CHARS,
                                       description="Temporal metric; default: the model's.")] = None,
    ttl_seconds: Annotated[int | None, Form(ge=1, le=MAX_TTL_S,
                                            description=f"Lifetime in seconds, 1 to {MAX_TTL_S} (10 years); "
                                                        "default: the server's support_set_ttl_s.")] = None,
) -> dict:
    """Decode and encode every video with its label, build the class prototypes and store the set."""
    # The videos live in files in upload_dir while the request runs (never whole in memory).
    async with stored_uploads(videos, service.settings.upload_dir) as uploads:
        return await service.create_support_set(uploads, labels, name=name, metric=metric,
                                                ttl_seconds=ttl_seconds, tenant=tenant)


@router.get("", response_model=SupportSetList, responses=_ERRORS, summary="List support sets")
async def list_support_sets(service: Service, tenant: Tenant) -> dict:
    """The caller's support sets (its tenant's), oldest first."""
    sets = await service.list_support_sets(tenant=tenant)
    return {"support_sets": sets, "count": len(sets)}


@router.get("/{set_id}", response_model=SupportSet, responses=_ERRORS, summary="Describe a support set")
async def get_support_set(set_id: SetId, service: Service, tenant: Tenant) -> dict:
    return await service.get_support_set(set_id, tenant=tenant)


@router.delete("/{set_id}", status_code=204, responses=_ERRORS, summary="Delete a support set")
async def delete_support_set(set_id: SetId, service: Service, tenant: Tenant) -> Response:
    await service.delete_support_set(set_id, tenant=tenant)
    return Response(status_code=204)


@router.post("/{set_id}/videos", response_model=SupportSet, responses=_ERRORS,
             summary="Add shots or classes to a support set")
async def add_videos(set_id: SetId, videos: Videos, labels: Labels, service: Service, tenant: Tenant) -> dict:
    """Add videos (new shots of existing classes, or new classes); the prototypes are rebuilt."""
    async with stored_uploads(videos, service.settings.upload_dir) as uploads:
        return await service.add_videos(set_id, uploads, labels, tenant=tenant)
