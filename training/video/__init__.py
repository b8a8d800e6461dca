"""Video ingestion: turn an upload into T upright square RGB frames with PyAV.

Public API:
- :func:`decode_clip` (``source -> uint8 [T, size, size, 3]``) and :func:`probe`
  (``source -> VideoInfo``),
- :func:`decode_windows` (``source -> Windows``: fixed time windows of a long video, uint8
  ``[W, T, size, size, 3]`` with their spans, in one decoding pass) and :func:`window_spans`,
- :class:`DecodeLimits` (bytes, pixels, duration, frames, time budget),
- :class:`VideoDecodeError` and its subclasses, each with a ``code`` and a ``message`` (no HTTP
  knowledge: the gateway maps codes to statuses).

Shared by training (datasets) and serving (the gateway's decode pool), so both sample frames
identically; it imports nothing from either.

Module map: ``source`` (inputs, limits, opening), ``index`` (the frame index from one demux
pass), ``sampling`` (which frames, and the seek-or-decode-forward plan), ``decode``
(decoding, resizing, cropping, rotation), ``windows`` (many windows of one video), ``errors``.
"""

from training.video.decode import decode_clip, frame_to_square, probe
from training.video.errors import (
    CorruptedVideoError,
    DecodeTimeoutError,
    NotAVideoError,
    NoVideoStreamError,
    TooManyPixelsError,
    VideoDecodeError,
    VideoTooLargeError,
    VideoTooLongError,
)
from training.video.index import VideoInfo
from training.video.source import DecodeLimits, VideoSource
from training.video.windows import TooManySegmentsError, Windows, decode_windows, window_spans

__all__ = [
    "CorruptedVideoError",
    "DecodeLimits",
    "DecodeTimeoutError",
    "NoVideoStreamError",
    "NotAVideoError",
    "TooManyPixelsError",
    "TooManySegmentsError",
    "VideoDecodeError",
    "VideoInfo",
    "VideoSource",
    "VideoTooLargeError",
    "VideoTooLongError",
    "Windows",
    "decode_clip",
    "decode_windows",
    "frame_to_square",
    "probe",
    "window_spans",
]
