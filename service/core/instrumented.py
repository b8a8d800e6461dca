"""Instrumentation around the store and the backend, so business logic carries none.

`TimedStore` times every store call as the `store` stage; `CountedBackend` counts every model call
(`fsar_backend_calls_total{op}`, `fsar_videos_encoded_total{branch}`) and times it as the `encode`
(encoding) or `match` (prototypes, classification) stage. Metric names: `service/telemetry.py`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from service.backends.base import Backend
from service.store.base import Batch, Store
from service.telemetry import Metrics


class TimedStore:
    """The store calls the core makes, each timed as the `store` stage."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    async def get_array(self, key: str) -> np.ndarray | None:
        with self._metrics.stage("store"):
            return await self._store.get_array(key)

    async def get_arrays(self, keys: list[str]) -> list[np.ndarray | None]:
        with self._metrics.stage("store"):
            return await self._store.get_arrays(keys)

    async def set_array(self, key: str, array: np.ndarray, ttl_s: float | None = None) -> None:
        with self._metrics.stage("store"):
            await self._store.set_array(key, array, ttl_s=ttl_s)

    async def get_json(self, key: str) -> Any | None:
        with self._metrics.stage("store"):
            return await self._store.get_json(key)

    async def get_jsons(self, keys: list[str]) -> list[Any | None]:
        with self._metrics.stage("store"):
            return await self._store.get_jsons(keys)

    async def write_batch(self, batch: Batch, ttl_s: float | None = None, *,
                          guard: tuple[str, int | None] | None = None) -> None:
        with self._metrics.stage("store"):
            await self._store.write_batch(batch, ttl_s=ttl_s, guard=guard)

    async def keys(self, pattern: str) -> list[str]:
        with self._metrics.stage("store"):
            return await self._store.keys(pattern)

    async def delete(self, keys: list[str]) -> int:
        with self._metrics.stage("store"):
            return await self._store.delete(keys)


class CountedBackend:
    """The backend's model calls, each counted by op and timed as its stage (shapes: `Backend`)."""

    def __init__(self, backend: Backend, metrics: Metrics) -> None:
        self._backend = backend
        self._metrics = metrics

    async def encode_videos(self, frames: np.ndarray, text_feats: np.ndarray | None = None) -> np.ndarray:
        """Features `[B, T, D]` of frames `[B, T, S, S, 3]`; with label text features `[B, D]` the
        support branch, without them the query branch (`fsar_videos_encoded_total{branch}`)."""
        self._metrics.backend_call("encode_videos")
        self._metrics.videos_encoded.labels(branch="query" if text_feats is None else "support").inc(len(frames))
        with self._metrics.stage("encode"):
            return await self._backend.encode_videos(frames, text_feats)

    async def encode_texts(self, labels: list[str]) -> np.ndarray:
        self._metrics.backend_call("encode_texts")
        with self._metrics.stage("encode"):
            return await self._backend.encode_texts(labels)

    async def build_prototypes(self, support_feats: np.ndarray, support_labels: np.ndarray,
                               text_feats: np.ndarray, *, op: str = "build_prototypes") -> np.ndarray:
        """`op`: the label the call is counted under (`"open_set"` for calibration's extra calls)."""
        self._metrics.backend_call(op)
        with self._metrics.stage("match"):
            return await self._backend.build_prototypes(support_feats, support_labels, text_feats)

    async def classify(self, query_feats: np.ndarray, prototypes: np.ndarray,
                       text_feats: np.ndarray | None = None, metric: str | None = None, *,
                       op: str = "classify") -> np.ndarray:
        """`op`: the label the call is counted under (`"open_set"` for the open-set score's Q2S logits)."""
        self._metrics.backend_call(op)
        with self._metrics.stage("match"):
            return await self._backend.classify(query_feats, prototypes, text_feats, metric=metric)

    async def zero_shot(self, query_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        self._metrics.backend_call("zero_shot")
        with self._metrics.stage("match"):
            return await self._backend.zero_shot(query_feats, text_feats)
