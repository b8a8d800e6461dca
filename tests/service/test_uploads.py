"""Uploads go to disk, not gateway memory: each uploaded file is streamed to its own temporary file in
`upload_dir` (sha256 and size computed on the way), decode workers open that file, and every file is
removed when its request ends, whatever the outcome.

Real parts throughout: the app with its lifespan under httpx's ASGI transport (as in test_api.py), real
PyAV videos, real decode worker processes (and the thread pool), a real gateway process for client
disconnects. The service's own methods are wrapped only to look at the uploads while a request runs;
every call still goes through to the real code.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest

from service.api.deps import UPLOAD_FILE_PREFIX, _copy, _storage_error
from service.core import FsarService, Upload
from service.decode_pool import decode_file
from training.video import decode_clip
from tests.media import make_video_bytes
from tests.service.live_gateway import LiveGateway
from tests.service.test_api import LABELS, assert_error, class_video, running, tiny_settings

pytestmark = pytest.mark.timeout(180)

MB = 1024 * 1024


def padded(video: bytes, total_bytes: int) -> bytes:
    """A valid MP4 of exactly `total_bytes`: the video then a top-level `free` box (FFmpeg skips it).
    Past 1 MB Starlette spools the part to disk; past 1 MiB our copy takes several pieces."""
    pad = total_bytes - len(video)
    return video + pad.to_bytes(4, "big") + b"free" + bytes(pad - 8)


@pytest.fixture(scope="module")
def small() -> bytes:
    return class_video(0)


@pytest.fixture(scope="module")
def large() -> bytes:
    return padded(class_video(1), 3 * MB + 12345)


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


class UploadWatch:
    """Records, for every upload the service is handed (classify, create_support_set, add_videos) and
    every decode job, the path and whether the file was there with its announced size and hash."""

    def __init__(self, service: FsarService) -> None:
        self.seen: list[dict[str, Any]] = []
        self.decodes: list[tuple[Callable, Any]] = []
        for name in ("classify", "create_support_set", "add_videos"):
            setattr(service, name, self._wrap(getattr(service, name)))
        pool = service.decode_pool
        real_run = pool.run

        async def run(fn: Callable, source: Any, *args: Any, **kwargs: Any) -> Any:
            self.decodes.append((fn, source))
            if isinstance(source, str):
                self.seen.append(self._look(Path(source).name, source))  # the file exists while it decodes
            return await real_run(fn, source, *args, **kwargs)

        pool.run = run  # an instance attribute: the service calls through it, then the real pool

    def _look(self, filename: str, path: str | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"filename": filename, "path": path,
                                 "exists": path is not None and os.path.exists(path)}
        if entry["exists"]:
            data = Path(path).read_bytes()
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        return entry

    def _wrap(self, method: Callable) -> Callable:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            uploads = [a for a in args if isinstance(a, Upload)]
            uploads += [u for a in args if isinstance(a, (list, tuple)) for u in a if isinstance(u, Upload)]
            for upload in uploads:
                entry = self._look(upload.filename, upload.path)
                entry.update(announced_size=upload.size, announced_sha256=upload.sha256,
                             in_memory=upload.data is not None)
                self.seen.append(entry)
            return await method(*args, **kwargs)
        return wrapped

    def paths(self) -> set[str]:
        return {entry["path"] for entry in self.seen if entry["path"] is not None}


def files_of(items: list[tuple[str, bytes]], field: str = "videos") -> list:
    return [(field, (name, data, "video/mp4")) for name, data in items]


# ------------------------------------------------------------------ streaming to a file
@pytest.mark.parametrize("isolation", ["process", "thread"])
async def test_uploads_stream_to_files_the_decoder_opens_and_are_removed(isolation, upload_dir, small, large) -> None:
    settings = tiny_settings(upload_dir=str(upload_dir), decode_isolation=isolation)
    async with running(settings) as (client, service):
        watch = UploadWatch(service)
        response = await client.post("/support-sets", files=files_of([("small.mp4", small), ("large.mp4", large)]),
                                     data={"labels": LABELS[:2]})
        assert response.status_code == 201, response.text
        # The response's hashes (computed while streaming) are those of the bytes sent.
        assert [v["sha256"] for v in response.json()["videos"]] == [hashlib.sha256(small).hexdigest(),
                                                                     hashlib.sha256(large).hexdigest()]

        handed = [entry for entry in watch.seen if "announced_size" in entry]
        assert [entry["filename"] for entry in handed] == ["small.mp4", "large.mp4"]
        for entry, data in zip(handed, (small, large)):
            # The service got a file in upload_dir, not bytes, holding exactly what was sent.
            assert not entry["in_memory"] and entry["exists"], entry
            assert Path(entry["path"]).parent == upload_dir and Path(entry["path"]).name.startswith(UPLOAD_FILE_PREFIX)
            assert entry["size"] == entry["announced_size"] == len(data)
            assert entry["sha256"] == entry["announced_sha256"] == hashlib.sha256(data).hexdigest()
        # Each decode job was given the path (the worker opens the file), and the file was there.
        assert [(fn, source) for fn, source in watch.decodes] == [(decode_file, entry["path"]) for entry in handed]
        assert all(entry["exists"] for entry in watch.seen)
        assert os.listdir(upload_dir) == []

        response = await client.post("/classify", files=files_of([("query.mp4", large)], "video"),
                                     data={"support_set_id": response.json()["id"]})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == LABELS[1]
        assert len(watch.paths()) == 3 and os.listdir(upload_dir) == []


def test_decoding_the_file_gives_the_frames_of_the_bytes(tmp_path, large) -> None:
    path = tmp_path / "upload.video"
    path.write_bytes(large)
    from_file = decode_file(str(path), num_frames=4, size=32)
    assert np.array_equal(from_file, decode_clip(large, num_frames=4, size=32))


def test_copy_hashes_and_sizes_what_it_streams(tmp_path, large) -> None:
    target_path = tmp_path / "copy"
    with open(target_path, "wb") as target:
        size, sha256 = _copy(io.BytesIO(large), target)
    assert (size, sha256) == (len(large), hashlib.sha256(large).hexdigest())
    assert target_path.read_bytes() == large


def test_upload_from_bytes_and_from_a_file_agree(tmp_path, small) -> None:
    in_memory = Upload("a.mp4", small)
    assert Upload(filename="a.mp4", data=small).sha256 == in_memory.sha256 == hashlib.sha256(small).hexdigest()
    assert in_memory.size == len(small) and in_memory.source is small and in_memory.path is None
    with pytest.raises(ValueError):
        Upload("a.mp4")  # neither bytes nor a file
    with pytest.raises(ValueError):
        Upload("a.mp4", path=str(tmp_path / "x"))  # a file without its size and hash


# ------------------------------------------------------------------ clean-up on every outcome
async def test_no_upload_file_is_left_after_any_error(upload_dir, small, large) -> None:
    corrupt = b"\0\0\0\x18ftypisom" + bytes(64) + os.urandom(4096)  # starts like MP4, is not one
    settings = tiny_settings(upload_dir=str(upload_dir), max_files_per_request=2, max_video_seconds=2.0)
    async with running(settings) as (client, service):
        watch = UploadWatch(service)
        set_id = (await client.post("/support-sets", files=files_of([("a.mp4", small)]),
                                    data={"labels": [LABELS[0]]})).json()["id"]
        cases = [
            ("corrupt upload", 415, "corrupted",
             client.post("/classify", files=files_of([("bad.mp4", corrupt)], "video"), data={"labels": ["a"]})),
            ("empty upload", 415, "not_a_video",
             client.post("/classify", files=files_of([("empty.mp4", b"")], "video"), data={"labels": ["a"]})),
            ("too long", 413, "too_long",
             client.post("/classify", files=files_of([("long.mp4", make_video_bytes(num_frames=32, fps=8))], "video"),
                         data={"labels": ["a"]})),
            ("a good and a corrupt video", 415, "corrupted",
             client.post("/support-sets", files=files_of([("a.mp4", small), ("bad.mp4", corrupt)]),
                         data={"labels": LABELS[:2]})),
            ("too many files", 413, "too_many_files",
             client.post("/support-sets", files=files_of([("a.mp4", small), ("b.mp4", large), ("c.mp4", small)]),
                         data={"labels": LABELS[:3]})),
            ("empty label", 422, "empty_label",
             client.post("/support-sets", files=files_of([("a.mp4", small)]), data={"labels": ["  "]})),
            ("label count", 422, "label_count_mismatch",
             client.post("/support-sets", files=files_of([("a.mp4", small), ("b.mp4", large)]),
                         data={"labels": [LABELS[0]]})),
            ("unknown set", 404, "support_set_not_found",
             client.post("/support-sets/0123abcd/videos", files=files_of([("b.mp4", large)]),
                         data={"labels": [LABELS[1]]})),
            ("no target", 422, "missing_target",
             client.post("/classify", files=files_of([("q.mp4", large)], "video"))),
            ("unknown set to classify against", 404, "support_set_not_found",
             client.post("/classify", files=files_of([("q.mp4", small)], "video"), data={"support_set_id": "feed"})),
        ]
        for what, status, code, request in cases:
            before = len(watch.seen)
            assert_error(await request, status, code)
            new = watch.seen[before:]
            # The request's uploads were files in upload_dir while it ran ...
            assert new and all(entry["exists"] and Path(entry["path"]).parent == upload_dir for entry in new), what
            # ... and none is left once it answered.
            assert os.listdir(upload_dir) == [], what
        assert set_id and len(watch.paths()) >= len(cases)


async def test_identical_bytes_still_hit_the_query_cache_without_decoding(upload_dir, large) -> None:
    async with running(tiny_settings(upload_dir=str(upload_dir))) as (client, service):
        watch = UploadWatch(service)
        first = await client.post("/classify", files=files_of([("one.mp4", large)], "video"), data={"labels": LABELS})
        again = await client.post("/classify", files=files_of([("two.mp4", large)], "video"), data={"labels": LABELS})
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert first.json()["query_cache_hit"] is False and again.json()["query_cache_hit"] is True
        assert len(watch.decodes) == 1  # the hit was found by the streamed sha256 alone
        assert again.json()["predictions"] == first.json()["predictions"]
        assert len(watch.paths()) == 2 and os.listdir(upload_dir) == []


# ------------------------------------------------------------------ storage problems
@pytest.mark.parametrize("problem", ["missing folder", "not a folder"])
async def test_an_unusable_upload_dir_is_a_clear_503(tmp_path, small, problem) -> None:
    folder = tmp_path / "no-such-folder"
    if problem == "not a folder":
        folder = tmp_path / "a-file"
        folder.write_bytes(b"")
    async with running(tiny_settings(upload_dir=str(folder))) as (client, _):
        response = await client.post("/classify", files=files_of([("q.mp4", small)], "video"), data={"labels": ["a"]})
        error = assert_error(response, 503, "upload_storage_unavailable")
        assert "cannot store uploads" in error["message"] and str(tmp_path) not in error["message"]
        response = await client.post("/support-sets", files=files_of([("a.mp4", small)]), data={"labels": ["a"]})
        assert_error(response, 503, "upload_storage_unavailable")


async def test_a_write_that_fails_half_way_is_a_503_and_leaves_no_file(upload_dir) -> None:
    """The process's file-size limit makes the kernel refuse the copy's writes past 256 kB (EFBIG), as a
    full disk would (ENOSPC); the upload (under Starlette's 1 MB spooling threshold) is copied in pieces."""
    upload = padded(class_video(2), 900 * 1024)
    async with running(tiny_settings(upload_dir=str(upload_dir))) as (client, _):
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, limits[1]))
        try:
            response = await client.post("/classify", files=files_of([("q.mp4", upload)], "video"),
                                         data={"labels": ["a"]})
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, old_handler)
        error = assert_error(response, 503, "upload_storage_unavailable")
        assert "File too large" in error["message"]
        assert os.listdir(upload_dir) == []


def test_a_full_disk_is_reported_as_such(large) -> None:
    with open("/dev/full", "wb") as full, pytest.raises(OSError) as raised:
        _copy(io.BytesIO(large), full)
    assert raised.value.errno == errno.ENOSPC
    error = _storage_error(raised.value, None)
    assert error.status == 503 and error.code == "upload_storage_unavailable"
    assert "No space left on device" in error.message


# ------------------------------------------------------------------ what FFmpeg sees
async def test_an_uploaded_playlist_cannot_make_the_decoder_read_local_files(upload_dir, tmp_path) -> None:
    """An HLS playlist naming a real video on the server: FFmpeg probes HLS only for sources whose name
    ends in .m3u8, so neither the client's file name nor our file's name may reach it as one."""
    target = tmp_path / "private.ts"
    target.write_bytes(make_video_bytes(".ts", num_frames=16, size=(64, 48), codec="mpeg2video"))
    playlist = (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n" + str(target).encode()
                + b"\n#EXT-X-ENDLIST\n")
    for isolation in ("process", "thread"):
        async with running(tiny_settings(upload_dir=str(upload_dir), decode_isolation=isolation)) as (client, _):
            response = await client.post("/classify", data={"labels": ["a", "b"]},
                                         files=[("video", ("list.m3u8", playlist, "application/x-mpegurl"))])
            assert_error(response, 415, "not_a_video")
    assert os.listdir(upload_dir) == []


# ------------------------------------------------------------------ a real server, clients that go away
def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "fsar-test-boundary-7d1e"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\na\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\nb\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"q.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), boundary


def _send_and_hang_up(port: int, body: bytes, boundary: str, send_bytes: int) -> None:
    """POST /classify declaring the whole body, send its first `send_bytes`, close the connection."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall((f"POST /classify HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len(body)}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
        sock.sendall(body[:send_bytes])


def _decodes_done(gateway: LiveGateway) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('fsar_stage_duration_seconds_count{stage="decode"}'):
            return float(line.split()[-1])
    return 0.0


def test_clients_that_hang_up_leave_no_upload_file(tmp_path_factory, large) -> None:
    """A real gateway (uploads in its TMPDIR, as by default): clients that hang up half-way through the
    body, or right after sending all of it (the gateway still decodes it), leave nothing behind."""
    settings = tiny_settings(log_level="error")
    with LiveGateway(settings, tmp_path_factory.mktemp("hang-up")) as gateway:
        for number in range(3):
            body, boundary = _multipart(padded(class_video(1), 3 * MB + number))
            _send_and_hang_up(gateway.port, body, boundary, len(body) // 2)
        for number in range(1, 4):  # distinct bytes: every one is decoded (no query cache hit)
            body, boundary = _multipart(padded(class_video(1), 3 * MB + number))
            _send_and_hang_up(gateway.port, body, boundary, len(body))
            deadline = time.monotonic() + 60
            while _decodes_done(gateway) < number:  # the gateway went on with the request: it decoded the file
                assert time.monotonic() < deadline, gateway.log()[-3000:]
                time.sleep(0.1)
        deadline = time.monotonic() + 30
        while gateway.new_tmp_entries() or gateway.open_tmp_files():  # the request's clean-up runs after the decode
            assert time.monotonic() < deadline, (gateway.new_tmp_entries(), gateway.open_tmp_files())
            time.sleep(0.1)
        assert gateway.alive() and httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200
