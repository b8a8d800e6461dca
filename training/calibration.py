"""Probability calibration of few-shot answers: temperatures fitted on held-out episodes.

A few-shot model ranks classes well long before its probabilities mean anything: the training-free
``synthetic-tiny`` model says 97% on average for answers that are right 55% of the time at 6-way
1-shot (README, "Probabilities that mean what they say"). Temperature scaling (Guo et al.,
"On Calibration of Modern Neural Networks", ICML 2017) fixes the scale without changing any ranking:
the reported probabilities become ``softmax(log p / T)``, with one ``T > 0`` chosen to minimise the
negative log-likelihood of the right class over episodes of classes the model is not evaluated on.

``log p`` are the model's few-shot log-probabilities (``FsarModel.classify``: the Q2S logits up to a
constant when ``alpha = 0``, else the log of the Q2S / Q2T mixture), so for a model without text,
``softmax(log p / T) = softmax(Q2S / T)``. Pure numpy, so the gateway applies it with any backend::

    T = fit_temperature(logits, labels)           # logits [M, N] from validation episodes, labels [M]
    probs = temper(probs, T)                      # [Q, N] probabilities as served -> calibrated ones
    calibration_summary(probs, labels)            # accuracy, confidence, ECE, NLL, Brier

The fewer the shots, the less sure a right answer should be, so ``fsar eval --calibrate --record`` fits
one ``T`` per shot count of :data:`FIT_SHOTS` (1, 5, 10) on the val split and writes them into the
checkpoint (``meta["calibration"]``: ``{"temperature": T at 1 shot, "temperatures": {"1": .., "5": ..,
"10": ..}, ...}``); the gateway reads it from the embedded checkpoint or the Triton models'
``fsar_calibration`` parameter and uses, for a support set, the temperature for its smallest class's shot
count (:func:`recorded_temperature`, interpolated in log shots). Without a record, ``T = 1`` (the
probabilities as the model gives them).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import numpy as np

ECE_BINS = 15
"""Equal-width confidence bins of :func:`expected_calibration_error` (Guo et al. use 15)."""

T_BOUNDS = (1e-3, 1e4)
"""The range :func:`fit_temperature` searches; a fit at a bound means the data asked for more."""

FIT_SHOTS = (1, 5, 10)
"""Shot counts ``fsar eval --calibrate`` fits a temperature at (those the split has clips for): the fewer
the shots, the less sure a right answer, so one temperature does not serve all (docs/learning.md)."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [M, N] with M >= 1 and N >= 2, got shape {logits.shape}")
    if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers [M] with M = {logits.shape[0]}, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}")
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite")
    return logits, labels.astype(np.int64)


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``[..., N]`` -> ``softmax(log p / T)`` (float64, rows sum to 1). ``T = 1`` returns
    them unchanged; the order of the classes in every row is kept (ties too). Zero probabilities stay 0."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs
    with np.errstate(divide="ignore"):
        logp = np.log(probs) / temperature
    top = np.max(logp, axis=-1, keepdims=True)
    weights = np.exp(logp - np.where(np.isfinite(top), top, 0.0))
    return weights / weights.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the right class under ``softmax(logits / T)``."""
    logits, labels = _check(logits, labels)
    logp = _log_softmax(logits / temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The ``T`` in ``bounds`` that minimises :func:`nll` of ``softmax(logits / T)``.

    With ``b = 1 / T`` the NLL is convex in ``b`` and its derivative, ``mean(E_p[z] - z_label)``, rises
    with ``b``; its zero is found by bisection on ``log b`` (60 halvings: far below any difference that
    shows). All queries right with margins -> the smallest ``T`` allowed; all wrong -> the largest.

    Args:
        logits: ``[M, N]`` the model's few-shot logits (or log-probabilities) of M queries.
        labels: ``[M]`` the right class of each.
    """
    logits, labels = _check(logits, labels)
    low_t, high_t = bounds
    if not 0 < low_t < high_t:
        raise ValueError(f"bounds must be 0 < low < high, got {bounds}")
    rows = np.arange(len(labels))

    def slope(b: float) -> float:
        p = np.exp(_log_softmax(logits * b))
        return float(((p * logits).sum(axis=1) - logits[rows, labels]).mean())

    lo, hi = math.log(1.0 / high_t), math.log(1.0 / low_t)  # log b
    if slope(math.exp(hi)) <= 0:
        return float(low_t)
    if slope(math.exp(lo)) >= 0:
        return float(high_t)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if slope(math.exp(mid)) < 0:
            lo = mid
        else:
            hi = mid
    return float(1.0 / math.exp(0.5 * (lo + hi)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE in percent: over ``bins`` equal-width bins of top-1 confidence, the query-weighted mean of
    ``|accuracy - mean confidence|`` (Guo et al. 2017)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total * 100.0)


def calibration_summary(probs: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """``accuracy``, mean top-1 ``confidence`` and ``ece`` (percent), ``nll`` and ``brier`` (mean over
    queries of the squared distance between the probabilities and the one-hot right answer)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    rows = np.arange(len(labels))
    onehot = np.zeros_like(probs)
    onehot[rows, labels] = 1.0
    return {
        "accuracy": float((probs.argmax(axis=1) == labels).mean() * 100.0),
        "confidence": float(probs.max(axis=1).mean() * 100.0),
        "ece": expected_calibration_error(probs, labels),
        "nll": float(-np.log(np.clip(probs[rows, labels], 1e-300, None)).mean()),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
    }


def _valid_temperature(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _by_shots(record: Mapping[str, Any]) -> Dict[int, float]:
    """``record["temperatures"]`` (``{"1": T1, "5": T5, ...}``) as ``{shots: T}``; {} when absent."""
    table = record.get("temperatures")
    if table is None:
        return {}
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"the recorded calibration's temperatures are not a {{shots: T}} table: {table!r}")
    out: Dict[int, float] = {}
    for key, value in table.items():
        shots = int(key) if isinstance(key, (int, str)) and str(key).isdigit() else 0
        if shots < 1 or not _valid_temperature(value):
            raise ValueError(f"the recorded calibration has a bad entry {key!r}: {value!r} (shots >= 1, T > 0)")
        out[shots] = float(value)
    return out


def temperature_for_shots(by_shots: Mapping[int, float], shots: int) -> float:
    """The temperature for support sets with ``shots`` clips a class, from temperatures fitted at some
    shot counts: linear in ``log shots`` between the two nearest (``log T`` interpolated), the nearest
    one's outside their range. Measured: fitted at 1 and 5 shots, this predicts 2 and 3 shots about as
    well as fitting there (docs/learning.md)."""
    if shots in by_shots:
        return float(by_shots[shots])
    points = sorted(by_shots.items())
    if shots <= points[0][0]:
        return points[0][1]
    if shots >= points[-1][0]:
        return points[-1][1]
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= shots <= s1:
            x = (math.log(shots) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return float(math.exp((1 - x) * math.log(t0) + x * math.log(t1)))
    raise AssertionError("unreachable")


def recorded_temperature(meta: Optional[Mapping[str, Any]], shots: Optional[int] = None) -> float:
    """The temperature a checkpoint's meta (or a served model's info) records under ``calibration``,
    else 1.0. ``shots``: the support set's clips a class (its smallest class); a record fitted at several
    shot counts (``temperatures``) gives :func:`temperature_for_shots`, otherwise ``temperature``. A
    malformed record is an error, not a silent 1.0."""
    record = (meta or {}).get("calibration")
    if not record:
        return 1.0
    if not isinstance(record, Mapping) or not _valid_temperature(record.get("temperature")):
        raise ValueError(f"the recorded calibration has no valid temperature: {record!r}")
    by_shots = _by_shots(record)
    if shots is not None and by_shots:
        return temperature_for_shots(by_shots, max(1, int(shots)))
    return float(record["temperature"])


__all__ = ["ECE_BINS", "T_BOUNDS", "FIT_SHOTS", "temper", "nll", "fit_temperature", "expected_calibration_error",
           "calibration_summary", "temperature_for_shots", "recorded_temperature"]
