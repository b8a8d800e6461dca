"""Real test media written with PyAV: videos whose frames carry their own index.

Shared by every test that needs an upload (decoding, gateway, training data). The API here
is stable; add keyword arguments rather than changing existing ones.

Frame pattern
-------------
Every frame of :func:`make_video` shows its index as horizontal black/white bands that span
the full width of the frame, inside its central square (side ``min(width, height)``; outside
it, above and below in a portrait frame, is mid-grey). The square is cut into
:data:`NUM_BANDS` equal bands, top to bottom::

    white marker, black marker, 12 index bits (most significant first), parity bit, black marker

Because the bands span the width and live in the central square, they survive a centre crop
at any aspect ratio, resizing to any size down to about ``2 * NUM_BANDS`` pixels, chroma
subsampling and lossy codecs. The markers make the pattern asymmetric: a frame shown upside
down or on its side is refused by :func:`read_index` instead of being misread.

Typical use::

    from tests.media import make_video, read_index
    path = make_video(tmp_path / "clip.mp4", num_frames=16, fps=8, size=(64, 48))
    frames = decode_clip(path, num_frames=8)          # [8, 224, 224, 3] uint8
    assert [read_index(f) for f in frames] == expected_centre_indices(16, 8)
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from av.stream import Disposition

from training.video.writer import video_bytes, write_video

NUM_BANDS = 16
INDEX_BITS = 12
MAX_INDEX = (1 << INDEX_BITS) - 1  # 4095: the largest frame index a pattern can carry

# Pixel formats each encoder accepts for our RGB frames (anything else: yuv420p).
_DEFAULT_PIX_FMT = {
    "mjpeg": "yuvj420p",
    "gif": "rgb8",
    "prores_ks": "yuv422p10le",
    "prores": "yuv422p10le",
    "png": "rgb24",
    "ffv1": "yuv420p",
}
# Container (muxer) names by file extension.
_FORMAT_BY_SUFFIX = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
    ".avi": "avi",
    ".gif": "gif",
    ".ts": "mpegts",
    ".h264": "h264",  # a raw elementary stream: no container, no timestamps
}


def _bits_of(index: int) -> list[int]:
    """The band values (1 = white) of frame ``index``, top to bottom: NUM_BANDS values."""
    data_bits = [(index >> shift) & 1 for shift in range(INDEX_BITS - 1, -1, -1)]
    parity = sum(data_bits) & 1
    return [1, 0, *data_bits, parity, 0]


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """The upright RGB image of frame ``index``: uint8 ``[height, width, 3]``.

    Raises ValueError when ``index`` is outside ``0..MAX_INDEX`` or the frame is too small
    (the central square needs at least 2 pixels per band).
    """
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"frame index {index} outside 0..{MAX_INDEX}")
    side = min(width, height)
    if side < 2 * NUM_BANDS:
        raise ValueError(f"frame {width}x{height} too small: need min side >= {2 * NUM_BANDS}")
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    top = (height - side) // 2
    # Band b covers rows [top + b*side/NUM_BANDS, top + (b+1)*side/NUM_BANDS).
    edges = [top + (b * side) // NUM_BANDS for b in range(NUM_BANDS + 1)]
    for band, bit in enumerate(_bits_of(index)):
        image[edges[band] : edges[band + 1], :, :] = 255 if bit else 0
    return image


def read_index(frame: np.ndarray) -> int:
    """Recover the frame index from a decoded frame ``[H, W, 3]`` (resized/cropped allowed).

    Reads the central square: each band's middle half (rows and columns) must be clearly
    black or white. Raises ValueError when the pattern is absent, rotated, upside down or
    fails its parity check.
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] frame, got shape {frame.shape}")
    height, width = frame.shape[:2]
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    square = frame[top : top + side, left : left + side].astype(np.float32).mean(axis=2)
    values = []
    for band in range(NUM_BANDS):
        row0 = (band * side) // NUM_BANDS
        row1 = ((band + 1) * side) // NUM_BANDS
        quarter_rows = (row1 - row0) // 4
        rows = square[row0 + quarter_rows : row1 - quarter_rows]
        block = rows[:, side // 4 : side - side // 4]
        if block.size == 0:
            raise ValueError(f"frame {width}x{height} too small to read")
        mean, spread = float(block.mean()), float(block.max() - block.min())
        if spread > 128 or 80 < mean < 176:
            raise ValueError(
                f"band {band} is not uniformly black or white (mean {mean:.0f}, "
                f"spread {spread:.0f}): no upright index pattern"
            )
        values.append(1 if mean >= 128 else 0)
    if values[0] != 1 or values[1] != 0 or values[-1] != 0:
        raise ValueError(f"marker bands wrong ({values[0]}, {values[1]}, {values[-1]}): frame not upright")
    data_bits = values[2 : 2 + INDEX_BITS]
    if sum(data_bits) & 1 != values[2 + INDEX_BITS]:
        raise ValueError("parity check failed")
    return int("".join(str(bit) for bit in data_bits), 2)


def expected_centre_indices(num_video_frames: int, num_samples: int) -> list[int]:
    """Frame indices ``decode_clip(mode="test")`` must return for a constant-rate video.

    Segment k of ``num_samples`` equal segments has its centre at frame time
    ``(k + 0.5) * N / T``; the frame shown there is ``floor((2k + 1) * N / (2T))``.
    """
    return [((2 * k + 1) * num_video_frames) // (2 * num_samples) for k in range(num_samples)]


def make_video(
    path: str | os.PathLike,
    *,
    codec: str = "libx264",
    container: str | None = None,
    num_frames: int = 16,
    fps: float = 8,
    size: tuple[int, int] = (64, 48),
    gop: int | None = None,
    pix_fmt: str | None = None,
    vfr_timestamps: Sequence[float] | None = None,
    rotation: int | None = None,
    faststart: bool = False,
    live: bool = False,
    first_index: int = 0,
) -> Path:
    """Write a real video whose frame i shows index ``first_index + i``; returns the path.

    - ``container``: muxer name ("mp4", "webm", "matroska", "avi", "mov", "gif", ...);
      default from the file extension.
    - ``size``: ``(width, height)`` as displayed (upright).
    - ``gop``: keyframe interval in frames (exact for libx264: scene-cut detection is off).
    - ``vfr_timestamps``: one presentation time in seconds per frame (strictly increasing)
      for a variable-frame-rate file; ``fps`` then only sets the last frame's duration hint.
    - ``rotation``: display rotation in degrees counter-clockwise (PyAV/FFmpeg convention,
      ``-90`` is what a phone writes for portrait video). The stored frames are turned the
      other way, so a player that honours the display matrix shows the upright pattern.
    - ``faststart``: mp4/mov only, put the index (moov) before the data, as web uploads do;
      a truncated faststart file keeps its index.
    - ``live``: write through a non-seekable sink, as live recorders (a browser's
      MediaRecorder) do: a WebM/MKV then declares no duration and has no seek index (cues).
    """
    path = Path(path)
    if vfr_timestamps is not None:
        if len(vfr_timestamps) != num_frames:
            raise ValueError("vfr_timestamps needs one time per frame")
        if any(b <= a for a, b in zip(vfr_timestamps[:-1], vfr_timestamps[1:], strict=True)):
            raise ValueError("vfr_timestamps must be strictly increasing")
    width, height = size
    quarter_turns = 0 if rotation is None else round(rotation / 90) % 4
    if rotation is not None and rotation % 90:
        raise ValueError("rotation must be a multiple of 90 degrees")

    format_name = container or _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if codec == "libx264":
        keyint = gop or 250
        options: dict[str, str] | None = {"x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
    elif codec.startswith("libvpx"):
        # Fast enough for tests; keyint_min = gop makes the keyframe spacing exact.
        options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        if gop is not None:
            options["keyint_min"] = str(gop)
    else:
        options = None
    frames = (np.rot90(frame_pattern(first_index + i, width, height), k=-quarter_turns) for i in range(num_frames))
    with contextlib.ExitStack() as stack:
        if live:
            if format_name is None:
                raise ValueError(f"live writing needs a container name for {path.name}")
            target: Path | _NonSeekableSink = _NonSeekableSink(stack.enter_context(open(path, "wb")))
        else:
            target = path
        write_video(target, frames, fps=fps, codec=codec, container=format_name,
                    pix_fmt=pix_fmt or _DEFAULT_PIX_FMT.get(codec, "yuv420p"), options=options,
                    container_options={"movflags": "+faststart"} if faststart else None, gop=gop,
                    timestamps=vfr_timestamps, rotation=rotation if quarter_turns else None)
    return path


class _NonSeekableSink(io.RawIOBase):
    """A write-only file that cannot seek (a pipe, a network stream)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        return self._file.write(data)


def make_video_bytes(suffix: str = ".mp4", **kwargs) -> bytes:
    """The bytes of a :func:`make_video` file with extension ``suffix`` (same keywords)."""
    with tempfile.TemporaryDirectory() as tmp:
        return make_video(Path(tmp) / f"clip{suffix}", **kwargs).read_bytes()


#: The colours (RGB, 0..1) of the classes of :func:`class_video`.
CLASS_COLOURS = [(1.0, 0.1, 0.1), (0.1, 0.9, 0.2), (0.1, 0.2, 1.0), (0.9, 0.9, 0.1)]


def class_video(class_index: int, shot: int = 0, *, num_frames: int = 12) -> bytes:
    """A real H.264 mp4 (64x48, 8 fps): the class's colour (:data:`CLASS_COLOURS`) blended with the
    pattern of frame index ``100 * shot + i``, so each shot of a class is another video."""
    colour = np.array(CLASS_COLOURS[class_index], dtype=np.float32)[None, None, :]

    def frame(i: int) -> np.ndarray:
        pattern = frame_pattern(100 * shot + i, 64, 48).astype(np.float32) / 255.0
        return ((0.35 * pattern + 0.65 * colour) * 255).astype(np.uint8)

    return video_bytes((frame(i) for i in range(num_frames)), fps=8)


def make_gif(
    path: str | os.PathLike, *, num_frames: int = 16, fps: float = 10, size: tuple[int, int] = (64, 48)
) -> Path:
    """An animated GIF whose frame i shows index i (see :func:`make_video`)."""
    return make_video(path, codec="gif", container="gif", num_frames=num_frames, fps=fps, size=size)


def make_png(path: str | os.PathLike, *, size: tuple[int, int] = (64, 48), index: int = 0) -> Path:
    """A still PNG image showing the pattern of frame ``index``."""
    path = Path(path)
    width, height = size
    write_video(path, [frame_pattern(index, width, height)], fps=24, codec="png", container="image2", pix_fmt="rgb24")
    return path


def make_audio_only(
    path: str | os.PathLike, *, seconds: float = 1.0, sample_rate: int = 16000, cover_art: bool = False
) -> Path:
    """An audio-only file (a 440 Hz tone): AAC in .m4a/.mp4/.mov, PCM in .wav, Opus in .ogg/.webm.

    ``cover_art`` (.m4a/.mp4/.mov): add an album picture, a one-frame MJPEG stream marked
    as attached picture, as music files carry; it is still not a video.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    codec = {".wav": "pcm_s16le", ".ogg": "libopus", ".webm": "libopus"}.get(suffix, "aac")
    if codec == "libopus":
        sample_rate = 48000
    if cover_art and suffix not in (".m4a", ".mp4", ".mov"):
        raise ValueError("cover art needs an .m4a, .mp4 or .mov file")
    # FFmpeg's .m4a muxer ("ipod") takes no pictures; the mp4 muxer writes the same file type.
    with av.open(str(path), "w", format="mp4" if cover_art and suffix == ".m4a" else None) as output:
        stream = output.add_stream(codec, rate=sample_rate, layout="mono")
        if cover_art:
            picture = output.add_stream("mjpeg")
            picture.width, picture.height, picture.pix_fmt = 64, 48, "yuvj420p"
            picture.disposition = Disposition.attached_pic
            output.mux(picture.encode(av.VideoFrame.from_ndarray(frame_pattern(0, 64, 48), format="rgb24")))
            output.mux(picture.encode(None))
        chunk = 960 if codec == "libopus" else 1024
        total = int(seconds * sample_rate)
        for start in range(0, total, chunk):
            times = np.arange(start, start + chunk) / sample_rate
            tone = (0.3 * np.sin(2 * np.pi * 440 * times)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path
