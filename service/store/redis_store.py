"""Redis store (`redis.asyncio`): one connection pool per process, created in the app's lifespan.

One server, a Redis Cluster or a Sentinel-managed master, with or without TLS: the URL says which
(`service.store.redis_client`). Every key is `prefix + relative key`; on a cluster the relative key
goes through the layout's `cluster_keys` mapping first (a support set's keys share a hash tag, see
`service.core.keys`), keys are listed by scanning every master, and a batch is written in one
transaction per hash slot (a guarded batch must fit in its guard's slot). Arrays are stored as one string value (header + raw bytes,
see `service.store.base.encode_array`); TTLs use `SET key value EX seconds`. `write_batch` runs
in a MULTI/EXEC transaction (with WATCH on the guarded key when a guard is given), so readers
never see a manifest without the features it lists. Any connection or server error becomes
`StoreUnavailable`; the pool reconnects by itself once Redis is back.
"""
from __future__ import annotations

import re
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import StoreUnavailable
from service.store.base import Batch, Store, StoreConflict, guard_matches, ttl_seconds
from service.store.redis_client import connect, parse_redis_url

#: (relative key -> key as a cluster stores it, and back); identity on one server.
KeyMapping = tuple[Callable[[str], str], Callable[[str], str]]

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def redact_url(url: str) -> str:
    """The URL with its password (if any, also a `sentinel_password` argument) replaced by ***."""
    parts = urlsplit(url)
    if "sentinel_password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(sentinel_password=)[^&]*", r"\1***", parts.query))
    if parts.password is None:
        return urlunsplit(parts)
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _connection_lost(err: WatchError) -> bool:
    """Whether a WatchError stands for a lost connection (raised while handling a connection error)
    rather than a watched key that changed."""
    context = err.__context__
    return (err.__cause__ is None and not err.__suppress_context__
            and isinstance(context, (RedisConnectionError, RedisTimeoutError, OSError)))


class RedisStore(Store):
    """Store backed by Redis (one server, a cluster or Sentinel). `close()` must be awaited (the lifespan
    does it). `cluster_keys` maps relative keys to their cluster form and back (`create_store` passes the
    layout's hash-tag mapping); it is used on a cluster only."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "fsar:", *, socket_timeout_s: float = 5.0,
                 connect_timeout_s: float = 2.0, max_connections: int = 32,
                 cluster_keys: KeyMapping | None = None) -> None:
        if not prefix:
            raise ValueError("a Redis key prefix is required (e.g. 'fsar:')")
        target = parse_redis_url(url)
        self.topology = target.topology
        self.cluster = target.topology == "cluster"
        if self.cluster and ("{" in prefix or "}" in prefix):
            raise ValueError(f"on a Redis Cluster the key prefix must not contain braces (got {prefix!r}): "
                             "the store sets each support set's hash tag itself")
        self.url = url
        self.prefix = prefix
        self._to_stored, self._from_stored = (cluster_keys if self.cluster and cluster_keys
                                              else (_identity, _identity))
        self._glob_prefix = _GLOB_SPECIAL.sub(r"\\\1", prefix)
        self._client = connect(
            target,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            max_connections=max_connections,
            # One quick retry, then report the outage: a request should fail fast with 503.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=15,
        )

    @property
    def client(self) -> aioredis.Redis:
        """The connection pool's client, for other Redis users of this process (the rate limiter)."""
        return self._client

    def _k(self, key: str) -> str:
        return self.prefix + self._to_stored(key)

    def _slot_groups(self, batch: Batch, guard_key: str | None) -> list[list[tuple[str, bytes]]]:
        """The batch's (stored key, value) pairs in order: one group on one server, one per hash slot on a
        cluster. ValueError when a guarded batch does not fit in its guard's slot (a layout bug)."""
        pairs = [(self._k(key), value) for key, value in batch.values.items()]
        if not self.cluster:
            return [pairs]
        groups: dict[int, list[tuple[str, bytes]]] = {}
        for key, value in pairs:
            groups.setdefault(key_slot(key.encode()), []).append((key, value))
        if guard_key is not None and set(groups) - {key_slot(guard_key.encode())}:
            raise ValueError(f"a guarded batch must keep every key in the hash slot of {guard_key!r}")
        return list(groups.values()) or [[]]  # an empty guarded batch still checks its guard

    @asynccontextmanager
    async def _guard_errors(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except WatchError:
            raise
        except (RedisError, RedisClusterException) as err:
            raise StoreUnavailable(
                f"Redis at {redact_url(self.url)} is unavailable ({what}: {type(err).__name__}: {err}); "
                "retry when it is back.") from err
        except OSError as err:
            raise StoreUnavailable(
                f"Redis at {redact_url(self.url)} is unreachable ({what}: {err}); retry when it is back.") from err

    async def get_bytes(self, key: str) -> bytes | None:
        async with self._guard_errors("GET"):
            return await self._client.get(self._k(key))

    async def get_many_bytes(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        async with self._guard_errors("MGET"):
            stored = [self._k(key) for key in keys]
            if self.cluster:  # one MGET per slot: cache keys spread over the cluster
                return list(await self._client.mget_nonatomic(stored))
            return list(await self._client.mget(stored))

    async def set_bytes(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        seconds = ttl_seconds(ttl_s)
        async with self._guard_errors("SET"):
            await self._client.set(self._k(key), value, ex=seconds)

    async def write_batch(self, batch: Batch, ttl_s: float | None = None, *,
                          guard: tuple[str, int | None] | None = None) -> None:
        seconds = ttl_seconds(ttl_s)
        guard_key = None if guard is None else self._k(guard[0])
        groups = self._slot_groups(batch, guard_key)
        for number, group in enumerate(groups):
            await self._write_group(group, seconds, guard if number == 0 else None, guard_key)

    async def _write_group(self, group: list[tuple[str, bytes]], seconds: int | None,
                           guard: tuple[str, int | None] | None, guard_key: str | None) -> None:
        """One MULTI/EXEC (WATCHing the guard's key when there is a guard)."""
        async with self._guard_errors("MULTI/EXEC"):
            async with self._client.pipeline(transaction=True) as pipe:
                try:
                    if guard is not None and guard_key is not None:
                        await pipe.watch(guard_key)
                        current = await pipe.get(guard_key)
                        if not guard_matches(current, guard[1]):
                            raise StoreConflict(f"'{guard[0]}' changed during the update; retry the request.")
                        pipe.multi()
                    for key, value in group:
                        pipe.set(key, value, ex=seconds)
                    await pipe.execute()
                except WatchError as err:
                    if _connection_lost(err):
                        # redis-py reports a connection lost during a WATCHed transaction as a WatchError.
                        raise StoreUnavailable(
                            f"Redis at {redact_url(self.url)} went away during a write (MULTI/EXEC: "
                            f"{type(err.__context__).__name__}); nothing or all of it was applied: "
                            "retry when it is back.") from err
                    raise StoreConflict(f"'{guard[0] if guard else '?'}' changed during the update; "
                                        "retry the request.") from err

    async def delete(self, keys: list[str]) -> int:
        if not keys:
            return 0
        async with self._guard_errors("DEL"):
            return int(await self._client.delete(*[self._k(key) for key in keys]))

    async def keys(self, pattern: str) -> list[str]:
        found: list[str] = []
        async with self._guard_errors("SCAN"):
            # On a cluster redis-py scans every master, one after the other.
            async for raw in self._client.scan_iter(match=self._glob_prefix + self._to_stored(pattern), count=500):
                name = raw.decode() if isinstance(raw, bytes) else raw
                found.append(self._from_stored(name[len(self.prefix):]))
        return found

    async def ttl(self, key: str) -> float | None:
        async with self._guard_errors("PTTL"):
            millis = await self._client.pttl(self._k(key))
        return None if millis < 0 else millis / 1000.0

    async def exists(self, key: str) -> bool:
        async with self._guard_errors("EXISTS"):
            return bool(await self._client.exists(self._k(key)))

    async def ping(self) -> None:
        async with self._guard_errors("PING"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    def describe(self) -> dict:
        return {"kind": self.kind, "topology": self.topology, "url": redact_url(self.url), "prefix": self.prefix}


def _identity(key: str) -> str:
    return key
