"""The store interface: a small async key-value API for arrays and JSON documents.

Keys are relative (`set:abc:manifest`); each store prepends its own prefix. Values are either
numpy arrays (stored as raw bytes behind a small JSON header with dtype and shape: never pickle)
or JSON documents. `write_batch` writes several values in one transaction, in order, so a
manifest written last becomes visible together with the features it points at, or not at all.

Errors: an unreachable backing service raises `StoreUnavailable` (HTTP 503); a failed
optimistic check in `write_batch` raises `StoreConflict` (HTTP 409).
"""
from __future__ import annotations

import json
import math
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.bounds import MAX_TTL_S
from service.errors import Conflict, StoreUnavailable

__all__ = ["Store", "StoreUnavailable", "StoreConflict", "StoreDataError", "Batch", "encode_array",
           "decode_array", "encode_json", "decode_json"]

_MAGIC = b"FSARNPY1"
_HEADER_LEN = struct.Struct("<I")
# Plain numeric dtypes only: object or void dtypes could smuggle arbitrary structures.
_ALLOWED_KINDS = set("biuf")


class StoreConflict(Conflict):
    """A guarded write found the guarded document changed since it was read."""

    code = "conflict"


class StoreDataError(Exception):
    """A stored value cannot be decoded (wrong format or a foreign key under our prefix)."""


def encode_array(array: np.ndarray) -> bytes:
    """Serialise an array as `MAGIC | u32 header length | JSON {dtype, shape} | raw C-order bytes`."""
    array = np.asarray(array)
    if array.dtype.kind not in _ALLOWED_KINDS:
        raise TypeError(f"only numeric arrays can be stored, got dtype {array.dtype}")
    header = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape)}).encode()
    return b"".join([_MAGIC, _HEADER_LEN.pack(len(header)), header, np.ascontiguousarray(array).tobytes()])


def decode_array(blob: bytes) -> np.ndarray:
    """Inverse of `encode_array`; returns a writable array with the stored dtype and shape."""
    if not blob.startswith(_MAGIC):
        raise StoreDataError("stored value is not an fsar array")
    offset = len(_MAGIC)
    (header_len,) = _HEADER_LEN.unpack_from(blob, offset)
    offset += _HEADER_LEN.size
    try:
        header = json.loads(blob[offset:offset + header_len])
        dtype = np.dtype(header["dtype"])
        shape = tuple(int(n) for n in header["shape"])
    except (ValueError, KeyError, TypeError) as err:
        raise StoreDataError(f"bad array header: {err}") from err
    if dtype.kind not in _ALLOWED_KINDS:
        raise StoreDataError(f"refusing stored dtype {dtype}")
    data = memoryview(blob)[offset + header_len:]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise StoreDataError(f"array payload has {len(data)} bytes, header says {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def decode_json(blob: bytes) -> Any:
    try:
        return json.loads(blob)
    except ValueError as err:
        raise StoreDataError(f"stored value is not JSON: {err}") from err


@dataclass
class Batch:
    """Values to write together, in insertion order (put the manifest last)."""

    values: dict[str, bytes] = field(default_factory=dict)

    def array(self, key: str, array: np.ndarray) -> "Batch":
        self.values[key] = encode_array(array)
        return self

    def json(self, key: str, value: Any) -> "Batch":
        self.values[key] = encode_json(value)
        return self

    def __len__(self) -> int:
        return len(self.values)


class Store(ABC):
    """Async key-value store for arrays and JSON. Implementations: `MemoryStore`, `RedisStore`."""

    kind: str = "abstract"

    # -- raw bytes: what implementations provide ------------------------------------------
    @abstractmethod
    async def get_bytes(self, key: str) -> bytes | None:
        """The stored bytes, or None if the key is absent or expired."""

    @abstractmethod
    async def get_many_bytes(self, keys: list[str]) -> list[bytes | None]:
        """`get_bytes` for several keys in one round trip."""

    @abstractmethod
    async def set_bytes(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store bytes; `ttl_s` None means no expiry."""

    @abstractmethod
    async def write_batch(self, batch: Batch, ttl_s: float | None = None, *,
                          guard: tuple[str, int | None] | None = None) -> None:
        """Write every value of `batch` atomically and in order, all with the same TTL.

        `guard=(key, revision)`: write only if the JSON document at `key` has `"revision": revision`
        (revision None: only if `key` does not exist); otherwise raise `StoreConflict`.
        """

    @abstractmethod
    async def delete(self, keys: list[str]) -> int:
        """Delete keys; returns how many existed."""

    @abstractmethod
    async def keys(self, pattern: str) -> list[str]:
        """Relative keys matching a glob pattern (`*` wildcard), e.g. `set:*:manifest`."""

    @abstractmethod
    async def ttl(self, key: str) -> float | None:
        """Seconds left before `key` expires; None when it has no expiry or does not exist."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether `key` is present."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise `StoreUnavailable` if the store cannot be reached."""

    async def close(self) -> None:
        """Release connections (Redis: `aclose()` the pool)."""

    # -- typed helpers ---------------------------------------------------------------------
    async def get_array(self, key: str) -> np.ndarray | None:
        blob = await self.get_bytes(key)
        return None if blob is None else decode_array(blob)

    async def get_arrays(self, keys: list[str]) -> list[np.ndarray | None]:
        blobs = await self.get_many_bytes(keys) if keys else []
        return [None if blob is None else decode_array(blob) for blob in blobs]

    async def set_array(self, key: str, array: np.ndarray, ttl_s: float | None = None) -> None:
        await self.set_bytes(key, encode_array(array), ttl_s)

    async def get_json(self, key: str) -> Any | None:
        blob = await self.get_bytes(key)
        return None if blob is None else decode_json(blob)

    async def get_jsons(self, keys: list[str]) -> list[Any | None]:
        blobs = await self.get_many_bytes(keys) if keys else []
        return [None if blob is None else decode_json(blob) for blob in blobs]

    async def set_json(self, key: str, value: Any, ttl_s: float | None = None) -> None:
        await self.set_bytes(key, encode_json(value), ttl_s)

    def describe(self) -> dict[str, Any]:
        """What kind of store this is, for logs and `/model`."""
        return {"kind": self.kind}


def guard_matches(current: bytes | None, expected_revision: int | None) -> bool:
    """Whether a stored JSON document satisfies a `write_batch` guard."""
    if current is None:
        return expected_revision is None
    if expected_revision is None:
        return False
    try:
        return decode_json(current).get("revision") == expected_revision
    except (StoreDataError, AttributeError):
        return False


def ttl_seconds(ttl_s: float | None) -> int | None:
    """A TTL as whole seconds for `SET ... EX` (rounded up, at least 1), or None for no expiry.

    Raises ValueError (before anything is written) for a TTL that is not a finite number from above 0
    to `MAX_TTL_S`: callers validate lifetimes first, so this is a bug, never a request to retry."""
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) \
            or not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be a number of seconds in (0, {MAX_TTL_S}] or None, got {ttl_s!r}")
    return max(1, math.ceil(ttl_s))
