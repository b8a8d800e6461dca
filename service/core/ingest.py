"""Turning uploads into clips: the decode pool, the limits every upload is decoded under, and resizing.

Decoding runs in worker processes (`service.decode_pool`), off the event loop; a decode failure
becomes the API error `service.errors.from_decode_error` gives (413 over a limit, else 415).
"""
from __future__ import annotations

import asyncio

import numpy as np

from service.core.model import ModelFacts
from service.core.uploads import Upload
from service.decode_pool import (
    DecodePool,
    ProcessDecodePool,
    ThreadDecodePool,
    decode_file,
    decode_windows_file,
    hard_timeout_for,
)
from service.errors import from_decode_error
from service.settings import Settings
from service.telemetry import Metrics
from training.video import DecodeLimits, VideoDecodeError, Windows, decode_clip, decode_windows, frame_to_square


def decode_limits(settings: Settings) -> DecodeLimits:
    """The limits every upload is decoded under (size, pixels, duration, time budget)."""
    return DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                        max_duration_s=settings.max_video_seconds, time_budget_s=settings.decode_timeout_s)


def create_decode_pool(settings: Settings, metrics: Metrics | None = None) -> DecodePool:
    """The decode pool the settings ask for: `decode_concurrency` worker processes (a job over
    `hard_timeout_for(decode_timeout_s)` kills its worker) or, with decode_isolation=thread, threads."""
    if settings.decode_isolation == "thread":
        return ThreadDecodePool(settings.decode_concurrency)

    def count_restart(reason: str) -> None:
        if metrics is not None:
            metrics.decode_restarts.labels(reason=reason).inc()

    return ProcessDecodePool(settings.decode_concurrency, hard_timeout_for(settings.decode_timeout_s),
                             on_restart=count_restart)


def resize_clip(clip: np.ndarray, size: int) -> np.ndarray:
    """Square frames `[T, H, H, 3]` uint8 resized to `[T, size, size, 3]` (the decoder's own scaler)."""
    import av

    return np.stack([frame_to_square(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"),
                                     size, None) for frame in clip])


class Decoder:
    """Decodes uploads into clips `[T, S, S, 3]` uint8 at the model's sampling, at most
    `decode_concurrency` at a time, each under `decode_limits(settings)`."""

    def __init__(self, settings: Settings, model: ModelFacts, metrics: Metrics) -> None:
        self._max_segments = settings.max_segments
        self.pool = create_decode_pool(settings, metrics)
        self._slots = asyncio.Semaphore(settings.decode_concurrency)
        self._limits = decode_limits(settings)
        self._model = model
        self._metrics = metrics

    async def close(self) -> None:
        await self.pool.close()

    async def decode(self, upload: Upload) -> np.ndarray:
        """Frames `[T, S, S, 3]` uint8 of one upload, decoded in the decode pool (a worker process
        unless decode_isolation=thread). An upload on disk travels as its path and the worker opens the
        file (`decode_file`); one held in memory travels as its bytes.

        Raises `PayloadTooLarge` (413) or `UnsupportedMedia` (415) with the decoder's code."""
        decode = decode_clip if upload.path is None else decode_file
        async with self._slots:
            with self._metrics.stage("decode"):
                try:
                    return await self.pool.run(
                        decode, upload.source, num_frames=self._model.num_frames, size=self._model.input_size,
                        mode="test", limits=self._limits)
                except VideoDecodeError as err:
                    raise from_decode_error(err, upload.filename) from err

    async def decode_many(self, uploads: dict[str, Upload]) -> dict[str, np.ndarray]:
        """Clips of several uploads (decoded concurrently), by the same keys (their sha256)."""
        hashes = list(uploads)
        clips = await asyncio.gather(*(self.decode(uploads[h]) for h in hashes))
        return dict(zip(hashes, clips))

    async def decode_windows(self, upload: Upload, segment_s: float, stride_s: float,
                             only: tuple[int, int]) -> Windows:
        """Windows `only=(first, stop)` of a long upload (`training.video.decode_windows`): frames
        `[W, T, S, S, 3]` uint8 and spans `[W, 2]`, with the total window count of the video. Every
        window's frames come from one decoding plan over that stretch of the file; more windows than
        `max_segments` is a 413 (`too_many_segments`) before any frame is decoded."""
        decode = decode_windows if upload.path is None else decode_windows_file
        async with self._slots:
            with self._metrics.stage("decode"):
                try:
                    return await self.pool.run(
                        decode, upload.source, num_frames=self._model.num_frames, size=self._model.input_size,
                        segment_s=segment_s, stride_s=stride_s, max_windows=self._max_segments,
                        limits=self._limits, only=only)
                except VideoDecodeError as err:
                    raise from_decode_error(err, upload.filename) from err
