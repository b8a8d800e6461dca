"""Classification of one query video: few-shot, zero-shot or hybrid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from service.backends.base import softmax
from service.core.checks import check_not_empty, clean_labels, unique
from service.core.explain import Explainer
from service.core.features import Features
from service.core.instrumented import CountedBackend
from service.core.model import ModelFacts
from service.core.support_sets import SupportSets
from service.core.timings import Timings
from service.core.uploads import Upload
from service.errors import InvalidField, PayloadTooLarge
from service.settings import Settings

Source = Literal["support", "text", "both"]


@dataclass(frozen=True)
class Prediction:
    """One candidate label, its probability, and where it came from."""

    label: str
    score: float
    source: Source


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
                       explain: bool = False) -> Classification:
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

        Scores are probabilities summing to 1 over all candidates; `top_k` keeps the best k.
        `explain` adds an `explanation` (`service.core.explain.Explainer.explain`).
        """
        labels = unique(clean_labels(labels or []))
        self._check(labels, support_set_id, top_k, text_weight)
        check_not_empty(upload)
        manifest = await self._support_sets.load(support_set_id, tenant) if support_set_id is not None else None

        timings = Timings()
        query_feats, cache_hit = await self._features.query(upload, tenant, timings)
        query_batch = query_feats[None]  # [1, T, D]

        candidates: list[str] = []
        sources: dict[str, Source] = {}
        few_probs = zero_probs = prototypes = None
        if manifest is not None:
            classes = list(manifest.classes)
            with timings.measure("match"):
                prototypes = await self._support_sets.prototypes(manifest)  # [N, T, D]
            with timings.measure("encode"):
                class_text = await self._features.text(classes)  # [N, D]
            metric = self._model.metric_for_set(manifest.id, manifest.metric)
            with timings.measure("match"):
                if text_weight is None or labels:  # the model's own mix (hybrid: the few-shot part)
                    few_probs = softmax(await self._backend.classify(query_batch, prototypes, class_text,
                                                                     metric=metric))[0]  # [N]
                else:
                    few_probs = await self._mixed(query_batch, prototypes, class_text, metric, text_weight)
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
                logits = await self._backend.zero_shot(query_batch, text_feats)
            zero_probs = softmax(logits)[0]  # [C]

        mode, probs = self._fuse(few_probs, zero_probs, len(candidates), text_weight)
        order = np.argsort(-probs, kind="stable")
        ranked = [Prediction(candidates[i], float(probs[i]), sources[candidates[i]]) for i in order]
        explanation = None
        if explain and self._explainer is not None:
            explanation = await self._explainer.explain(upload, query_feats, prototypes,
                                                        list(manifest.classes) if manifest else [], ranked)
        return Classification(
            mode=mode,
            predictions=ranked[:top_k] if top_k is not None else ranked,
            support_set_id=support_set_id,
            labels=labels or None,
            num_candidates=len(candidates),
            model=self._model.fingerprint,
            query_cache_hit=cache_hit,
            timings_ms=timings.milliseconds(),
            explanation=explanation,
        )

    async def _mixed(self, query_batch: np.ndarray, prototypes: np.ndarray, class_text: np.ndarray,
                     metric: str | None, text_weight: float) -> np.ndarray:
        """Few-shot probabilities `[N]` with the text share `text_weight` instead of the model's alpha:
        w * softmax(Q2T) + (1 - w) * softmax(Q2S), the model's own formula with another weight."""
        q2s = softmax(await self._backend.classify(query_batch, prototypes, None, metric=metric))[0]  # [N]
        if text_weight == 0.0:
            return q2s
        q2t = softmax(await self._backend.zero_shot(query_batch, class_text))[0]  # [N]
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
              text_weight: float | None) -> tuple[Literal["few-shot", "zero-shot", "hybrid"], np.ndarray]:
        """The mode and the probabilities `[C]` over all candidates (support classes first)."""
        if few_probs is not None and zero_probs is not None:
            weight = self._settings.hybrid_text_weight if text_weight is None else text_weight
            few_padded = np.zeros(num_candidates)
            few_padded[:len(few_probs)] = few_probs  # support classes come first; text-only get 0
            return "hybrid", weight * zero_probs + (1.0 - weight) * few_padded
        if few_probs is not None:
            return "few-shot", few_probs
        return "zero-shot", zero_probs  # type: ignore[return-value]
