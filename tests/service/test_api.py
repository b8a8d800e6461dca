"""The gateway end to end: real encoded videos, the tiny random model in-process, a real Redis.

Every test drives `create_app(settings)` through httpx's ASGI transport with the app's lifespan
running, exactly as uvicorn would. Support videos of different classes have different colours so
that even the random tiny model tells them apart; frames still carry their index pattern.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import httpx
import numpy as np
import pytest

from service.api import create_app
from service.core import FsarService
from service.errors import InvalidField
from service.settings import Settings, settings_table
from service.harness import free_port
from tests.media import class_video, make_audio_only, make_png, make_video_bytes

pytestmark = pytest.mark.timeout(120)

LABELS = ["open valve", "stand up", "wave hand", "sit down"]


@pytest.fixture(scope="module")
def videos() -> dict[tuple[int, int], bytes]:
    """(class, shot) -> mp4 bytes for 4 classes x 3 shots."""
    return {(c, s): class_video(c, s) for c in range(4) for s in range(3)}


def tiny_settings(**overrides) -> Settings:
    base = dict(backbone="fsar-tiny", pretrained=None, num_frames=4, demo=True, log_level="warning")
    return Settings(**{**base, **overrides})


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FsarService]]:
    """The app with its lifespan running, and a client talking to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app.state.service


def upload_form(items: list[tuple[bytes, str]]) -> tuple[list, dict]:
    files = [("videos", (f"clip{i}.mp4", data, "video/mp4")) for i, (data, _) in enumerate(items)]
    return files, {"labels": [label for _, label in items]}


async def register(client: httpx.AsyncClient, items: list[tuple[bytes, str]], **fields) -> dict:
    files, data = upload_form(items)
    response = await client.post("/support-sets", files=files, data={**data, **fields})
    assert response.status_code == 201, response.text
    return response.json()


async def classify(client: httpx.AsyncClient, video: bytes, **fields) -> httpx.Response:
    return await client.post("/classify", files=[("video", ("query.mp4", video, "video/mp4"))], data=fields)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def counter(service: FsarService, name: str, **labels: str) -> float:
    return service.metrics.value(name, **labels)


# ------------------------------------------------------------------ support sets and few-shot
async def test_register_classify_list_get_delete(videos, redis_url: str, redis_prefix: str) -> None:
    async with running(tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix)) as (client, service):
        items = [(videos[c, s], LABELS[c]) for c in range(3) for s in range(2)]
        created = await register(client, items, name="plant floor")
        assert created["name"] == "plant floor" and created["num_videos"] == 6
        assert created["classes"] == [{"label": LABELS[c], "shots": 2} for c in range(3)]
        assert created["metric"] == "otam" and created["revision"] == 1
        assert created["model"]["fingerprint"] == service.fingerprint and created["model"]["demo"] is True
        set_id = created["id"]
        support_encoded = counter(service, "fsar_videos_encoded_total", branch="support")
        assert support_encoded == 6

        for (data, label) in items:
            response = await classify(client, data, support_set_id=set_id)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["mode"] == "few-shot" and body["support_set_id"] == set_id
            assert body["predictions"][0]["label"] == label
            assert sorted(p["label"] for p in body["predictions"]) == sorted(LABELS[:3])
            assert sum(p["score"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-6)
            assert set(body["timings_ms"]) == {"decode", "encode", "match"}
            assert body["model"] == service.fingerprint

        # Classifying never re-encoded a support video nor rebuilt prototypes.
        assert counter(service, "fsar_videos_encoded_total", branch="support") == support_encoded
        assert counter(service, "fsar_backend_calls_total", op="build_prototypes") == 1
        assert counter(service, "fsar_backend_calls_total", op="classify") == 6

        top = (await classify(client, items[0][0], support_set_id=set_id, top_k="1")).json()
        assert len(top["predictions"]) == 1 and top["num_candidates"] == 3

        got = (await client.get(f"/support-sets/{set_id}")).json()
        assert got["id"] == set_id and got["classes"] == created["classes"]
        assert [v["label"] for v in got["videos"]] == [label for _, label in items]
        listed = (await client.get("/support-sets")).json()
        assert listed["count"] == 1 and listed["support_sets"][0]["id"] == set_id

        assert (await client.delete(f"/support-sets/{set_id}")).status_code == 204
        assert_error(await client.get(f"/support-sets/{set_id}"), 404, "support_set_not_found")
        assert_error(await classify(client, items[0][0], support_set_id=set_id), 404, "support_set_not_found")
        assert_error(await client.delete(f"/support-sets/{set_id}"), 404, "support_set_not_found")
        assert await service.store.keys(f"set:{set_id}:*") == []
        assert (await client.get("/support-sets")).json()["count"] == 0


async def test_add_videos_rebuilds_prototypes(videos, redis_url: str, redis_prefix: str) -> None:
    async with running(tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix)) as (client, service):
        created = await register(client, [(videos[0, 0], LABELS[0]), (videos[1, 0], LABELS[1])])
        set_id = created["id"]
        before = counter(service, "fsar_videos_encoded_total", branch="support")

        files, data = upload_form([(videos[2, 0], LABELS[2]), (videos[0, 1], LABELS[0])])
        response = await client.post(f"/support-sets/{set_id}/videos", files=files, data=data)
        assert response.status_code == 200, response.text
        updated = response.json()
        assert updated["revision"] == 2 and updated["num_videos"] == 4
        assert updated["classes"] == [{"label": LABELS[0], "shots": 2}, {"label": LABELS[1], "shots": 1},
                                      {"label": LABELS[2], "shots": 1}]
        # Only the two new videos were encoded; the old ones' features came from the store.
        assert counter(service, "fsar_videos_encoded_total", branch="support") == before + 2
        assert counter(service, "fsar_backend_calls_total", op="build_prototypes") == 2
        # Prototypes of the old revision are gone, the new ones are in the store.
        proto_keys = await service.store.keys(f"set:{set_id}:proto:*")
        assert proto_keys == [f"set:{set_id}:proto:{service.fingerprint}:2"]

        body = (await classify(client, videos[2, 0], support_set_id=set_id)).json()
        assert body["predictions"][0]["label"] == LABELS[2] and body["num_candidates"] == 3
        assert_error(await client.post("/support-sets/nope/videos", files=files, data=data), 404)


async def test_concurrent_additions_both_land(videos, redis_url: str, redis_prefix: str) -> None:
    async with running(tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix)) as (client, service):
        set_id = (await register(client, [(videos[0, 0], LABELS[0])], metric="otam"))["id"]

        async def add(item: tuple[bytes, str]) -> httpx.Response:
            files, data = upload_form([item])
            return await client.post(f"/support-sets/{set_id}/videos", files=files, data=data)

        responses = await asyncio.gather(add((videos[1, 0], LABELS[1])), add((videos[2, 0], LABELS[2])))
        assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
        final = (await client.get(f"/support-sets/{set_id}")).json()
        assert final["revision"] == 3 and final["num_videos"] == 3 and final["metric"] == "otam"
        assert {c["label"] for c in final["classes"]} == set(LABELS[:3])
        body = (await classify(client, videos[2, 1], support_set_id=set_id)).json()
        assert body["num_candidates"] == 3 and body["predictions"][0]["label"] == LABELS[2]


# ------------------------------------------------------------------ zero-shot and hybrid
async def test_zero_shot_and_hybrid_fusion(videos) -> None:
    settings = tiny_settings(hybrid_text_weight=0.3)  # in-process store (no redis_url)
    async with running(settings) as (client, service):
        assert service.store.kind == "memory"
        query = videos[1, 2]
        labels = ["open valve", "jump", "stand up", "jump"]  # duplicate label counted once
        body = (await classify(client, query, labels=labels)).json()
        assert body["mode"] == "zero-shot" and body["support_set_id"] is None
        assert sorted(p["label"] for p in body["predictions"]) == ["jump", "open valve", "stand up"]
        assert all(p["source"] == "text" and 0.0 < p["score"] < 1.0 for p in body["predictions"])
        assert sum(p["score"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-6)
        assert len((await classify(client, query, labels=labels, top_k="2")).json()["predictions"]) == 2

        created = await register(client, [(videos[c, 0], LABELS[c]) for c in range(3)])
        few = {p["label"]: p["score"] for p in
               (await classify(client, query, support_set_id=created["id"])).json()["predictions"]}
        text_only = ["jump", "juggle"]
        hybrid_labels = [LABELS[1]] + text_only  # one label is also a support class
        hybrid = (await classify(client, query, support_set_id=created["id"], labels=hybrid_labels)).json()
        assert hybrid["mode"] == "hybrid" and hybrid["num_candidates"] == 5
        scores = {p["label"]: p["score"] for p in hybrid["predictions"]}
        sources = {p["label"]: p["source"] for p in hybrid["predictions"]}
        assert set(scores) == set(LABELS[:3]) | set(text_only)
        assert sources == {LABELS[0]: "support", LABELS[1]: "both", LABELS[2]: "support",
                           "jump": "text", "juggle": "text"}
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
        # p = w * p_zero_shot(all candidates) + (1 - w) * p_few_shot (0 for text-only labels)
        candidates = LABELS[:3] + text_only
        zero = {p["label"]: p["score"] for p in
                (await classify(client, query, labels=candidates)).json()["predictions"]}
        for label in candidates:
            expected = 0.3 * zero[label] + 0.7 * few.get(label, 0.0)
            assert scores[label] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------ caches
async def test_identical_bytes_are_encoded_once_and_queries_are_cached(videos, redis_url: str,
                                                                       redis_prefix: str) -> None:
    async with running(tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix)) as (client, service):
        same = videos[0, 0]
        await register(client, [(same, LABELS[0]), (same, LABELS[0]), (videos[1, 0], LABELS[1])])
        assert counter(service, "fsar_videos_encoded_total", branch="support") == 2
        # Another set with the same bytes and label: served from the shared support cache.
        second = await register(client, [(same, LABELS[0]), (videos[1, 0], LABELS[1])])
        assert counter(service, "fsar_videos_encoded_total", branch="support") == 2
        assert counter(service, "fsar_cache_requests_total", cache="support", result="hit") == 2

        first = (await classify(client, videos[2, 1], support_set_id=second["id"])).json()
        again = (await classify(client, videos[2, 1], support_set_id=second["id"])).json()
        assert first["query_cache_hit"] is False and again["query_cache_hit"] is True
        assert again["timings_ms"]["decode"] == 0.0
        assert again["predictions"] == first["predictions"]
        assert counter(service, "fsar_videos_encoded_total", branch="query") == 1
        assert counter(service, "fsar_cache_requests_total", cache="query", result="hit") == 1


# ------------------------------------------------------------------ persistence and model changes
async def test_support_set_survives_restart_and_model_change(videos, redis_url: str, redis_prefix: str) -> None:
    items = [(videos[c, 0], LABELS[c]) for c in range(3)]
    query = videos[2, 1]
    async with running(tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix)) as (client, service):
        set_id = (await register(client, items, ttl_seconds="3600"))["id"]
        before = (await classify(client, query, support_set_id=set_id)).json()
        fingerprint = service.fingerprint

    # A new gateway process (same model, same Redis prefix) serves the set without re-encoding.
    async with running(tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix)) as (client, service):
        assert service.fingerprint == fingerprint  # seeded initial weights: restarts agree
        got = (await client.get(f"/support-sets/{set_id}")).json()
        assert got["num_videos"] == 3 and got["expires_at"] is not None
        ttl = await service.store.ttl(f"set:{set_id}:manifest")
        assert ttl is not None and 3500 < ttl <= 3600
        after = (await classify(client, query, support_set_id=set_id)).json()
        assert after["predictions"] == before["predictions"] and after["query_cache_hit"] is True
        assert counter(service, "fsar_backend_calls_total", op="encode_videos") == 0
        assert counter(service, "fsar_backend_calls_total", op="build_prototypes") == 0

    # A different model: prototypes are rebuilt from the stored clips, once; no re-upload needed.
    changed = tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix, adapter="none")
    async with running(changed) as (client, service):
        assert service.fingerprint != fingerprint
        body = (await classify(client, videos[1, 1], support_set_id=set_id)).json()
        assert body["model"] == service.fingerprint and body["predictions"][0]["label"] == LABELS[1]
        assert counter(service, "fsar_videos_encoded_total", branch="support") == 3
        await classify(client, videos[0, 1], support_set_id=set_id)
        assert counter(service, "fsar_videos_encoded_total", branch="support") == 3
        assert counter(service, "fsar_backend_calls_total", op="build_prototypes") == 1


async def test_store_outage_gives_503_and_recovers(videos, redis_process, redis_prefix: str) -> None:
    async with running(tiny_settings(redis_url=redis_process.url, redis_prefix=redis_prefix)) as (client, service):
        set_id = (await register(client, [(videos[0, 0], LABELS[0]), (videos[1, 0], LABELS[1])]))["id"]
        redis_process.stop()
        assert_error(await client.get("/support-sets"), 503, "store_unavailable")
        assert_error(await classify(client, videos[0, 1], support_set_id=set_id), 503, "store_unavailable")
        ready = await client.get("/readyz")
        assert_error(ready, 503, "not_ready")
        assert ready.json()["checks"]["backend"] == "ok" and ready.json()["checks"]["store"] != "ok"
        assert (await client.get("/healthz")).status_code == 200
        redis_process.start()  # an empty Redis comes back: same app, no restart
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/support-sets")).json()["count"] == 0
        await register(client, [(videos[0, 0], LABELS[0])])


# ------------------------------------------------------------------ bad input
async def test_bad_requests_get_json_errors(videos, tmp_path) -> None:
    settings = tiny_settings(max_upload_mb=0.05, max_files_per_request=3)
    async with running(settings) as (client, _):
        good = videos[0, 0]
        set_id = (await register(client, [(good, LABELS[0])]))["id"]

        # 404
        assert_error(await client.get("/support-sets/unknown"), 404, "support_set_not_found")
        assert_error(await classify(client, good, support_set_id="unknown"), 404, "support_set_not_found")
        assert_error(await client.get("/no/such/path"), 404, "not_found")
        assert_error(await client.put("/support-sets"), 405, "method_not_allowed")

        # 422: missing fields, mismatched counts, bad values
        files, _ = upload_form([(good, "a")])
        assert_error(await client.post("/support-sets", files=files), 422, "missing_field")
        assert_error(await client.post("/support-sets", data={"labels": ["a"]}), 422, "missing_field")
        files, _ = upload_form([(good, "a"), (good, "b")])
        assert_error(await client.post("/support-sets", files=files, data={"labels": ["a"]}), 422,
                     "label_count_mismatch")
        assert_error(await client.post("/support-sets", files=files, data={"labels": ["a", "  "]}), 422,
                     "empty_label")
        files, data = upload_form([(good, "a")])
        assert_error(await client.post("/support-sets", files=files, data={**data, "ttl_seconds": "-5"}), 422)
        assert_error(await client.post("/support-sets", files=files, data={**data, "metric": "nope"}), 422,
                     "unknown_metric")
        assert_error(await classify(client, good), 422, "missing_target")
        assert_error(await classify(client, good, labels=["a"], top_k="0"), 422)
        assert_error(await client.post("/classify", data={"labels": ["a"]}), 422, "missing_field")

        # 415: not a decodable video
        png = make_png(tmp_path / "still.png").read_bytes()
        audio = make_audio_only(tmp_path / "tone.m4a").read_bytes()
        noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        for data in (noise, png, audio, b""):
            error = assert_error(await classify(client, data, labels=["a"]), 415)
            assert error["code"] in {"not_a_video", "no_video_stream", "corrupted"}
        files, data = upload_form([(good, "a"), (noise, "b")])
        error = assert_error(await client.post("/support-sets", files=files, data=data), 415)
        assert "clip1.mp4" in error["message"]  # says which file

        # 413: too many files; body over the limit, with and without Content-Length
        files, data = upload_form([(good, "a")] * 4)
        assert_error(await client.post("/support-sets", files=files, data=data), 413, "too_many_files")
        big = make_video_bytes(num_frames=8, size=(64, 48)) + b"\0" * 60_000
        assert_error(await classify(client, big, labels=["a"]), 413, "too_large")
        request = client.build_request("POST", "/classify", files=[("video", ("q.mp4", big, "video/mp4"))],
                                       data={"labels": ["a"]})
        body = request.read()

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 8192):
                yield body[start:start + 8192]

        response = await client.post("/classify", content=chunks(),
                                     headers={"content-type": request.headers["content-type"]})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_error(response, 413, "too_large")

        # The gateway still works after all that.
        assert (await classify(client, good, support_set_id=set_id)).status_code == 200


async def test_upload_over_decode_limits_is_413(videos) -> None:
    async with running(tiny_settings(max_video_seconds=1.0)) as (client, _):
        long_video = make_video_bytes(num_frames=24, fps=8)  # 3 s
        assert_error(await classify(client, long_video, labels=["a"]), 413, "too_long")
    async with running(tiny_settings(max_pixels=32 * 32)) as (client, _):
        assert_error(await classify(client, videos[0, 0], labels=["a"]), 413, "too_many_pixels")


# ------------------------------------------------------------------ operations
async def test_ops_endpoints(videos) -> None:
    async with running(tiny_settings()) as (client, service):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready", "checks": {"backend": "ok", "store": "ok"}}
        card = (await client.get("/model")).json()
        assert card["backbone"] == "fsar-tiny" and card["adapter"] == "ted" and card["metric"] == "otam"
        assert card["fingerprint"] == service.fingerprint and card["num_frames"] == 4 and card["input_size"] == 64
        assert card["trainable_params"] > 0 and card["total_params"] > card["trainable_params"]
        assert card["demo"] is True and "demo model" in card["description"]
        assert card["weights_source"] == "random" and card["store"]["kind"] == "memory"

        set_id = (await register(client, [(videos[0, 0], LABELS[0])]))["id"]
        await client.get(f"/support-sets/{set_id}")
        await client.get("/support-sets/missing")
        text = (await client.get("/metrics")).text
        assert 'fsar_http_requests_total{method="GET",route="/support-sets/{set_id}",status="200"} 1.0' in text
        assert 'fsar_http_requests_total{method="GET",route="/support-sets/{set_id}",status="404"} 1.0' in text
        assert 'fsar_http_requests_total{method="POST",route="/support-sets",status="201"} 1.0' in text
        for stage in ("decode", "encode", "match", "store"):
            assert f'fsar_stage_duration_seconds_count{{stage="{stage}"}}' in text
        assert 'fsar_backend_calls_total{op="encode_videos"}' in text


async def test_model_card_without_demo_mode() -> None:
    async with running(tiny_settings(demo=False)) as (client, _):
        card = (await client.get("/model")).json()
        assert card["demo"] is False and "demo model" not in card["description"]


async def test_serves_a_checkpoint(videos, tmp_path) -> None:
    import torch

    from training.checkpoint import save_checkpoint
    from training.model import ModelConfig, build_model

    torch.manual_seed(3)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, num_frames=4, adapter="ted",
                                    metric="bimhm"))
    with torch.no_grad():  # stand-in for training: make TPCM non-identity
        for param in model.tpcm.parameters():
            param.add_(0.01 * torch.randn_like(param))
    checkpoint_hash = save_checkpoint(tmp_path / "model.pt", model, step=7)

    async with running(tiny_settings(checkpoint=str(tmp_path / "model.pt"), num_frames=None)) as (client, service):
        card = (await client.get("/model")).json()
        assert card["checkpoint_hash"] == checkpoint_hash == card["fingerprint"]
        assert card["metric"] == "bimhm" and card["num_frames"] == 4
        set_id = (await register(client, [(videos[c, 0], LABELS[c]) for c in range(3)]))["id"]
        body = (await classify(client, videos[0, 1], support_set_id=set_id)).json()
        assert body["model"] == checkpoint_hash and len(body["predictions"]) == 3
        assert sum(p["score"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-6)
        assert_error(await client.post("/support-sets", files=upload_form([(videos[0, 0], "a")])[0],
                                       data={"labels": ["a"], "metric": "otam"}), 422, "unknown_metric")

    app = create_app(tiny_settings(checkpoint=str(tmp_path / "absent.pt")))
    with pytest.raises(Exception, match="does not exist"):
        async with app.router.lifespan_context(app):
            pass


async def test_missing_pretrained_weights_stop_start_up(tmp_path) -> None:
    app = create_app(tiny_settings(pretrained=str(tmp_path / "missing-weights.pt")))
    with pytest.raises(Exception) as info:
        async with app.router.lifespan_context(app):
            pass
    assert "does not exist" in str(info.value)


async def test_unexpected_errors_are_json_500s(caplog) -> None:
    app = create_app(tiny_settings())

    async def broken() -> dict:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.get("/broken")
    assert_error(response, 500, "internal_error")
    assert "a bug" not in response.text  # no internals leak to the client...
    assert any("a bug" in (record.exc_text or "") or record.exc_info for record in caplog.records)  # ...but logged


# ------------------------------------------------------------------ settings and import hygiene
def test_settings_from_env_and_cli(monkeypatch) -> None:
    monkeypatch.setenv("FSAR_PORT", "9001")
    monkeypatch.setenv("FSAR_REDIS_URL", "none")
    monkeypatch.setenv("FSAR_PRETRAINED", "none")
    monkeypatch.setenv("FSAR_HYBRID_TEXT_WEIGHT", "0.25")
    settings = Settings.from_cli(port=None, backbone="fsar-tiny", workers=None)
    assert settings.port == 9001 and settings.backbone == "fsar-tiny"
    assert settings.redis_url is None and settings.pretrained is None and settings.hybrid_text_weight == 0.25
    assert Settings.from_cli(port=7000).port == 7000
    with pytest.raises(ValueError, match="redis_url"):
        Settings(workers=2)
    with pytest.raises(ValueError):
        Settings(hybrid_text_weight=1.5)
    rows = settings_table()
    assert {row["name"] for row in rows} == set(Settings.model_fields)
    assert all(row["description"] and row["env"] == "FSAR_" + row["name"].upper() for row in rows)


def test_encode_concurrency_defaults_to_the_cores(monkeypatch) -> None:
    from service.backends.embedded import cpu_threads_per_model_call, encode_concurrency_for

    auto = Settings(decode_concurrency=2)
    assert auto.encode_concurrency is None
    # CPU: one model call per core up to 4, sharing the cores the decode workers leave (at least 1 thread).
    assert [encode_concurrency_for(auto, "cpu", cores) for cores in (1, 2, 4, 16)] == [1, 2, 4, 4]
    assert [cpu_threads_per_model_call(auto, cores) for cores in (1, 2, 4, 16)] == [1, 1, 1, 3]
    assert encode_concurrency_for(auto, "cuda", 16) == 1
    fixed = Settings(encode_concurrency=1, decode_concurrency=2)
    assert encode_concurrency_for(fixed, "cpu", 16) == 1 and cpu_threads_per_model_call(fixed, 16) == 14
    monkeypatch.setenv("FSAR_ENCODE_CONCURRENCY", "3")
    assert encode_concurrency_for(Settings(), "cuda") == 3
    monkeypatch.setenv("FSAR_ENCODE_CONCURRENCY", "auto")
    assert Settings().encode_concurrency is None
    monkeypatch.setenv("FSAR_ENCODE_CONCURRENCY", "0")
    with pytest.raises(ValueError):
        Settings()


def test_core_rejects_bad_labels_without_http() -> None:
    from service.core import clean_labels

    assert clean_labels([" a ", "b"]) == ["a", "b"]
    with pytest.raises(InvalidField):
        clean_labels(["x" * 500])


def test_triton_backend_app_does_not_import_torch() -> None:
    script = textwrap.dedent("""
        import json, sys
        from service.api import create_app
        from service.settings import Settings
        create_app(Settings(backend="triton"))
        loaded = {"torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules}
        try:
            from service.backends import create_backend
            create_backend(Settings(backend="triton"))
            loaded["triton_backend"] = True
        except RuntimeError:
            loaded["triton_backend"] = False
        loaded["torch_after_backend"] = "torch" in sys.modules
        print(json.dumps(loaded))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["torch"] is False and loaded["open_clip"] is False
    assert loaded["torch_after_backend"] is False


def test_server_factory_builds_app_from_environment(monkeypatch) -> None:
    from service.server import SETTINGS_ENV, app_from_env

    settings = tiny_settings(port=8123, hybrid_text_weight=0.2)
    monkeypatch.setenv(SETTINGS_ENV, settings.model_dump_json())
    app = app_from_env()
    assert app.state.settings == settings


def test_serve_with_two_workers_shares_redis(videos, redis_url: str, redis_prefix: str) -> None:
    """`serve()` with workers=2 (uvicorn factory + settings in the environment), over real HTTP."""
    port = free_port()
    settings = tiny_settings(port=port, workers=2, redis_url=redis_url, redis_prefix=redis_prefix)
    script = ("from service.server import serve; from service.settings import Settings; "
              f"serve(Settings.model_validate_json({settings.model_dump_json()!r}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSAR_")}
    server = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and server.poll() is None:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(0.3)
        assert ready, "gateway did not become ready"
        files, data = upload_form([(videos[0, 0], LABELS[0]), (videos[1, 0], LABELS[1])])
        created = httpx.post(f"{base}/support-sets", files=files, data=data, timeout=60)
        assert created.status_code == 201, created.text
        set_id = created.json()["id"]
        # Whichever worker answers, the set is there (state lives in Redis).
        for _ in range(6):
            got = httpx.get(f"{base}/support-sets/{set_id}", timeout=10)
            assert got.status_code == 200 and got.json()["num_videos"] == 2
        answer = httpx.post(f"{base}/classify", files=[("video", ("q.mp4", videos[1, 0], "video/mp4"))],
                            data={"support_set_id": set_id}, timeout=60)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == LABELS[1]
    finally:
        server.terminate()
        try:
            output, _ = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate(timeout=10)
    assert output.count("built with RANDOM weights") == 2, output[-2000:]  # one model per worker
