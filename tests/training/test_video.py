"""decode_clip / probe on real files written by PyAV (tests/media.py).

Every frame of a test video shows its own index, so the tests assert exactly which frames
were sampled, that they are upright, and that seeking and one sequential pass agree.
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from service.errors import DECODE_STATUS

from training.video import (
    CorruptedVideoError,
    DecodeLimits,
    DecodeTimeoutError,
    NotAVideoError,
    NoVideoStreamError,
    TooManyPixelsError,
    VideoDecodeError,
    VideoTooLargeError,
    VideoTooLongError,
    decode_clip,
    frame_to_square,
    probe,
)
from training.video import decode as decode_module
from training.video.index import FrameIndex
from training.video.sampling import SEEK_COST_FRAMES, plan_runs, sample_positions
from training.video.source import ACCEPTED_FORMATS
from tests.media import (
    MAX_INDEX,
    expected_centre_indices,
    frame_pattern,
    make_audio_only,
    make_gif,
    make_png,
    make_video,
    make_video_bytes,
    read_index,
)

SIZE = 64  # output side in most tests: small and fast, still 4 px per band


def indices(frames: np.ndarray) -> list[int]:
    return [read_index(frame) for frame in frames]


def test_the_index_pattern_reads_back_only_upright():
    """The factory's own contract: any centre crop keeps the index; a turned frame is refused."""
    for index, (width, height) in [(0, (64, 48)), (MAX_INDEX, (48, 64)), (1234, (300, 32)), (77, (32, 300))]:
        pattern = frame_pattern(index, width, height)
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        assert read_index(pattern) == read_index(pattern[top : top + side, left : left + side]) == index
        for turns in (1, 2, 3):
            with pytest.raises(ValueError):
                read_index(np.rot90(pattern, turns))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


# name -> make_video keywords: one file per container/codec family the gateway accepts.
FORMATS = {
    "h264.mp4": dict(codec="libx264", gop=4),
    "vp9.webm": dict(codec="libvpx-vp9", gop=4),
    "mpeg4.avi": dict(codec="mpeg4", gop=4),
    "mjpeg.mkv": dict(codec="mjpeg"),
    "prores.mov": dict(codec="prores_ks"),
    "hevc.mp4": dict(codec="libx265", gop=4),
    "h264.ts": dict(codec="libx264", gop=4),  # MPEG-TS: starts at 0.2 s, seeks imprecisely
    "raw.h264": dict(codec="libx264", gop=4),  # no container, no timestamps: frames are counted
    "av1.mkv": dict(codec="libsvtav1", gop=10),  # long enough a GOP for non-reference frames
}


@pytest.fixture(scope="module")
def format_files(media) -> dict[str, Path]:
    files = {name: make_video(media / name, num_frames=20, fps=10, **kwargs) for name, kwargs in FORMATS.items()}
    files["anim.gif"] = make_gif(media / "anim.gif", num_frames=20, fps=10)
    return files


@pytest.mark.parametrize("name", [*FORMATS, "anim.gif"])
def test_test_mode_takes_the_centre_frame_of_each_segment(format_files, name):
    frames = decode_clip(format_files[name], num_frames=8, size=SIZE)
    assert frames.shape == (8, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert indices(frames) == expected_centre_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]


# Containers on the demuxer list (training.video.source.ACCEPTED_FORMATS) that FORMATS leaves out.
MORE_CONTAINERS = {
    "h264.3gp": dict(codec="libx264", gop=4, container="3gp", size=(176, 144)),
    "h264.flv": dict(codec="libx264", gop=4, container="flv"),
    "mpeg2.mpg": dict(codec="mpeg2video", gop=4, container="mpeg"),
    "wmv2.wmv": dict(codec="wmv2", gop=4, container="asf"),
    "vp9.ivf": dict(codec="libvpx-vp9", gop=4, container="ivf"),
    "raw.hevc": dict(codec="libx265", gop=4, container="hevc"),
    "raw.mjpeg": dict(codec="mjpeg", container="mjpeg"),
}


@pytest.mark.parametrize("name", list(MORE_CONTAINERS))
def test_every_accepted_container_decodes(media, name):
    path = make_video(media / name, num_frames=20, fps=10, **MORE_CONTAINERS[name])
    for source in (path, path.read_bytes()):
        for strategy in ("auto", "seek", "sequential"):
            assert indices(decode_clip(source, 8, SIZE, strategy=strategy)) == expected_centre_indices(20, 8)


def test_the_demuxer_list_names_real_demuxers():
    """A misspelt name would silently refuse a whole format: each must be one of FFmpeg's demuxers."""
    demuxer_names = {part for full in av.formats_available if av.format.ContainerFormat(full).is_input
                     for part in full.split(",")}
    assert set(ACCEPTED_FORMATS) <= demuxer_names
    assert not {"concat", "hls", "image2", "sdp", "rtsp", "vobsub"} & set(ACCEPTED_FORMATS)


def test_other_formats_are_refused_with_what_is_accepted(media):
    """NUT is a general-purpose container, but not on the list: refused as it opens, a still image
    as such."""
    nut = make_video(media / "clip.nut", container="nut", codec="mpeg4", num_frames=4)
    with pytest.raises(NotAVideoError, match="accepted formats: MP4/MOV, Matroska/WebM"):
        decode_clip(nut)
    for image in (make_png(media / "still.png"), make_png(media / "still.png").read_bytes()):
        with pytest.raises(NotAVideoError, match=r"a still image \(PNG\)"):
            decode_clip(image)


def test_default_output_is_224_square(format_files):
    frames = decode_clip(format_files["h264.mp4"])
    assert frames.shape == (8, 224, 224, 3)
    assert indices(frames) == [1, 3, 6, 8, 11, 13, 16, 18]


@pytest.mark.parametrize("name", [*FORMATS, "anim.gif"])
def test_frames_are_bit_identical_to_decoding_every_frame(format_files, name):
    """Seeking, stopping early and skipping non-reference frames change nothing in the pixels."""
    reference = {}
    with av.open(str(format_files[name])) as container:
        for frame in container.decode(video=0):
            square = frame_to_square(frame, SIZE)
            reference[read_index(square)] = square
    assert sorted(reference) == list(range(20))
    for strategy in ("auto", "seek", "sequential"):
        frames = decode_clip(format_files[name], 8, SIZE, strategy=strategy)
        assert indices(frames) == expected_centre_indices(20, 8)
        for frame in frames:
            assert np.array_equal(frame, reference[read_index(frame)])


def test_a_decoder_that_ignores_per_packet_skipping_is_caught(format_files, monkeypatch):
    """libdav1d (AV1) reads skip_frame once, when it opens: told to skip non-reference frames
    it would drop target frames for good. Were it on the list of decoders that skip per
    packet, decode_clip must notice the missing target and decode again without skipping."""
    monkeypatch.setattr(decode_module, "SKIPS_NON_REFERENCE_FRAMES", frozenset({"libdav1d"}))
    assert indices(decode_clip(format_files["av1.mkv"], 8, SIZE)) == expected_centre_indices(20, 8)


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("num_frames", [3, 8, 13])
def test_seeking_and_one_sequential_pass_return_identical_frames(format_files, name, num_frames, caplog):
    caplog.set_level(logging.INFO, logger="training.video.decode")
    by_seek = decode_clip(format_files[name], num_frames, SIZE, strategy="seek")
    sequential = decode_clip(format_files[name], num_frames, SIZE, strategy="sequential")
    auto = decode_clip(format_files[name], num_frames, SIZE)
    assert np.array_equal(by_seek, sequential) and np.array_equal(auto, sequential)
    assert indices(sequential) == expected_centre_indices(20, num_frames)
    # First time right: no safety net (a missed seek, a skipped target) had to decode again.
    assert not [record.message for record in caplog.records if record.name == "training.video.decode"]


def test_webm_without_frame_count_is_sampled_by_time(format_files):
    with av.open(str(format_files["vp9.webm"])) as container:
        assert container.streams.video[0].frames == 0  # the container does not say
    info = probe(format_files["vp9.webm"])
    assert (info.num_frames, info.declared_frames, info.codec) == (20, None, "vp9")
    assert info.duration_s == pytest.approx(2.0)
    assert info.keyframe_interval_s == pytest.approx(0.4) and info.num_keyframes == 5


def test_variable_frame_rate_samples_by_timestamps(media):
    # 12 frames over 4 s, bunched unevenly; the last one counts as shown for the median gap, 0.1 s.
    times = [0.0, 0.1, 0.2, 0.9, 1.0, 1.05, 1.1, 1.8, 2.3, 2.6, 2.7, 3.9]
    path = make_video(media / "vfr.mp4", num_frames=12, fps=10, vfr_timestamps=times)
    # Segment centres 0.5, 1.5, 2.5, 3.5 s show the frames that started at 0.2, 1.1, 2.3, 2.7 s;
    # counting frames as if the rate were constant would give [1, 4, 7, 10].
    assert indices(decode_clip(path, 4, SIZE)) == [2, 6, 8, 10]
    # Centres every 0.5 s from 0.25 s.
    assert indices(decode_clip(path, 8, SIZE, strategy="sequential")) == [2, 2, 6, 6, 7, 10, 10, 10]


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_rotated_video_comes_out_upright(media, rotation):
    path = make_video(media / f"rot{rotation}.mp4", num_frames=16, fps=8, size=(48, 64), rotation=rotation)
    with av.open(str(path)) as container:  # the stored frames are not upright...
        stored = next(container.decode(video=0))
        assert stored.rotation % 360 == rotation % 360
        with pytest.raises(ValueError):
            read_index(stored.to_ndarray(format="rgb24"))
    frames = decode_clip(path, 8, SIZE)  # ...the decoded ones are
    assert indices(frames) == expected_centre_indices(16, 8)
    assert probe(path).rotation == rotation


def test_rotation_is_written_as_a_phone_writes_portrait_video(media):
    """-90 must be the track matrix phones write for portrait video (tkhd: b = 1, c = -1),
    which players show turned 90 degrees clockwise; so our convention is FFmpeg's."""
    path = make_video(media / "portrait.mp4", num_frames=2, size=(48, 64), rotation=-90)
    data = path.read_bytes()
    tkhd = data.find(b"tkhd")
    version = data[tkhd + 4]
    matrix_offset = tkhd + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    matrix = struct.unpack(">9i", data[matrix_offset : matrix_offset + 36])
    assert matrix[:6] == (0, 1 << 16, 0, -(1 << 16), 0, 0)


def test_video_with_fewer_frames_than_samples_repeats_frames_in_order(media):
    one = make_video(media / "one.mp4", num_frames=1, fps=8)
    three = make_video(media / "three.webm", codec="libvpx-vp9", num_frames=3, fps=8)
    assert indices(decode_clip(one, 8, SIZE)) == [0] * 8
    assert indices(decode_clip(three, 8, SIZE)) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_train_mode_draws_within_each_segment_and_depends_on_the_seed(media):
    path = make_video(media / "train.mp4", num_frames=40, fps=10, gop=5)
    draws = [indices(decode_clip(path, 8, SIZE, mode="train", rng=seed)) for seed in range(6)]
    for drawn in draws:
        assert all(5 * k <= index <= 5 * k + 4 for k, index in enumerate(drawn))  # segment k: frames 5k..5k+4
        assert drawn == sorted(drawn)
    assert len({tuple(drawn) for drawn in draws}) > 1
    assert indices(decode_clip(path, 8, SIZE, mode="train", rng=3)) == draws[3]
    generator_draw = indices(decode_clip(path, 8, SIZE, mode="train", rng=np.random.default_rng(3)))
    assert generator_draw == draws[3]
    by_seek = decode_clip(path, 8, SIZE, mode="train", rng=4, strategy="seek")
    assert indices(by_seek) == draws[4]


@pytest.mark.parametrize("suffix", [".mp4", ".h264"])
def test_fast_mode_takes_the_nearest_keyframe(media, suffix):
    path = make_video(media / f"fast{suffix}", num_frames=40, fps=10, gop=8)  # keyframes 0, 8, 16, 24, 32
    # Centres at frame times 2.5, 7.5, ..., 37.5; nearest keyframes (ties: earlier):
    assert indices(decode_clip(path, 8, SIZE, fast=True)) == [0, 8, 16, 16, 24, 24, 32, 32]
    assert indices(decode_clip(path, 8, SIZE, fast=True, strategy="sequential")) == [0, 8, 16, 16, 24, 24, 32, 32]


def test_accepts_bytes_paths_and_file_objects(format_files):
    path = format_files["vp9.webm"]
    expected = decode_clip(path, 8, SIZE)
    data = path.read_bytes()

    class Unseekable(io.RawIOBase):
        def __init__(self, payload: bytes) -> None:
            self._stream = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            return self._stream.readinto(buffer)

    with open(path, "rb") as file:
        file.seek(0, io.SEEK_END)  # e.g. just written: seekable files are read from their start
        from_file = decode_clip(file, 8, SIZE)
    assert indices(decode_clip(make_video_bytes(".mkv", codec="mjpeg", num_frames=20), 8, SIZE)) == indices(expected)
    for frames in (decode_clip(str(path), 8, SIZE), decode_clip(data, 8, SIZE), decode_clip(bytearray(data), 8, SIZE),
                   decode_clip(io.BytesIO(data), 8, SIZE), decode_clip(Unseekable(data), 8, SIZE), from_file):
        assert np.array_equal(frames, expected)


@pytest.mark.parametrize(
    "make, code, status",
    [
        (lambda d: make_audio_only(d / "tone.m4a"), "no_video_stream", 415),
        (lambda d: make_audio_only(d / "tone.wav"), "no_video_stream", 415),
        (lambda d: make_audio_only(d / "song.m4a", cover_art=True), "no_video_stream", 415),
        (lambda d: make_png(d / "still.png"), "not_a_video", 415),
        (lambda d: np.random.default_rng(0).bytes(50_000), "not_a_video", 415),
        (lambda d: b"", "not_a_video", 415),
        (lambda d: b"%PDF-1.4 not a video at all", "not_a_video", 415),
    ],
    ids=["audio-m4a", "audio-wav", "audio-with-cover-art", "png", "random-bytes", "empty", "text"],
)
def test_non_videos_are_refused_with_a_code(media, make, code, status):
    source = make(media)
    with pytest.raises(VideoDecodeError) as caught:
        decode_clip(source)
    assert (caught.value.code, DECODE_STATUS[caught.value.code]) == (code, status)
    assert caught.value.message and str(caught.value) == caught.value.message


def test_errors_survive_pickling_for_decode_worker_processes():
    """The gateway's decode pool sends errors back from worker processes."""
    for error_type in (NotAVideoError, NoVideoStreamError, CorruptedVideoError, DecodeTimeoutError,
                       VideoTooLargeError, VideoTooLongError, TooManyPixelsError):
        error = error_type("the reason")
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is error_type and isinstance(copy, VideoDecodeError)
        assert (copy.code, copy.message, DECODE_STATUS[copy.code], str(copy)) == (error.code, "the reason", DECODE_STATUS[error.code],
                                                                         "the reason")


def _readable_pts(full: Path, cut_size: int) -> list[int]:
    """Presentation timestamps of the packets stored entirely in the first ``cut_size``
    bytes, up to the first packet that is not (what a reader of the cut file can get)."""
    readable = []
    with av.open(str(full)) as container:
        for packet in container.demux(video=0):
            if packet.size == 0:
                continue
            if packet.pos + packet.size > cut_size:
                break
            readable.append(packet.pts)
    return sorted(readable)


def test_truncated_upload_decodes_its_readable_part(media):
    full = make_video(media / "full.mp4", num_frames=40, fps=10, gop=10, size=(320, 240), faststart=True)
    data = full.read_bytes()
    cut_size = int(len(data) * 0.6)
    readable = _readable_pts(full, cut_size)
    assert 8 < len(readable) < 40
    frames = decode_clip(data[:cut_size], 8, SIZE)
    # The frame shown at each segment centre of the readable span [first, last + 1 frame).
    frame_ticks = min(np.diff(readable))
    span = readable[-1] + frame_ticks - readable[0]
    expected = []
    for k in range(8):
        centre = readable[0] + (2 * k + 1) * span / 16
        expected.append(max(pts for pts in readable if pts <= centre) // frame_ticks)
    assert indices(frames) == expected
    assert probe(data[:cut_size]).truncated


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3])
def test_truncated_upload_without_readable_frames_is_refused(media, fraction):
    full = make_video(media / "cut.mp4", num_frames=40, fps=10, gop=10, size=(320, 240), faststart=True)
    data = full.read_bytes()
    with pytest.raises(VideoDecodeError) as caught:
        decode_clip(data[: int(len(data) * fraction)])
    assert caught.value.code == "corrupted"


def test_mp4_cut_before_its_index_is_refused_as_corrupted(media):
    data = make_video(media / "index_last.mp4", num_frames=40, fps=10).read_bytes()  # moov at the end
    with pytest.raises(VideoDecodeError) as caught:
        decode_clip(data[: len(data) * 9 // 10])
    assert caught.value.code == "corrupted"


@pytest.mark.parametrize("suffix, codec", [(".mp4", "libx264"), (".webm", "libvpx-vp9"), (".avi", "mpeg4")])
def test_damaged_bytes_never_raise_anything_but_video_decode_error(media, suffix, codec):
    data = make_video(media / f"fuzz{suffix}", codec=codec, num_frames=24, fps=8, gop=6, size=(96, 64)).read_bytes()
    rng = np.random.default_rng(7)
    outcomes = set()
    for _ in range(25):
        damaged = bytearray(data)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 40))):
            damaged[position] = int(rng.integers(0, 256))
        try:
            frames = decode_clip(bytes(damaged), 4, 32, limits=DecodeLimits(time_budget_s=5))
            assert frames.shape == (4, 32, 32, 3)
            outcomes.add("decoded")
        except VideoDecodeError as error:
            outcomes.add(error.code)
    assert "decoded" in outcomes  # most damage is concealed by the decoder


def test_each_limit_raises_its_error(format_files, media):
    path = format_files["h264.mp4"]  # 64x48, 20 frames, 2 s
    size = path.stat().st_size
    cases = [
        (DecodeLimits(max_bytes=size - 1), "too_large", 413),
        (DecodeLimits(max_pixels=64 * 48 - 1), "too_many_pixels", 413),
        (DecodeLimits(max_duration_s=1.5), "too_long", 413),
        (DecodeLimits(max_frames=19), "too_long", 413),
        (DecodeLimits(time_budget_s=1e-9), "timeout", 415),
    ]
    for limits, code, status in cases:
        for source in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
            with pytest.raises(VideoDecodeError) as caught:
                decode_clip(source, limits=limits)
            assert (caught.value.code, DECODE_STATUS[caught.value.code]) == (code, status), limits
    at_the_limits = DecodeLimits(max_bytes=size, max_pixels=64 * 48, max_duration_s=2.0, max_frames=20)
    assert decode_clip(path, 8, SIZE, limits=at_the_limits).shape == (8, SIZE, SIZE, 3)


def test_live_recorded_webm_without_duration_or_cues(media):
    """What a browser's MediaRecorder uploads: no frame count, no duration, no seek index."""
    path = make_video(media / "live.webm", codec="libvpx-vp9", num_frames=20, fps=10, gop=5, live=True)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.frames, stream.duration, container.duration) == (0, None, None)
    for strategy in ("auto", "seek", "sequential"):
        assert indices(decode_clip(path, 8, SIZE, strategy=strategy)) == expected_centre_indices(20, 8)
    assert probe(path).duration_s == pytest.approx(2.0)
    # Nothing declares the duration: the frame index measures it, and the limit still holds.
    with pytest.raises(VideoDecodeError) as caught:
        decode_clip(path, limits=DecodeLimits(max_duration_s=1.9))
    assert caught.value.code == "too_long"


def test_bad_arguments_are_programming_errors(format_files):
    path = format_files["h264.mp4"]
    for kwargs in (dict(num_frames=0), dict(size=0), dict(mode="eval"), dict(strategy="random")):
        with pytest.raises(ValueError):
            decode_clip(path, **kwargs)
    with pytest.raises(TypeError):
        decode_clip(12345)
    with pytest.raises(TypeError):
        decode_clip(path, mode="train", rng="seed")
    with pytest.raises(ValueError):
        DecodeLimits(max_bytes=0)


def _index(num_frames: int, keyframe_every: int) -> FrameIndex:
    """The index of a constant-rate stream, for planner arithmetic."""
    positions = np.arange(num_frames)
    return FrameIndex(pts=positions * 100, is_keyframe=positions % keyframe_every == 0,
                      end_pts=num_frames * 100, time_base=Fraction(1, 3000), truncated=False)


def test_planner_seeks_with_short_gops_and_decodes_forward_with_long_ones():
    targets = sample_positions(_index(900, 30), 8, "test")
    assert targets.tolist() == [56, 168, 281, 393, 506, 618, 731, 843]
    short = plan_runs(_index(900, 30), targets, SEEK_COST_FRAMES)  # keyframe every 1 s at 30 fps
    assert [run.seek_to for run in short] == [30, 150, 270, 390, 480, 600, 720, 840]
    long = plan_runs(_index(900, 300), targets, SEEK_COST_FRAMES)  # every 10 s: targets share GOPs
    assert [(run.seek_to, run.targets) for run in long] == [
        (0, (56, 168, 281)), (300, (393, 506)), (600, (618, 731, 843))]
    single = plan_runs(_index(900, 900), targets, SEEK_COST_FRAMES)  # one keyframe: one pass from the start
    assert [(run.seek_to, run.targets) for run in single] == [(0, tuple(targets.tolist()))]
    never = plan_runs(_index(900, 30), targets, float("inf"))
    assert [run.seek_to for run in never] == [0]
