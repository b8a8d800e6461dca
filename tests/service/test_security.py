"""Authentication, tenant isolation, rate limits and upload limits, through the HTTP API.

The app runs with its lifespan (tiny random model, real encoded videos); rate limits shared between
replicas use the real Redis. One test talks to a live uvicorn over a socket to show that an over-limit
body is refused while it is still streaming in.
"""
from __future__ import annotations

import logging
import select
import socket
import time
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest

from service.api import create_app
from service.auth import KeyConfigError, KeyRing, load_key_ring, parse_keys
from service.ratelimit import MemoryRateLimiter
from service.settings import Settings
from tests.media import make_video_bytes
from tests.service.live_gateway import LiveGateway
from tests.service.test_api import LABELS, assert_error, class_video, classify, register, running, tiny_settings, \
    upload_form

pytestmark = pytest.mark.timeout(180)

ALICE_KEY = "alice-key-0123456789abcdef"
ALICE_KEY_2 = "alice-rotated-key-fedcba9876543210"
BOB_KEY = "bob-key-0123456789abcdef-xyz"
KEYS = f"alice:{ALICE_KEY}, bob:{BOB_KEY},alice:{ALICE_KEY_2}"
ALL_KEYS = (ALICE_KEY, ALICE_KEY_2, BOB_KEY)


def keyed(**overrides) -> Settings:
    return tiny_settings(api_keys=KEYS, decode_concurrency=1, **overrides)


def as_tenant(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture(scope="module")
def clips() -> dict[int, bytes]:
    return {c: class_video(c) for c in range(3)}


# ------------------------------------------------------------------ key configuration
def test_parse_keys_reads_entries_comments_and_rotated_keys(tmp_path: Path) -> None:
    assert parse_keys(KEYS, "test") == [("alice", ALICE_KEY), ("bob", BOB_KEY), ("alice", ALICE_KEY_2)]
    key_file = tmp_path / "keys"
    key_file.write_text(f"# production keys\nalice:{ALICE_KEY}\n\n  # bob rotates monthly\nbob:{BOB_KEY}\n")
    ring = load_key_ring(Settings(api_keys_file=str(key_file)))
    assert ring.enabled and ring.tenants == ["alice", "bob"] and len(ring) == 2
    assert ring.authenticate(ALICE_KEY) == "alice" and ring.authenticate(BOB_KEY) == "bob"
    assert ring.authenticate(ALICE_KEY + "x") is None and ring.authenticate("") is None
    assert ring.authenticate(None) is None
    assert not load_key_ring(Settings()).enabled


@pytest.mark.parametrize("text, problem", [
    (f"alice{ALICE_KEY}", "not 'tenant:key'"),
    (f"al ice:{ALICE_KEY}", "tenant name"),
    (f"a/b:{ALICE_KEY}", "tenant name"),
    ("alice:short-key", "at least 16"),
    ("alice:has a space in the key 12345", "whitespace"),
    (f"alice:{ALICE_KEY},bob:{ALICE_KEY}", "repeats a key"),
])
def test_bad_key_configuration_is_refused_without_echoing_keys(text: str, problem: str) -> None:
    with pytest.raises(KeyConfigError, match=problem) as info:
        parse_keys(text, "FSAR_API_KEYS")
    message = str(info.value)
    for secret in (ALICE_KEY, "short-key", "has a space in the key 12345"):
        assert secret not in message


def test_key_settings_errors_stop_the_app_at_creation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        Settings(api_keys=KEYS, api_keys_file=str(tmp_path / "keys"))
    with pytest.raises(KeyConfigError, match="cannot read"):
        create_app(tiny_settings(api_keys_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(KeyConfigError, match="no keys"):
        create_app(tiny_settings(api_keys_file=str(tmp_path / "empty")))
    assert "alice-key" not in repr(Settings(api_keys=KEYS))
    assert Settings(api_keys=KEYS).redacted()["api_keys"] == "***"


def test_serve_stops_with_one_sentence_on_a_bad_key_file(tmp_path: Path) -> None:
    from service.server import serve

    (tmp_path / "keys").write_text(f"alice:{ALICE_KEY}\nbob-without-a-key\n")
    with pytest.raises(SystemExit) as info:
        serve(tiny_settings(api_keys_file=str(tmp_path / "keys")))
    assert str(info.value) == f"fsar serve: entry 2 of api_keys_file {tmp_path / 'keys'} is not 'tenant:key'."


def test_key_ring_compares_against_every_key(monkeypatch) -> None:
    """A match does not end the loop early: every digest is compared with hmac.compare_digest, whatever
    the key, so timing reveals neither whether nor which key matched."""
    import hmac

    ring = KeyRing([(f"t{i}", f"key-number-{i:04d}-padding") for i in range(50)])
    compared: list[bytes] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert ring.authenticate("key-number-0000-padding") == "t0"
    assert len(compared) == 50
    assert ring.authenticate("key-number-0049-padding") == "t49"
    assert ring.authenticate("not a key at all, no") is None
    assert len(compared) == 150


async def test_decode_workers_get_no_gateway_secrets(monkeypatch) -> None:
    """Decode workers parse untrusted bytes: API keys and the Redis URL stay out of their environment."""
    import os

    from service.decode_pool import ProcessDecodePool

    monkeypatch.setenv("FSAR_API_KEYS", KEYS)
    monkeypatch.setenv("FSAR_REDIS_URL", "redis://:secret@127.0.0.1:6379/13")
    pool = ProcessDecodePool(1, hard_timeout_s=30)
    try:
        # os.getenv runs in the worker, on the worker's environment.
        assert await pool.run(os.getenv, "FSAR_API_KEYS") is None
        assert await pool.run(os.getenv, "FSAR_REDIS_URL") is None
        assert await pool.run(os.getenv, "PATH") == os.environ["PATH"]
        assert await pool.run(os.getppid) == os.getpid()
    finally:
        await pool.close()


# ------------------------------------------------------------------ authentication over HTTP
async def test_requests_need_a_valid_key_except_probes(clips, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="service")  # other tests may have raised its level
    async with running(keyed()) as (client, _):
        for path in ("/support-sets", "/model", "/support-sets/abc", "/no/such/path"):
            missing = await client.get(path)
            assert_error(missing, 401, "missing_api_key")
            assert missing.headers["www-authenticate"] == 'ApiKey header="X-API-Key"'
            assert_error(await client.get(path, headers=as_tenant("wrong-key-0123456789")), 401, "invalid_api_key")
        assert_error(await classify(client, clips[0], labels=["a"]), 401, "missing_api_key")
        assert_error(await client.post("/classify", headers={"X-API-Key": ""}, data={"labels": ["a"]}), 401)

        # Probes, metrics and the API description stay open.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert 'fsar_rejected_requests_total{reason="unauthenticated"} 10.0' in metrics.text
        scheme = (await client.get("/openapi.json")).json()["components"]["securitySchemes"]["ApiKey"]
        assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")

        for key in ALL_KEYS:
            assert (await client.get("/model", headers=as_tenant(key))).status_code == 200
        assert_error(await client.get("/no/such/path", headers=as_tenant(BOB_KEY)), 404, "not_found")

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "authentication ON: 3 API key(s) for tenant(s) alice, bob" in logged
    for key in ALL_KEYS + ("wrong-key-0123456789",):
        assert key not in logged


async def test_open_mode_says_so_at_start_up(caplog) -> None:
    caplog.set_level(logging.INFO, logger="service")
    async with running(tiny_settings(decode_concurrency=1)) as (client, _):
        assert (await client.get("/support-sets")).status_code == 200
        assert (await client.get("/model")).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("authentication OFF" in message for message in warnings)


async def test_unauthenticated_upload_is_refused_before_its_body_is_read() -> None:
    async with running(keyed(max_upload_mb=50)) as (client, _):
        sent = {"chunks": 0}

        async def body() -> AsyncIterator[bytes]:
            for _ in range(400):  # 400 x 64 KiB = 25 MiB if it were all read
                sent["chunks"] += 1
                yield b"\0" * 65536

        response = await client.post("/support-sets", content=body(),
                                     headers={"content-type": "multipart/form-data; boundary=x"})
        assert_error(response, 401, "missing_api_key")
        assert sent["chunks"] <= 1


async def test_tenants_cannot_see_each_others_support_sets(clips) -> None:
    alice, bob = as_tenant(ALICE_KEY), as_tenant(BOB_KEY)
    async with running(keyed()) as (client, service):
        files, data = upload_form([(clips[c], LABELS[c]) for c in range(2)])
        created = await client.post("/support-sets", files=files, data=data, headers=alice)
        assert created.status_code == 201, created.text
        set_id = created.json()["id"]

        # Bob: 404 on read, classify, add and delete, exactly as for a set that does not exist; empty list.
        assert_error(await client.get(f"/support-sets/{set_id}", headers=bob), 404, "support_set_not_found")
        response = await client.post("/classify", headers=bob, data={"support_set_id": set_id},
                                     files=[("video", ("q.mp4", clips[0], "video/mp4"))])
        assert_error(response, 404, "support_set_not_found")
        files, data = upload_form([(clips[2], LABELS[2])])
        assert_error(await client.post(f"/support-sets/{set_id}/videos", files=files, data=data, headers=bob), 404)
        assert_error(await client.delete(f"/support-sets/{set_id}", headers=bob), 404, "support_set_not_found")
        assert (await client.get("/support-sets", headers=bob)).json() == {"support_sets": [], "count": 0}

        # Alice, with either of her keys, still has it, unchanged.
        for key in (ALICE_KEY, ALICE_KEY_2):
            listed = (await client.get("/support-sets", headers=as_tenant(key))).json()
            assert [s["id"] for s in listed["support_sets"]] == [set_id]
        got = (await client.get(f"/support-sets/{set_id}", headers=alice)).json()
        assert got["revision"] == 1 and got["num_videos"] == 2
        first = await client.post("/classify", headers=alice, data={"support_set_id": set_id},
                                  files=[("video", ("q.mp4", clips[1], "video/mp4"))])
        assert first.status_code == 200 and first.json()["predictions"][0]["label"] == LABELS[1]

        # Caches that depend on uploaded bytes are per tenant: Bob sending Alice's query learns nothing.
        bob_query = await client.post("/classify", headers=bob, data={"labels": ["a", "b"]},
                                      files=[("video", ("q.mp4", clips[1], "video/mp4"))])
        assert bob_query.status_code == 200 and bob_query.json()["query_cache_hit"] is False
        alice_again = await client.post("/classify", headers=alice, data={"labels": ["a", "b"]},
                                        files=[("video", ("q.mp4", clips[1], "video/mp4"))])
        assert alice_again.json()["query_cache_hit"] is True
        assert all(key.startswith(("tenant:alice:", "tenant:bob:", "cache:text:"))
                   for key in await service.store.keys("*"))

        # Bob's own set with the same ids space lives apart; Alice deletes hers.
        files, data = upload_form([(clips[0], LABELS[0])])
        bobs = (await client.post("/support-sets", files=files, data=data, headers=bob)).json()["id"]
        assert (await client.delete(f"/support-sets/{set_id}", headers=alice)).status_code == 204
        assert await service.store.keys(f"tenant:alice:set:{set_id}:*") == []
        assert [s["id"] for s in (await client.get("/support-sets", headers=bob)).json()["support_sets"]] == [bobs]


# ------------------------------------------------------------------ rate limits
def test_token_bucket_arithmetic() -> None:
    limiter = MemoryRateLimiter(per_minute=60, burst=2)  # one token a second, two at most
    assert limiter.take("t", now=0.0) == 0.0 and limiter.take("t", now=0.0) == 0.0
    assert limiter.take("t", now=0.0) == pytest.approx(1.0)
    assert limiter.take("t", now=0.5) == pytest.approx(0.5)
    assert limiter.take("t", now=1.0) == 0.0
    assert limiter.take("other", now=1.0) == 0.0  # buckets are independent
    assert limiter.take("t", now=100.0) == 0.0 and limiter.take("t", now=100.0) == 0.0  # refilled to burst only
    assert limiter.take("t", now=100.0) > 0


async def test_rate_limit_gives_429_with_retry_after_per_tenant() -> None:
    async with running(keyed(rate_limit_per_minute=6, rate_limit_burst=3)) as (client, service):
        for _ in range(3):
            assert (await client.get("/support-sets", headers=as_tenant(ALICE_KEY))).status_code == 200
        limited = await client.get("/support-sets", headers=as_tenant(ALICE_KEY_2))  # same tenant, other key
        error = assert_error(limited, 429, "rate_limited")
        # 6/min: one token every 10 s, less what has refilled since the burst (seconds on a busy machine)
        retry_after = int(limited.headers["retry-after"])
        assert 7 <= retry_after <= 10
        assert "alice" in error["message"] and f"retry in {retry_after} s" in error["message"]
        assert (await client.get("/support-sets", headers=as_tenant(BOB_KEY))).status_code == 200
        for _ in range(5):  # probes are never limited
            assert (await client.get("/healthz")).status_code == 200
        assert service.metrics.value("fsar_rejected_requests_total", reason="rate_limited") == 1


async def test_rate_limit_without_keys_is_per_client_address() -> None:
    async with running(tiny_settings(decode_concurrency=1, rate_limit_per_minute=60, rate_limit_burst=2)) as (client, _):
        assert [(await client.get("/support-sets")).status_code for _ in range(3)] == [200, 200, 429]


async def test_replicas_share_rate_limits_through_redis(redis_url: str, redis_prefix: str) -> None:
    settings = keyed(rate_limit_per_minute=6, rate_limit_burst=3, redis_url=redis_url, redis_prefix=redis_prefix)
    async with running(settings) as (first, service), running(settings) as (second, _):
        assert type(service.store).__name__ == "RedisStore"
        statuses = [(await client.get("/support-sets", headers=as_tenant(ALICE_KEY))).status_code
                    for client in (first, second, first, second)]
        assert statuses == [200, 200, 200, 429]
        assert (await second.get("/support-sets", headers=as_tenant(BOB_KEY))).status_code == 200


async def test_rate_limiter_falls_back_per_replica_when_redis_is_down(redis_process, redis_prefix: str) -> None:
    settings = keyed(rate_limit_per_minute=6, rate_limit_burst=2, redis_url=redis_process.url,
                     redis_prefix=redis_prefix)
    async with running(settings) as (client, _):
        assert (await client.get("/model", headers=as_tenant(ALICE_KEY))).status_code == 200
        redis_process.stop()
        # The store answers 503; the rate limit still holds, now counted in this process.
        assert_error(await client.get("/support-sets", headers=as_tenant(ALICE_KEY)), 503, "store_unavailable")
        assert (await client.get("/model", headers=as_tenant(ALICE_KEY))).status_code == 200
        assert_error(await client.get("/model", headers=as_tenant(ALICE_KEY)), 429, "rate_limited")
        redis_process.start()  # an empty Redis (this one keeps nothing): a fresh, shared bucket
        assert [(await client.get("/support-sets", headers=as_tenant(ALICE_KEY))).status_code
                for _ in range(3)] == [200, 200, 429]


# ------------------------------------------------------------------ upload and decode limits
async def test_each_decode_limit_reaches_the_decoder_over_http(clips) -> None:
    long_clip = make_video_bytes(num_frames=24, fps=8)  # 3 s
    async with running(tiny_settings(decode_concurrency=1, max_video_seconds=2.0, max_files_per_request=2)) as (
            client, service):
        assert_error(await classify(client, long_clip, labels=["a"]), 413, "too_long")
        files, data = upload_form([(clips[0], "a"), (long_clip, "b")])
        error = assert_error(await client.post("/support-sets", files=files, data=data), 413, "too_long")
        assert "clip1.mp4" in error["message"]
        files, data = upload_form([(clips[0], "a"), (clips[1], "b"), (clips[2], "c")])
        assert_error(await client.post("/support-sets", files=files, data=data), 413, "too_many_files")
        assert (await client.get("/support-sets")).json()["count"] == 0
    async with running(tiny_settings(decode_concurrency=1, max_pixels=32 * 32, max_labels_per_request=3)) as (
            client, _):
        files, data = upload_form([(clips[0], "a")])
        assert_error(await client.post("/support-sets", files=files, data=data), 413, "too_many_pixels")
        assert_error(await classify(client, clips[0], labels=["a", "b", "c", "d"]), 413, "too_many_labels")
        assert_error(await classify(client, clips[0], labels=["a", "b", "c"]), 413, "too_many_pixels")
    # A decode over its time budget: 415 `timeout`, and the gateway carries on (either isolation).
    slow_clip = make_video_bytes(num_frames=240, fps=30, size=(640, 480), gop=240)
    for isolation in ("process", "thread"):
        settings = tiny_settings(decode_concurrency=1, decode_timeout_s=0.005, decode_isolation=isolation)
        async with running(settings) as (client, service):
            assert_error(await classify(client, slow_clip, labels=["a"]), 415, "timeout")
            pool = service.decode_pool.describe()
            assert pool["kind"] == isolation
            if isolation == "process":  # the decoder's own budget stopped it: no worker had to be killed
                assert pool["alive"] == 1 and pool["restarts"]["timeout"] == 0


def test_over_limit_body_is_refused_while_streaming_over_a_socket(tmp_path: Path) -> None:
    """A live server with a 1 MB limit answers 413 after about 1 MB of a chunked 64 MB upload."""
    with LiveGateway(tiny_settings(max_upload_mb=1, decode_concurrency=1), tmp_path) as gateway:
        for chunked in (True, False):
            status, sent = _stream_upload(gateway.port, total_bytes=64 * 2**20, chunked=chunked)
            assert status == 413
            assert sent < 8 * 2**20, f"sent {sent} bytes before the 413 (chunked={chunked})"
        assert httpx.get(f"{gateway.url}/healthz").status_code == 200


def _stream_upload(port: int, *, total_bytes: int, chunked: bool) -> tuple[int, int]:
    """POST /classify, sending the body in 64 KiB pieces until the server answers; (status, body bytes
    the kernel accepted). Without chunking the request declares its true Content-Length."""
    head = ["POST /classify HTTP/1.1", f"Host: 127.0.0.1:{port}",
            "Content-Type: multipart/form-data; boundary=fsarlimit",
            "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total_bytes}"]
    piece = b"\0" * 65536
    framed = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
    part_head = (b'--fsarlimit\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
                 b"Content-Type: video/mp4\r\n\r\n")
    sent = 0
    pending = (f"{len(part_head):x}\r\n".encode() + part_head + b"\r\n") if chunked else part_head
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"\r\n" not in reply:
            want_write = sent < total_bytes or bool(pending)
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 1.0)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                continue
            if writable:
                if not pending:
                    pending = framed
                try:
                    count = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    want_write = False
                    sock.settimeout(5)
                    reply += sock.recv(65536)
                    break
                pending = pending[count:]
                if not pending:
                    sent += len(piece)
    status_line = reply.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1.1 "), reply[:200]
    return int(status_line.split()[1]), sent
