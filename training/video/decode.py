"""decode_clip: an upload in, T upright square RGB frames out, at the least decoding cost.

Steps: check the byte limit; open the container and pick its video stream (header limits);
index every frame with one demux pass (``index.py``); choose the frames by time
(``sampling.py``); decode them with the cheapest mix of seeks and forward decoding
(``sampling.plan_runs``); resize each chosen frame in swscale (short side to ``size``),
centre-crop it, and turn it upright by its display matrix.

Cheap decoding: ``thread_type="AUTO"`` (frame and slice threads); a run of targets ends by
draining the decoder as soon as the last target's packet is in, instead of feeding it
frames nobody needs; with decoders that support it, non-reference frames that are not
targets are skipped (``skip_frame="NONREF"``). Frames are bit-identical to decoding every
frame. Safety nets, each on a freshly opened container: a seek that lands after its target
(a broken index) falls back to one sequential pass; a target missing while frames were
skipped decodes again without skipping. Every PyAV/FFmpeg error becomes a
:class:`VideoDecodeError`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import TypeVar

import av
import numpy as np
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream

from training.video.errors import CorruptedVideoError, VideoDecodeError, VideoTooLargeError
from training.video.index import FrameIndex, VideoInfo, describe, open_indexed
from training.video.sampling import Run, as_generator, plan_runs, sample_positions, seek_cost_for
from training.video.source import DecodeLimits, Deadline, VideoInput, VideoSource, check_pixels, video_stream

logger = logging.getLogger(__name__)

# Consecutive packets the decoder may reject before the rest of the file counts as unreadable.
_MAX_DECODE_ERRORS = 8

_Result = TypeVar("_Result")


# Decoders whose ``skip_frame="NONREF"`` can be switched per packet and skips exactly the
# frames no other frame references (checked bit-exact in tests/service/test_video.py).
# libdav1d (AV1), for one, reads the setting once when it opens.
SKIPS_NON_REFERENCE_FRAMES = frozenset({"h264", "hevc", "mpeg4", "mpeg2video", "vp8", "vp9"})


# Demuxers that seek to the exact keyframe asked for, from an index (MP4/MOV sample tables,
# Matroska cues or a cluster scan, AVI idx1). Others (MPEG-TS/PS, FLV, raw streams) search by
# byte position and may land a GOP late: those files are decoded in one forward pass.
SEEKS_PRECISELY = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})


class _SeekMissed(Exception):
    """A seek landed after its target: the container's index cannot be trusted."""


class _SkippedTarget(Exception):
    """A target frame did not come out of a decoder told to skip non-reference frames."""


def guarded(work: Callable[[], _Result]) -> _Result:
    """Run ``work``; any exception that is not already a ``VideoDecodeError`` becomes one."""
    try:
        return work()
    except VideoDecodeError:
        raise
    except MemoryError as exc:
        raise VideoTooLargeError("decoding the video needs more memory than is available") from exc
    except av.FFmpegError as exc:
        raise CorruptedVideoError(f"the video cannot be decoded ({exc.strerror or type(exc).__name__})") from exc
    except Exception as exc:  # nothing odd input provokes may escape; logged, as it may be a bug
        logger.warning("unexpected error while decoding a video", exc_info=True)
        raise CorruptedVideoError(f"the video cannot be decoded ({type(exc).__name__})") from exc


def decode_clip(
    source: VideoSource,
    num_frames: int = 8,
    size: int = 224,
    mode: str = "test",
    rng: np.random.Generator | int | None = None,
    *,
    limits: DecodeLimits | None = None,
    fast: bool = False,
    strategy: str = "auto",
) -> np.ndarray:
    """Sample ``num_frames`` frames of a video: uint8 ``[T, size, size, 3]`` RGB, upright.

    - ``source``: bytes, a path, or a binary file object (a seekable one is read from its
      start, wherever its position is; a non-seekable one from where it is).
    - ``mode``: ``"test"``, the frame shown at the centre of each of T equal time segments;
      ``"train"``, the frame shown at a random time in each segment (``rng``: a numpy
      Generator, an int seed, or None).
    - Frames: short side resized to ``size`` in swscale (bicubic, as CLIP preprocesses),
      centre-cropped to ``size x size``, rotated upright by the display matrix.
    - ``fast``: take the keyframe nearest each sampling time instead (decodes only
      keyframes: several times cheaper on long GOPs, frames up to half a GOP off).
    - ``strategy``: how to reach the frames; ``"auto"`` picks per file by keyframe spacing
      (see ``training.video.sampling``); ``"seek"`` / ``"sequential"`` force one way (same
      frames; seeks happen only in containers that seek exactly, :data:`SEEKS_PRECISELY`).
    - ``limits``: :class:`DecodeLimits` (defaults: 200 MiB, 4096x4096 pixels, 10 min,
      30 s of decoding).

    Raises a :class:`VideoDecodeError` subclass for every bad upload (never another
    exception for bad bytes); ``ValueError``/``TypeError`` for bad arguments, ``OSError``
    for an unreadable path.
    """
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if mode not in ("test", "train"):
        raise ValueError(f"mode must be 'test' or 'train', got {mode!r}")
    seek_cost = seek_cost_for(strategy, keyframes_only=fast)
    generator = as_generator(rng) if mode == "train" else None
    limits = limits or DecodeLimits()
    deadline = Deadline(limits.time_budget_s)
    video_input = VideoInput(source, limits)

    def work() -> np.ndarray:
        container, stream, index = open_indexed(video_input, limits, deadline)
        positions = sample_positions(index, int(num_frames), mode, generator, keyframes_only=fast)
        chosen = decode_positions(video_input, container, stream, index, positions, int(size), limits, deadline,
                                  seek_cost=seek_cost, keyframes_only=fast)
        return np.stack([chosen[int(p)] for p in positions])

    return guarded(work)


def decode_positions(
    video_input: VideoInput,
    container: InputContainer,
    stream: VideoStream,
    index: FrameIndex,
    positions: np.ndarray,
    size: int,
    limits: DecodeLimits,
    deadline: Deadline,
    *,
    seek_cost: float,
    keyframes_only: bool = False,
) -> dict[int, np.ndarray]:
    """Decode the frames at ``positions`` (index positions, any order, repeats allowed) of an
    indexed video in one plan (:func:`~training.video.sampling.plan_runs`): each distinct
    position decoded and turned into an upright ``[size, size, 3]`` square once.

    Returns ``{position: frame}`` for every distinct position; closes ``container``. Raises
    ``CorruptedVideoError`` when a position cannot be decoded.
    """
    # Without timestamps frames are told apart by counting them from the start: one pass
    # in which the decoder returns every frame.
    counted = not index.timestamps_known
    use_seeks = container.format.name in SEEKS_PRECISELY and not counted
    skip_non_reference = not keyframes_only and not counted and stream.codec_context.name in SKIPS_NON_REFERENCE_FRAMES
    keyframes_only = keyframes_only and not counted
    # At most three attempts: each failure switches off the shortcut that caused it and
    # starts again on a freshly opened container. Without seeks the decode also starts on
    # a fresh container (rewinding an imprecisely seeking format is a seek too).
    for attempt in range(3):
        fresh = attempt > 0 or not use_seeks
        if fresh:
            container.close()
            container = video_input.open()
            stream = video_stream(container, video_input.looks_like)
        runs = plan_runs(index, positions, seek_cost if use_seeks else math.inf, keyframes_only=keyframes_only)
        collector = _Collector(stream, index, size, limits, deadline, keyframes_only, skip_non_reference)
        try:
            with container:
                chosen = collector.collect(container, runs, fresh=fresh)
            break
        except (_SeekMissed, av.FFmpegError) as exc:
            if not use_seeks:
                raise
            logger.info("seeking failed (%r); decoding in one pass instead", exc)
            use_seeks = False
        except _SkippedTarget as exc:
            logger.info("%s; decoding again without skipping frames", exc)
            skip_non_reference = False
    else:  # unreachable: each retry switches off one shortcut, the last raises
        raise CorruptedVideoError("the video cannot be decoded")
    missing = sorted({int(p) for p in positions} - chosen.keys())
    if missing:
        raise CorruptedVideoError("no frame of the video could be decoded")
    return chosen


def probe(source: VideoSource, *, limits: DecodeLimits | None = None) -> VideoInfo:
    """Describe a video without sampling it (sizes, codec, duration, frame and keyframe
    counts, rotation). Indexes the stream and decodes its first frame. Raises like
    :func:`decode_clip`."""
    limits = limits or DecodeLimits()
    deadline = Deadline(limits.time_budget_s)
    video_input = VideoInput(source, limits)

    def work() -> VideoInfo:
        container, stream, index = open_indexed(video_input, limits, deadline)
        with container:
            info = describe(container, stream, index, rotation=0)
        with video_input.open() as container:
            stream = video_stream(container, video_input.looks_like)
            for frame in _decoded_frames(container, stream, limits, deadline, frozenset({index.start_pts})):
                rotation = (round(frame.rotation / 90) * 90 + 179) % 360 - 179  # one of -90, 0, 90, 180
                return dataclasses.replace(info, rotation=rotation)
        return info

    return guarded(work)


def frame_to_square(
    frame: VideoFrame,
    size: int,
    sample_aspect: Fraction | None = None,
    reformatter: VideoReformatter | None = None,
) -> np.ndarray:
    """One decoded frame as uint8 ``[size, size, 3]`` RGB: short side (in display pixels)
    scaled to ``size`` by swscale (bicubic), centre crop, then turned upright by
    ``frame.rotation``. Pass one ``reformatter`` for all frames of a video: it keeps the
    swscale context, which costs more to set up than a conversion."""
    width, height = frame.width, frame.height
    display_width = width * float(sample_aspect) if sample_aspect and sample_aspect > 0 else float(width)
    scale = size / min(display_width, height)
    out_width = max(size, round(display_width * scale))
    out_height = max(size, round(height * scale))
    reformatter = reformatter or VideoReformatter()
    rgb = reformatter.reformat(
        frame, width=out_width, height=out_height, format="rgb24", interpolation="BICUBIC"
    ).to_ndarray()
    top, left = (out_height - size) // 2, (out_width - size) // 2
    square = rgb[top : top + size, left : left + size]
    quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise, FFmpeg's convention
    return np.ascontiguousarray(np.rot90(square, k=quarter_turns) if quarter_turns else square)


def _decoded_frames(
    container: InputContainer,
    stream: VideoStream,
    limits: DecodeLimits,
    deadline: Deadline,
    wanted_pts: frozenset[int],
    *,
    keyframes_only: bool = False,
    skip_non_reference: bool = False,
) -> Iterator[VideoFrame]:
    """Frames in display order from the container's current position, until the packets of
    all ``wanted_pts`` have been sent to the decoder or the readable data ends (end of file,
    read error, corrupt cut-off packet, more than a few packets in a row the decoder
    rejects). Then the decoder is drained: the frames it holds back (B-frame reordering,
    frame threads) come out without feeding it packets nobody needs. A drained decoder
    takes new packets only after a seek.

    - ``keyframes_only``: only keyframe packets reach the decoder.
    - ``skip_non_reference``: the decoder skips the non-reference frames
      (``skip_frame="NONREF"``: B-frames mostly; no other frame depends on them) that are
      not wanted: about half the frames of a typical H.264 file, the others bit-identical.
    """
    packets = container.demux(stream)
    codec_context = stream.codec_context
    unsent = set(wanted_pts)
    errors_in_a_row = 0
    try:
        for packet in packets:
            deadline.check()
            if packet.is_corrupt or packet.size == 0:  # cut off, or the end-of-file marker
                break
            if keyframes_only and not packet.is_keyframe:
                continue
            packet_ts = packet.pts if packet.pts is not None else packet.dts
            if skip_non_reference:
                codec_context.skip_frame = "DEFAULT" if packet_ts in wanted_pts else "NONREF"
            unsent.discard(packet_ts)
            try:
                frames = packet.decode()
            except av.FFmpegError:
                errors_in_a_row += 1
                if errors_in_a_row > _MAX_DECODE_ERRORS:
                    break
                continue
            errors_in_a_row = 0
            for frame in frames:
                check_pixels(frame.width, frame.height, limits)
                yield frame
            if not unsent:
                break
    except av.FFmpegError:  # a read error: the readable part ends here
        pass
    finally:
        packets.close()
    try:
        drained = codec_context.decode(None)
    except av.FFmpegError:
        return
    for frame in drained:
        check_pixels(frame.width, frame.height, limits)
        yield frame


class _Collector:
    """Executes decode runs and converts the target frames."""

    def __init__(
        self,
        stream: VideoStream,
        index: FrameIndex,
        size: int,
        limits: DecodeLimits,
        deadline: Deadline,
        keyframes_only: bool,
        skip_non_reference: bool,
    ) -> None:
        self.stream, self.index, self.size = stream, index, size
        self.limits, self.deadline = limits, deadline
        self.sample_aspect = stream.codec_context.sample_aspect_ratio
        self.reformatter = VideoReformatter()
        self.keyframes_only, self.skip_non_reference = keyframes_only, skip_non_reference
        stream.codec_context.thread_type = "AUTO"

    def collect(self, container: InputContainer, runs: list[Run], *, fresh: bool) -> dict[int, np.ndarray]:
        """Decode ``runs`` in order; ``{position: [size, size, 3] frame}`` for every target
        that could be decoded. ``fresh``: nothing was read from ``container`` yet, so a
        first run from position 0 needs no seek."""
        chosen: dict[int, np.ndarray] = {}
        for number, run in enumerate(runs):
            sought = not (fresh and number == 0 and run.seek_to == 0)
            if sought:
                container.seek(int(self.index.pts[run.seek_to]), stream=self.stream, backward=True)
            target_pts = [int(self.index.pts[position]) for position in run.targets]
            frames = _decoded_frames(
                container, self.stream, self.limits, self.deadline, frozenset(target_pts),
                keyframes_only=self.keyframes_only, skip_non_reference=self.skip_non_reference,
            )
            try:
                self._collect_run(frames, run, target_pts, chosen, sought)
            finally:
                frames.close()
        return chosen

    def _collect_run(
        self, frames: Iterator[VideoFrame], run: Run, target_pts: list[int], chosen: dict[int, np.ndarray], sought: bool
    ) -> None:
        previous: VideoFrame | None = None
        previous_ts: int | None = None
        next_target = 0
        for frame in frames:
            # A frame without pts follows the one before it (streams without timestamps:
            # frames are counted from the start of a single pass).
            if frame.pts is not None:
                ts = int(frame.pts)
            else:
                ts = self.index.start_pts if previous_ts is None else previous_ts + self.index.frame_ticks
            if sought and previous is None and ts > target_pts[0]:
                raise _SeekMissed(f"seek to {target_pts[0]} landed at {ts}")
            while next_target < len(target_pts) and ts >= target_pts[next_target]:
                # The frame shown at the target time: this one if it starts exactly there,
                # else the one before it (a frame the index has but the decoder did not return).
                exact = ts == target_pts[next_target]
                if not exact and self.skip_non_reference:
                    raise _SkippedTarget(f"the frame at pts {target_pts[next_target]} did not come out")
                shown = frame if exact or previous is None else previous
                chosen[run.targets[next_target]] = self._square(shown)
                next_target += 1
            previous, previous_ts = frame, ts
            if next_target == len(target_pts):
                return
        # The readable data ended before the last targets: they show the last frame.
        if sought and previous is None:
            raise _SeekMissed(f"no frame came out after seeking to {target_pts[0]}")
        if next_target < len(target_pts) and self.skip_non_reference:
            raise _SkippedTarget(f"the frame at pts {target_pts[next_target]} did not come out")
        for position in run.targets[next_target:]:
            if previous is not None:
                chosen[position] = self._square(previous)

    def _square(self, frame: VideoFrame) -> np.ndarray:
        return frame_to_square(frame, self.size, self.sample_aspect, self.reformatter)
