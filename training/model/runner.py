"""ModelRunner: the fsar model behind numpy arrays, for serving.

The embedded backend and the three Triton models call the same runner, so both serve the same
numbers (numpy in, float32 numpy out; every call under ``torch.inference_mode``)::

    runner = ModelRunner(model)                                  # an FsarModel, on its device
    text_feats = runner.encode_texts(["open the valve"])          # [N, D]
    support = runner.encode_videos(frames, text_feats[labels])   # uint8 [S, T, H, W, 3] -> [S, T, D]
    prototypes = runner.build_prototypes(support, labels, text_feats)  # [N, T, D]
    logits = runner.classify(runner.encode_videos(query_frames), prototypes, text_feats)  # [Q, N]
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from training.model.explain import explain_alignment
from training.model.fsar_model import FsarModel


class ModelRunner:
    """Numpy calls on an :class:`FsarModel` (float inputs are cast to the model's device and dtype)."""

    def __init__(self, model: FsarModel) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def metric(self) -> str:
        """The model's temporal metric (the only one :meth:`classify` accepts)."""
        return self.model.config.metric

    # ------------------------------------------------------------------ encoders
    def encode_videos(self, frames: np.ndarray, text_feats: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 frames ``[B, T, H, W, 3]`` (+ support videos' label text features ``[B, D]``) ->
        frame features float32 ``[B, T, D]``."""
        if frames.dtype != np.uint8 or frames.ndim != 5:
            raise ValueError(f"frames must be uint8 [B, T, H, W, 3], got {frames.dtype} {frames.shape}")
        with torch.inference_mode():
            texts = None if text_feats is None else self._floats(text_feats)
            return _numpy(self.model.encode_video(self._tensor(frames), texts=texts))

    def encode_texts(self, labels: Sequence[str]) -> np.ndarray:
        """N labels -> text features float32 ``[N, D]`` (the model applies its prompt template)."""
        with torch.inference_mode():
            return _numpy(self.model.encode_text(list(labels)))

    # ------------------------------------------------------------------ few-shot head
    def build_prototypes(self, support_feats: np.ndarray, support_labels: np.ndarray,
                         text_feats: np.ndarray) -> np.ndarray:
        """Support features ``[S, T, D]``, integer labels ``[S]`` in 0..N-1, label text features
        ``[N, D]`` -> prototypes float32 ``[N, T, D]``."""
        with torch.inference_mode():
            labels = self._tensor(np.asarray(support_labels).astype(np.int64))
            return _numpy(self.model.build_prototypes(self._floats(support_feats), labels,
                                                      self._floats(text_feats)))

    def classify(self, query_feats: np.ndarray, prototypes: np.ndarray, text_feats: Optional[np.ndarray] = None,
                 metric: Optional[str] = None) -> np.ndarray:
        """Queries ``[Q, T, D]`` against prototypes ``[N, T, D]`` (+ the classes' text features
        ``[N, D]``: hybrid) -> logits float32 ``[Q, N]``. ``metric`` None or the model's own."""
        if metric is not None and metric != self.metric:
            raise ValueError(f"metric {metric!r} is not available; this model uses {self.metric!r}")
        with torch.inference_mode():
            texts = None if text_feats is None else self._floats(text_feats)
            return _numpy(self.model.classify(self._floats(query_feats), self._floats(prototypes), texts))

    def zero_shot(self, query_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        """Queries ``[Q, T, D]`` against label text features ``[N, D]`` -> logits float32 ``[Q, N]``."""
        with torch.inference_mode():
            return _numpy(self.model.zero_shot(self._floats(query_feats), self._floats(text_feats)))

    def explain(self, query_feats: np.ndarray, prototypes: np.ndarray) -> dict[str, np.ndarray]:
        """Why queries ``[Q, T, D]`` score as they do against prototypes ``[N, T, D]``:
        ``{"similarity": float32 [Q, N, T, T], "alignment": float32 [Q, N, 2, T, T]}``
        (:func:`training.model.explain.explain_alignment`)."""
        with torch.inference_mode():
            return explain_alignment(self.model, self._floats(query_feats), self._floats(prototypes))

    # ------------------------------------------------------------------ conversions
    def _tensor(self, array: np.ndarray) -> Tensor:
        """An array as a tensor on the model's device, dtype kept."""
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _floats(self, array: np.ndarray) -> Tensor:
        """A float array as a tensor on the model's device, in the model's dtype."""
        return self._tensor(array).to(self.dtype)


def _numpy(tensor: Tensor) -> np.ndarray:
    """float32 numpy copy of a model output."""
    return tensor.detach().float().cpu().numpy()


__all__ = ["ModelRunner"]
