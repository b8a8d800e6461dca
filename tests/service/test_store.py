"""Store behaviour on a real Redis and on the in-process store (same tests, parametrised); Redis URL forms,
Sentinel and TLS on local servers (Redis Cluster: test_redis_cluster.py)."""
from __future__ import annotations

import asyncio
import shutil
import subprocess

import numpy as np
import pytest
import redis

from service.errors import StoreUnavailable
from service.settings import Settings
from service.store import Batch, MemoryStore, Store, StoreConflict, StoreDataError, create_store
from service.store.base import decode_array, encode_array
from service.harness import RedisServer, free_port
from service.store.redis_client import parse_redis_url
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


# ------------------------------------------------------------------ URL forms: cluster, Sentinel, TLS
def test_redis_urls_name_their_topology() -> None:
    single = parse_redis_url("rediss://u:pw@cache.example.com:6380/2?ssl_ca_certs=/ca.pem")
    assert (single.topology, single.tls) == ("single", True)
    cluster = parse_redis_url("rediss+cluster://:pw@h1:7000,h2:7001,[::1]:7002?ssl_ca_certs=/ca.pem")
    assert cluster.topology == "cluster" and cluster.tls
    assert cluster.nodes == (("h1", 7000), ("h2", 7001), ("::1", 7002))
    assert cluster.options["password"] == "pw" and cluster.options["ssl_ca_certs"] == "/ca.pem"
    assert "db" not in cluster.options and "host" not in cluster.options
    sentinel = parse_redis_url("redis+sentinel://:pw@s1,s2:26380/mymaster/3?sentinel_password=spw&socket_timeout=2")
    assert sentinel.topology == "sentinel" and not sentinel.tls and sentinel.service_name == "mymaster"
    assert sentinel.nodes == (("s1", 26379), ("s2", 26380))
    assert sentinel.options["db"] == 3 and sentinel.options["password"] == "pw"
    assert sentinel.options["socket_timeout"] == 2.0 and sentinel.sentinel_options == {"password": "spw"}
    for bad in ("http://h:1", "redis+cluster://h1:7000/1", "redis+sentinel://s1:26379", "redis+cluster://",
                "redis+cluster://h1:port", "redis+sentinel://s1/m/x"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)
    with pytest.raises(ValueError):
        Settings(redis_url="redis+cluster://h1:7000/4")  # refused at start-up, not at the first request


def test_redact_url_hides_passwords_of_every_form() -> None:
    assert redact_url("redis+cluster://:pw@h1:7000,h2:7001") == "redis+cluster://:***@h1:7000,h2:7001"
    assert (redact_url("redis+sentinel://s1:26379/m?sentinel_password=x&db=1")
            == "redis+sentinel://s1:26379/m?sentinel_password=***&db=1")


async def _round_trip(url: str, prefix: str) -> None:
    store = RedisStore(url, prefix=prefix, connect_timeout_s=1, socket_timeout_s=2)
    try:
        batch = Batch().array("set:a:clip:x", np.arange(3, dtype=np.uint8)).json("set:a:manifest", {"revision": 1})
        await store.write_batch(batch, ttl_s=60, guard=("set:a:manifest", None))
        assert (await store.get_json("set:a:manifest")) == {"revision": 1}
        assert sorted(await store.keys("set:a:*")) == ["set:a:clip:x", "set:a:manifest"]
        assert await store.delete(await store.keys("*")) == 2
    finally:
        await store.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
async def test_store_through_sentinel(tmp_path, redis_prefix: str) -> None:
    """`redis+sentinel://` finds the master a (local) Sentinel monitors and uses it as a single server."""
    with RedisServer(tmp_path / "master", args=["--save", "", "--appendonly", "no"]) as master:
        conf = tmp_path / "sentinel" / "sentinel.conf"
        conf.parent.mkdir()
        conf.write_text(f"sentinel monitor fsarmaster 127.0.0.1 {master.port} 1\n")
        with RedisServer(conf.parent, args=[str(conf), "--sentinel"]) as sentinel:
            await _round_trip(f"redis+sentinel://127.0.0.1:{sentinel.port}/fsarmaster/0", redis_prefix)


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("openssl") is None,
                    reason="redis-server or openssl not installed")
async def test_store_over_tls(tmp_path, redis_prefix: str) -> None:
    """`rediss://` with the server's CA verifies and works; without it the store reports 503, not a crash."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    tls_port = free_port()
    args = ["--save", "", "--appendonly", "no", "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    with RedisServer(tmp_path / "tls", args=args):
        await _round_trip(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}", redis_prefix)
        untrusted = RedisStore(f"rediss://127.0.0.1:{tls_port}/0", prefix=redis_prefix, connect_timeout_s=1)
        try:
            with pytest.raises(StoreUnavailable):
                await untrusted.ping()
        finally:
            await untrusted.close()
