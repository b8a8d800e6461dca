"""Uploads in, an open PyAV container with its video stream out: limits checked early.

Accepted sources: ``bytes``-like objects, paths (``str`` / ``os.PathLike``), and binary file
objects (seekable ones are read from their start, as FFmpeg seeks in them by absolute
offsets; non-seekable ones from where they are, into memory, at most ``max_bytes + 1``
bytes). The byte limit is checked before FFmpeg sees anything, the pixel
and declared-duration limits as soon as the container header is read.

FFmpeg reads the source and nothing else: it may only use the demuxers of
:data:`ACCEPTED_FORMATS` (some others open further files or sockets named inside the upload),
and, for bytes and file objects, may open no file or URL at all (see ``VideoInput.open``).
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from typing import BinaryIO

import av
from av.container import InputContainer
from av.stream import Discard, Disposition
from av.video.stream import VideoStream

from training.video.errors import (
    CorruptedVideoError,
    DecodeTimeoutError,
    NotAVideoError,
    NoVideoStreamError,
    TooManyPixelsError,
    VideoTooLargeError,
    VideoTooLongError,
)

VideoSource = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO


@dataclass(frozen=True)
class DecodeLimits:
    """What one upload may cost. Exceeding a limit raises the matching ``VideoDecodeError``.

    - ``max_bytes``: file size (``too_large``), checked before opening.
    - ``max_pixels``: width x height of any frame (``too_many_pixels``), checked from the
      header before decoding and again on every decoded frame.
    - ``max_duration_s``: video duration (``too_long``), from the header and while indexing.
    - ``max_frames``: frames in the video (``too_long``); bounds the frame index's memory.
    - ``time_budget_s``: wall time for the whole call (``timeout``), checked between packets
      and frames (a single frame is bounded by ``max_pixels``).
    """

    max_bytes: int = 200 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_duration_s: float = 600.0
    max_frames: int = 144_000  # 10 minutes at 240 fps
    time_budget_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_duration_s", "max_frames", "time_budget_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DecodeLimits.{name} must be > 0, got {getattr(self, name)!r}")


class Deadline:
    """The decode time budget of one call; ``check()`` raises ``DecodeTimeoutError`` once spent."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.end = time.monotonic() + budget_s

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise DecodeTimeoutError(f"decoding took longer than the time budget of {self.budget_s:g} s")


# The demuxers FFmpeg may pick for a source (its ``format_whitelist``; a name matches any of a
# demuxer's comma-separated names, so "mov" is "mov,mp4,m4a,3gp,3g2,mj2" and "matroska" is
# "matroska,webm"). FFmpeg picks the demuxer from the bytes, not from us, and some demuxers open
# what the upload names: concat (an ``ffconcat`` script) and hls (an ``#EXTM3U`` playlist) open
# files on the server, image2 opens numbered image files, sdp opens UDP sockets, vobsub opens a
# companion file. An upload must not make the decoder read the server's files, so only
# demuxers that read nothing but their input are allowed; mov could follow data references
# to other files, which ``enable_drefs`` (off by default) keeps off. A format refused here
# fails to open: ``not_a_video``. To accept a new container, check its demuxer opens nothing.
VIDEO_FORMATS = (
    "mov",  # MP4, MOV, 3GP
    "matroska",  # MKV, WebM
    "avi",
    "mpegts",
    "mpeg",  # MPEG program stream (.mpg, .vob)
    "flv",
    "live_flv",  # FLV recorded by nginx-rtmp (same demuxer, its own probe)
    "asf",  # WMV
    "ogg",
    "gif",
    "h264",  # raw elementary streams
    "hevc",
    "ivf",  # raw VP8/VP9/AV1
    "mjpeg",  # raw Motion JPEG (IP cameras); a single JPEG probes as jpeg_pipe and stays refused
)
# Audio-only containers: opened so that a song is refused as ``no_video_stream``, which says
# more than ``not_a_video`` (.m4a is mov, audio-only .webm/.ogg are matroska/ogg).
AUDIO_FORMATS = ("wav", "mp3", "aac", "flac")
ACCEPTED_FORMATS = VIDEO_FORMATS + AUDIO_FORMATS
ACCEPTED_NAMES = "MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, WMV, Ogg, GIF, raw H.264/HEVC/MJPEG, IVF"


def open_options(custom_io: bool) -> dict[str, str]:
    """FFmpeg format options for opening a source (``container_options``).

    ``custom_io``: FFmpeg reads the source through Python (bytes, file objects), so it needs no
    protocol at all, and an empty ``protocol_whitelist`` stops any nested open, whatever the
    demuxer. A path needs the ``file`` protocol for itself, which a nested open could use too:
    there the format list is the guard (and ``file`` alone keeps a path from being read as
    another protocol's URL, ``pipe:``, ``concat:``, ``http:`` ..., besides the ``file:`` prefix
    ``VideoInput.open`` gives it).
    """
    return {
        "format_whitelist": ",".join(ACCEPTED_FORMATS),
        "protocol_whitelist": "" if custom_io else "file",
        "enable_drefs": "0",  # mov: no data references to other files (FFmpeg's default, kept explicit)
    }


# Container signatures (checked when FFmpeg cannot open a file) that make "corrupted" a better
# answer than "not a video": the bytes start like a video container but do not parse.
def _sniff_container(head: bytes) -> str | None:
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "MP4/MOV"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"GIF8":
        return "GIF"
    if head[:3] == b"FLV":
        return "FLV"
    return None


# Still-image signatures (checked when FFmpeg cannot open a file): their demuxers are not
# accepted, and "a still image" says why better than "not a video file" alone.
def _sniff_image(head: bytes) -> str | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and head[6:10] == bytes(4):  # then the file size, reserved zeros
        return "BMP"
    return None


class VideoInput:
    """A source made re-openable: ``open()`` gives a fresh PyAV container at its start each time.

    Raises ``VideoTooLargeError`` when the source has more than ``limits.max_bytes`` bytes,
    ``TypeError`` for an unsupported source type, ``OSError`` for an unreadable path.
    """

    def __init__(self, source: VideoSource, limits: DecodeLimits) -> None:
        self._path: str | None = None
        self._data: bytes | None = None
        self._file: BinaryIO | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            size = len(source) if not isinstance(source, memoryview) else source.nbytes
            self._check_size(size, limits)
            self._data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            self._path = os.fsdecode(source)
            self._check_size(os.stat(self._path).st_size, limits)
        elif hasattr(source, "read"):
            if _is_seekable(source):
                self._file = source
                self._check_size(source.seek(0, io.SEEK_END), limits)
                source.seek(0)
            else:
                data = source.read(limits.max_bytes + 1)
                self._check_size(len(data), limits)
                self._data = bytes(data)
        else:
            raise TypeError(f"source must be bytes, a path or a binary file object, not {type(source).__name__}")
        self.head = self._read_head()

    @staticmethod
    def _check_size(size: int, limits: DecodeLimits) -> None:
        if size > limits.max_bytes:
            raise VideoTooLargeError(
                f"the file is larger than the limit of {limits.max_bytes / 2**20:g} MB"
            )
        if size == 0:
            raise NotAVideoError("the file is empty")

    def _read_head(self) -> bytes:
        if self._data is not None:
            return self._data[:16]
        if self._path is not None:
            with open(self._path, "rb") as file:
                return file.read(16)
        assert self._file is not None
        head = self._file.read(16)
        self._file.seek(0)
        return head

    def open(self) -> InputContainer:
        """A fresh container reading the source from its start.

        Raises ``NotAVideoError`` (or ``CorruptedVideoError`` when the bytes start like a
        video container) when FFmpeg cannot read it, or when it is not in one of the
        ``ACCEPTED_FORMATS``: then FFmpeg has only probed the source's first bytes.
        """
        if self._data is not None:
            file: str | BinaryIO = io.BytesIO(self._data)
        elif self._path is not None:
            # "file:" so that the path is a path, even one that looks like a URL ("a:b.mp4").
            file = "file:" + self._path
        else:
            assert self._file is not None
            self._file.seek(0)
            file = self._file
        options = open_options(custom_io=not isinstance(file, str))
        try:
            return av.open(file, mode="r", container_options=options, metadata_errors="ignore")
        except Exception as exc:  # FFmpegError, and anything PyAV raises on odd headers
            if self.looks_like is not None:
                raise CorruptedVideoError(
                    f"the file looks like {self.looks_like} but cannot be read ({_reason(exc)})"
                ) from exc
            image = _sniff_image(self.head)
            if image is not None:
                raise NotAVideoError(f"a still image ({image}), not a video") from exc
            raise NotAVideoError(f"not a video file (accepted formats: {ACCEPTED_NAMES})") from exc

    @property
    def looks_like(self) -> str | None:
        """The video container the first bytes announce ("MP4/MOV", ...), if any."""
        return _sniff_container(self.head)


def _is_seekable(file: BinaryIO) -> bool:
    try:
        return bool(file.seekable())
    except (AttributeError, ValueError, OSError):
        return False


def _reason(exc: BaseException) -> str:
    """A short FFmpeg reason for messages, without file names."""
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return type(exc).__name__


def video_stream(container: InputContainer, looks_like: str | None = None) -> VideoStream:
    """The container's main video stream; the demuxer is told to drop all other streams.

    Raises ``NoVideoStreamError`` when the only pictures are cover art or there are none, and
    ``CorruptedVideoError`` when the stream has no usable codec parameters or a file that
    ``looks_like`` a video container (see ``VideoInput.looks_like``) shows no stream at all.
    """
    if looks_like is not None and not (container.streams.video or container.streams.audio):
        raise CorruptedVideoError(f"the file looks like {looks_like} but no video stream can be read")
    candidates = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
    if not candidates:
        kinds = sorted({s.type for s in container.streams if s.type != "video"})
        if len(candidates) < len(container.streams.video):
            kinds.append("cover art")
        raise NoVideoStreamError("the file has no video stream" + (f" (only {' and '.join(kinds)})" if kinds else ""))
    defaults = [s for s in candidates if s.disposition & Disposition.default]
    stream = (defaults or candidates)[0]
    codec_context = stream.codec_context
    if codec_context is None or not codec_context.name:
        raise CorruptedVideoError("the video stream has no codec FFmpeg can decode")
    for other in container.streams:
        if other.index != stream.index:
            other.discard = Discard.all  # the demuxer skips their packets
    return stream


def check_header_limits(container: InputContainer, stream: VideoStream, limits: DecodeLimits) -> None:
    """Refuse, before decoding, what the header already shows to be over a limit."""
    codec_context = stream.codec_context
    width, height = codec_context.width, codec_context.height
    check_pixels(width, height, limits)
    if stream.duration and stream.time_base:
        declared_s = float(stream.duration * stream.time_base)
    elif container.duration:
        declared_s = container.duration / av.time_base
    else:
        return
    if declared_s > limits.max_duration_s:
        raise VideoTooLongError(
            f"the video lasts {declared_s:.1f} s, longer than the limit of {limits.max_duration_s:g} s"
        )


def check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise TooManyPixelsError(
            f"frames of {width}x{height} have more than the limit of {limits.max_pixels} pixels"
        )
