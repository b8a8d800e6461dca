"""Jobs (`/jobs`): the same fields and result as `POST /classify`, progress, cancel, a full queue, and
jobs that survive a SIGKILLed gateway and a SIGKILLed Redis (append-only file)."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.test_api import LABELS, assert_error, class_video, classify, register, running, tiny_settings

pytestmark = pytest.mark.timeout(180)


async def submit(client: httpx.AsyncClient, video: bytes, **fields: Any) -> httpx.Response:
    return await client.post("/jobs", files=[("video", ("query.mp4", video, "video/mp4"))], data=fields)


async def wait_for(client: httpx.AsyncClient, job_id: str, states: set[str], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = (await client.get(f"/jobs/{job_id}")).json()
        if body.get("state") in states:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


def block_classify(service, started: asyncio.Event | None = None) -> None:
    """Make the service's classifications wait until cancelled (a long video, as far as jobs can tell)."""

    async def forever(*args: Any, **kwargs: Any) -> None:
        if started is not None:
            started.set()
        await asyncio.sleep(3600)

    service.classify = forever


async def test_job_gives_the_classify_body_with_progress(tmp_path: Path) -> None:
    clips = {c: class_video(c, 0) for c in range(2)}
    settings = tiny_settings(job_dir=str(tmp_path / "jobs"))
    async with running(settings) as (client, service):
        created = await register(client, [(clips[0], LABELS[0]), (clips[1], LABELS[1])])
        fields = {"support_set_id": created["id"], "labels": [LABELS[2]], "top_k": "2", "explain": "true"}
        response = await submit(client, clips[1], **fields)
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["state"] == "queued" and response.headers["location"] == f"/jobs/{job['id']}"
        assert job["request"]["support_set_id"] == created["id"] and job["request"]["top_k"] == 2
        done = await wait_for(client, job["id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded", done
        direct = (await classify(client, clips[1], **fields)).json()
        for body in (done["result"], direct):
            body.pop("timings_ms"), body.pop("query_cache_hit")
        assert done["result"] == direct and "explanation" in direct
        total = done["progress"]["total_s"]
        assert total > 0 and done["progress"]["done_s"] == total
        assert os.listdir(tmp_path / "jobs") == []  # the video went with the job

        # Failures carry the error body and the status /classify would have had.
        bad = await submit(client, b"not a video at all", labels=[LABELS[0]])
        failed = await wait_for(client, bad.json()["id"], {"succeeded", "failed"})
        assert failed["state"] == "failed" and failed["status"] == 415 and failed["error"]["code"] == "not_a_video"
        missing = await submit(client, clips[0], support_set_id="0" * 32)
        failed = await wait_for(client, missing.json()["id"], {"succeeded", "failed"})
        assert failed["status"] == 404 and failed["error"]["code"] == "support_set_not_found"

        # The same field checks as /classify, before anything is queued.
        assert_error(await submit(client, clips[0], top_k="0", labels=["a"]), 422, "validation_error")
        assert_error(await client.get("/jobs/nope"), 404, "job_not_found")
        assert (await client.delete(f"/jobs/{job['id']}")).status_code == 204
        assert_error(await client.get(f"/jobs/{job['id']}"), 404, "job_not_found")


async def test_cancel_queued_and_running_jobs(tmp_path: Path) -> None:
    clip = class_video(0, 0)
    async with running(tiny_settings(job_dir=str(tmp_path / "jobs"), job_workers=1)) as (client, service):
        started = asyncio.Event()
        block_classify(service, started)
        first = (await submit(client, clip, labels=["a"])).json()
        second = (await submit(client, clip, labels=["a"])).json()
        await asyncio.wait_for(started.wait(), 30)
        assert (await client.get(f"/jobs/{first['id']}")).json()["state"] == "running"
        assert (await client.get(f"/jobs/{second['id']}")).json()["state"] == "queued"

        cancelled = await client.delete(f"/jobs/{second['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert not (tmp_path / "jobs" / second["id"]).exists()
        cancelled = await client.delete(f"/jobs/{first['id']}")  # running: stops at its next await
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        await asyncio.sleep(0.2)
        body = (await client.get(f"/jobs/{first['id']}")).json()
        assert body["state"] == "cancelled" and body["error"]["code"] == "cancelled" and "result" not in body
        assert os.listdir(tmp_path / "jobs") == []
        assert (await client.delete(f"/jobs/{first['id']}")).status_code == 204  # finished: deleted


async def test_full_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    clip = class_video(0, 0)
    settings = tiny_settings(job_dir=str(tmp_path / "jobs"), job_workers=1, max_queued_jobs=1)
    async with running(settings) as (client, service):
        started = asyncio.Event()
        block_classify(service, started)
        running_job = (await submit(client, clip, labels=["a"])).json()
        await asyncio.wait_for(started.wait(), 30)
        queued = await submit(client, clip, labels=["a"])
        assert queued.status_code == 202
        full = await submit(client, clip, labels=["a"])
        assert_error(full, 429, "job_queue_full")
        assert int(full.headers["retry-after"]) >= 1
        assert sorted(os.listdir(tmp_path / "jobs")) == sorted([running_job["id"], queued.json()["id"]])
        await client.delete(f"/jobs/{queued.json()['id']}")
        assert (await submit(client, clip, labels=["a"])).status_code == 202


# ------------------------------------------------------------------ restarts (real processes)
def _wait_http(url: str, job_id: str, states: set[str], timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if body.get("state") in states:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_jobs_survive_killed_gateway_and_redis(tmp_path: Path) -> None:
    """SIGKILL the gateway with jobs queued: on start-up those whose video is still in job_dir run, the
    one whose video was removed fails with job_upload_lost. Then SIGKILL Redis (append-only file)
    under a queued job: the worker waits for the store and finishes it."""
    from tests.service.test_failures import AofRedis
    from tests.service.live_gateway import LiveGateway

    redis_server = AofRedis(tmp_path / "redis", appendfsync="always")
    redis_server.start()
    job_dir = tmp_path / "jobs"
    settings = tiny_settings(redis_url=redis_server.url, redis_prefix="fsar:", decode_concurrency=1,
                             job_workers=1, job_dir=str(job_dir))
    gateway = LiveGateway(settings, tmp_path / "gateway")
    clip = class_video(1, 0)
    try:
        gateway.start()
        from concurrent.futures import ThreadPoolExecutor

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{gateway.url}/jobs", data={"labels": LABELS[:2], "explain": "true"}, timeout=60,
                              files=[("video", ("q.mp4", clip, "video/mp4"))])

        with ThreadPoolExecutor(8) as pool:  # all at once: one worker cannot finish them before the kill
            responses = list(pool.map(post, range(8)))
        assert [r.status_code for r in responses] == [202] * 8, responses[0].text
        ids = [r.json()["id"] for r in responses]
        gateway.kill()
        unfinished = sorted(os.listdir(job_dir))
        assert len(unfinished) >= 2, "the jobs ran faster than they were submitted"
        lost = unfinished[-1]
        (job_dir / lost / "video").unlink()
        gateway.start()
        for job_id in ids:
            body = _wait_http(gateway.url, job_id, {"succeeded", "failed"})
            if job_id == lost:
                assert body["state"] == "failed" and body["error"]["code"] == "job_upload_lost", body
            else:
                assert body["state"] == "succeeded", body
                assert [p["label"] for p in body["result"]["predictions"]] != []
        assert os.listdir(job_dir) == []

        # Redis dies right after a job is accepted and comes back from its append-only file.
        response = httpx.post(f"{gateway.url}/jobs", data={"labels": LABELS[:2]}, timeout=60,
                              files=[("video", ("q.mp4", clip, "video/mp4"))])
        job_id = response.json()["id"]
        redis_server.kill()
        assert_error(httpx.get(f"{gateway.url}/jobs/{job_id}", timeout=30), 503, "store_unavailable")
        time.sleep(1.0)
        redis_server.start()
        assert _wait_http(gateway.url, job_id, {"succeeded", "failed"})["state"] == "succeeded"
    finally:
        gateway.close()
        redis_server.kill()
