"""Why an upload could not be turned into frames.

Every error carries a stable ``code`` and a human ``message``, nothing else: this package is shared
by training and serving and knows nothing of HTTP. (The gateway maps codes to statuses in one table,
``service.errors.STATUS_BY_CODE``.)

| code | class | means |
| --- | --- | --- |
| ``not_a_video`` | :class:`NotAVideoError` | non-media bytes, still images |
| ``no_video_stream`` | :class:`NoVideoStreamError` | audio only, cover art only |
| ``corrupted`` | :class:`CorruptedVideoError` | unreadable, nothing decodable |
| ``timeout`` | :class:`DecodeTimeoutError` | decode time budget spent |
| ``too_large`` | :class:`VideoTooLargeError` | file bytes over the limit |
| ``too_long`` | :class:`VideoTooLongError` | duration or frame count over the limit |
| ``too_many_pixels`` | :class:`TooManyPixelsError` | pixels per frame over the limit |
"""

from __future__ import annotations

from typing import ClassVar


class VideoDecodeError(Exception):
    """Base class: the upload cannot be decoded into frames. Never raised directly."""

    code: ClassVar[str] = "corrupted"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class VideoTooLongError(VideoDecodeError):
    """The video lasts longer than ``max_duration_s`` or has more than ``max_frames`` frames."""

    code = "too_long"


class TooManyPixelsError(VideoDecodeError):
    """A frame has more pixels than ``DecodeLimits.max_pixels``."""

    code = "too_many_pixels"
