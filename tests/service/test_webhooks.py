"""Job callbacks: a signed POST received by a local HTTP server, the documented signature check
(forged, tampered and replayed deliveries refused), and callback URLs refused for non-public or
non-http(s) destinations (server-side request forgery)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from service.webhooks import (CallbackRefused, SIGNATURE_HEADER, TIMESTAMP_HEADER, _pinned_request,
                              check_callback_url, parse_secrets, sign, verify_signature)
from tests.service.test_api import LABELS, assert_error, class_video, running, tiny_settings
from tests.service.test_jobs import submit, wait_for

pytestmark = pytest.mark.timeout(120)

SECRET = "s3cret-for-tests-only-0123456789"


class Receiver(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that keeps every POST (headers, raw body); answers `statuses` in turn."""

    def __init__(self, statuses: list[int]) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses = statuses
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append(({k: v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook?src=fsar"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([503])  # the first delivery fails: the gateway tries again
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def test_finished_job_is_posted_signed(receiver: Receiver, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("service.webhooks.MAX_BACKOFF_S", 0.05)
    settings = tiny_settings(job_dir=str(tmp_path / "jobs"), webhook_secrets=f"*:{SECRET}",
                             webhook_allow_private=True)
    async with running(settings) as (client, _service):
        response = await submit(client, class_video(0, 0), labels=LABELS[:2], callback_url=receiver.url)
        assert response.status_code == 202, response.text
        job = await wait_for(client, response.json()["id"], {"succeeded"})
        deadline = time.monotonic() + 20
        while len(receiver.received) < 2 or "callback" not in job:
            assert time.monotonic() < deadline, (receiver.received, job)
            await asyncio.sleep(0.05)
            job = (await client.get(f"/jobs/{job['id']}")).json()
    assert job["callback"] == {"state": "delivered", "attempts": 2, "last_status": 204, "last_error": None}
    headers, body = receiver.received[-1]
    assert headers["Content-Type"] == "application/json" and headers["X-Fsar-Job"] == job["id"]
    assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    delivered = json.loads(body)
    assert delivered["state"] == "succeeded" and delivered["result"] == job["result"]
    assert not verify_signature("another-secret-0123456789", headers[TIMESTAMP_HEADER], body,
                                headers[SIGNATURE_HEADER])


def test_verify_signature_refuses_forged_tampered_and_replayed() -> None:
    body, now = b'{"id":"x","state":"succeeded"}', 1_700_000_000
    header = sign(SECRET, now, body)
    assert header.startswith("v1=") and verify_signature(SECRET, str(now), body, header, now=now + 299)
    assert verify_signature(SECRET, now, body, f"v1=deadbeef, {header}", now=now)  # rotated keys: any entry
    assert not verify_signature(SECRET, now, body + b" ", header, now=now)  # tampered body
    assert not verify_signature(SECRET, now + 1, body, header, now=now)  # the timestamp is signed too
    assert not verify_signature(SECRET, now, body, "v1=" + "0" * 64, now=now)  # forged
    assert not verify_signature(SECRET, now, body, header.upper(), now=now)
    assert not verify_signature(SECRET, now, body, header, now=now + 301)  # replayed after 5 minutes
    assert not verify_signature(SECRET, now, body, header, now=now - 301)  # from the future
    assert not verify_signature(SECRET, "yesterday", body, header, now=now)
    assert not verify_signature(SECRET, None, body, header, now=now)
    assert not verify_signature(SECRET, now, body, None, now=now)
    assert not verify_signature("", now, body, header, now=now)


@pytest.mark.parametrize("url", [
    "http://10.0.0.7/hook", "http://127.0.0.1:8080/", "http://127.1.2.3/", "http://169.254.169.254/latest/meta-data",
    "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[fe80::1]/", "http://192.168.1.1/", "http://172.16.0.1/",
    "http://100.64.0.1/", "http://0.0.0.0/", "http://224.0.0.1/", "http://localhost:9000/hook",
])
async def test_non_public_destinations_are_refused(url: str) -> None:
    with pytest.raises(CallbackRefused):
        await check_callback_url(url, allow_private=False)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1/", "ftp://example.com/x",
                                 "http://user:pw@127.0.0.1/", "http:///nohost", "javascript:alert(1)"])
async def test_non_http_urls_are_refused_even_when_private_is_allowed(url: str) -> None:
    with pytest.raises(CallbackRefused):
        await check_callback_url(url, allow_private=True)


async def test_public_address_passes_and_the_request_is_pinned_to_it() -> None:
    target = await check_callback_url("https://93.184.215.14:8443/hook?a=1", allow_private=False)
    url, headers, extensions = _pinned_request(target, "93.184.215.14")
    assert str(url) == "https://93.184.215.14:8443/hook?a=1" and headers["Host"] == "93.184.215.14:8443"
    url, headers, extensions = _pinned_request(
        target.__class__(url="https://hooks.example/x", scheme="https", host="hooks.example", port=443,
                         addresses=("2606:2800::1",)), "2606:2800::1")
    assert url.host == "2606:2800::1" and str(url).startswith("https://[2606:2800::1]/x")
    assert headers["Host"] == "hooks.example" and extensions == {"sni_hostname": "hooks.example"}


async def test_the_api_refuses_private_callbacks_and_unconfigured_webhooks(tmp_path: Path) -> None:
    clip = class_video(0, 0)
    settings = tiny_settings(job_dir=str(tmp_path / "jobs"), webhook_secrets=f"*:{SECRET}")
    async with running(settings) as (client, _service):
        for url in ("http://10.1.2.3/hook", "http://localhost/hook", "file:///etc/passwd", "http://[::1]/"):
            assert_error(await submit(client, clip, labels=["a"], callback_url=url), 422, "callback_url_refused")
        jobs = tmp_path / "jobs"  # made with the first job kept: none was
        assert not jobs.exists() or list(jobs.iterdir()) == []
    async with running(tiny_settings(job_dir=str(tmp_path / "jobs"))) as (client, _service):
        error = assert_error(await submit(client, clip, labels=["a"], callback_url="https://93.184.215.14/"),
                             422, "callback_url_refused")
        assert "webhook_secrets" in error["message"]


def test_secrets_setting() -> None:
    assert parse_secrets(f"acme:{SECRET}, *:{SECRET}x") == {"acme": SECRET, "*": SECRET + "x"}
    with pytest.raises(ValueError):
        parse_secrets("acme:short")
