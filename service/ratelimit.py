"""Per-tenant rate limits: a token bucket per tenant (per client address when the gateway runs open).

A bucket holds at most `burst` tokens and refills at `per_minute / 60` tokens a second; each request
takes one token, and a request that finds less than one gets a 429 with `Retry-After` (seconds until
a token is back). Settings: `rate_limit_per_minute` (None = off) and `rate_limit_burst`.

- `RedisRateLimiter` (when the store is Redis): the bucket lives in Redis (`{prefix}ratelimit:{bucket}`,
  a hash of tokens and last refill time, expiring once it would be full again) and is updated by one Lua
  script using the Redis server's clock, so every replica and worker shares one bucket per tenant.
  The script touches that one key only, so on a Redis Cluster it runs on the key's master as is.
  If Redis cannot be reached the limiter falls back to its in-process buckets (each replica limits on
  its own) and logs it once; it returns to Redis by itself.
- `MemoryRateLimiter` (in-process store): the buckets live in this process.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from redis.exceptions import RedisClusterException, RedisError

if TYPE_CHECKING:
    from service.settings import Settings
    from service.store import Store

log = logging.getLogger(__name__)

#: In-process buckets kept before full (idle) ones are forgotten.
MAX_MEMORY_BUCKETS = 10_000

# KEYS[1] = bucket key; ARGV = rate (tokens/s), burst, cost. Returns {allowed 0/1, seconds to wait}.
_TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = burst
  last = now
end
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class RateLimiter(ABC):
    """Token buckets keyed by a bucket name (`tenant:<name>` or `client:<address>`)."""

    kind = "abstract"

    def __init__(self, per_minute: float, burst: int) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError("per_minute must be > 0 and burst >= 1")
        self.per_minute = per_minute
        self.burst = burst
        self.rate_per_s = per_minute / 60.0

    @abstractmethod
    async def acquire(self, bucket: str) -> float:
        """Take one token: 0.0 if the request may go ahead, else the seconds until a token is back."""


class MemoryRateLimiter(RateLimiter):
    """Buckets in this process (monotonic clock)."""

    kind = "memory"

    def __init__(self, per_minute: float, burst: int) -> None:
        super().__init__(per_minute, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, time of last update)

    def take(self, bucket: str, now: float | None = None) -> float:
        """`acquire` without awaiting (the same token-bucket arithmetic as the Redis script)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(bucket, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate_per_s)
        if tokens >= 1.0:
            self._buckets[bucket] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[bucket] = (tokens, now)
            wait = (1.0 - tokens) / self.rate_per_s
        if len(self._buckets) > MAX_MEMORY_BUCKETS:
            self._forget_full(now)
        return wait

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled completely (forgetting them changes nothing)."""
        full = [name for name, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate_per_s >= self.burst]
        for name in full:
            del self._buckets[name]

    async def acquire(self, bucket: str) -> float:
        return self.take(bucket)


class RedisRateLimiter(RateLimiter):
    """Buckets in Redis, shared by every replica; in-process buckets while Redis is unreachable."""

    kind = "redis"

    def __init__(self, client, prefix: str, per_minute: float, burst: int) -> None:
        super().__init__(per_minute, burst)
        self.prefix = prefix
        self._script = client.register_script(_TOKEN_BUCKET_LUA)
        self._fallback = MemoryRateLimiter(per_minute, burst)
        self._degraded = False

    async def acquire(self, bucket: str) -> float:
        try:
            allowed, wait = await self._script(keys=[f"{self.prefix}ratelimit:{bucket}"],
                                               args=[repr(self.rate_per_s), self.burst, 1])
        except (RedisError, RedisClusterException, OSError) as err:
            if not self._degraded:
                log.warning("rate limiter: Redis unavailable (%s: %s); limiting per replica until it is back",
                            type(err).__name__, err)
                self._degraded = True
            return self._fallback.take(bucket)
        if self._degraded:
            log.info("rate limiter: Redis is back; buckets are shared again")
            self._degraded = False
        return 0.0 if int(allowed) else float(wait)


def create_rate_limiter(settings: "Settings", store: "Store") -> RateLimiter | None:
    """The limiter the settings ask for (None when `rate_limit_per_minute` is unset): in Redis when the
    store is a `RedisStore`, in-process otherwise."""
    if not settings.rate_limit_per_minute:
        return None
    client = getattr(store, "client", None)
    if client is not None:
        prefix = getattr(store, "prefix", settings.redis_prefix)
        return RedisRateLimiter(client, prefix, settings.rate_limit_per_minute, settings.rate_limit_burst)
    return MemoryRateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
