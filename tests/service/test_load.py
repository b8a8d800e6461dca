"""Load: a live gateway (uvicorn on loopback, tiny model, decode worker processes, real Redis, API keys on)
answers 500 requests from 16 concurrent clients with zero errors and flat memory.

The requests mix few-shot and zero-shot classification of 250 distinct real videos (each sent twice, so
half the queries are cache misses that decode and encode) with reads of the support set. Memory bound
(asserted): the gateway's RSS grows by less than `RSS_GROWTH_MB` between the end of the warm-up (the
first `WARM_UP` requests) and the end, and its decode workers together stay under `WORKERS_RSS_MB`.
Throughput and latency percentiles are printed (`-s`), never asserted.
"""
from __future__ import annotations

import asyncio
import collections
import random
import statistics
import time
from pathlib import Path

import httpx
import pytest

from tests.service.live_gateway import LiveGateway
from tests.service.test_api import LABELS, class_video, tiny_settings

pytestmark = pytest.mark.timeout(600)

API_KEY = "load-test-key-0123456789abcdef"
CONCURRENCY = 16
WARM_UP = 100
RSS_GROWTH_MB = 100.0
WORKERS_RSS_MB = 600.0


def distinct_video(number: int) -> bytes:
    """Real mp4 number `number` (up to 3 x 40 x 10 different files): class, shot and length vary."""
    return class_video(number % 3, (number // 3) % 40, num_frames=8 + number // 120)


def run_load(gateway: LiveGateway, total: int, distinct_videos: int) -> dict:
    """Send `total` requests with `CONCURRENCY` clients; returns status counts, latencies and RSS samples."""
    queries = [distinct_video(i) for i in range(distinct_videos)]
    return asyncio.run(_load(gateway, total, queries))


async def _load(gateway: LiveGateway, total: int, queries: list[bytes]) -> dict:
    headers = {"X-API-Key": API_KEY}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120, limits=limits) as client:
        files = [("videos", (f"s{c}{s}.mp4", class_video(c, s), "video/mp4")) for c in range(3) for s in range(2)]
        created = await client.post("/support-sets", files=files, data={"labels": [LABELS[c] for c in range(3)
                                                                                  for _ in range(2)]})
        assert created.status_code == 201, created.text
        set_id = created.json()["id"]

        rng = random.Random(0)
        plan = []  # (kind, query index) for every request, decided up front
        order = [i for i in range(len(queries)) for _ in range(2)]
        rng.shuffle(order)
        for number in range(total):
            roll = rng.random()
            kind = "few-shot" if roll < 0.6 else "zero-shot" if roll < 0.85 else "read"
            plan.append((kind, order[number % len(order)]))

        statuses: collections.Counter = collections.Counter()
        errors: list[str] = []
        latencies: list[float] = []
        samples: dict[str, dict[str, float]] = {}
        done = 0
        next_request = 0

        async def one(kind: str, index: int) -> None:
            start = time.perf_counter()
            if kind == "read":
                response = await client.get(f"/support-sets/{set_id}")
            else:
                data = {"support_set_id": set_id} if kind == "few-shot" else {"labels": ["jump", "wave hand"]}
                response = await client.post("/classify", data=data,
                                             files=[("video", ("q.mp4", queries[index], "video/mp4"))])
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] += 1
            if response.status_code != 200:
                errors.append(f"{kind}: {response.status_code} {response.text[:200]}")

        async def client_loop() -> None:
            nonlocal done, next_request
            while next_request < total:
                kind, index = plan[next_request]
                next_request += 1
                await one(kind, index)
                done += 1
                if done == WARM_UP:
                    samples["warm"] = gateway.rss_mb()

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
        samples["end"] = gateway.rss_mb()
    return {"statuses": statuses, "errors": errors, "latencies": latencies, "elapsed": elapsed, "rss": samples}


def check_load(gateway: LiveGateway, result: dict, total: int) -> None:
    latencies = sorted(result["latencies"])
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    rss = result["rss"]
    print(f"\n{total} requests, {CONCURRENCY} clients: {total / result['elapsed']:.1f} req/s, "
          f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; statuses {dict(result['statuses'])}; "
          f"RSS MB after warm-up {rss['warm']}, at the end {rss['end']}")
    assert result["errors"] == [], result["errors"][:5]
    assert result["statuses"] == {200: total}
    growth = rss["end"]["gateway"] - rss["warm"]["gateway"]
    assert growth < RSS_GROWTH_MB, f"gateway RSS grew by {growth:.0f} MB"
    assert rss["end"]["workers"] < WORKERS_RSS_MB
    assert gateway.alive() and len(gateway.children()) == 2
    assert gateway.new_tmp_entries() == [] and gateway.open_tmp_files() == []


@pytest.fixture
def gateway(tmp_path: Path, redis_url: str, redis_prefix: str):
    settings = tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix, api_keys=f"load:{API_KEY}",
                             log_level="warning", decode_concurrency=2)
    with LiveGateway(settings, tmp_path) as live:
        yield live


def test_500_requests_at_concurrency_16_without_errors_or_growth(gateway: LiveGateway) -> None:
    check_load(gateway, run_load(gateway, total=500, distinct_videos=250), total=500)


@pytest.mark.slow
def test_3000_requests_at_concurrency_16(gateway: LiveGateway) -> None:
    check_load(gateway, run_load(gateway, total=3000, distinct_videos=1000), total=3000)
