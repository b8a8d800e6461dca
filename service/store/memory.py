"""In-process store: a dict of bytes with expiry times. For one worker without Redis (lost on restart)."""
from __future__ import annotations

import asyncio
import fnmatch
import time

from service.store.base import Batch, Store, StoreConflict, guard_matches, ttl_seconds


class MemoryStore(Store):
    """Same semantics as `RedisStore` (bytes in, bytes out, whole-second TTLs, atomic batches)."""

    kind = "memory"

    def __init__(self, prefix: str = "fsar:") -> None:
        self.prefix = prefix
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._lock = asyncio.Lock()

    def _live(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at is not None and time.monotonic() >= expires_at:
            del self._data[key]
            return None
        return value

    def _put(self, key: str, value: bytes, ttl_s: float | None) -> None:
        seconds = ttl_seconds(ttl_s)
        self._data[key] = (bytes(value), None if seconds is None else time.monotonic() + seconds)

    async def get_bytes(self, key: str) -> bytes | None:
        return self._live(key)

    async def get_many_bytes(self, keys: list[str]) -> list[bytes | None]:
        return [self._live(key) for key in keys]

    async def set_bytes(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._put(key, value, ttl_s)

    async def write_batch(self, batch: Batch, ttl_s: float | None = None, *,
                          guard: tuple[str, int | None] | None = None) -> None:
        ttl_seconds(ttl_s)  # validate before touching anything
        async with self._lock:
            if guard is not None and not guard_matches(self._live(guard[0]), guard[1]):
                raise StoreConflict(f"'{guard[0]}' changed during the update; retry the request.")
            for key, value in batch.values.items():
                self._put(key, value, ttl_s)

    async def delete(self, keys: list[str]) -> int:
        count = 0
        for key in keys:
            if self._live(key) is not None:
                count += 1
            self._data.pop(key, None)
        return count

    async def keys(self, pattern: str) -> list[str]:
        return [key for key in list(self._data) if fnmatch.fnmatchcase(key, pattern) and self._live(key) is not None]

    async def ttl(self, key: str) -> float | None:
        if self._live(key) is None:
            return None
        expires_at = self._data[key][1]
        return None if expires_at is None else max(0.0, expires_at - time.monotonic())

    async def exists(self, key: str) -> bool:
        return self._live(key) is not None

    async def ping(self) -> None:
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "note": "in-process store: support sets are lost on restart"}
