"""Which frames to take, and how to reach them at the least decoding cost.

Sampling is by time, on the frame index (see ``index.py``): the video's span
``[first pts, end of last frame)`` is cut into T equal segments.

- ``mode="test"``: the frame shown at each segment's centre, i.e. the last frame whose pts is
  at or before the centre. Exact integer arithmetic: for a constant-rate video of N frames,
  segment k gives frame ``floor((2k + 1) * N / (2T))``. A video with fewer than T frames
  repeats frames, in order.
- ``mode="train"``: the frame shown at a uniformly random time within each segment.
- keyframes only (``fast=True``): the keyframe nearest in time to each of those times
  (ties: the earlier one). Only keyframe packets are sent to the decoder, which needs no
  other frame to decode them.

Reaching the frames (``plan_runs``): the decoder must start at a keyframe, so each target
costs the frames from where the decoder is (or from the keyframe before the target, after a
seek) up to the target. Targets are visited in order; before each one the planner compares

    keep decoding forward:  decode the frames from the current position to the target
    seek:                   decode the frames from the target's keyframe to the target,
                            plus ``seek_cost`` frames for the seek itself

so it seeks exactly when the seek skips more than ``seek_cost`` frames. Per file this is the
choice between seeking to the keyframe before each target and one sequential pass:
keyframes 1 s apart with 8 targets on a 30 s clip seek for every target (decoding about
1/7 of the frames); keyframes 10 s apart make targets share GOPs and mostly decode forward;
a single keyframe (GIF, some screen recordings) is one pass, stopped at the last target.
Containers whose demuxer cannot seek exactly (MPEG-TS/PS, FLV, raw streams: see
``decode.SEEKS_PRECISELY``) always get the one pass.

Measured (service/bench/decode.py, 30 s 720p H.264, 8 frames, 2 cores): keyframes every 1 s, the
plan passes through 124 of 900 frames with 8 seeks; every 10 s, 733 frames with 2 seeks
(one pass: 844).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.video.index import FrameIndex

# A seek costs about this many decoded frames: the demuxer jump, the decoder flush and
# refilling its frame-thread pipeline (measured on 720p H.264, 2 cores: a seek plus one
# frame took 6-8 frame times).
SEEK_COST_FRAMES = 6.0
# Keyframes only: just keyframe packets reach the decoder, so a forward pass costs the
# keyframes it passes; a seek costs less than decoding one of them (720p: about 2 ms
# against 4 ms for an H.264 keyframe, 15 ms for a VP9 one), so skipping one is worth it.
SEEK_COST_KEYFRAMES = 0.5

STRATEGIES = ("auto", "seek", "sequential")


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """``rng`` as a numpy Generator: a Generator as is, an int as a seed, None as fresh entropy."""
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, not {type(rng).__name__}")


def sample_positions(
    index: FrameIndex,
    num_frames: int,
    mode: str,
    rng: np.random.Generator | int | None = None,
    *,
    keyframes_only: bool = False,
    span_pts: tuple[int, int] | None = None,
) -> np.ndarray:
    """Positions in ``index`` of the T frames to return, in temporal order: int64 ``[T]``.

    ``span_pts``: sample the time range ``[start, end)`` (``time_base`` ticks, within the
    video's span, ``end > start``) instead of the whole video, exactly as if it were the whole
    video: a window of a long video gets the frames a clip cut at its bounds would get.
    Positions may repeat (videos shorter than T frames, keyframes-only sampling).
    """
    start, end = span_pts if span_pts is not None else (index.start_pts, index.end_pts)
    if end <= start:
        raise ValueError(f"span_pts must end after it starts, got {span_pts!r}")
    span = end - start  # ticks, > 0
    relative_pts = index.pts - start  # [N]
    segments = np.arange(num_frames, dtype=np.int64)
    if mode == "test":
        # Centre of segment k: (2k + 1) * span / (2T); compare in units of 1/(2T) ticks.
        scaled_pts = relative_pts * (2 * num_frames)
        scaled_targets = (2 * segments + 1) * span
    elif mode == "train":
        offsets = as_generator(rng).random(num_frames)  # [T] in [0, 1)
        scaled_pts = relative_pts.astype(np.float64) * num_frames
        scaled_targets = (segments + offsets) * float(span)
    else:
        raise ValueError(f"mode must be 'test' or 'train', got {mode!r}")

    keyframe_positions = np.flatnonzero(index.is_keyframe)
    if keyframes_only and keyframe_positions.size:
        return _nearest(keyframe_positions, scaled_pts[keyframe_positions], scaled_targets)
    positions = np.searchsorted(scaled_pts, scaled_targets, side="right") - 1
    return np.clip(positions, 0, index.num_frames - 1).astype(np.int64)


def _nearest(candidates: np.ndarray, candidate_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target time, the candidate nearest in time (ties: the earlier): int64 ``[T]``."""
    after = np.clip(np.searchsorted(candidate_times, targets, side="left"), 0, candidates.size - 1)
    before = np.clip(after - 1, 0, candidates.size - 1)
    take_before = np.abs(targets - candidate_times[before]) <= np.abs(candidate_times[after] - targets)
    return np.where(take_before, candidates[before], candidates[after]).astype(np.int64)


@dataclass(frozen=True)
class Run:
    """Seek to the keyframe at index position ``seek_to`` (0: the start), then decode
    forward collecting ``targets`` (index positions, ascending, distinct)."""

    seek_to: int
    targets: tuple[int, ...]


def seek_cost_for(strategy: str, *, keyframes_only: bool = False) -> float:
    """The seek cost a strategy plans with, in decoded frames (keyframes with
    ``keyframes_only``): ``auto`` the measured :data:`SEEK_COST_FRAMES` /
    :data:`SEEK_COST_KEYFRAMES`, ``seek`` 0 (seek whenever it skips a frame), ``sequential``
    infinity (never seek)."""
    if strategy == "auto":
        return SEEK_COST_KEYFRAMES if keyframes_only else SEEK_COST_FRAMES
    if strategy == "seek":
        return 0.0
    if strategy == "sequential":
        return math.inf
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def plan_runs(index: FrameIndex, positions: np.ndarray, seek_cost: float, *, keyframes_only: bool = False) -> list[Run]:
    """Split the distinct target positions into decode runs (see the module docstring).

    A target that is not worth a seek joins the current run. With ``keyframes_only``
    only keyframes are decoded, so costs are counted in keyframes.
    """
    targets = np.unique(positions)
    keyframe_before = np.maximum(index.keyframe_before(), 0)  # [N]; no keyframe yet: the start
    if keyframes_only:
        cost_units = np.cumsum(index.is_keyframe) - index.is_keyframe  # keyframes before each position
    else:
        cost_units = np.arange(index.num_frames)

    runs: list[tuple[int, list[int]]] = []
    current = -1  # the last position the decoder returned
    for target in targets.tolist():
        keyframe = int(keyframe_before[target])
        if keyframe > current and cost_units[keyframe] - cost_units[current + 1] > seek_cost:
            runs.append((keyframe, [target]))
        elif not runs:
            runs.append((0, [target]))
        else:
            runs[-1][1].append(target)
        current = target
    return [Run(seek_to=seek_to, targets=tuple(run_targets)) for seek_to, run_targets in runs]


def decoded_frame_count(index: FrameIndex, runs: list[Run], *, keyframes_only: bool = False) -> int:
    """How many frames a plan decodes (keyframes only: how many keyframes); for reports."""
    total = 0
    for run in runs:
        stop = run.targets[-1] + 1
        total += int(index.is_keyframe[run.seek_to : stop].sum()) if keyframes_only else stop - run.seek_to
    return total
