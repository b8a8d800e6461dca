"""`service.client` against a live gateway (the tiny model in a child process): support sets,
classification, jobs, typed errors, videos streamed from open files, and Retry-After honoured."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from service.client import AsyncFsarClient, FsarClient, FsarError, Job
from tests.service.live_gateway import LiveGateway
from tests.service.test_api import LABELS, class_video, tiny_settings

pytestmark = pytest.mark.timeout(240)

KEY = "client-test-key-0123456789"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    workdir = tmp_path_factory.mktemp("client")
    settings = tiny_settings(api_keys=f"acme:{KEY}", job_dir=str(workdir / "jobs"), decode_concurrency=1)
    with LiveGateway(settings, workdir) as live:
        yield live


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("clips")
    paths = {}
    for c in range(3):
        paths[c] = folder / f"class{c}.mp4"
        paths[c].write_bytes(class_video(c, 0))
    return paths


def test_sync_client_end_to_end(gateway: LiveGateway, clips: dict[int, Path]) -> None:
    with FsarClient(gateway.url, api_key=KEY) as fsar:
        created = fsar.register([clips[0], clips[1]], LABELS[:2], name="client")
        with open(clips[2], "rb") as handle:  # an open file: streamed, and rewound for a retry
            updated = fsar.add_videos(created["id"], [handle], [LABELS[2]])
        assert updated["num_videos"] == 3
        assert [s["id"] for s in fsar.list_support_sets()] == [created["id"]]
        assert fsar.get_support_set(created["id"])["name"] == "client"

        few = fsar.classify(clips[1], support_set_id=created["id"], top_k=2)
        assert few["mode"] == "few-shot" and few["predictions"][0]["label"] == LABELS[1]
        hybrid = fsar.classify(clips[1], support_set_id=created["id"], labels=["jump"], explain=True)
        assert hybrid["mode"] == "hybrid" and "explanation" in hybrid
        zero = fsar.classify(str(clips[0]), labels=LABELS[:2], text_weight=None)
        assert zero["mode"] == "zero-shot"

        job = fsar.submit_job(clips[1], support_set_id=created["id"])
        assert isinstance(job, Job) and job.state in ("queued", "running", "succeeded")
        done = fsar.wait(job.id, timeout_s=60, poll_s=0.1).raise_for_failure()
        assert done.result["predictions"][0]["label"] == LABELS[1]
        assert done.progress["done_s"] == done.progress["total_s"] > 0
        assert fsar.cancel_job(done.id) is None  # finished: deleted
        with pytest.raises(FsarError) as caught:
            fsar.get_job(done.id)
        assert (caught.value.status, caught.value.code) == (404, "job_not_found")

        with pytest.raises(FsarError) as caught:
            fsar.classify(clips[0], support_set_id="f" * 32)
        assert (caught.value.status, caught.value.code) == (404, "support_set_not_found")
        fsar.delete_support_set(created["id"])
        assert fsar.list_support_sets() == []

    with FsarClient(gateway.url, api_key="wrong-key-0123456789") as stranger:
        with pytest.raises(FsarError) as caught:
            stranger.list_support_sets()
        assert caught.value.status == 401 and caught.value.code == "invalid_api_key"


async def test_async_client(gateway: LiveGateway, clips: dict[int, Path]) -> None:
    async with AsyncFsarClient(gateway.url, api_key=KEY) as fsar:
        created = await fsar.register([clips[0], clips[2]], [LABELS[0], LABELS[2]])
        job = await fsar.submit_job(clips[2], support_set_id=created["id"], labels=["jump"])
        done = await fsar.wait(job.id, timeout_s=60, poll_s=0.1)
        assert done.state == "succeeded" and done.result["mode"] == "hybrid"
        assert (await fsar.classify(clips[0], support_set_id=created["id"]))["predictions"][0]["label"] == LABELS[0]
        await fsar.delete_support_set(created["id"])


def test_retry_after_is_honoured_and_bounded(clips: dict[int, Path]) -> None:
    calls: list[bytes] = []

    def busy_then_ok(request: httpx.Request) -> httpx.Response:
        calls.append(request.read())
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "0"},
                                  json={"error": {"code": "rate_limited", "message": "slow down"}})
        return httpx.Response(200, json={"mode": "zero-shot", "predictions": []})

    with FsarClient("http://gateway", transport=httpx.MockTransport(busy_then_ok)) as fsar, \
            open(clips[0], "rb") as handle:
        assert fsar.classify(handle, labels=["a"])["mode"] == "zero-shot"
    assert len(calls) == 3 and all(clips[0].read_bytes() in call for call in calls)  # resent whole

    def always_busy(request: httpx.Request) -> httpx.Response:
        calls.append(b"")
        return httpx.Response(503, headers={"Retry-After": "0"},
                              json={"error": {"code": "store_unavailable", "message": "down"}})

    calls.clear()
    with FsarClient("http://gateway", transport=httpx.MockTransport(always_busy), max_retries=2) as fsar:
        with pytest.raises(FsarError) as caught:
            fsar.list_support_sets()
    assert caught.value.status == 503 and caught.value.code == "store_unavailable" and len(calls) == 3
