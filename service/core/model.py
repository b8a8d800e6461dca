"""What the gateway needs to know about the model being served, read from `Backend.info()`."""
from __future__ import annotations

from typing import Any

from service.backends.base import Backend
from service.errors import Conflict, InvalidField
from training.calibration import recorded_temperature

#: The fields of the short model description embedded in responses (`ModelRef`).
_REF_FIELDS = ("fingerprint", "backbone", "adapter", "metric", "checkpoint_hash", "weights_source", "demo")


class ModelFacts:
    """A live view of the backend's model card (read at every access: valid once the backend started)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def info(self) -> dict[str, Any]:
        return self._backend.info()

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    @property
    def num_frames(self) -> int:
        return int(self.info["num_frames"])

    @property
    def input_size(self) -> int:
        return int(self.info["input_size"])

    @property
    def metric(self) -> str:
        """The model's own temporal metric."""
        return self.info["metric"]

    @property
    def sampling(self) -> dict[str, int]:
        """How clips are sampled for this model: `{"num_frames": T, "size": S}`."""
        return {"num_frames": self.num_frames, "size": self.input_size}

    @property
    def open_set_meta(self) -> dict[str, Any]:
        """What the checkpoint records about open-set recognition (`fsar eval --open-set --record`), as
        `{"open_set": {...}}`, or {} (then `training.open_set.DEFAULT_THRESHOLDS` apply)."""
        recorded = self.info.get("open_set")
        return {"open_set": recorded} if recorded else {}

    def temperature(self, shots: int) -> float:
        """The temperature of the few-shot probabilities against a set whose smallest class has `shots`
        clips (`fsar eval --calibrate --record`; `training.calibration.recorded_temperature`): answers
        report `softmax(log p / T)`. 1.0 when the checkpoint records none."""
        return recorded_temperature(self.info, shots)

    def ref(self) -> dict[str, Any]:
        """The short model description embedded in responses."""
        info = self.info
        return {key: info.get(key) for key in _REF_FIELDS}

    def check_metric(self, metric: str | None) -> str | None:
        """A requested per-set metric, validated (422 if the model lacks it); None (the default, also
        for a blank one) means "whatever the model uses"."""
        if metric is None or not metric.strip():
            return None
        metric = metric.strip()
        info = self.info
        available = list(info.get("metrics") or [info["metric"]])
        if metric not in available:
            raise InvalidField(f"metric '{metric}' is not available with this model; choose one of "
                               f"{', '.join(available)}.", code="unknown_metric")
        return metric

    def metric_for_set(self, set_id: str, metric: str | None) -> str | None:
        """The metric to classify a set registered with `metric` (None: the model's own), or 409 if
        the current model does not offer it."""
        info = self.info
        if metric is None or metric == info["metric"]:
            return None
        if metric not in (info.get("metrics") or []):
            raise Conflict(f"Support set '{set_id}' was registered with metric '{metric}', which the "
                           f"current model does not offer (it uses '{info['metric']}'); register it again.",
                           code="metric_unavailable")
        return metric
