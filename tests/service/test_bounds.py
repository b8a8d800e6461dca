"""Bounds of every field, damaged stored data, and concurrent additions to one set.

- Every numeric and string field is refused (422, JSON) past its bounds (`service/bounds.py`), at
  each edge and far beyond, before anything is written; the OpenAPI schema states the bounds.
- No stored value can make a read fail: manifests planted in the store (not JSON, missing fields,
  wrong types, absurd timestamps) are skipped in listings, answer 409 `support_set_unreadable` on a
  read, and can be deleted.
- 16 concurrent additions of distinct classes to one set, as real HTTP requests (uvicorn on loopback,
  in this process), all succeed with each class present once: in-process store, Redis, and two
  gateways sharing one Redis (the optimistic retry across processes).
"""
from __future__ import annotations

import asyncio
import socket
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator

import httpx
import pytest
import uvicorn
from pydantic import ValidationError

from service.api import create_app
from service.bounds import (MAX_LABEL_CHARS, MAX_LABEL_FIELD_CHARS, MAX_LABELS, MAX_METRIC_CHARS, MAX_NAME_CHARS,
                            MAX_TOP_K, MAX_TTL_S)
from service.core import support_sets as support_sets_module
from service.core.checks import clean_labels
from service.core.manifest import iso
from service.store.base import StoreConflict, ttl_seconds
from tests.service.test_api import assert_error, class_video, classify, register, running, tiny_settings, \
    upload_form

pytestmark = pytest.mark.timeout(180)

HUGE = ["0", "-1", str(2 ** 63), str(2 ** 64), str(10 ** 30), "9" * 5000, "inf", "-inf", "nan", "1e3", "1.5",
        " ", "ten"]  # "" is "not given"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return class_video(0)


# ------------------------------------------------------------------ request fields
async def test_ttl_seconds_bounds_are_checked_before_anything_is_written(clip: bytes) -> None:
    async with running(tiny_settings()) as (client, service):
        files, data = upload_form([(clip, "a")])
        for value in HUGE + [str(MAX_TTL_S + 1), str(10 ** 12)]:
            response = await client.post("/support-sets", files=files, data={**data, "ttl_seconds": value})
            assert_error(response, 422)
        assert (await client.get("/support-sets")).json()["count"] == 0
        assert await service.store.keys("set:*") == []
        ids = {}
        for value in ("1", str(MAX_TTL_S)):
            created = await register(client, [(clip, "a")], ttl_seconds=value)
            assert created["expires_at"] is not None
            ids[value] = created["id"]
        listed = await client.get("/support-sets")  # the 1 s set may be gone already on a slow machine
        assert listed.status_code == 200
        assert ids[str(MAX_TTL_S)] in {s["id"] for s in listed.json()["support_sets"]}


async def test_string_fields_are_bounded(clip: bytes) -> None:
    async with running(tiny_settings()) as (client, _):
        files, data = upload_form([(clip, "a")])
        for name in ("n" * (MAX_NAME_CHARS + 1), "n" * 100_000):
            assert_error(await client.post("/support-sets", files=files, data={**data, "name": name}), 422)
        created = await register(client, [(clip, "a")], name="n" * MAX_NAME_CHARS)
        assert created["name"] == "n" * MAX_NAME_CHARS
        assert (await register(client, [(clip, "a")], name=" \u200b "))["name"] is None
        for metric in ("m" * MAX_METRIC_CHARS, "m" * (MAX_METRIC_CHARS + 1), "m" * 100_000):
            assert_error(await client.post("/support-sets", files=files, data={**data, "metric": metric}), 422)
        for label in ("l" * (MAX_LABEL_CHARS + 1), "l" * (MAX_LABEL_FIELD_CHARS + 1), "l" * 100_000):
            assert_error(await client.post("/support-sets", files=files, data={"labels": [label]}), 422)
        padded = " " * (MAX_LABEL_FIELD_CHARS - MAX_LABEL_CHARS) + "l" * MAX_LABEL_CHARS
        assert (await register(client, [(clip, padded)]))["classes"][0]["label"] == "l" * MAX_LABEL_CHARS
        # support_set_id: form field and path
        for bad in ("x" * 65, "../etc", "a b", "a:b", "\u200b"):
            assert_error(await classify(client, clip, support_set_id=bad), 422)
            assert_error(await client.get(f"/support-sets/{bad}"), 422 if bad != "../etc" else 404)
        assert_error(await client.get(f"/support-sets/{'x' * 64}"), 404, "support_set_not_found")


async def test_top_k_bounds(clip: bytes) -> None:
    async with running(tiny_settings()) as (client, _):
        for value in HUGE + [str(MAX_TOP_K + 1)]:
            if value.strip():  # an empty form value is "not given"
                assert_error(await classify(client, clip, labels=["a", "b"], top_k=value), 422)
        response = await classify(client, clip, labels=["a", "b"], top_k=str(MAX_TOP_K))
        assert response.status_code == 200 and len(response.json()["predictions"]) == 2


@pytest.mark.parametrize("label", ["\u200b", "\ufeff", "\u200b\u200c\u200d\u2060\ufeff", " \u200b\t", "\u2062",
                                   "\u202e"])
def test_invisible_labels_are_empty(label: str) -> None:
    with pytest.raises(Exception, match="empty"):
        clean_labels([label])


async def test_labels_are_compared_normalised(clip: bytes) -> None:
    async with running(tiny_settings()) as (client, _):
        created = await register(client, [(clip, "caf\u00e9"), (class_video(1), "cafe\u0301\u200b"),
                                          (class_video(2), "\ufeffcaf\u00e9 ")])
        assert created["classes"] == [{"label": "caf\u00e9", "shots": 3}]
        files, data = upload_form([(clip, "\u200b\ufeff")])
        assert_error(await client.post("/support-sets", files=files, data=data), 422, "empty_label")
        body = (await classify(client, clip, labels=["a\u200b", "a", "\u2060a"])).json()
        assert body["labels"] == ["a"]


@pytest.mark.parametrize("field, value", [
    ("support_set_ttl_s", MAX_TTL_S + 1), ("support_set_ttl_s", 10 ** 12), ("support_set_ttl_s", -1),
    ("query_cache_ttl_s", MAX_TTL_S + 1), ("query_cache_ttl_s", 2 ** 63),
    ("max_files_per_request", MAX_LABELS + 1), ("max_labels_per_request", 2 ** 63),
])
def test_settings_that_feed_bounds_are_bounded(field: str, value: int) -> None:
    with pytest.raises(ValidationError):
        tiny_settings(**{field: value})
    tiny_settings(**{field: MAX_TTL_S if "ttl" in field else MAX_LABELS})


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL_S + 1, 10 ** 30, float("inf"), float("nan")])
def test_the_store_refuses_a_lifetime_it_could_not_keep(ttl: float) -> None:
    with pytest.raises(ValueError):
        ttl_seconds(ttl)


def test_rendering_a_timestamp_never_raises() -> None:
    assert iso(10 ** 12) is None and iso(float("nan")) is None and iso(-10 ** 15) is None
    assert iso(0) == "1970-01-01T00:00:00Z"


def test_openapi_states_the_bounds() -> None:
    schema = create_app(tiny_settings()).openapi()
    forms = {name: body for name, body in schema["components"]["schemas"].items() if name.startswith("Body_")}
    register_form = next(body for name, body in forms.items() if "create_support_set" in name)["properties"]
    ttl = next(option for option in register_form["ttl_seconds"]["anyOf"] if option.get("type") == "integer")
    assert ttl["minimum"] == 1 and ttl["maximum"] == MAX_TTL_S
    assert any(o.get("maxLength") == MAX_NAME_CHARS for o in register_form["name"]["anyOf"])
    assert any(o.get("maxLength") == MAX_METRIC_CHARS for o in register_form["metric"]["anyOf"])
    assert register_form["labels"]["items"]["maxLength"] == MAX_LABEL_FIELD_CHARS
    assert register_form["labels"]["maxItems"] == MAX_LABELS
    classify_form = next(body for name, body in forms.items() if "classify" in name)["properties"]
    top_k = next(option for option in classify_form["top_k"]["anyOf"] if option.get("type") == "integer")
    assert top_k["minimum"] == 1 and top_k["maximum"] == MAX_TOP_K
    assert any("pattern" in o for o in classify_form["support_set_id"]["anyOf"])
    path_param = schema["paths"]["/support-sets/{set_id}"]["get"]["parameters"][0]["schema"]
    assert path_param["maxLength"] == 64 and "pattern" in path_param


# ------------------------------------------------------------------ damaged stored data
PLANTED = {
    "notjson": b"{not json",
    "notobject": b"[1, 2, 3]",
    "missing": b'{"id": "missing"}',
    "wrongtypes": b'{"id": "wrongtypes", "created_at": "yesterday", "revision": "1", "videos": {}, "classes": 3}',
    "future": b'{"id": "future", "created_at": 1e300, "revision": 1, "videos": [], "classes": []}',
    "past": b'{"id": "past", "created_at": -1e18, "revision": 1, "videos": [], "classes": []}',
    "expiry": b'{"id": "expiry", "created_at": 1, "expires_at": 1e20, "revision": 1, "videos": [], "classes": []}',
    "foreign": b'{"id": "someone-else", "created_at": 1, "revision": 1, "videos": [], "classes": []}',
    "badvideo": b'{"id": "badvideo", "created_at": 1, "revision": 1, "videos": [{"label": 5}], "classes": []}',
}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_planted_manifests_never_break_reads(kind: str, clip: bytes, redis_url: str, redis_prefix: str,
                                                   caplog) -> None:
    settings = tiny_settings() if kind == "memory" else tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix)
    async with running(settings) as (client, service):
        good = await register(client, [(clip, "a")])
        for set_id, blob in PLANTED.items():
            await service.store.set_bytes(f"set:{set_id}:manifest", blob)
        await service.store.set_bytes("set:bad id!:manifest", b"{}")
        listed = await client.get("/support-sets")
        assert listed.status_code == 200, listed.text
        assert [s["id"] for s in listed.json()["support_sets"]] == [good["id"]]
        assert "skipping the unreadable manifest" in caplog.text
        for set_id in PLANTED:
            assert_error(await client.get(f"/support-sets/{set_id}"), 409, "support_set_unreadable")
            assert_error(await classify(client, clip, support_set_id=set_id), 409, "support_set_unreadable")
            files, data = upload_form([(clip, "b")])
            assert_error(await client.post(f"/support-sets/{set_id}/videos", files=files, data=data), 409,
                         "support_set_unreadable")
            assert (await client.delete(f"/support-sets/{set_id}")).status_code == 204
        assert (await client.get("/support-sets")).json()["count"] == 1


# ------------------------------------------------------------------ concurrent additions over HTTP
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def serving(settings) -> AsyncIterator[str]:
    """The app under uvicorn on a loopback port, in this process and event loop; yields its URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, lifespan="on",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def add_concurrently(urls: list[str], count: int) -> None:
    """Register a set on the first gateway, then `count` concurrent additions of distinct classes spread
    over the gateways; every one succeeds and each class is present once."""
    videos = [class_video(i % 4, shot=i // 4) for i in range(count + 1)]
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=120)) for url in urls]
        files, data = upload_form([(videos[count], "base")])
        created = await clients[0].post("/support-sets", files=files, data=data)
        assert created.status_code == 201, created.text
        set_id = created.json()["id"]

        async def add(i: int) -> httpx.Response:
            files, data = upload_form([(videos[i], f"class {i}")])
            return await clients[i % len(clients)].post(f"/support-sets/{set_id}/videos", files=files, data=data)

        responses = await asyncio.gather(*(add(i) for i in range(count)))
        assert [r.status_code for r in responses] == [200] * count, [r.text[:200] for r in responses if
                                                                     r.status_code != 200]
        final = (await clients[0].get(f"/support-sets/{set_id}")).json()
        assert final["revision"] == count + 1 and final["num_videos"] == count + 1
        labels = [c["label"] for c in final["classes"]]
        assert sorted(labels) == sorted(["base"] + [f"class {i}" for i in range(count)])
        assert all(c["shots"] == 1 for c in final["classes"])


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_sixteen_concurrent_additions_all_succeed(kind: str, redis_url: str, redis_prefix: str) -> None:
    settings = tiny_settings(decode_isolation="thread", decode_concurrency=2)
    if kind == "redis":
        settings = settings.model_copy(update={"redis_url": redis_url, "redis_prefix": redis_prefix})
    async with serving(settings) as url:
        await add_concurrently([url], 16)


async def test_concurrent_additions_through_two_gateways_sharing_redis(redis_url: str, redis_prefix: str) -> None:
    """Two gateways (each its own lock per set) retry the cheap guarded write against each other."""
    settings = tiny_settings(decode_isolation="thread", decode_concurrency=2, redis_url=redis_url,
                             redis_prefix=redis_prefix)
    async with serving(settings) as first, serving(settings) as second:
        await add_concurrently([first, second], 16)


async def test_conflict_only_past_the_retry_budget(clip: bytes, monkeypatch) -> None:
    monkeypatch.setattr(support_sets_module, "UPDATE_WRITE_ATTEMPTS", 4)
    monkeypatch.setattr(support_sets_module, "UPDATE_RETRY_PAUSE_S", 0.0)
    async with running(tiny_settings()) as (client, service):
        set_id = (await register(client, [(clip, "a")]))["id"]
        attempts = []
        real_write = service.store.write_batch

        async def always_conflicting(batch, ttl_s=None, *, guard=None):
            if guard is not None and guard[1] is not None:
                attempts.append(guard)
                raise StoreConflict("changed")
            return await real_write(batch, ttl_s, guard=guard)

        monkeypatch.setattr(service.store, "write_batch", always_conflicting)
        encoded = service.metrics.value("fsar_videos_encoded_total", branch="support")
        files, data = upload_form([(class_video(1), "b")])
        assert_error(await client.post(f"/support-sets/{set_id}/videos", files=files, data=data), 409, "conflict")
        assert len(attempts) == 4
        # The upload was encoded once, not once per attempt.
        assert service.metrics.value("fsar_videos_encoded_total", branch="support") == encoded + 1


# ------------------------------------------------------------------ keys and multipart framing
async def test_blanks_around_an_api_key_are_ignored_on_both_sides(clip: bytes) -> None:
    key = "bounds-test-key-0123456789"
    async with running(tiny_settings(api_keys=f"t:{key}")) as (client, _):
        for presented in (key, f" {key}", f"{key} ", f"\t{key}\t", f"  {key}  "):
            response = await client.get("/support-sets", headers={"X-API-Key": presented})
            assert response.status_code == 200, (presented, response.text)
        for presented in (" ", f"{key}x", f"k{key}"):
            assert_error(await client.get("/support-sets", headers={"X-API-Key": presented}), 401)


async def test_a_multipart_body_needs_its_closing_boundary(clip: bytes) -> None:
    boundary = "fsarboundary42"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\na\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"q.mp4\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode() + clip + b"\r\n"
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    async with running(tiny_settings()) as (client, _):
        for body in (part, part + f"--{boundary}".encode(), part + f"--{boundary}\r\n".encode()):
            assert_error(await client.post("/classify", content=body, headers=headers), 400, "malformed_body")
        complete = part + f"--{boundary}--\r\n".encode()
        assert (await client.post("/classify", content=complete, headers=headers)).status_code == 200
        with_epilogue = part + f"--{boundary}--\r\nepilogue".encode()
        assert (await client.post("/classify", content=with_epilogue, headers=headers)).status_code == 200
