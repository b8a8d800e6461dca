"""`POST /classify`: few-shot, zero-shot or hybrid classification of one video.

Its form fields (all but the video) are declared once, in `classify_fields`: `POST /jobs` takes the
same dependency, so a field added there reaches both endpoints (and `FsarService.classify`, which gets
every field as a keyword argument). `classification_body` renders a result for both.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, UploadFile

from service.api.deps import get_service, get_tenant, stored_uploads
from service.api.schemas import ClassifyResponse, ErrorResponse, Label
from service.bounds import MAX_LABELS, MAX_SEGMENT_S, MAX_SET_ID_CHARS, MAX_TOP_K, MIN_SEGMENT_S, SET_ID_PATTERN
from service.core import FsarService
from service.core.classify import Classification
from service.core.explain import EXPLAIN_TOP_CLASSES, EXPLANATION_MAX_BYTES

router = APIRouter(tags=["classify"])

_ERRORS = {status: {"model": ErrorResponse} for status in (401, 404, 409, 413, 415, 422, 429, 503)}


def classify_fields(
    support_set_id: Annotated[str | None, Form(min_length=1, max_length=MAX_SET_ID_CHARS, pattern=SET_ID_PATTERN,
                                               description="Few-shot: match against this set.")] = None,
    labels: Annotated[list[Label] | None, Form(max_length=MAX_LABELS,
                                               description="Zero-shot labels (repeat the field); "
                                                           "with support_set_id: hybrid.")] = None,
    top_k: Annotated[int | None, Form(ge=1, le=MAX_TOP_K, description="Return only the k best labels.")] = None,
    text_weight: Annotated[float | None, Form(
        ge=0.0, le=1.0, allow_inf_nan=False,
        description="Text share of this request, 0..1. Few-shot: replaces the model's alpha in "
                    "p = w * softmax(Q2T) + (1 - w) * softmax(Q2S) (0 = the examples alone, 1 = the label "
                    "texts alone). Hybrid: replaces hybrid_text_weight. Unset: the model's and the "
                    "server's weights.")] = None,
    explain: Annotated[bool, Form(
        description=f"Add an `explanation`: for the {EXPLAIN_TOP_CLASSES} best predictions with a prototype, the "
                    "frame-to-frame similarity of the query with the prototype and the metric's alignment, plus "
                    f"JPEG thumbnails of the sampled query frames; at most {EXPLANATION_MAX_BYTES} bytes of "
                    "JSON.")] = False,
    segment_seconds: Annotated[float | None, Form(
        ge=MIN_SEGMENT_S, le=MAX_SEGMENT_S, allow_inf_nan=False,
        description="Long videos: classify every window of this many seconds (T frames each, sampled as a whole "
                    "video is) and answer `segments` (each window's predictions and verdict) and `events` (maximal "
                    "runs of windows with one confident label); the top-level predictions are then the mean of the "
                    "windows' probabilities. One decoding pass over the file; more windows than the server's "
                    "max_segments -> 413 too_many_segments. Unset: the whole video, as one clip.")] = None,
    stride_seconds: Annotated[float | None, Form(
        ge=MIN_SEGMENT_S, le=MAX_SEGMENT_S, allow_inf_nan=False,
        description="Seconds between window starts (with segment_seconds); default segment_seconds (windows "
                    "side by side). Smaller: overlapping windows.")] = None,
    unknown_threshold: Annotated[float | None, Form(
        ge=0.0, le=1.0, allow_inf_nan=False,
        description="Few-shot and hybrid: answer `unknown` (none of these) when open_set_score is above this, "
                    "instead of the support set's calibrated threshold (its description's open_set.threshold).")
    ] = None,
) -> dict[str, Any]:
    """The classification fields of a request, by name: exactly the keyword arguments of
    `FsarService.classify` besides the upload and the tenant (JSON values: a job stores them)."""
    return dict(locals())


ClassifyFields = Annotated[dict[str, Any], Depends(classify_fields)]


def classification_body(result: Classification) -> dict[str, Any]:
    """The response body of a classification (`ClassifyResponse`), as `POST /classify` and jobs give it."""
    body = asdict(result)
    for optional in ("explanation", "unknown", "open_set_score", "segments", "events"):
        if body.get(optional) is None:
            body.pop(optional, None)  # absent, not null, when the request did not ask for it
    if body.get("segments") is not None:
        for segment in body["segments"]:
            for optional in ("unknown", "open_set_score"):
                if segment.get(optional) is None:
                    segment.pop(optional, None)
    return body


@router.post("/classify", response_model=ClassifyResponse, response_model_exclude_unset=True, responses=_ERRORS,
             summary="Classify a video")
async def classify(
    video: Annotated[UploadFile, File(description="The query video.")],
    service: Annotated[FsarService, Depends(get_service)],
    tenant: Annotated[str | None, Depends(get_tenant)],
    fields: ClassifyFields,
) -> dict:
    """Scores are probabilities that sum to 1 over all candidate labels
    (see `service.core.classify.Classifier.classify`)."""
    # The video lives in a file in upload_dir while the request runs (never whole in memory).
    async with stored_uploads([video], service.settings.upload_dir) as (upload,):
        result = await service.classify(upload, tenant=tenant, **fields)
    return classification_body(result)
