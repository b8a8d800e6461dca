"""decode_windows on real files written by PyAV (tests/media.py): every frame shows its index.

Each window must hold the very frames decode_clip gives a clip cut at the window's bounds
(the cut clip is written as its own file, its frames numbered as in the long video), all
windows must come out of one plan over the file, and each shared frame is converted once.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from training.video import (
    DecodeLimits,
    DecodeTimeoutError,
    TooManyPixelsError,
    TooManySegmentsError,
    VideoDecodeError,
    VideoTooLongError,
    Windows,
    decode_clip,
    decode_windows,
    window_spans,
)
from training.video import decode as decode_module
from tests.media import make_video, read_index

SIZE = 48
FPS = 10
SECONDS = 24
T = 8

# name -> make_video keywords: 2 s keyframe spacing, as a typical camera or upload.
FORMATS = {
    "h264.mp4": dict(codec="libx264", gop=20),
    "vp9.webm": dict(codec="libvpx-vp9", gop=20),
    "h264.ts": dict(codec="libx264", gop=20),  # MPEG-TS: starts at 0.2 s, decoded in one pass
}


def indices(frames: np.ndarray) -> list[int]:
    """``[T, S, S, 3]`` -> the frame index each frame shows."""
    return [read_index(frame) for frame in frames]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("windows")


@pytest.fixture(scope="module")
def long_videos(media) -> dict[str, Path]:
    return {name: make_video(media / name, num_frames=SECONDS * FPS, fps=FPS, size=(64, 48), **kwargs)
            for name, kwargs in FORMATS.items()}


class CutClips:
    """decode_clip's frame indices for a clip cut from the long video at a window's bounds
    (written as its own file with the same codec, frames numbered as in the long video)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cache: dict[tuple[str, int, int], list[int]] = {}

    def indices(self, name: str, start_s: float, end_s: float) -> list[int]:
        first, count = round(start_s * FPS), round((end_s - start_s) * FPS)
        key = (name, first, count)
        if key not in self.cache:
            path = make_video(self.directory / f"cut_{first}_{count}_{name}", num_frames=count, fps=FPS,
                              size=(64, 48), first_index=first, **FORMATS[name])
            self.cache[key] = indices(decode_clip(path, T, SIZE))
        return self.cache[key]


@pytest.fixture(scope="module")
def cut_clips(media) -> CutClips:
    return CutClips(media)


class Counting:
    """Counts frames coming out of the decoder, frame conversions and decode runs (monkeypatched)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decoded = self.converted = self.runs = 0
        decoded_frames, to_square = decode_module._decoded_frames, decode_module.frame_to_square

        def counted_frames(*args, **kwargs):
            self.runs += 1
            for frame in decoded_frames(*args, **kwargs):
                self.decoded += 1
                yield frame

        def counted_square(*args, **kwargs):
            self.converted += 1
            return to_square(*args, **kwargs)

        monkeypatch.setattr(decode_module, "_decoded_frames", counted_frames)
        monkeypatch.setattr(decode_module, "frame_to_square", counted_square)


# ---------------------------------------------------------------------------------- the windows
def test_window_spans_start_at_zero_and_cut_or_drop_the_last_window():
    assert window_spans(10, 2).tolist() == [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10]]
    # The last window is cut at the end when it lasts at least half a segment ...
    assert window_spans(9, 2).tolist()[-1] == [8, 9]
    assert window_spans(24, 5).tolist()[-1] == [20, 24]
    # ... and dropped when shorter.
    assert window_spans(24, 7).tolist() == [[0, 7], [7, 14], [14, 21]]
    # Overlapping windows stop at the first one that reaches the end.
    assert window_spans(10, 4, 2).tolist() == [[0, 4], [2, 6], [4, 8], [6, 10]]
    # A video shorter than one segment is one window.
    assert window_spans(1.5, 4).tolist() == [[0, 1.5]]
    with pytest.raises(ValueError):
        window_spans(10, 0)
    with pytest.raises(ValueError):
        window_spans(10, 2, -1)


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_window_gets_the_frames_of_a_clip_cut_at_its_bounds(long_videos, cut_clips, name, monkeypatch):
    counting = Counting(monkeypatch)
    windows = decode_windows(long_videos[name], T, SIZE, segment_s=3.0)
    decoded, converted = counting.decoded, counting.converted  # before the cut clips are decoded
    assert isinstance(windows, Windows) and len(windows) == 8
    assert windows.frames.shape == (8, T, SIZE, SIZE, 3) and windows.frames.dtype == np.uint8
    assert windows.spans.dtype == np.float64
    np.testing.assert_allclose(windows.spans, [[3 * w, 3 * w + 3] for w in range(8)])
    assert windows.duration_s == pytest.approx(SECONDS)
    for (start_s, end_s), frames in zip(windows.spans, windows.frames, strict=True):
        assert indices(frames) == cut_clips.indices(name, start_s, end_s)
    # One plan over the file: no frame decoded twice, each target converted once.
    assert decoded <= SECONDS * FPS
    assert converted == windows.distinct_frames == 8 * T


def test_overlapping_windows_share_frames_converted_once(long_videos, cut_clips, monkeypatch):
    counting = Counting(monkeypatch)
    windows = decode_windows(long_videos["h264.mp4"], T, SIZE, segment_s=4.0, stride_s=1.5)
    decoded, converted = counting.decoded, counting.converted  # before the cut clips are decoded
    starts = [1.5 * w for w in range(14)]  # the 14th, [19.5, 23.5), ... the 15th would reach the end
    assert windows.spans[:, 0].tolist() == [*starts, 21.0]
    assert windows.spans[-1].tolist() == [21.0, 24.0]  # 3 s: more than half a segment, kept
    for (start_s, end_s), frames in zip(windows.spans, windows.frames, strict=True):
        assert indices(frames) == cut_clips.indices("h264.mp4", start_s, end_s)
    pooled = {index for frames in windows.frames for index in indices(frames)}
    assert windows.distinct_frames == len(pooled) < len(windows) * T
    assert converted == len(pooled)
    assert decoded <= SECONDS * FPS


def test_all_windows_decode_no_more_than_one_sequential_pass(long_videos, monkeypatch):
    # Dense windows (one frame in two): the plan decodes forward instead of seeking per window.
    counting = Counting(monkeypatch)
    windows = decode_windows(long_videos["h264.mp4"], T, SIZE, segment_s=1.6)
    assert len(windows) == 15
    assert counting.decoded <= SECONDS * FPS
    assert counting.runs == 1


def test_sparse_windows_seek_past_what_they_skip(long_videos, monkeypatch):
    # One frame an 8 s window, keyframes every 2 s: seeking skips most of the file.
    counting = Counting(monkeypatch)
    windows = decode_windows(long_videos["h264.mp4"], 1, SIZE, segment_s=8.0)
    assert [indices(frames) for frames in windows.frames] == [[40], [120], [200]]
    assert counting.decoded < SECONDS * FPS / 2


def test_variable_frame_rate_windows_sample_by_timestamps(media):
    rng = np.random.default_rng(0)
    gaps_ms = rng.integers(20, 250, size=159)  # 160 frames over about 21 s, unevenly spaced
    times_ms = np.concatenate([[0], np.cumsum(gaps_ms)])
    path = make_video(media / "vfr.mp4", num_frames=len(times_ms), fps=10,
                      vfr_timestamps=[t / 1000 for t in times_ms], size=(64, 48))
    windows = decode_windows(path, T, SIZE, segment_s=4.0, stride_s=3.0)
    for (start_s, end_s), frames in zip(windows.spans, windows.frames, strict=True):
        start, length = Fraction(start_s).limit_denominator(1000), Fraction(end_s - start_s).limit_denominator(1000)
        centres_ms = [1000 * (start + (2 * k + 1) * length / (2 * T)) for k in range(T)]
        expected = [int(np.searchsorted(times_ms, float(c), side="right")) - 1 for c in centres_ms]
        assert indices(frames) == expected


def test_video_shorter_than_one_segment_is_one_window_like_decode_clip(long_videos, media):
    path = make_video(media / "short.mp4", num_frames=15, fps=FPS, size=(64, 48), gop=20)
    windows = decode_windows(path, T, SIZE, segment_s=4.0)
    assert windows.spans.tolist() == [[0.0, 1.5]]
    np.testing.assert_array_equal(windows.frames[0], decode_clip(path, T, SIZE))


def test_train_mode_draws_each_frame_within_its_window(long_videos):
    windows = decode_windows(long_videos["h264.mp4"], T, SIZE, segment_s=3.0, mode="train", rng=1)
    for (start_s, end_s), frames in zip(windows.spans, windows.frames, strict=True):
        got = indices(frames)
        assert got == sorted(got)
        assert all(start_s * FPS <= index < end_s * FPS for index in got)
    again = decode_windows(long_videos["h264.mp4"], T, SIZE, segment_s=3.0, mode="train", rng=1)
    np.testing.assert_array_equal(windows.frames, again.frames)


# ------------------------------------------------------------------------------------ limits
def test_too_many_windows_is_refused_before_decoding(long_videos, monkeypatch):
    counting = Counting(monkeypatch)
    with pytest.raises(TooManySegmentsError) as caught:
        decode_windows(long_videos["h264.mp4"], T, SIZE, segment_s=2.0, max_windows=11)
    assert isinstance(caught.value, VideoDecodeError) and caught.value.code == "too_many_segments"
    assert "12 windows" in caught.value.message and "11" in caught.value.message
    assert counting.decoded == counting.runs == 0
    assert len(decode_windows(long_videos["h264.mp4"], 1, SIZE, segment_s=2.0, max_windows=12)) == 12


def test_decode_limits_apply_to_the_whole_call(long_videos):
    path = long_videos["h264.mp4"]
    with pytest.raises(VideoTooLongError):
        decode_windows(path, T, SIZE, segment_s=2.0, limits=DecodeLimits(max_duration_s=20))
    with pytest.raises(TooManyPixelsError):
        decode_windows(path, T, SIZE, segment_s=2.0, limits=DecodeLimits(max_pixels=32 * 32))
    with pytest.raises(DecodeTimeoutError):
        decode_windows(path, T, SIZE, segment_s=2.0, limits=DecodeLimits(time_budget_s=1e-6))


def test_bad_arguments_are_programming_errors(long_videos):
    path = long_videos["h264.mp4"]
    for kwargs in (dict(segment_s=0), dict(segment_s=2, stride_s=0), dict(segment_s=2, max_windows=0),
                   dict(segment_s=2, mode="eval")):
        with pytest.raises(ValueError):
            decode_windows(path, T, SIZE, **kwargs)
    with pytest.raises(ValueError):
        decode_windows(path, 0, SIZE, segment_s=2)
