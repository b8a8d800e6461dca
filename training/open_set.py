"""Open-set ("none of these") recognition for few-shot classification: the score and its calibration.

Pure numpy (no torch), so the gateway can use it with any backend. Everything is computed from what
the backend already returns for a few-shot answer: the Q2S logits ``[Q, N]`` (pure metric logits,
``-distance * scale``), and the final probabilities ``[Q, N]``
(``alpha * softmax(Q2T) + (1 - alpha) * softmax(Q2S)``, see :func:`mix_probabilities`).

The score (:func:`open_set_score`) lies in [0, 1]; **higher = less like any registered class**. A
query is answered "none of these" when its score is above the support set's threshold.

Calibration, once per support set (when it is registered or changed): the threshold accepts
``accept`` (95%) of the set's left-out clips, and moves up to its normal approximation (mean + 1.645
sd, the sd at least ``MIN_SCORE_SD``), but not past the middle between them and the set's clips
scored without their own class (stand-ins for unregistered actions, :func:`class_out_scores`)::

    plan = plan_calibration(labels)                                        # labels [S]
    q2s_support = classify(support_feats, prototypes)                      # [S, N], no texts
    loo_protos = build_prototypes(support_feats[plan.loo_support], plan.loo_labels,
                                  text_feats[plan.loo_classes])             # [J, T, D] (skip when J == 0)
    q2s_own = plan.own_logits(classify(support_feats[plan.heldout], loo_protos))   # [J]
    calibration = calibrate(plan, q2s_support, q2s_own, default_threshold=default_threshold(meta))
    ...
    scores = open_set_score(q2s_query, calibration.reference)             # [Q]
    unknown = scores > calibration.threshold

:func:`calibrate_support_set` runs exactly those steps with synchronous callables. A set where no
class has two shots gets the model-level default (:func:`default_threshold`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

SCORE_NAMES = ("distance", "msp", "margin")
"""Every score :func:`score_by_name` knows: ``distance`` is :func:`open_set_score`; ``msp`` (maximum
softmax probability) is the baseline; ``margin`` (top-2 probability gap) was measured beside them."""

DEFAULT_ACCEPT = 0.95
"""Fraction of a set's own left-out known clips that its threshold accepts."""

MIN_SCORE_SD = 0.05
"""Smallest spread assumed for the scores of a set's known clips when its threshold is set (about 0.2
of the set's logit spread near score 0.5): a few left-out shots understate how far queries stray."""

DEFAULT_THRESHOLDS: Dict[str, float] = {"distance": 0.905, "msp": 0.185, "margin": 0.365}
"""Model-level thresholds for sets with one shot per class, for models whose checkpoint records none.

Measured with ``fsar eval --open-set --record --way 5 --shot 1 --episodes 1000`` on ``fsar synth``
data (default seed 0; validation split, 6 classes) with the ``synthetic-tiny`` preset's training-free
model (the demo's: identity adapters and TPCM on the shipped 4,000-step stand-in tower, unit frames,
frame centering, OTAM lambda 0.1): the ``ceil(0.95 n)``-th smallest score of the n = 5,000 known queries
(:func:`accept_threshold`), rounded to 3 decimals. ``msp`` and ``margin`` depend on the number of classes
(here 5) and on the probabilities' scale (measured at temperature 1); ``distance`` is normalised per set.
Re-measured 2026-12-08 (it was 0.901 / 0.266 / 0.525 on the 1,000-step tower and the previous preset)."""

@dataclass(frozen=True)
class SetReference:
    """Where a support set's own clips sit in Q2S logits: the unit of :func:`open_set_score`.

    Attributes:
        own: median Q2S logit of a support clip against its own class's prototype, built without that
            clip when some class has >= 2 shots (leave-one-out, over the clips left out), else with it.
        spread: standard deviation of all ``[S, N]`` Q2S logits of the support clips against the set's
            prototypes (> 0; ``max(|own|, 1)`` when they are all equal, e.g. one clip in all).
    """

    own: float
    spread: float


@dataclass(frozen=True)
class SetCalibration:
    """A support set's open-set calibration (store it with the set; ``to_dict`` / ``from_dict``).

    Attributes:
        threshold: reject ("none of these") when the score is above it.
        reference: the set's :class:`SetReference` for :func:`open_set_score`.
        source: ``"leave-one-out"`` (from the set's own clips) or ``"default"`` (model-level).
        heldout: number of left-out clips the threshold came from (0 for ``default``).
        accept: the fraction of left-out clips the threshold accepts by design.
        score: which score the threshold applies to (a name in :data:`SCORE_NAMES`).
    """

    threshold: float
    reference: SetReference
    source: str
    heldout: int
    accept: float
    score: str = "distance"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SetCalibration":
        return cls(**{**raw, "reference": SetReference(**raw["reference"])})


# --------------------------------------------------------------------------- scores
def mix_probabilities(q2s_logits: np.ndarray, q2t_logits: Optional[np.ndarray], alpha: float) -> np.ndarray:
    """The model's few-shot probabilities ``alpha * softmax(Q2T) + (1 - alpha) * softmax(Q2S)``, ``[Q, N]``."""
    q2s_probs = _softmax(q2s_logits)
    if q2t_logits is None or alpha == 0.0:
        return q2s_probs
    return alpha * _softmax(q2t_logits) + (1.0 - alpha) * q2s_probs


def open_set_score(q2s_logits: np.ndarray, reference: SetReference) -> np.ndarray:
    """Open-set score in [0, 1] of each query: higher = less like any registered class.

    The best Q2S logit ``l`` (the nearest prototype) becomes the normalised distance
    ``u = (reference.own - l) / reference.spread``: how many of the set's logit spreads the query is
    farther from its nearest class than the set's own clips are from theirs (negative: closer). The
    score is ``1 / (1 + exp(-u))``: 0.5 exactly as close as the set's own clips, towards 1 farther.
    It depends on the logits only through ``u``, so the metric's scale and offset cancel.

    Args:
        q2s_logits: ``[Q, N]`` Q2S logits (``-distance * scale``; no text mixed in).
        reference: the set's :class:`SetReference` (from :func:`calibrate`).

    Returns:
        float64 ``[Q]`` scores.
    """
    logits = _matrix(q2s_logits, "q2s_logits")
    u = (reference.own - logits.max(axis=1)) / reference.spread
    return 0.5 * (1.0 + np.tanh(0.5 * u))  # the logistic 1 / (1 + exp(-u)) without overflow


def msp_score(probs: np.ndarray) -> np.ndarray:
    """Baseline: ``1 - max_c p(c)`` (maximum softmax probability) of each query, ``[Q, N]`` -> ``[Q]``."""
    return 1.0 - _matrix(probs, "probs").max(axis=1)


def margin_score(probs: np.ndarray) -> np.ndarray:
    """``1 - (p_top1 - p_top2)`` of each query, ``[Q, N]`` -> ``[Q]`` (0 with a single class)."""
    p = _matrix(probs, "probs")
    if p.shape[1] < 2:
        return np.zeros(p.shape[0])
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def score_by_name(name: str, q2s_logits: np.ndarray, probs: np.ndarray, reference: SetReference) -> np.ndarray:
    """The score ``name`` (one of :data:`SCORE_NAMES`) of each query, ``[Q]``."""
    if name == "distance":
        return open_set_score(q2s_logits, reference)
    if name == "msp":
        return msp_score(probs)
    if name == "margin":
        return margin_score(probs)
    raise ValueError(f"unknown open-set score {name!r}; choose one of {', '.join(SCORE_NAMES)}")


# --------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class CalibrationPlan:
    """The backend calls that calibrate one support set, as index arrays (see the module doc).

    Every clip of a class with >= 2 shots is left out once ("job" j). Job j's prototype is its class's
    prototype built from that class's OTHER shots; the other classes keep their full prototypes. Clips
    of one-shot classes are never left out (nothing would remain of their class).

    Attributes:
        labels: ``[S]`` class index 0..N-1 of each support clip.
        heldout: ``[J]`` support index left out by job j.
        loo_support: ``[M]`` support indices whose features build the jobs' prototypes (M = sum K_c (K_c - 1)).
        loo_labels: ``[M]`` job 0..J-1 each of those clips belongs to (the prototype "class").
        loo_classes: ``[J]`` class of job j (give ``text_feats[loo_classes]`` to build_prototypes).
    """

    labels: np.ndarray
    heldout: np.ndarray
    loo_support: np.ndarray
    loo_labels: np.ndarray
    loo_classes: np.ndarray

    @property
    def num_jobs(self) -> int:
        return int(self.heldout.size)

    @staticmethod
    def own_logits(heldout_vs_loo: np.ndarray) -> np.ndarray:
        """Job j's clip against job j's prototype: the diagonal of ``classify(support[heldout], loo_protos)`` ``[J, J]`` -> ``[J]``."""
        matrix = _matrix(heldout_vs_loo, "heldout_vs_loo")
        return np.diagonal(matrix).copy()


def plan_calibration(labels: np.ndarray) -> CalibrationPlan:
    """The leave-one-out jobs of a support set with integer ``labels [S]`` in 0..N-1 (see :class:`CalibrationPlan`)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"labels must be non-negative integers [S], got {labels.dtype} {labels.shape}")
    heldout, loo_support, loo_labels = [], [], []
    for index, label in enumerate(labels.tolist()):
        others = [i for i in np.flatnonzero(labels == label).tolist() if i != index]
        if not others:
            continue
        loo_support.extend(others)
        loo_labels.extend([len(heldout)] * len(others))
        heldout.append(index)
    heldout_array = np.asarray(heldout, dtype=np.int64)
    return CalibrationPlan(labels=labels.astype(np.int64), heldout=heldout_array,
                           loo_support=np.asarray(loo_support, dtype=np.int64),
                           loo_labels=np.asarray(loo_labels, dtype=np.int64),
                           loo_classes=labels[heldout_array].astype(np.int64))


def leave_one_out_logits(plan: CalibrationPlan, q2s_support: np.ndarray, q2s_own: np.ndarray) -> np.ndarray:
    """Q2S logits ``[J, N]`` of each left-out clip against the set with its own shot removed.

    Args:
        plan: from :func:`plan_calibration`.
        q2s_support: ``[S, N]`` Q2S logits of every support clip against the full prototypes.
        q2s_own: ``[J]`` job j's clip against job j's prototype (:meth:`CalibrationPlan.own_logits`).
    """
    support = _matrix(q2s_support, "q2s_support")
    own = np.asarray(q2s_own, dtype=np.float64).reshape(-1)
    if support.shape[0] != plan.labels.size or own.size != plan.num_jobs:
        raise ValueError(f"need q2s_support [{plan.labels.size}, N] and q2s_own [{plan.num_jobs}], "
                         f"got {support.shape} and {own.shape}")
    rows = support[plan.heldout].copy()
    rows[np.arange(plan.num_jobs), plan.loo_classes] = own
    return rows


def set_reference(plan: CalibrationPlan, q2s_support: np.ndarray, q2s_own: np.ndarray) -> SetReference:
    """The set's :class:`SetReference` from the calibration logits (arguments as :func:`leave_one_out_logits`)."""
    support = _matrix(q2s_support, "q2s_support")
    labels = plan.labels
    own_values = (np.asarray(q2s_own, dtype=np.float64) if plan.num_jobs
                  else support[np.arange(labels.size), labels])
    own = float(np.median(own_values))
    spread = float(support.std())
    if not spread > 1e-9 * max(1.0, abs(own)):
        spread = max(abs(own), 1.0)
    return SetReference(own=own, spread=spread)


def accept_threshold(known_scores: np.ndarray, accept: float = DEFAULT_ACCEPT) -> float:
    """The smallest score at or below which at least ``accept`` of ``known_scores`` lie
    (the ``ceil(accept * n)``-th smallest)."""
    scores = np.sort(np.asarray(known_scores, dtype=np.float64).reshape(-1))
    if scores.size == 0:
        raise ValueError("no known scores to set a threshold from")
    if not 0.0 < accept <= 1.0:
        raise ValueError(f"accept must be in (0, 1], got {accept}")
    return float(scores[max(math.ceil(accept * scores.size - 1e-9), 1) - 1])


def calibrate(plan: CalibrationPlan, q2s_support: np.ndarray, q2s_own: np.ndarray, *,
              default_threshold: float, q2t_support: Optional[np.ndarray] = None, alpha: float = 0.0,
              accept: float = DEFAULT_ACCEPT, score: str = "distance") -> SetCalibration:
    """A support set's threshold and reference from its calibration logits.

    With at least one class of >= 2 shots, each left-out clip is scored as a query against the set with
    its own shot removed (:func:`leave_one_out_logits`; probabilities mixed with its Q2T logits, which
    do not depend on the prototypes), and the threshold is :func:`accept_threshold` of those scores.
    Otherwise (one shot per class everywhere) the threshold is ``default_threshold``.

    Args:
        plan: from :func:`plan_calibration`.
        q2s_support: ``[S, N]`` Q2S logits of the support clips against the set's prototypes.
        q2s_own: ``[J]`` left-out clips against their leave-one-out prototypes (empty when J == 0).
        default_threshold: the model-level threshold (:func:`default_threshold`).
        q2t_support: ``[S, N]`` Q2T logits of the support clips against the class texts (when alpha > 0).
        alpha: the text share of the probabilities (the model's alpha, or the request's text weight).
        accept: fraction of left-out clips to accept.
        score: the score the threshold is for (:data:`SCORE_NAMES`).
    """
    reference = set_reference(plan, q2s_support, q2s_own)
    if plan.num_jobs == 0:
        return SetCalibration(threshold=float(default_threshold), reference=reference, source="default",
                              heldout=0, accept=accept, score=score)
    loo = leave_one_out_logits(plan, q2s_support, q2s_own)
    q2t = None if q2t_support is None else _matrix(q2t_support, "q2t_support")[plan.heldout]
    scores = score_by_name(score, loo, mix_probabilities(loo, q2t, alpha), reference)
    threshold = accept_threshold(scores, accept)
    if score == "distance":
        # A handful of left-out clips put the quantile at their largest score, hugging the known side:
        # a class's shots are more alike than its future queries. So the threshold is also at least the
        # normal approximation of the same quantile, mean + z * sd, with the spread at least
        # MIN_SCORE_SD; but it stays below the middle between the known clips and the set's clips scored
        # without their own class (stand-ins for queries of actions the set does not have).
        known_mu = float(np.mean(scores))
        z = float(_normal_quantile(accept))
        threshold = max(threshold, known_mu + z * max(float(np.std(scores)), MIN_SCORE_SD))
        unknown_like = class_out_scores(plan, q2s_support, reference)
        if unknown_like.size:
            middle = 0.5 * (known_mu + float(np.mean(unknown_like)))
            threshold = min(threshold, max(accept_threshold(scores, accept), middle))
    return SetCalibration(threshold=threshold, reference=reference,
                          source="leave-one-out", heldout=plan.num_jobs, accept=accept, score=score)


def class_out_scores(plan: CalibrationPlan, q2s_support: np.ndarray, reference: SetReference) -> np.ndarray:
    """:func:`open_set_score` of each support clip against the set without its own class: ``[S]``, what
    a query of an action the set does not have scores (empty when the set has one class)."""
    support = _matrix(q2s_support, "q2s_support")
    if support.shape[1] < 2:
        return np.zeros(0)
    others = support.copy()
    others[np.arange(plan.labels.size), plan.labels] = -np.inf
    return open_set_score(others, reference)


def calibrate_support_set(support_feats: np.ndarray, labels: np.ndarray, text_feats: Optional[np.ndarray],
                          build_prototypes: Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], np.ndarray],
                          q2s: Callable[[np.ndarray, np.ndarray], np.ndarray], *, default_threshold: float,
                          prototypes: Optional[np.ndarray] = None,
                          q2t_support: Optional[np.ndarray] = None, alpha: float = 0.0,
                          accept: float = DEFAULT_ACCEPT, score: str = "distance") -> SetCalibration:
    """:func:`calibrate` with the backend calls made through synchronous callables.

    Args:
        support_feats: ``[S, T, D]`` support-branch features; ``labels``: ``[S]`` in 0..N-1.
        text_feats: ``[N, D]`` class label text features (None: prototypes without text).
        build_prototypes: ``(feats [M, T, D], labels [M], texts [K, D] | None) -> [K, T, D]``.
        q2s: ``(queries [Q, T, D], prototypes [K, T, D]) -> [Q, K]`` Q2S logits (no text).
        prototypes: the set's ``[N, T, D]`` prototypes when already built.
        Others as :func:`calibrate`.

    Backend cost: one Q2S call of S clips, plus, when some class has >= 2 shots, one prototype build of
    ``sum_c K_c (K_c - 1)`` clips and one Q2S call of J clips against J prototypes.
    """
    plan, q2s_support, q2s_own = calibration_logits(support_feats, labels, text_feats, build_prototypes, q2s,
                                                    prototypes=prototypes)
    return calibrate(plan, q2s_support, q2s_own, default_threshold=default_threshold, q2t_support=q2t_support,
                     alpha=alpha, accept=accept, score=score)


def calibration_logits(support_feats: np.ndarray, labels: np.ndarray, text_feats: Optional[np.ndarray],
                       build_prototypes: Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], np.ndarray],
                       q2s: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                       prototypes: Optional[np.ndarray] = None) -> tuple[CalibrationPlan, np.ndarray, np.ndarray]:
    """The backend half of :func:`calibrate_support_set`: ``(plan, q2s_support [S, N], q2s_own [J])``."""
    plan = plan_calibration(labels)
    if prototypes is None:
        prototypes = build_prototypes(support_feats, plan.labels, text_feats)
    q2s_support = np.asarray(q2s(support_feats, prototypes), dtype=np.float64)
    q2s_own = np.zeros(0)
    if plan.num_jobs:
        texts = None if text_feats is None else np.asarray(text_feats)[plan.loo_classes]
        loo_protos = build_prototypes(support_feats[plan.loo_support], plan.loo_labels, texts)
        q2s_own = plan.own_logits(q2s(support_feats[plan.heldout], loo_protos))
    return plan, q2s_support, q2s_own


def default_threshold(meta: Optional[Mapping[str, Any]] = None, score: str = "distance") -> float:
    """The model-level threshold for sets with one shot per class.

    ``meta`` is a checkpoint's metadata (``read_checkpoint_meta``) or any mapping with an
    ``"open_set"`` entry as ``fsar eval --open-set --record`` writes it; without one, the documented
    :data:`DEFAULT_THRESHOLDS` constant.
    """
    recorded = (meta or {}).get("open_set") or {}
    value = (recorded.get("default_thresholds") or {}).get(score)
    if value is not None:
        return float(value)
    if score not in DEFAULT_THRESHOLDS:
        raise ValueError(f"unknown open-set score {score!r}; choose one of {', '.join(SCORE_NAMES)}")
    return DEFAULT_THRESHOLDS[score]


# --------------------------------------------------------------------------- evaluation helpers
def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling unknown from known by the score (unknown = positive):
    the probability that a random unknown scores above a random known, ties counting one half."""
    known = np.asarray(known_scores, dtype=np.float64).reshape(-1)
    unknown = np.asarray(unknown_scores, dtype=np.float64).reshape(-1)
    if known.size == 0 or unknown.size == 0:
        raise ValueError("AUROC needs at least one known and one unknown score")
    above = (unknown[:, None] > known[None, :]).sum()
    ties = (unknown[:, None] == known[None, :]).sum()
    return float((above + 0.5 * ties) / (known.size * unknown.size))


# --------------------------------------------------------------------------- helpers
def _normal_quantile(p: float) -> float:
    """The standard normal quantile (inverse CDF) at ``p`` in (0, 1), by bisection on erf."""
    low, high = -10.0, 10.0
    for _ in range(80):
        mid = 0.5 * (low + high)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def _softmax(logits: np.ndarray) -> np.ndarray:
    x = _matrix(logits, "logits")
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def _matrix(array: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(array, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must be [Q, N] with N >= 1, got shape {matrix.shape}")
    return matrix


__all__ = ["SCORE_NAMES", "DEFAULT_ACCEPT", "DEFAULT_THRESHOLDS", "SetReference", "SetCalibration",
           "CalibrationPlan", "mix_probabilities", "open_set_score", "msp_score", "margin_score", "score_by_name",
           "plan_calibration", "leave_one_out_logits", "set_reference", "accept_threshold", "calibrate",
           "calibrate_support_set", "calibration_logits", "class_out_scores", "default_threshold", "auroc"]
