"""Encode RGB frames into a video file with PyAV: the one video writer of the project.

Used by the synthetic dataset (``training.data.synth``), the benchmarks' generated clips
(``service.bench.decode``), the smoke script and the test media (``tests/media.py``). Given the
same frames and arguments it writes the same bytes (x264 is deterministic for a fixed thread
count; pass ``threads=1`` where bytes must not depend on the machine's core count).

Frame ``i`` gets ``pts = i`` in the time base ``1 / fps`` (what the encoder would count itself),
or, with ``timestamps``, its own presentation time in milliseconds (variable frame rate).
"""
from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

__all__ = ["video_bytes", "write_video"]

VFR_TIME_BASE = Fraction(1, 1000)


def write_video(target: str | os.PathLike | BinaryIO, frames: Iterable[np.ndarray], *, fps: float | Fraction,
                codec: str = "libx264", container: str | None = None, pix_fmt: str = "yuv420p",
                options: Mapping[str, str] | None = None, container_options: Mapping[str, str] | None = None,
                gop: int | None = None, threads: int | None = None, timestamps: Sequence[float] | None = None,
                rotation: int | None = None) -> None:
    """Encode ``frames`` (uint8 RGB ``[H, W, 3]`` each, all the same size; an iterable, so long clips
    need not sit in memory; a ``[T, H, W, 3]`` array works too) into one video stream.

    Args:
        target: a file path, or a binary file object (seekable or not: a non-seekable sink gets what
            a live recorder writes).
        fps: the stream's frame rate (an int, float or Fraction; a float is read as the nearest
            fraction with a denominator up to 1001, so 29.97 is 30000/1001).
        codec: the encoder (``libx264``, ``libvpx-vp9``, ``mjpeg``, ``gif``, ``png`` ...).
        container: the muxer name (``mp4``, ``matroska``, ``image2`` ...); default: from the path's
            extension (needed for a file object).
        pix_fmt: the encoded pixel format.
        options: encoder options (``{"crf": "18"}``, ``{"x264-params": ...}``).
        container_options: muxer options (``{"movflags": "+faststart"}``).
        gop: the encoder's keyframe interval in frames (``gop_size``); None: the encoder's default.
        threads: encoder threads; None: the encoder's default.
        timestamps: one presentation time in seconds per frame (strictly increasing) for a
            variable-frame-rate stream; None: constant rate.
        rotation: display rotation in degrees (PyAV/FFmpeg convention); the frames are stored as given.

    Raises:
        ValueError: no frames, or fewer/more ``timestamps`` than frames.
    """
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("write_video needs at least one frame")
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(target, "w", format=container, options=dict(container_options or {})) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if threads is not None:
            stream.codec_context.thread_count = threads
        if options:
            stream.options = dict(options)
        if timestamps is not None:
            stream.codec_context.time_base = VFR_TIME_BASE
            time_base, pts_of = VFR_TIME_BASE, [round(t * 1000) for t in timestamps]
        else:
            time_base, pts_of = 1 / rate, None
        if rotation is not None:
            stream.set_display_rotation(rotation)
        count = 0
        for count, image in enumerate(itertools.chain([first], iterator), start=1):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if pts_of is not None and count > len(pts_of):
                raise ValueError(f"more frames than timestamps ({len(pts_of)})")
            frame.pts, frame.time_base = (count - 1 if pts_of is None else pts_of[count - 1]), time_base
            output.mux(stream.encode(frame))
        if pts_of is not None and count != len(pts_of):
            raise ValueError(f"{count} frames for {len(pts_of)} timestamps")
        output.mux(stream.encode(None))


def video_bytes(frames: Iterable[np.ndarray], *, fps: float | Fraction, container: str = "mp4",
                **kwargs: object) -> bytes:
    """The bytes of :func:`write_video` into memory (same keywords; ``container`` defaults to mp4)."""
    buffer = io.BytesIO()
    write_video(buffer, frames, fps=fps, container=container, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()
