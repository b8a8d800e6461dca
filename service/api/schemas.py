"""Pydantic models of every response body (multipart requests are declared on the routes)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.bounds import MAX_LABEL_FIELD_CHARS

#: One label as sent in a form (cleaned and checked again by `service.core.checks.clean_labels`).
Label = Annotated[str, StringConstraints(max_length=MAX_LABEL_FIELD_CHARS)]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. 'support_set_not_found'.")
    message: str = Field(description="What went wrong, for a human.")


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class ModelRef(BaseModel):
    """The model a result was computed with."""

    model_config = ConfigDict(protected_namespaces=())

    fingerprint: str
    backbone: str | None = None
    adapter: str | None = None
    metric: str | None = None
    checkpoint_hash: str | None = None
    weights_source: str | None = None
    demo: bool | None = None


class ClassInfo(BaseModel):
    label: str
    shots: int = Field(description="Number of support videos of this class.")


class VideoInfo(BaseModel):
    label: str
    filename: str | None = None
    sha256: str = Field(description="SHA-256 of the uploaded bytes.")


class Sampling(BaseModel):
    num_frames: int
    size: int


class SupportSet(BaseModel):
    """A registered support set."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    name: str | None = None
    classes: list[ClassInfo]
    num_videos: int
    metric: str = Field(description="Temporal metric used to match queries against this set.")
    model: ModelRef
    sampling: Sampling | None = None
    revision: int = Field(description="Increases each time videos are added.")
    created_at: str
    updated_at: str | None = None
    expires_at: str | None = Field(None, description="When the set expires (None: never).")
    videos: list[VideoInfo]


class SupportSetList(BaseModel):
    support_sets: list[SupportSet]
    count: int


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Probability; scores of all candidates sum to 1.")
    source: Literal["support", "text", "both"] = Field(
        description="'support': a support-set class; 'text': a label given only as text; 'both'.")


class Timings(BaseModel):
    decode: float = Field(description="Milliseconds decoding the query video (0 on a cache hit).")
    encode: float = Field(description="Milliseconds encoding the query video and label texts.")
    match: float = Field(description="Milliseconds fetching prototypes and matching.")


class ClassifyResponse(BaseModel):
    """The answer to `POST /classify`."""

    model_config = ConfigDict(protected_namespaces=())

    mode: Literal["few-shot", "zero-shot", "hybrid"]
    predictions: list[Prediction]
    support_set_id: str | None = None
    labels: list[str] | None = Field(None, description="The text labels given (zero-shot / hybrid).")
    num_candidates: int = Field(description="Candidate labels the scores are spread over.")
    model: str = Field(description="Fingerprint of the model that produced the scores.")
    query_cache_hit: bool = Field(description="True when the query features came from the cache.")
    timings_ms: Timings


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


class ModelCard(BaseModel):
    """`GET /model`: what is being served."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    backend: str
    backbone: str | None = None
    adapter: str | None = None
    metric: str | None = None
    metrics: list[str] | None = None
    checkpoint_hash: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    fingerprint: str
    input_size: int
    num_frames: int
    embed_dim: int | None = None
    weights_source: str | None = None
    demo: bool = False
    description: str = Field(description="One line for humans; says 'demo model' in demo mode.")
    store: dict[str, Any]
