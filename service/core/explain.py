"""Explanations of a classification (`POST /classify` with `explain=true`) and frame thumbnails.

An explanation shows why a query got its few-shot scores: for the best `EXPLAIN_TOP_CLASSES`
predictions that have a prototype (support classes), the frame-to-frame cosine similarity `[T, T]` of
the query's frames (after TPCM's query path) with the prototype's frames and the metric's alignment
over it (the backend's `explain`, see `training.model.explain`), plus small JPEG thumbnails of the
frames the model sampled from the query. The body (`Explanation` in `service/api/schemas.py`)::

    {"metric": "otam", "num_frames": T, "alignment": "otam_path" | "nearest_frames" | "none",
     "thumbnail_size": 64, "query_thumbnails": ["<base64 JPEG>", ... T],
     "classes": [{"label", "score", "source", "similarity": [[T floats] x T] (rows: query frames),
                  "query_to_prototype": [[i, j], ...], "prototype_to_query": [[i, j], ...]}],
     "truncated": false, "max_bytes": EXPLANATION_MAX_BYTES}

Pairs are `[query frame, prototype frame]`. Its JSON never exceeds `EXPLANATION_MAX_BYTES`: when it
would, thumbnails shrink to `SMALL_THUMBNAIL_PX`, then go, then fewer classes are kept, then the
matrices go (`truncated: true`). Thumbnails are JPEGs from PyAV's `mjpeg` encoder (no Pillow needed).
"""
from __future__ import annotations

import asyncio
import base64
import json
from fractions import Fraction
from typing import Any, Sequence

import av
import numpy as np

from service.backends.base import Backend
from service.core.ingest import Decoder
from service.core.model import ModelFacts
from service.core.uploads import Upload
from service.telemetry import Metrics

#: How many of the best predictions with a prototype get a frame alignment.
EXPLAIN_TOP_CLASSES = 3
#: Side of a thumbnail in pixels (square, like the model's input).
THUMBNAIL_PX = 64
SMALL_THUMBNAIL_PX = 32
#: Upper bound of an explanation's JSON, in bytes.
EXPLANATION_MAX_BYTES = 128 * 1024
#: Decimals kept of each similarity.
SIMILARITY_DECIMALS = 4
ALIGNMENT_KINDS = {"otam": "otam_path", "bimhm": "nearest_frames"}


def jpeg_thumbnails(clip: np.ndarray, size: int = THUMBNAIL_PX) -> list[str]:
    """Base64 JPEGs of frames `[T, H, W, 3]` uint8 RGB, each scaled to `size` x `size`."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width = codec.height = size
    codec.pix_fmt = "yuvj420p"
    codec.time_base = Fraction(1, 25)
    thumbnails = []
    for frame in clip:
        image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        packets = codec.encode(image.reformat(width=size, height=size, format="yuvj420p"))
        thumbnails.append(base64.b64encode(b"".join(bytes(packet) for packet in packets)).decode("ascii"))
    return thumbnails


def json_size(value: Any) -> int:
    """Bytes of `value` as compact JSON (as the response renders it, near enough)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


class Explainer:
    """Builds explanations and thumbnails from the backend's `explain` and the query's decoded frames."""

    def __init__(self, backend: Backend, decoder: Decoder, model: ModelFacts, metrics: Metrics) -> None:
        self._backend = backend
        self._decoder = decoder
        self._model = model
        self._metrics = metrics

    async def thumbnails(self, upload: Upload, size: int = THUMBNAIL_PX) -> list[str]:
        """Base64 JPEG thumbnails of the T frames the model samples from `upload` (decoded under the
        same limits and sampling as a classification)."""
        clip = await self._decoder.decode(upload)  # [T, S, S, 3]
        return await asyncio.to_thread(jpeg_thumbnails, clip, size)

    async def explain(self, upload: Upload, query_feats: np.ndarray, prototypes: np.ndarray | None,
                      classes: Sequence[str], predictions: Sequence[Any]) -> dict[str, Any]:
        """The explanation of one classification.

        Args:
            upload: the query video (decoded again for its thumbnails: query features may come from the
                cache, which keeps no frames).
            query_feats: `[T, D]` query frame features.
            prototypes: `[N, T, D]` prototypes of the support classes `classes` (None: zero-shot).
            classes: the N support class labels, in prototype order.
            predictions: the response's predictions (`label`, `score`, `source`), best first.
        """
        metric = self._model.metric
        index = {label: i for i, label in enumerate(classes)}
        chosen = [p for p in predictions if p.label in index][:EXPLAIN_TOP_CLASSES] if prototypes is not None else []
        thumbnails_task = asyncio.ensure_future(self._thumbnails_both(upload))
        try:
            explained = None
            if chosen:
                self._metrics.backend_call("explain")
                rows = np.array([index[p.label] for p in chosen])
                explained = await self._backend.explain(query_feats[None], prototypes[rows])
            thumbnails, small = await thumbnails_task
        finally:
            thumbnails_task.cancel()
        entries = []
        for k, prediction in enumerate(chosen):
            assert explained is not None
            alignment = explained["alignment"][0, k]  # [2, T, T]
            entries.append({
                "label": prediction.label,
                "score": float(prediction.score),
                "source": prediction.source,
                "similarity": np.round(explained["similarity"][0, k].astype(np.float64),
                                       SIMILARITY_DECIMALS).tolist(),
                "query_to_prototype": _pairs(alignment[0]),
                "prototype_to_query": _pairs(alignment[1]),
            })
        body = {
            "metric": metric,
            "num_frames": self._model.num_frames,
            "alignment": ALIGNMENT_KINDS.get(metric, "none"),
            "thumbnail_size": THUMBNAIL_PX,
            "query_thumbnails": thumbnails,
            "classes": entries,
            "truncated": False,
            "max_bytes": EXPLANATION_MAX_BYTES,
        }
        return _bounded(body, small)

    async def _thumbnails_both(self, upload: Upload) -> tuple[list[str], list[str]]:
        clip = await self._decoder.decode(upload)
        return await asyncio.to_thread(lambda: (jpeg_thumbnails(clip, THUMBNAIL_PX),
                                                jpeg_thumbnails(clip, SMALL_THUMBNAIL_PX)))


def _pairs(mask: np.ndarray) -> list[list[int]]:
    """`[[query frame, prototype frame], ...]` of a 0/1 mask `[T, T]`, row-major (a path's order)."""
    rows, cols = np.nonzero(mask > 0.5)
    return [[int(i), int(j)] for i, j in zip(rows, cols)]


def _bounded(body: dict[str, Any], small_thumbnails: list[str]) -> dict[str, Any]:
    """`body` made to fit `EXPLANATION_MAX_BYTES` (see the module docstring for the order of cuts)."""
    limit = EXPLANATION_MAX_BYTES
    if json_size(body) <= limit:
        return body
    body.update(query_thumbnails=small_thumbnails, thumbnail_size=SMALL_THUMBNAIL_PX, truncated=True)
    if json_size(body) <= limit:
        return body
    body.update(query_thumbnails=[], thumbnail_size=0)
    while len(body["classes"]) > 1 and json_size(body) > limit:
        body["classes"] = body["classes"][:-1]
    if json_size(body) > limit:
        body["classes"] = [{**entry, "similarity": [], "query_to_prototype": [], "prototype_to_query": []}
                           for entry in body["classes"]]
    return body
