"""Classification of one query video: few-shot, zero-shot or hybrid; whole, or window by window.

The scores of every mode are computed for a batch of queries `[Q, T, D]`: one row for a whole video,
one per window for a long video classified with `segment_seconds` (`Features.query_windows`), whose
window answers become events (`service.core.timeline`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Sequence

import numpy as np

from service.backends.base import softmax
from service.core.checks import check_not_empty, clean_labels, unique
from service.core.explain import Explainer
from service.core.features import Features
from service.core.instrumented import CountedBackend
from service.core.model import ModelFacts
from service.core.support_sets import SupportSets
from service.core.timeline import Event, find_events
from service.core.timings import Timings
from service.core.uploads import Upload
from service.bounds import MAX_SEGMENT_S, MIN_SEGMENT_S
from service.errors import InvalidField, PayloadTooLarge
from service.settings import Settings
from training import open_set
from training.calibration import temper

Source = Literal["support", "text", "both"]
Mode = Literal["few-shot", "zero-shot", "hybrid"]


@dataclass(frozen=True)
class Prediction:
    """One candidate label, its probability, and where it came from."""

    label: str
    score: float
    source: Source


@dataclass(frozen=True)
class Segment:
    """One window of a long video and its answer."""

    start_s: float
    end_s: float
    predictions: list[Prediction]  # best first (`top_k` applies)
    unknown: bool | None = None
    open_set_score: float | None = None


@dataclass(frozen=True)
class Scores:
    """The scores of a batch of Q queries over C candidates (support classes first)."""

    mode: Mode
    probs: np.ndarray  # [Q, C], rows sum to 1
    candidates: list[str]
    sources: dict[str, Source]
    prototypes: np.ndarray | None  # [N, T, D], few-shot and hybrid
    q2s_logits: np.ndarray | None  # [Q, N]: the metric's own logits against the support classes
    open_set_scores: np.ndarray | None = None  # [Q] in [0, 1], few-shot and hybrid (training.open_set)
    threshold: float | None = None  # the support set's calibrated open-set threshold


@dataclass(frozen=True)
class Classification:
    """The answer to one classification (the `ClassifyResponse` body)."""

    mode: Literal["few-shot", "zero-shot", "hybrid"]
    predictions: list[Prediction]  # best first
    support_set_id: str | None
    labels: list[str] | None  # the text labels given, cleaned and without repeats
    num_candidates: int
    model: str  # fingerprint
    query_cache_hit: bool
    timings_ms: dict[str, float]  # decode, encode, match
    explanation: dict[str, Any] | None = None  # with explain=True (service/core/explain.py)
    unknown: bool | None = None  # few-shot / hybrid: "none of these" (service/core/open_set.py)
    open_set_score: float | None = None
    segments: list["Segment"] | None = None  # with segment_seconds
    events: list[Event] | None = None  # with segment_seconds


class Classifier:
    """Labels query videos against a tenant's support set, label texts, or both."""

    def __init__(self, settings: Settings, backend: CountedBackend, model: ModelFacts, features: Features,
                 support_sets: SupportSets, explainer: Explainer | None = None) -> None:
        self._settings = settings
        self._explainer = explainer
        self._backend = backend
        self._model = model
        self._features = features
        self._support_sets = support_sets

    async def classify(self, upload: Upload, *, support_set_id: str | None, labels: Sequence[str] | None,
                       top_k: int | None, tenant: str | None, text_weight: float | None = None,
                       explain: bool = False, segment_seconds: float | None = None,
                       stride_seconds: float | None = None, unknown_threshold: float | None = None,
                       progress: Callable[[float, float], Awaitable[None]] | None = None) -> Classification:
        """Label one query video (few-shot against one of the tenant's sets).

        - few-shot (`support_set_id`): the model's `classify` against the set's cached prototypes
          (with the classes' text features, so the model mixes in its own text probabilities).
        - zero-shot (`labels`): the model's `zero_shot` against "a video of {label}" texts.
        - hybrid (both): candidates are the support classes plus the text-only labels. With
          w = `hybrid_text_weight`,

              p(c) = w * p_zero_shot(c) + (1 - w) * p_few_shot(c)

          where p_zero_shot is the zero-shot softmax over ALL candidates and p_few_shot the few-shot
          softmax over the support classes (0 for text-only labels). Both sum to 1, so p does too.
          A label given in `labels` that is also a support class is one candidate, not two.

        `text_weight` (0..1) is the text share of this request: few-shot, the model's alpha is replaced
        and p = w * softmax(Q2T) + (1 - w) * softmax(Q2S) is formed here from the model's Q2T
        (`zero_shot` against the classes' label texts) and Q2S (`classify` without texts) logits;
        hybrid, it replaces `hybrid_text_weight`. None keeps the model's and the settings' weights.

        `segment_seconds` (and `stride_seconds`, default the same) classifies every window of the video
        instead: `segments` holds each window's answer, `events` the maximal runs of windows with one
        label that are not unknown, and the top-level `predictions` are the mean of the windows'
        probabilities. `await progress(done_s, total_s)` follows each piece of windows done.

        Few-shot and hybrid answers say whether the video looks like none of the set's classes:
        `open_set_score` in [0, 1] (`training.open_set.open_set_score`: the nearest prototype's distance
        in units of where the set's own clips sit; higher = less like any class) and `unknown` when it
        is above the set's calibrated threshold, or above `unknown_threshold` when the request gives one.
        The ranked predictions do not change.

        Scores are probabilities summing to 1 over all candidates; `top_k` keeps the best k. The few-shot
        probabilities (before any hybrid mix) are tempered with the temperature the checkpoint records
        (`fsar eval --calibrate --record`; `training.calibration.temper`; T = 1 without one), so they say
        how often such an answer is right; rankings and `open_set_score` do not depend on it.
        `explain` adds an `explanation` (`service.core.explain.Explainer.explain`; whole videos only).
        """
        labels = unique(clean_labels(labels or []))
        self._check(labels, support_set_id, top_k, text_weight)
        if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:  # also refuses nan
            raise InvalidField("unknown_threshold must be between 0 and 1.", code="invalid_unknown_threshold")
        check_windows(segment_seconds, stride_seconds)
        check_not_empty(upload)
        manifest = await self._support_sets.load(support_set_id, tenant) if support_set_id is not None else None

        timings = Timings()
        spans = None
        if segment_seconds is None:
            query_feats, cache_hit = await self._features.query(upload, tenant, timings)
            queries = query_feats[None]  # [1, T, D]
        else:
            stride = segment_seconds if stride_seconds is None else stride_seconds
            queries, spans, cache_hit = await self._features.query_windows(
                upload, tenant, segment_seconds, stride, timings, progress)  # [W, T, D], [W, 2]
        scores = await self._score(queries, manifest, labels, text_weight, timings)

        video_probs = scores.probs.mean(axis=0)  # [C]: the video's, or the mean over its windows
        threshold = unknown_threshold if unknown_threshold is not None else scores.threshold
        open_scores = scores.open_set_scores  # [Q] or None (zero-shot)
        unknown = None if open_scores is None else [bool(score > threshold) for score in open_scores]
        ranked = self._ranked(scores, video_probs)
        explanation = None
        if explain and self._explainer is not None and spans is None:
            explanation = await self._explainer.explain(upload, queries[0], scores.prototypes,
                                                        list(manifest.classes) if manifest else [], ranked)
        segments = events = None
        if spans is not None:
            segments = [Segment(start_s=round(float(start), 3), end_s=round(float(end), 3),
                                predictions=self._ranked(scores, row)[:top_k] if top_k else self._ranked(scores, row),
                                unknown=None if unknown is None else unknown[w],
                                open_set_score=None if open_scores is None else round(float(open_scores[w]), 6))
                        for w, ((start, end), row) in enumerate(zip(spans, scores.probs))]
            events = find_events(spans, [segment.predictions[0].label if segment.unknown is not True else None
                                         for segment in segments],
                                 [segment.predictions[0].score for segment in segments])
        return Classification(
            mode=scores.mode,
            predictions=ranked[:top_k] if top_k is not None else ranked,
            support_set_id=support_set_id,
            labels=labels or None,
            num_candidates=len(scores.candidates),
            model=self._model.fingerprint,
            query_cache_hit=cache_hit,
            timings_ms=timings.milliseconds(),
            explanation=explanation,
            # the video's verdict; with windows: unknown when every window is, the lowest window score
            unknown=None if unknown is None else all(unknown),
            open_set_score=None if open_scores is None else round(float(open_scores.min()), 6),
            segments=segments,
            events=events,
        )

    @staticmethod
    def _ranked(scores: Scores, probs: np.ndarray) -> list[Prediction]:
        """The candidates by `probs` `[C]`, best first (ties keep the candidates' order)."""
        order = np.argsort(-probs, kind="stable")
        return [Prediction(scores.candidates[i], float(probs[i]), scores.sources[scores.candidates[i]]) for i in order]

    async def _score(self, queries: np.ndarray, manifest: Any, labels: list[str], text_weight: float | None,
                     timings: Timings) -> Scores:
        """Probabilities of queries `[Q, T, D]` over the candidates, with the mode they came from."""
        candidates: list[str] = []
        sources: dict[str, Source] = {}
        few_probs = zero_probs = prototypes = q2s = calibration = None
        if manifest is not None:
            classes = list(manifest.classes)
            with timings.measure("match"):
                prototypes, calibration = await self._support_sets.prepared(manifest)  # [N, T, D]
            with timings.measure("encode"):
                class_text = await self._features.text(classes)  # [N, D]
            metric = self._model.metric_for_set(manifest.id, manifest.metric)
            with timings.measure("match"):
                q2s = await self._backend.classify(queries, prototypes, None, metric=metric, op="open_set")  # [Q, N]
                if text_weight is None or labels:  # the model's own mix (hybrid: the few-shot part)
                    few_probs = softmax(await self._backend.classify(queries, prototypes, class_text, metric=metric))
                else:
                    few_probs = await self._mixed(queries, q2s, class_text, text_weight)  # [Q, N]
            # The model's few-shot probabilities at the temperature its checkpoint records for sets with this
            # few clips a class (1: as they are): the ranking stays, the numbers say how often such an answer
            # is right (training.calibration).
            few_probs = temper(few_probs, self._model.temperature(manifest.fewest_shots()))
            candidates = classes
            sources = {label: "support" for label in classes}
        if labels:
            text_only = [label for label in labels if label not in sources]
            for label in labels:
                sources[label] = "both" if label in sources else "text"
            candidates = candidates + text_only
            with timings.measure("encode"):
                text_feats = await self._features.text(candidates)  # [C, D]
            with timings.measure("match"):
                zero_probs = softmax(await self._backend.zero_shot(queries, text_feats))  # [Q, C]
        mode, probs = self._fuse(few_probs, zero_probs, len(candidates), text_weight)
        open_set_scores = None if calibration is None else open_set.open_set_score(q2s, calibration.reference)  # [Q]
        return Scores(mode=mode, probs=probs, candidates=candidates, sources=sources, prototypes=prototypes,
                      q2s_logits=q2s, open_set_scores=open_set_scores,
                      threshold=None if calibration is None else calibration.threshold)

    async def _mixed(self, queries: np.ndarray, q2s_logits: np.ndarray, class_text: np.ndarray,
                     text_weight: float) -> np.ndarray:
        """Few-shot probabilities `[Q, N]` with the text share `text_weight` instead of the model's alpha:
        w * softmax(Q2T) + (1 - w) * softmax(Q2S), the model's own formula with another weight."""
        q2s = softmax(q2s_logits)  # [Q, N]
        if text_weight == 0.0:
            return q2s
        q2t = softmax(await self._backend.zero_shot(queries, class_text))  # [Q, N]
        return text_weight * q2t + (1.0 - text_weight) * q2s

    def _check(self, labels: list[str], support_set_id: str | None, top_k: int | None,
               text_weight: float | None) -> None:
        limit = self._settings.max_labels_per_request
        if len(labels) > limit:
            raise PayloadTooLarge(f"{len(labels)} labels in one request; the limit is {limit} "
                                  "(max_labels_per_request).", code="too_many_labels")
        if support_set_id is None and not labels:
            raise InvalidField("Give a support_set_id (few-shot), labels (zero-shot), or both (hybrid).",
                               code="missing_target")
        if top_k is not None and top_k < 1:
            raise InvalidField("top_k must be at least 1.", code="invalid_top_k")
        if text_weight is not None and not 0.0 <= text_weight <= 1.0:  # also refuses nan
            raise InvalidField("text_weight must be between 0 and 1.", code="invalid_text_weight")

    def _fuse(self, few_probs: np.ndarray | None, zero_probs: np.ndarray | None, num_candidates: int,
              text_weight: float | None) -> tuple[Mode, np.ndarray]:
        """The mode and the probabilities `[Q, C]` over all candidates (support classes first)."""
        if few_probs is not None and zero_probs is not None:
            weight = self._settings.hybrid_text_weight if text_weight is None else text_weight
            few_padded = np.zeros((few_probs.shape[0], num_candidates))
            few_padded[:, :few_probs.shape[1]] = few_probs  # support classes come first; text-only get 0
            return "hybrid", weight * zero_probs + (1.0 - weight) * few_padded
        if few_probs is not None:
            return "few-shot", few_probs
        return "zero-shot", zero_probs  # type: ignore[return-value]


def check_windows(segment_seconds: float | None, stride_seconds: float | None) -> None:
    """`segment_seconds` and `stride_seconds` within their bounds (`service.bounds`); a stride needs a
    segment. 422 otherwise."""
    for name, value in (("segment_seconds", segment_seconds), ("stride_seconds", stride_seconds)):
        if value is not None and not MIN_SEGMENT_S <= value <= MAX_SEGMENT_S:  # also refuses nan
            raise InvalidField(f"{name} must be between {MIN_SEGMENT_S:g} and {MAX_SEGMENT_S:g} seconds.",
                               code="invalid_segment")
    if stride_seconds is not None and segment_seconds is None:
        raise InvalidField("stride_seconds needs segment_seconds.", code="invalid_segment")
