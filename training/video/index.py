"""The frame index of a video: when every frame is shown and which frames are keyframes.

Built by one demux pass over the video stream's packets (no decoding: a few milliseconds
for a 30 s 720p clip). It is the ground truth everything else relies on, because container
metadata is often missing or wrong: ``stream.frames`` is 0 for WebM/MKV, duration x fps is
wrong for variable frame rate, and the declared duration of a truncated file is longer than
what can be read. The demux pass stops at the first unreadable or corrupt packet, so the
index covers exactly the readable part of a truncated file.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.container import InputContainer
from av.video.stream import VideoStream

from training.video.errors import CorruptedVideoError, VideoTooLongError
from training.video.source import (
    DecodeLimits,
    Deadline,
    VideoInput,
    check_header_limits,
    video_stream,
)

_DEADLINE_EVERY = 64  # packets between time-budget checks while indexing


@dataclass(frozen=True)
class FrameIndex:
    """Presentation times of the readable frames of one video stream, in display order.

    - ``pts``: int64 ``[N]``, ascending, in ``time_base`` units.
    - ``is_keyframe``: bool ``[N]``.
    - ``end_pts``: when the last frame stops being shown (its pts plus its duration).
    - ``truncated``: demuxing stopped early at an unreadable or corrupt packet.
    - ``timestamps_known``: False for streams without timestamps (raw H.264 elementary
      streams): ``pts`` is then frame number x ``frame_ticks``, and frames can only be
      told apart by counting them from the start.
    - ``frame_ticks``: the typical display time of one frame.
    """

    pts: np.ndarray
    is_keyframe: np.ndarray
    end_pts: int
    time_base: Fraction
    truncated: bool
    timestamps_known: bool = True
    frame_ticks: int = 1

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])

    @property
    def start_pts(self) -> int:
        return int(self.pts[0])

    @property
    def duration_s(self) -> float:
        return float((self.end_pts - self.start_pts) * self.time_base)

    def keyframe_before(self) -> np.ndarray:
        """int64 ``[N]``: for each frame, the position of the last keyframe at or before it
        (``-1`` when the stream starts without a keyframe)."""
        positions = np.where(self.is_keyframe, np.arange(self.num_frames), -1)
        return np.maximum.accumulate(positions)


def build_index(
    container: InputContainer, stream: VideoStream, limits: DecodeLimits, deadline: Deadline
) -> FrameIndex:
    """Demux ``stream`` once and index its frames.

    Raises ``VideoTooLongError`` as soon as the frames seen exceed ``max_duration_s`` or
    ``max_frames``, ``DecodeTimeoutError`` when the budget runs out, and
    ``CorruptedVideoError`` when not a single packet is readable.
    """
    time_base = stream.time_base or Fraction(1, 1000)
    max_ticks = limits.max_duration_s / float(time_base)
    pts_list: list[int] = []
    durations: list[int] = []
    keyframes: list[bool] = []
    truncated = False
    timestamps_known = True
    packets = container.demux(stream)
    try:
        for packet in packets:
            if packet.size == 0:  # the flush packet at the end of the stream
                continue
            if packet.is_corrupt:
                truncated = True
                break
            if packet.is_discard:  # pre-roll an edit list hides: decoded, never shown
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None or not timestamps_known:  # no timestamps: number the frames
                timestamps_known = False
                pts = len(pts_list) * max(packet.duration or 0, 1)
            pts_list.append(pts)
            durations.append(packet.duration or 0)
            keyframes.append(packet.is_keyframe)
            count = len(pts_list)
            if count > limits.max_frames:
                raise VideoTooLongError(f"the video has more than the limit of {limits.max_frames} frames")
            if pts - pts_list[0] > max_ticks:
                raise VideoTooLongError(f"the video lasts longer than the limit of {limits.max_duration_s:g} s")
            if count % _DEADLINE_EVERY == 0:
                deadline.check()
    except av.FFmpegError:  # a read error: the rest of the file is unreadable
        truncated = True
    finally:
        packets.close()
    deadline.check()
    if not pts_list:
        raise CorruptedVideoError("no readable video packets in the file")

    pts = np.asarray(pts_list, dtype=np.int64)
    order = np.argsort(pts, kind="stable")
    reordered = bool(np.any(order != np.arange(order.size)))
    pts = pts[order]
    is_keyframe = np.asarray(keyframes, dtype=bool)[order]
    # How long the last frame is shown. Its packet duration says so only when packets come in
    # display order: with B-frames, MP4 packet durations are decode-time gaps.
    frame_ticks = _typical_frame_ticks(pts, stream, time_base)
    last_duration = int(durations[int(order[-1])])
    if reordered or last_duration <= 0:
        last_duration = frame_ticks
    end_pts = int(pts[-1]) + last_duration
    if end_pts - int(pts[0]) > max_ticks:
        raise VideoTooLongError(f"the video lasts longer than the limit of {limits.max_duration_s:g} s")
    return FrameIndex(pts=pts, is_keyframe=is_keyframe, end_pts=end_pts, time_base=time_base, truncated=truncated,
                      timestamps_known=timestamps_known, frame_ticks=frame_ticks)


def _typical_frame_ticks(pts: np.ndarray, stream: VideoStream, time_base: Fraction) -> int:
    """The display time of a frame without a (trustworthy) duration: the median gap between
    frames, else one frame at the stream's nominal rate, else one tick."""
    if pts.shape[0] > 1:
        return max(int(np.median(np.diff(pts))), 1)
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        return max(round(1 / (rate * time_base)), 1)
    return 1


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about an upload (sizes as stored, before rotation).

    ``rotation`` is the display rotation in degrees counter-clockwise (FFmpeg's convention:
    -90, 0, 90 or 180; a portrait phone video says -90); decoded frames are turned upright
    with it.
    ``declared_frames`` is the container's own count (``None`` when it does not say, as in
    WebM/MKV); ``num_frames`` is counted. ``keyframe_interval_s`` is the mean spacing of
    keyframes (``None`` with a single keyframe), ``gop_frames`` the mean frames per keyframe.
    """

    container: str
    codec: str
    width: int
    height: int
    rotation: int
    duration_s: float
    fps: float
    num_frames: int
    declared_frames: int | None
    num_keyframes: int
    keyframe_interval_s: float | None
    gop_frames: float
    truncated: bool


def describe(container: InputContainer, stream: VideoStream, index: FrameIndex, rotation: int) -> VideoInfo:
    """A :class:`VideoInfo` from an indexed stream."""
    keyframe_pts = index.pts[index.is_keyframe]
    num_keyframes = int(keyframe_pts.shape[0])
    interval_s = (
        float(np.diff(keyframe_pts).mean() * index.time_base) if num_keyframes > 1 else None
    )
    duration_s = index.duration_s
    return VideoInfo(
        container=container.format.name,
        codec=stream.codec_context.name,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        rotation=rotation,
        duration_s=duration_s,
        fps=index.num_frames / duration_s if duration_s > 0 else 0.0,
        num_frames=index.num_frames,
        declared_frames=stream.frames or None,
        num_keyframes=num_keyframes,
        keyframe_interval_s=interval_s,
        gop_frames=index.num_frames / max(num_keyframes, 1),
        truncated=index.truncated,
    )


def open_indexed(
    video_input: VideoInput, limits: DecodeLimits, deadline: Deadline
) -> tuple[InputContainer, VideoStream, FrameIndex]:
    """Open the source, pick its video stream, check header limits and index it.

    The caller closes the returned container.
    """
    container = video_input.open()
    try:
        stream = video_stream(container, video_input.looks_like)
        check_header_limits(container, stream, limits)
        index = build_index(container, stream, limits, deadline)
    except BaseException:
        container.close()
        raise
    return container, stream, index

