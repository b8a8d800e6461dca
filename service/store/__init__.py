"""Stores for support sets and feature caches: Redis (shared, durable) or in-process memory."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from service.store.base import Batch, Store, StoreConflict, StoreDataError, StoreUnavailable
from service.store.memory import MemoryStore

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = ["Batch", "Store", "StoreConflict", "StoreDataError", "StoreUnavailable", "MemoryStore",
           "create_store"]

log = logging.getLogger(__name__)


def create_store(settings: "Settings") -> Store:
    """The store the settings ask for: `RedisStore` when `redis_url` is set (one server, a cluster or
    Sentinel, see `service.store.redis_client`), else `MemoryStore`.

    Call it inside the app's lifespan (the Redis pool belongs to the running event loop) and
    `await store.close()` on shutdown.
    """
    if settings.redis_url:
        from service.store.redis_store import RedisStore, redact_url

        # The key layout (and its Redis Cluster form) belongs to the core; the store only applies it.
        from service.core.keys import cluster_key, plain_key

        store = RedisStore(settings.redis_url, prefix=settings.redis_prefix, cluster_keys=(cluster_key, plain_key))
        log.info("store: Redis (%s) at %s, key prefix %r", store.topology, redact_url(settings.redis_url),
                 settings.redis_prefix)
        return store
    log.warning("store: in-process memory (no redis_url / FSAR_REDIS_URL set): support sets are lost on "
                "restart and not shared between workers")
    return MemoryStore(prefix=settings.redis_prefix)
