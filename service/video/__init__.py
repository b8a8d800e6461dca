"""Video ingestion: turn an upload into T upright square RGB frames with PyAV.

Public API:
- :func:`decode_clip` (``source -> uint8 [T, size, size, 3]``) and :func:`probe`
  (``source -> VideoInfo``),
- :class:`DecodeLimits` (bytes, pixels, duration, frames, time budget),
- :class:`VideoDecodeError` and its subclasses, each with ``code``, ``message`` and
  ``http_status`` (413 over a limit, 415 not decodable).

Module map: ``source`` (inputs, limits, opening), ``index`` (the frame index from one demux
pass), ``sampling`` (which frames, and the seek-or-decode-forward plan), ``decode``
(decoding, resizing, cropping, rotation), ``errors``.
"""

from service.video.decode import decode_clip, frame_to_square, probe
from service.video.errors import (
    CorruptedVideoError,
    DecodeTimeoutError,
    NotAVideoError,
    NoVideoStreamError,
    TooManyPixelsError,
    VideoDecodeError,
    VideoTooLargeError,
    VideoTooLongError,
)
from service.video.index import VideoInfo
from service.video.source import DecodeLimits, VideoSource

__all__ = [
    "CorruptedVideoError",
    "DecodeLimits",
    "DecodeTimeoutError",
    "NoVideoStreamError",
    "NotAVideoError",
    "TooManyPixelsError",
    "VideoDecodeError",
    "VideoInfo",
    "VideoSource",
    "VideoTooLargeError",
    "VideoTooLongError",
    "decode_clip",
    "frame_to_square",
    "probe",
]
