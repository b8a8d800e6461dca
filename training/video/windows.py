"""decode_windows: a long video cut into fixed time windows, all sampled in one decoding pass.

For locating actions in a long video: window w covers ``[w * stride_s, w * stride_s + segment_s)``
seconds from the video's first frame, and its T frames are sampled exactly as
:func:`~training.video.decode.decode_clip` samples a whole video (test mode: the frame shown
at the centre of each of T equal parts of the window), so a window gets the very frames
``decode_clip`` would give a clip cut at the window's bounds.

Which windows (:func:`window_spans`): they start at 0 and every ``stride_s``; the first
window that reaches the end of the video is the last one, cut at the end. That last, shorter
window is kept when it lasts at least half a segment and dropped otherwise (its few seconds
are mostly covered by the window before it). A video shorter than one segment gives one
window, the whole video.

How (one pass): the index positions of all windows' frames are pooled and decoded with ONE
plan over the file (:func:`~training.video.sampling.plan_runs`: a seek only where it skips
more frames than it costs, otherwise decoding forward), each distinct frame is resized,
cropped and turned upright once (overlapping windows share frames), then fanned out to the
windows. ``DecodeLimits`` apply to the whole call, as in ``decode_clip``: raise
``max_duration_s`` and ``time_budget_s`` for long videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.video.decode import decode_positions, guarded
from training.video.errors import VideoDecodeError
from training.video.index import FrameIndex, open_indexed
from training.video.sampling import as_generator, sample_positions, seek_cost_for
from training.video.source import DecodeLimits, Deadline, VideoInput, VideoSource


class TooManySegmentsError(VideoDecodeError):
    """The video would be cut into more windows than ``max_windows``."""

    code = "too_many_segments"


@dataclass(frozen=True)
class Windows:
    """The windows of a video and their frames.

    - ``frames``: uint8 ``[W, T, S, S, 3]``, window w's T frames in temporal order.
    - ``spans``: float64 ``[W, 2]``, ``(start_s, end_s)`` of each window in seconds from the
      video's first frame.
    - ``duration_s``: the video's duration (its readable part).
    - ``distinct_frames``: distinct frames decoded and converted for all windows together
      (frames shared by overlapping windows count once).
    - ``first`` / ``total``: with ``only=(first, stop)`` the windows are ``first..first+W-1`` of
      the video's ``total`` windows; otherwise ``first`` is 0 and ``total`` is W.
    """

    frames: np.ndarray
    spans: np.ndarray
    duration_s: float
    distinct_frames: int
    first: int = 0
    total: int = -1

    def __post_init__(self) -> None:
        if self.total < 0:
            object.__setattr__(self, "total", int(self.spans.shape[0]))

    def __len__(self) -> int:
        return int(self.spans.shape[0])


def window_spans(duration_s: float, segment_s: float, stride_s: float | None = None) -> np.ndarray:
    """The windows of a ``duration_s`` video: float64 ``[W, 2]`` of ``(start_s, end_s)``
    (see the module docstring); ``stride_s`` defaults to ``segment_s``."""
    stride_s = segment_s if stride_s is None else stride_s
    if not segment_s > 0 or not stride_s > 0:
        raise ValueError(f"segment_s and stride_s must be > 0, got {segment_s!r} and {stride_s!r}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    # Windows starting before the end, up to the first that reaches it (a small tolerance, so
    # that 10 s cut into 2 s windows is 5 windows, not 5 and a sliver).
    tolerance = 1e-9 * max(duration_s, segment_s)
    reaching = max(0, int(np.ceil((duration_s - segment_s - tolerance) / stride_s)))
    starts = np.arange(reaching + 1, dtype=np.float64) * stride_s
    ends = np.minimum(starts + segment_s, duration_s)
    if starts.size > 1 and ends[-1] - starts[-1] < segment_s / 2 - tolerance:
        starts, ends = starts[:-1], ends[:-1]
    return np.stack([starts, ends], axis=1)


def count_windows(duration_s: float, segment_s: float, stride_s: float | None = None) -> int:
    """How many windows :func:`window_spans` cuts a ``duration_s`` video into."""
    return int(window_spans(duration_s, segment_s, stride_s).shape[0])


def window_positions(
    index: FrameIndex,
    spans: np.ndarray,
    num_frames: int,
    mode: str = "test",
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Index positions of each window's frames: int64 ``[W, T]`` (``spans``: ``[W, 2]`` seconds
    from the video's first frame, as from :func:`window_spans`)."""
    generator = as_generator(rng) if mode == "train" else None
    ticks = np.rint(spans / float(index.time_base)).astype(np.int64) + index.start_pts  # [W, 2]
    ticks = np.clip(ticks, index.start_pts, index.end_pts)
    return np.stack([
        sample_positions(index, num_frames, mode, generator, span_pts=(int(start), max(int(end), int(start) + 1)))
        for start, end in ticks
    ]) if len(ticks) else np.zeros((0, num_frames), dtype=np.int64)


def decode_windows(
    source: VideoSource,
    num_frames: int = 8,
    size: int = 224,
    *,
    segment_s: float,
    stride_s: float | None = None,
    max_windows: int | None = None,
    mode: str = "test",
    rng: np.random.Generator | int | None = None,
    limits: DecodeLimits | None = None,
    strategy: str = "auto",
    only: tuple[int, int] | None = None,
) -> Windows:
    """Cut a video into windows of ``segment_s`` seconds every ``stride_s`` (default
    ``segment_s``) and sample ``num_frames`` frames of each: :class:`Windows` with uint8
    ``frames [W, T, size, size, 3]`` and float64 ``spans [W, 2]``.

    All windows are decoded together in one plan over the file, each distinct frame decoded
    and converted once (see the module docstring). ``mode``, ``rng``, ``strategy``, ``limits``
    and frame conversion as in :func:`~training.video.decode.decode_clip`, per window.
    ``max_windows``: raise :class:`TooManySegmentsError` (code ``too_many_segments``) when the
    video has more windows, after indexing it and before decoding any frame.
    ``only=(first, stop)``: decode windows ``first..stop-1`` alone (``stop`` past the last window is
    fine), so a caller can take a long video in pieces of bounded memory, each piece one plan over
    its stretch of the file; ``Windows.total`` says how many windows the whole video has.

    Raises a :class:`VideoDecodeError` subclass for every bad upload; ``ValueError`` /
    ``TypeError`` for bad arguments, ``OSError`` for an unreadable path.
    """
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if mode not in ("test", "train"):
        raise ValueError(f"mode must be 'test' or 'train', got {mode!r}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows!r}")
    if only is not None and not (0 <= only[0] < only[1]):
        raise ValueError(f"only must be (first, stop) with 0 <= first < stop, got {only!r}")
    window_spans(1.0, segment_s, stride_s)  # argument checks before any work
    seek_cost = seek_cost_for(strategy)
    limits = limits or DecodeLimits()
    deadline = Deadline(limits.time_budget_s)
    video_input = VideoInput(source, limits)

    def work() -> Windows:
        container, stream, index = open_indexed(video_input, limits, deadline)
        try:
            spans = window_spans(index.duration_s, segment_s, stride_s)
            total = len(spans)
            if max_windows is not None and total > max_windows:
                raise TooManySegmentsError(
                    f"the video ({index.duration_s:.1f} s) makes {total} windows of {segment_s:g} s, "
                    f"more than the limit of {max_windows}")
            first = 0 if only is None else min(only[0], total)
            if only is not None:
                spans = spans[first:only[1]]
            positions = window_positions(index, spans, int(num_frames), mode, rng)  # [W, T]
        except BaseException:
            container.close()
            raise
        if not len(spans):
            container.close()
            return Windows(frames=np.zeros((0, int(num_frames), int(size), int(size), 3), np.uint8), spans=spans,
                           duration_s=index.duration_s, distinct_frames=0, first=first, total=total)
        distinct, inverse = np.unique(positions, return_inverse=True)
        chosen = decode_positions(video_input, container, stream, index, distinct, int(size), limits, deadline,
                                  seek_cost=seek_cost)
        pooled = np.stack([chosen[int(p)] for p in distinct])  # [P, S, S, 3]
        frames = pooled[inverse.reshape(positions.shape)]  # [W, T, S, S, 3]
        return Windows(frames=frames, spans=spans, duration_s=index.duration_s, distinct_frames=int(distinct.size),
                       first=first, total=total)

    return guarded(work)
