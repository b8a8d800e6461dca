"""Store behaviour on a real Redis and on the in-process store (same tests, parametrised)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from service.errors import StoreUnavailable
from service.settings import Settings
from service.store import Batch, MemoryStore, Store, StoreConflict, StoreDataError, create_store
from service.store.base import decode_array, encode_array
from service.store.redis_store import RedisStore, redact_url


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_url: str, redis_prefix: str):
    if request.param == "memory":
        made: Store = MemoryStore(prefix=redis_prefix)
    else:
        made = RedisStore(redis_url, prefix=redis_prefix)
    yield made
    await made.delete(await made.keys("*"))
    await made.close()


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint8", "bool"])
async def test_array_round_trip_keeps_dtype_shape_and_values(store: Store, dtype: str) -> None:
    rng = np.random.default_rng(0)
    original = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    await store.set_array("a", original)
    loaded = await store.get_array("a")
    assert loaded.dtype == original.dtype and loaded.shape == original.shape
    np.testing.assert_array_equal(loaded, original)
    assert loaded.flags.writeable  # returned arrays are writable copies
    assert await store.get_array("missing") is None


async def test_zero_dim_and_empty_arrays_round_trip(store: Store) -> None:
    await store.set_array("scalar", np.float32(3.5))
    await store.set_array("empty", np.zeros((0, 7), dtype=np.float32))
    scalar, empty = await store.get_arrays(["scalar", "empty"])
    assert scalar.shape == () and float(scalar) == 3.5
    assert empty.shape == (0, 7)


async def test_json_round_trip_and_many(store: Store) -> None:
    await store.set_json("doc", {"b": [1, 2], "a": "x"})
    assert await store.get_json("doc") == {"a": "x", "b": [1, 2]}
    assert await store.get_jsons(["doc", "nope"]) == [{"a": "x", "b": [1, 2]}, None]


async def test_ttl_expires_keys(store: Store) -> None:
    await store.set_json("short", {"v": 1}, ttl_s=1)
    await store.set_json("forever", {"v": 2})
    left = await store.ttl("short")
    assert left is not None and 0 < left <= 1.0
    assert await store.ttl("forever") is None
    await asyncio.sleep(1.2)
    assert await store.get_json("short") is None
    assert not await store.exists("short")
    assert await store.get_json("forever") == {"v": 2}


async def test_batch_ttl_applies_to_every_key(store: Store) -> None:
    batch = Batch().array("f", np.ones(3, np.float32)).json("m", {"revision": 1})
    await store.write_batch(batch, ttl_s=100)
    for key in ("f", "m"):
        left = await store.ttl(key)
        assert left is not None and 99 <= left <= 100


async def test_guarded_batch_is_all_or_nothing(store: Store) -> None:
    first = Batch().array("feat:1", np.ones(2, np.float32)).json("manifest", {"revision": 1})
    await store.write_batch(first, guard=("manifest", None))
    # A stale writer (expects no manifest / an old revision) writes nothing at all.
    stale = Batch().array("feat:2", np.zeros(2, np.float32)).json("manifest", {"revision": 2})
    with pytest.raises(StoreConflict):
        await store.write_batch(stale, guard=("manifest", None))
    with pytest.raises(StoreConflict):
        await store.write_batch(stale, guard=("manifest", 7))
    assert await store.get_array("feat:2") is None
    assert (await store.get_json("manifest"))["revision"] == 1
    # The writer that read revision 1 succeeds.
    await store.write_batch(stale, guard=("manifest", 1))
    assert (await store.get_json("manifest"))["revision"] == 2
    assert await store.get_array("feat:2") is not None


async def test_keys_delete_and_prefix_isolation(store: Store, redis_url: str, redis_prefix: str) -> None:
    await store.set_json("set:a:manifest", {"n": 1})
    await store.set_json("set:b:manifest", {"n": 2})
    await store.set_array("set:a:clip:x", np.zeros(1, np.uint8))
    assert sorted(await store.keys("set:*:manifest")) == ["set:a:manifest", "set:b:manifest"]
    assert sorted(await store.keys("set:a:*")) == ["set:a:clip:x", "set:a:manifest"]

    other = MemoryStore(prefix=redis_prefix + "other:") if store.kind == "memory" else \
        RedisStore(redis_url, prefix=redis_prefix + "other:")
    try:
        assert await other.keys("*") == []
        await other.set_json("set:a:manifest", {"n": 99})
        assert (await store.get_json("set:a:manifest"))["n"] == 1
        assert await other.keys("set:*:manifest") == ["set:a:manifest"]
        await other.delete(["set:a:manifest"])
    finally:
        await other.close()

    assert await store.delete(["set:a:manifest", "set:a:clip:x", "never"]) == 2
    assert await store.keys("set:a:*") == []


async def test_redis_keys_live_under_the_prefix(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    try:
        await store.set_array("k", np.arange(4, dtype=np.int32))
        raw = redis.Redis.from_url(redis_url)
        try:
            blob = raw.get(redis_prefix + "k")
            assert blob is not None and raw.get("k") is None
            np.testing.assert_array_equal(decode_array(blob), np.arange(4, dtype=np.int32))
            assert b"pickle" not in blob and blob.startswith(b"FSARNPY1")
        finally:
            raw.close()
        await store.delete(["k"])
    finally:
        await store.close()


def test_array_encoding_refuses_non_numeric_and_foreign_bytes() -> None:
    with pytest.raises(TypeError):
        encode_array(np.array(["a", "b"], dtype=object))
    with pytest.raises(StoreDataError):
        decode_array(b"\x80\x04pickle-looking bytes")
    blob = encode_array(np.zeros((2, 2), np.float32))
    with pytest.raises(StoreDataError):
        decode_array(blob[:-1])


async def test_redis_down_raises_store_unavailable_and_recovers(redis_process, redis_prefix: str) -> None:
    store = RedisStore(redis_process.url, prefix=redis_prefix, connect_timeout_s=0.5, socket_timeout_s=0.5)
    try:
        await store.set_json("x", {"v": 1})
        redis_process.stop()
        with pytest.raises(StoreUnavailable) as info:
            await store.get_json("x")
        assert "unavailable" in info.value.message or "unreachable" in info.value.message
        with pytest.raises(StoreUnavailable):
            await store.ping()
        redis_process.start()
        await store.ping()  # same store object, no restart
        await store.set_json("x", {"v": 2})
        assert await store.get_json("x") == {"v": 2}
    finally:
        await store.close()


def test_create_store_follows_settings(redis_url: str) -> None:
    assert isinstance(create_store(Settings(redis_url=None)), MemoryStore)
    made = create_store(Settings(redis_url=redis_url, redis_prefix="p:"))
    assert isinstance(made, RedisStore) and made.prefix == "p:"
    asyncio.run(made.close())


def test_redact_url_hides_password() -> None:
    assert redact_url("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
