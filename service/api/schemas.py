"""Pydantic models of every response body (multipart requests are declared on the routes)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.bounds import MAX_LABEL_FIELD_CHARS

#: One label as sent in a form (cleaned and checked again by `service.core.checks.clean_labels`).
Label = Annotated[str, StringConstraints(max_length=MAX_LABEL_FIELD_CHARS)]

from service.core.explain import EXPLANATION_MAX_BYTES


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


class OpenSetCalibration(BaseModel):
    """How a support set tells "none of these" (`unknown`) from its classes."""

    threshold: float = Field(description="A query is unknown when its open_set_score is above this.")
    source: Literal["leave-one-out", "default"] = Field(
        description="leave-one-out: from the set's own clips (each shot of a class with two or more scored against "
                    "the set without it); default: the model-level threshold (one shot per class).")
    heldout: int = Field(description="Clips the leave-one-out threshold came from.")
    accept: float = Field(description="Fraction of those clips the threshold accepts as known.")


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
    open_set: OpenSetCalibration | None = Field(
        None, description="The set's 'none of these' calibration for the current model (absent until built).")


class SupportSetList(BaseModel):
    support_sets: list[SupportSet]
    count: int


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Probability; scores of all candidates sum to 1. Few-shot probabilities are "
                                     "scaled by the temperature the checkpoint records (GET /model's calibration), "
                                     "so they say how often such an answer is right; the ranking is the model's.")
    source: Literal["support", "text", "both"] = Field(
        description="'support': a support-set class; 'text': a label given only as text; 'both'.")


class Timings(BaseModel):
    decode: float = Field(description="Milliseconds decoding the query video (0 on a cache hit). With "
                                      "`segment_seconds` later windows decode while earlier ones encode, so "
                                      "decode + encode can exceed the request's wall time.")
    encode: float = Field(description="Milliseconds encoding the query video and label texts.")
    match: float = Field(description="Milliseconds fetching prototypes and matching.")


class ExplainedClass(BaseModel):
    """One explained class: the query's frames against its prototype's frames."""

    label: str
    score: float = Field(description="The class's probability (as in `predictions`).")
    source: Literal["support", "text", "both"]
    similarity: list[list[float]] = Field(
        description="[T, T] cosine similarity: row i = query frame i after TPCM's query path, column j = "
                    "prototype frame j.")
    query_to_prototype: list[list[int]] = Field(
        description="[[i, j], ...] alignment walking the query's frames: OTAM's hard-min path (same padded DP), "
                    "Bi-MHM each query frame's nearest prototype frame; empty for mean and TRX.")
    prototype_to_query: list[list[int]] = Field(
        description="[[i, j], ...] the other direction: OTAM's path walking the prototype's frames, Bi-MHM each "
                    "prototype frame's nearest query frame; empty for mean and TRX.")


class Explanation(BaseModel):
    """Why the query got its scores (`explain=true`); its JSON is at most `max_bytes` bytes."""

    metric: str = Field(description="The temporal metric the scores came from.")
    num_frames: int = Field(description="T, frames sampled per video.")
    alignment: Literal["otam_path", "nearest_frames", "none"]
    thumbnail_size: int = Field(description="Side in pixels of each thumbnail (0: none sent).")
    query_thumbnails: list[str] = Field(description="Base64 JPEGs of the T sampled query frames, in order.")
    classes: list[ExplainedClass] = Field(
        description="The best predictions that have a prototype (up to 3; none in zero-shot mode).")
    truncated: bool = Field(description="True when thumbnails, classes or matrices were cut to fit max_bytes.")
    max_bytes: int = Field(description="Upper bound of this object's JSON size.")


class SegmentResult(BaseModel):
    """One window of a long video (`segment_seconds`)."""

    start_s: float = Field(description="Start of the window, seconds from the video's first frame.")
    end_s: float = Field(description="End of the window (the last window may be shorter).")
    predictions: list[Prediction]
    unknown: bool | None = Field(None, description="Few-shot and hybrid: the window looks like none of the classes.")
    open_set_score: float | None = Field(None, ge=0.0, le=1.0, description="As the top-level field, for this window.")


class EventResult(BaseModel):
    """An action located in a long video."""

    label: str
    start_s: float
    end_s: float
    score: float = Field(description="Mean probability of the label over the event's windows.")


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
    explanation: Explanation | None = Field(
        None, description=f"Only with explain=true: similarities, alignments and thumbnails (at most {EXPLANATION_MAX_BYTES} "
              "bytes of JSON).")
    unknown: bool | None = Field(
        None, description="Few-shot and hybrid: true when the video looks like none of the support set's classes "
                          "(open_set_score above the set's calibrated threshold, or unknown_threshold); the ranked "
                          "predictions are unchanged. With segment_seconds: true when every window is unknown.")
    open_set_score: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Few-shot and hybrid: how unlike every support class the video is, 0 (like one of them) to 1 "
                    "(like none). With segment_seconds: the lowest over the windows.")
    segments: list[SegmentResult] | None = Field(
        None, description="Only with segment_seconds: each window, in time order.")
    events: list[EventResult] | None = Field(
        None, description="Only with segment_seconds: maximal runs of consecutive windows with the same best "
                          "label that are not unknown; score = mean probability of that label over the run.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str | list[dict[str, Any]]]


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
    calibration: dict[str, Any] | None = Field(
        None, description="The temperatures T of the few-shot probabilities (`temperatures`: one per shot count "
                          "they were fitted at) and how they were fitted (`fsar train` at its end, or `fsar eval "
                          "--calibrate --record`): answers report softmax(log p / T), T for the support set's "
                          "smallest class. null: T = 1, the probabilities as the model gives them.")
    store: dict[str, Any]
