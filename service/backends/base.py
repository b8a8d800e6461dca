"""The backend interface: where the model runs. Numpy in, numpy out; no torch here.

Two implementations: `EmbeddedBackend` (the model in this process, `service/backends/embedded.py`)
and a Triton one (`tritonclient`, added separately). The gateway calls only these methods, so it
never re-implements model math:

    frames [B, T, H, W, 3] uint8 --encode_videos--> frame features [B, T, D] float32
    labels list[str]           --encode_texts---> text features [N, D] float32
    support features [S, T, D] + labels [S] + text [N, D] --build_prototypes--> prototypes [N, T, D]
    query features [Q, T, D] + prototypes [N, T, D] (+ text [N, D]) --classify--> logits [Q, N]
    query features [Q, T, D] + text [N, D] --zero_shot--> logits [Q, N]
    query features [Q, T, D] + prototypes [N, T, D] --explain--> similarity [Q, N, T, T], alignment [Q, N, 2, T, T]

softmax(logits) over the last axis gives the model's probabilities.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Backend(ABC):
    """A model backend. Create it cheaply, `await start()` in the lifespan, `await close()` on shutdown."""

    name: str = "abstract"

    @abstractmethod
    async def start(self) -> None:
        """Load the model / connect. Raises with a one-sentence message when that is impossible
        (e.g. pretrained weights not cached offline); the server then stops at start-up."""

    @abstractmethod
    async def encode_videos(self, frames: np.ndarray, text_feats: np.ndarray | None = None) -> np.ndarray:
        """Frame features of B videos.

        Args:
            frames: uint8 `[B, T, H, W, 3]` RGB frames at the model's input size (`info()["input_size"]`).
            text_feats: float32 `[B, D]` label text feature per video (support branch), or None (queries).
        Returns:
            float32 `[B, T, D]`.
        """

    @abstractmethod
    async def encode_texts(self, labels: list[str]) -> np.ndarray:
        """Text features `[N, D]` float32 of N labels (the model applies its prompt template)."""

    @abstractmethod
    async def build_prototypes(self, support_feats: np.ndarray, support_labels: np.ndarray,
                               text_feats: np.ndarray) -> np.ndarray:
        """Class prototypes `[N, T, D]` from support features `[S, T, D]`, int64 labels `[S]` in
        0..N-1 and the classes' text features `[N, D]`."""

    @abstractmethod
    async def classify(self, query_feats: np.ndarray, prototypes: np.ndarray,
                       text_feats: np.ndarray | None = None, metric: str | None = None) -> np.ndarray:
        """Few-shot logits `[Q, N]` of queries `[Q, T, D]` against prototypes `[N, T, D]`; with the
        classes' text features `[N, D]` the model mixes in its text (Q2T) probabilities.
        `metric` None = the model's; other names only where `info()["metrics"]` lists them."""

    @abstractmethod
    async def zero_shot(self, query_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        """Zero-shot logits `[Q, N]` of queries `[Q, T, D]` against label text features `[N, D]`."""

    async def explain(self, query_feats: np.ndarray, prototypes: np.ndarray) -> dict[str, np.ndarray]:
        """Why queries `[Q, T, D]` score as they do against prototypes `[N, T, D]`:
        `{"similarity": float32 [Q, N, T, T], "alignment": float32 [Q, N, 2, T, T]}` (cosine of the query's
        frames after TPCM's query path with the prototype's frames; two 0/1 masks of the metric's
        alignment, see `training.model.explain`). Backends without it raise `NotImplementedError`."""
        raise NotImplementedError(f"the {self.name} backend cannot explain classifications")

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """The model card: backbone, adapter, metric, metrics (usable per support set), checkpoint_hash,
        trainable_params, total_params, fingerprint, input_size, num_frames, embed_dim,
        weights_source, demo, backend. Valid after `start()`."""

    @abstractmethod
    async def ready(self) -> bool:
        """Whether the backend can serve requests now."""

    async def close(self) -> None:
        """Release threads, clients and memory."""


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Probabilities from logits (numerically stable); float64 so they sum to 1 tightly."""
    shifted = logits.astype(np.float64) - np.max(logits, axis=axis, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=axis, keepdims=True)
