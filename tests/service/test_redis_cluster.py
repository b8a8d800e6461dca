"""The store and the gateway on a Redis Cluster: 3 masters with a replica each, made of local
`redis-server` processes for this module. test_api's support-set flows run on it unchanged, then a
master is SIGKILLed: requests for its slots get 503 `store_unavailable` until its replica takes over,
and every acknowledged write is still there afterwards."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import redis

from service.core import keys
from service.ratelimit import RedisRateLimiter
from service.settings import Settings
from service.store import Batch, StoreConflict, create_store
from service.store.redis_store import RedisStore
from tests.service import test_api as api
from tests.service.redis_topologies import LocalCluster, missing_binaries

_MISSING = missing_binaries("redis-server", "redis-cli")
pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))]

videos = api.videos  # the module-scoped fixture of test_api


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(Path(tmp_path_factory.mktemp("cluster"))) as made:
        yield made


@pytest.fixture
def cluster_store(cluster: LocalCluster, redis_prefix: str) -> RedisStore:
    store = create_store(Settings(redis_url=cluster.url, redis_prefix=redis_prefix))
    assert isinstance(store, RedisStore) and store.cluster
    return store


async def test_a_sets_keys_share_one_slot_and_listing_scans_every_master(cluster: LocalCluster,
                                                                          cluster_store: RedisStore) -> None:
    store = cluster_store
    try:
        ids = [f"s{i}" for i in range(12)]
        for set_id in ids:
            batch = (Batch().array(keys.clip_key(None, set_id, "h"), np.ones(2, np.uint8))
                     .json(keys.manifest_key(None, set_id), {"revision": 1}))
            await store.write_batch(batch, guard=(keys.manifest_key(None, set_id), None))
        stored = {key.decode() for s in cluster.masters() for key in cluster.client(s).keys(store.prefix + "*")}
        assert f"{store.prefix}set:{{s0}}:manifest" in stored and f"{store.prefix}set:{{s0}}:clip:h" in stored
        assert len({cluster.master_of(f"{store.prefix}set:{{{i}}}:manifest").port for i in ids}) > 1
        # Listing scans every master and gives back the layout's keys.
        assert sorted(await store.keys(keys.manifest_pattern(None))) == sorted(
            keys.manifest_key(None, i) for i in ids)
        assert sorted(await store.keys(keys.set_pattern(None, "s3"))) == sorted(
            [keys.manifest_key(None, "s3"), keys.clip_key(None, "s3", "h")])
        # The guard still works, and a guarded batch cannot leave its guard's slot.
        with pytest.raises(StoreConflict):
            await store.write_batch(Batch().json(keys.manifest_key(None, "s1"), {"revision": 9}),
                                    guard=(keys.manifest_key(None, "s1"), None))
        with pytest.raises(ValueError, match="hash slot"):
            await store.write_batch(Batch().json(keys.manifest_key(None, "s2"), {"revision": 2}),
                                    guard=(keys.manifest_key(None, "s1"), 1))
        # Caches spread over slots: an unguarded batch and a multi-key read across masters.
        cache = {keys.text_cache_key("fp", f"label {i}"): np.full(3, i, np.float32) for i in range(8)}
        batch = Batch()
        for key, value in cache.items():
            batch.array(key, value)
        await store.write_batch(batch, ttl_s=60)
        got = await store.get_arrays([*cache, "cache:text:fp:absent"])
        assert [float(a[0]) for a in got[:-1]] == list(range(8)) and got[-1] is None
        assert await store.delete(await store.keys("*")) == 2 * len(ids) + len(cache)
    finally:
        await store.close()


async def test_rate_limiter_script_runs_on_the_cluster(cluster_store: RedisStore) -> None:
    limiter = RedisRateLimiter(cluster_store.client, cluster_store.prefix, per_minute=60, burst=2)
    try:
        waits = [await limiter.acquire("tenant:alice") for _ in range(3)]
        assert waits[:2] == [0.0, 0.0] and 0 < waits[2] <= 1.0 and not limiter._degraded
    finally:
        await cluster_store.delete(await cluster_store.keys("*"))
        await cluster_store.close()


@pytest.mark.parametrize("flow", [api.test_register_classify_list_get_delete, api.test_add_videos_rebuilds_prototypes,
                                  api.test_concurrent_additions_both_land,
                                  api.test_identical_bytes_are_encoded_once_and_queries_are_cached],
                         ids=lambda flow: flow.__name__.removeprefix("test_"))
async def test_api_flow_on_the_cluster(flow, videos, cluster: LocalCluster, redis_prefix: str) -> None:
    """The single-Redis flow of test_api, unchanged, against the cluster."""
    await flow(videos, cluster.url, redis_prefix)


def test_cluster_prefix_with_braces_is_refused(cluster: LocalCluster) -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisStore(cluster.url, prefix="{fsar}:")
    assert redis.crc.key_slot(b"p:set:{abc}:manifest") == redis.crc.key_slot(b"q:tenant:t:set:{abc}:clip:h")


async def test_killed_master_gives_503_then_its_replica_serves_everything(videos, cluster: LocalCluster,
                                                                          redis_prefix: str) -> None:
    """Last in this module: it leaves one node down (the fixture stops the rest)."""
    settings = api.tiny_settings(redis_url=cluster.url, redis_prefix=redis_prefix)
    async with api.running(settings) as (client, service):
        sets = [(await api.register(client, [(videos[c, 0], api.LABELS[c]), (videos[c + 1, 0], api.LABELS[c + 1])]))
                for c in range(3)]
        ids = [s["id"] for s in sets]
        stored = {i: f"{redis_prefix}{keys.cluster_key(keys.manifest_key(None, i))}" for i in ids}
        cluster.wait_healthy()  # acknowledged = replicated (replication is asynchronous in Redis)
        victim = cluster.master_of(stored[ids[0]])
        lost_slots = [i for i in ids if cluster.master_of(stored[i]) is victim]
        victim.kill()

        api.assert_error(await client.get(f"/support-sets/{ids[0]}"), 503, "store_unavailable")
        api.assert_error(await api.classify(client, videos[0, 1], support_set_id=ids[0]), 503, "store_unavailable")

        deadline = time.monotonic() + 30
        while (response := await client.get(f"/support-sets/{ids[0]}")).status_code != 200:
            api.assert_error(response, 503, "store_unavailable")
            assert time.monotonic() < deadline, "the replica never took over"
            await asyncio.sleep(0.25)
        assert lost_slots and (await client.get("/readyz")).status_code == 200
        listed = (await client.get("/support-sets")).json()
        assert sorted(s["id"] for s in listed["support_sets"]) == sorted(ids)
        for set_id, created in zip(ids, sets):
            got = (await client.get(f"/support-sets/{set_id}")).json()
            assert got["revision"] == created["revision"] and got["num_videos"] == 2
        body = (await api.classify(client, videos[0, 1], support_set_id=ids[0])).json()
        assert body["predictions"][0]["label"] == api.LABELS[0]
        # Writes go to the promoted replica.
        files, data = api.upload_form([(videos[3, 1], api.LABELS[3])])
        response = await client.post(f"/support-sets/{ids[0]}/videos", files=files, data=data)
        assert response.status_code == 200 and response.json()["revision"] == 2, response.text
        for set_id in ids:
            assert (await client.delete(f"/support-sets/{set_id}")).status_code == 204
