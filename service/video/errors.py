"""Why an upload could not be turned into frames.

Every error has a stable ``code`` (what the API puts in ``{"error": {"code": ...}}``), a
human ``message`` and the ``http_status`` the gateway answers with:

| code | class | status |
| --- | --- | --- |
| ``not_a_video`` | :class:`NotAVideoError` (non-media bytes, still images) | 415 |
| ``no_video_stream`` | :class:`NoVideoStreamError` (audio only, cover art only) | 415 |
| ``corrupted`` | :class:`CorruptedVideoError` (unreadable, nothing decodable) | 415 |
| ``timeout`` | :class:`DecodeTimeoutError` (decode time budget spent) | 415 |
| ``too_large`` | :class:`VideoTooLargeError` (file bytes) | 413 |
| ``too_long`` | :class:`VideoTooLongError` (duration or frame count) | 413 |
| ``too_many_pixels`` | :class:`TooManyPixelsError` (pixels per frame) | 413 |
"""

from __future__ import annotations

from typing import ClassVar


class VideoDecodeError(Exception):
    """Base class: the upload cannot be decoded into frames. Never raised directly."""

    code: ClassVar[str] = "corrupted"
    http_status: ClassVar[int] = 415

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """``{"code": ..., "message": ...}`` for an API error body."""
        return {"code": self.code, "message": self.message}


class NotAVideoError(VideoDecodeError):
    """The bytes are not a video container FFmpeg can read, or they hold a still image."""

    code = "not_a_video"


class NoVideoStreamError(VideoDecodeError):
    """A media file without a video stream (audio only, or only cover art)."""

    code = "no_video_stream"


class CorruptedVideoError(VideoDecodeError):
    """A video container that cannot be read, or from which no frame can be decoded."""

    code = "corrupted"


class DecodeTimeoutError(VideoDecodeError):
    """Decoding took longer than the time budget (``DecodeLimits.time_budget_s``)."""

    code = "timeout"


class VideoTooLargeError(VideoDecodeError):
    """The file has more bytes than ``DecodeLimits.max_bytes``."""

    code = "too_large"
    http_status = 413


class VideoTooLongError(VideoDecodeError):
    """The video lasts longer than ``max_duration_s`` or has more than ``max_frames`` frames."""

    code = "too_long"
    http_status = 413


class TooManyPixelsError(VideoDecodeError):
    """A frame has more pixels than ``DecodeLimits.max_pixels``."""

    code = "too_many_pixels"
    http_status = 413
