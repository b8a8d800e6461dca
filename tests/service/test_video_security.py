"""Uploads cannot make FFmpeg open other files: scripts, playlists and session descriptions.

FFmpeg picks its demuxer from the bytes, and some demuxers open what the bytes name: an ``ffconcat``
script (concat) or an ``#EXTM3U`` playlist (hls) makes FFmpeg decode the files it lists, a
numbered file name (image2) the image files it numbers, an SDP description (sdp) opens UDP
sockets. Uploaded, they would let a client classify the server's own videos, or make the decoder
read devices. ``VideoInput.open`` allows only the demuxers of ``ACCEPTED_FORMATS`` (none of which
opens anything but its input) and, for bytes and file objects, no protocol at all.

Each attack is a real file naming real files, sent as bytes, as a path (with the extension that
makes FFmpeg look for it), as a file object, as the gateway's decode workers open uploads, and
through the HTTP API. Two checks that fail without the guard:
- the named file is a real video made by tests/media.py: without the guard, several of these
  decode (the server's video, classified for the client); with it, all are refused, no frame;
- the named file is a FIFO (:class:`Tripwire`), which tells whether anything opened it: the guard
  refuses before the demuxer ever tries. ``test_the_tripwire_sees_ffmpeg_open_the_named_file``
  shows the same scripts do make an unguarded FFmpeg open it.
"""
from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import pytest

from service.errors import DECODE_STATUS

from service.decode_pool import decode_file
from training.video import DecodeLimits, VideoDecodeError, decode_clip, source as source_module
from tests.media import make_png, make_video, read_index
from tests.service.test_api import assert_error, running, tiny_settings

pytestmark = pytest.mark.timeout(120)

VIDEO = "clip.mp4"  # what the scripts name, in the directory they are run from
SEGMENT = "seg.ts"  # HLS names a transport stream segment


class Tripwire:
    """A FIFO that records whether anything opened it for reading.

    Opening a FIFO to read blocks until a writer comes; this writer is a thread polling with a
    non-blocking open, which succeeds only while a reader is there. It then closes at once: the
    reader sees an empty file and goes on (no hang), and ``tripped`` stays set. Works for FFmpeg's
    own ``open()`` calls, which no Python hook would see.
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.tripped = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                self._stop.wait(0.002)
                continue
            self.tripped.set()
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def ffconcat(target: str) -> bytes:
    return f"ffconcat version 1.0\nfile {target}\n".encode()


def hls(target: str) -> bytes:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{target}\n#EXT-X-ENDLIST\n".encode()


# name -> (script of the directory it is run from, the file it names, relative to that directory).
# FFmpeg's concat refuses absolute names by itself (its "safe" mode), not relative ones; hls takes both.
SCRIPTS: dict[str, Callable[[Path], tuple[bytes, str]]] = {
    "ffconcat-relative": lambda d: (ffconcat(VIDEO), VIDEO),
    "ffconcat-absolute": lambda d: (ffconcat(str(d / VIDEO)), VIDEO),
    "hls-relative": lambda d: (hls(SEGMENT), SEGMENT),
    "hls-absolute": lambda d: (hls(str(d / SEGMENT)), SEGMENT),
}
SUFFIXES = (".ffconcat", ".m3u8", ".txt")  # the extensions FFmpeg (or a person) reads as script/playlist


def _sources(data: bytes, folder: Path, kind: str) -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) pairs decoding the script `data` from `folder` as source `kind`."""
    if kind == "bytes":
        yield "bytes", lambda: decode_clip(data, 4, 32)
        return
    for suffix in SUFFIXES:
        path = folder / f"script{suffix}"
        path.write_bytes(data)
        if kind == "path":
            yield f"path {path.name}", lambda path=path: decode_clip(str(path), 4, 32)
        elif kind == "file object":  # its name (the path) is what FFmpeg sees as the URL

            def from_file(path: Path = path) -> object:
                with open(path, "rb") as file:
                    return decode_clip(file, 4, 32)

            yield f"file object {path.name}", from_file
        else:  # as a gateway decode worker opens an upload
            yield f"decode_file {path.name}", lambda path=path: decode_file(str(path), 4, 32)


def _refused(call: Callable[[], object], label: str) -> None:
    try:
        frames = call()
    except VideoDecodeError as error:
        assert (error.code, DECODE_STATUS[error.code]) == ("not_a_video", 415), (label, error.message)
    else:
        pytest.fail(f"{label}: decoded {getattr(frames, 'shape', frames)} from a file the upload names")


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory (where a script given as bytes or by descriptor resolves relative names)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def real_targets(folder: Path) -> Path:
    make_video(folder / VIDEO, num_frames=16, fps=8)
    make_video(folder / SEGMENT, num_frames=16, fps=8, codec="mpeg2video")
    return folder


@pytest.fixture
def tripwires(folder: Path) -> Iterator[dict[str, Tripwire]]:
    wires = {name: Tripwire(folder / name) for name in (VIDEO, SEGMENT)}
    yield wires
    for wire in wires.values():
        wire.close()


SOURCE_KINDS = ("bytes", "path", "file object", "decode_file")


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_script_naming_a_real_video_is_refused(real_targets, script, kind):
    data, _ = SCRIPTS[script](real_targets)
    for label, call in _sources(data, real_targets, kind):
        _refused(call, f"{script} as {label}")


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_the_file_a_script_names_is_never_opened(folder, tripwires, script, kind):
    data, target = SCRIPTS[script](folder)
    for label, call in _sources(data, folder, kind):
        _refused(call, f"{script} as {label}")
        assert not tripwires[target].tripped.is_set(), f"{script} as {label}: FFmpeg opened {target}"


@pytest.mark.parametrize("script, suffix", [("ffconcat-relative", ".txt"), ("hls-relative", ".m3u8"),
                                            ("hls-absolute", ".m3u8")])
def test_the_tripwire_sees_ffmpeg_open_the_named_file(folder, tripwires, script, suffix):
    """The control: FFmpeg left to itself does open what these scripts name (so the check above can fail)."""
    data, target = SCRIPTS[script](folder)
    path = folder / f"script{suffix}"
    path.write_bytes(data)
    try:
        av.open(str(path)).close()
    except av.FFmpegError:
        pass  # the FIFO reads as an empty file: what fails then does not matter here
    assert tripwires[target].tripped.wait(5)


def test_a_numbered_file_name_does_not_open_the_numbered_files(folder):
    """image2 reads `seq%03d.png` as seq000.png, seq001.png, ...: a path (not an upload) can name such a
    pattern, and a file may be called that literally."""
    make_png(folder / "still.png").rename(folder / "seq%03d.png")  # (FFmpeg's writer would number it)
    wire = Tripwire(folder / "seq000.png")
    try:
        _refused(lambda: decode_clip(str(folder / "seq%03d.png"), 4, 32), "image2 pattern")
        assert not wire.tripped.is_set(), "FFmpeg opened seq000.png"
    finally:
        wire.close()


def test_a_path_that_looks_like_a_url_is_read_as_that_file(folder):
    """FFmpeg takes a name as a URL: `concat:clip.mp4` would be the concat protocol reading clip.mp4.
    A path is a path: the file of that name is the one decoded."""
    make_video(folder / VIDEO, num_frames=16, fps=8)  # frames 0..15
    for name in ("concat:clip.mp4", "subfile:clip.mp4", "file:clip.mp4"):
        make_video(folder / "own.mp4", num_frames=16, fps=8, first_index=100).rename(folder / name)  # 100..115
        for path in (name, str(folder / name)):
            assert [read_index(frame) for frame in decode_clip(path, 4, 32)] == [102, 106, 110, 114], path


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_session_description_opens_no_socket():
    """An SDP file makes FFmpeg's sdp demuxer listen for RTP on the port it names (without the guard:
    the decode waits there, then ends as `timeout`)."""
    port = _free_udp_port()
    sdp = (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           f"m=video {port} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n").encode()
    _refused(lambda: decode_clip(sdp, 4, 32, limits=DecodeLimits(time_budget_s=5)), "sdp")


def test_without_the_format_list_no_nested_open_for_uploads(folder, tripwires, monkeypatch):
    """Second guard: bytes and file objects reach FFmpeg with no protocol allowed, so even a demuxer
    that opens other files, were it on the list, could not open one."""
    monkeypatch.setattr(source_module, "ACCEPTED_FORMATS", (*source_module.ACCEPTED_FORMATS, "concat"))
    data = ffconcat(VIDEO)
    (folder / "script.txt").write_bytes(data)
    for label, call in (*_sources(data, folder, "bytes"), *_sources(data, folder, "file object")):
        with pytest.raises(VideoDecodeError):
            call()
        assert not tripwires[VIDEO].tripped.is_set(), f"{label}: FFmpeg opened {VIDEO}"


@pytest.mark.parametrize("isolation", ["process", "thread"])
async def test_the_api_refuses_scripts_and_reads_no_named_file(folder, tmp_path_factory, isolation):
    """Through the gateway: the real video named by a relative ffconcat line (the upload's name is a
    descriptor number, so relative names resolve from the gateway's working directory) would be
    classified; a tripwire named by every script stays untouched."""
    upload_dir = tmp_path_factory.mktemp("uploads")
    make_video(folder / VIDEO, num_frames=16, fps=8)
    wire = Tripwire(folder / SEGMENT)
    uploads = [("video.ffconcat", ffconcat(VIDEO)), ("list.m3u8", hls(SEGMENT)),
               ("list.m3u8", hls(str(folder / SEGMENT))), ("concat.txt", ffconcat(SEGMENT))]
    try:
        async with running(tiny_settings(upload_dir=str(upload_dir), decode_isolation=isolation)) as (client, _):
            for filename, data in uploads:
                response = await client.post("/classify", data={"labels": ["a", "b"]},
                                             files=[("video", (filename, data, "application/octet-stream"))])
                assert_error(response, 415, "not_a_video")
                assert not wire.tripped.is_set(), f"{filename}: the gateway opened {SEGMENT}"
            response = await client.post("/support-sets", data={"labels": ["a"]},
                                         files=[("videos", ("clip.ffconcat", ffconcat(VIDEO), "text/plain"))])
            assert_error(response, 415, "not_a_video")
    finally:
        wire.close()
    assert os.listdir(upload_dir) == []
