"""API keys, tenants and the access middleware (authentication, then rate limiting).

Keys come from `FSAR_API_KEYS="tenant:key,tenant:key"` or a file named by `FSAR_API_KEYS_FILE` (one
`tenant:key` per line, `#` comments). A tenant may hold several keys (rotation); a key belongs to one
tenant. Clients send the key in the `X-API-Key` header.

- Keys are kept only as SHA-256 digests. A presented key is hashed and compared with
  `hmac.compare_digest` against every configured digest, without stopping at a match, so the time
  taken says neither whether nor for which tenant a key matched. Keys never appear in logs or errors.
- Open paths (no key needed, not rate limited): `/healthz`, `/readyz`, `/metrics` (for probes and
  scrapers on the internal network) and the API description (`/openapi.json`, `/docs`, `/redoc`).
  Everything else, `/model` included, needs a key when keys are configured; an unknown path without a
  valid key is a 401 too, so paths cannot be probed anonymously.
- Blanks around a presented key are ignored, on both sides alike (`KeyRing.authenticate`).
- Missing or wrong key: 401 `{"error": {"code": "missing_api_key" | "invalid_api_key", ...}}` with
  `WWW-Authenticate: ApiKey header="X-API-Key"`, answered before the request body is read.
- With no keys configured the gateway runs open (every request is tenant None) and says so at start-up.
- After authentication the request spends one token of its tenant's rate-limit bucket (the client
  address's bucket when the gateway runs open); an empty bucket is a 429 with `Retry-After`.

The tenant reaches the routes as `scope["fsar.tenant"]` (`service.api.deps.get_tenant`).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.keys import TENANT_NAME
from service.errors import ApiError, render

if TYPE_CHECKING:
    from service.telemetry import Metrics
    from service.settings import Settings

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
TENANT_SCOPE_KEY = "fsar.tenant"
MIN_KEY_CHARS = 16
#: Paths anyone may call: probes, Prometheus, and the API description.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
_HEADER_NAME = API_KEY_HEADER.lower().encode()


class KeyConfigError(ValueError):
    """The API key configuration cannot be used (the message never contains a key)."""


class Unauthorized(ApiError):
    """No or an unknown API key (401, with the `WWW-Authenticate` header naming the key's header)."""

    status, code = 401, "invalid_api_key"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"www-authenticate": f'ApiKey header="{API_KEY_HEADER}"'})


class RateLimited(ApiError):
    """The caller's rate-limit bucket is empty (429, with `Retry-After` in whole seconds)."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after_s)})


@dataclass(frozen=True)
class _KeyDigest:
    tenant: str
    digest: bytes


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyRing:
    """The configured keys, as digests. Empty = authentication off."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self._keys = [_KeyDigest(tenant, _digest(key)) for tenant, key in entries]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def tenants(self) -> list[str]:
        return sorted({key.tenant for key in self._keys})

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, presented: str | None) -> str | None:
        """The tenant owning `presented`, or None. Constant time in which key (if any) matched.

        Blanks around the presented key are not part of it (HTTP does not count whitespace around a
        header value, and configured keys hold none): they are removed on both sides alike."""
        presented = (presented or "").strip()
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for key in self._keys:  # every key, always: no early exit
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.tenant
        return found


def parse_keys(text: str, source: str) -> list[tuple[str, str]]:
    """`(tenant, key)` pairs from `tenant:key` entries separated by commas or new lines.

    Blank entries and lines starting with `#` are skipped. Raises `KeyConfigError` for an entry without
    `:`, a tenant name that is not 1-64 of `A-Z a-z 0-9 _ . -`, a key shorter than 16 characters or
    containing whitespace, or a key listed twice. Messages name the entry's position and tenant only."""
    entries: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    position = 0
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        for raw in line.split(","):
            item = raw.strip()
            if not item:
                continue
            position += 1
            tenant, colon, key = item.partition(":")
            tenant = tenant.strip()
            where = f"entry {position} of {source}"
            if not colon:
                raise KeyConfigError(f"{where} is not 'tenant:key'.")
            if not TENANT_NAME.fullmatch(tenant):
                raise KeyConfigError(f"{where}: the tenant name must be 1-64 letters, digits, '_', '.' or '-'.")
            if len(key) < MIN_KEY_CHARS or any(char.isspace() for char in key):
                raise KeyConfigError(f"{where} (tenant {tenant}): keys need at least {MIN_KEY_CHARS} characters "
                                     "and no whitespace (e.g. `python -c 'import secrets; "
                                     "print(secrets.token_urlsafe(32))'`).")
            digest = _digest(key)
            if digest in seen:
                raise KeyConfigError(f"{where} (tenant {tenant}) repeats a key listed before; "
                                     "each key must belong to one tenant.")
            seen.add(digest)
            entries.append((tenant, key))
    return entries


def load_key_ring(settings: "Settings") -> KeyRing:
    """The key ring the settings describe (empty when neither api_keys nor api_keys_file is set)."""
    if settings.api_keys_file:
        path = Path(settings.api_keys_file)
        try:
            text = path.read_text()
        except OSError as err:
            raise KeyConfigError(f"cannot read api_keys_file {path}: {err.strerror or err}") from None
        entries = parse_keys(text, f"api_keys_file {path}")
        if not entries:
            raise KeyConfigError(f"api_keys_file {path} lists no keys; remove the setting to run without "
                                 "authentication.")
        return KeyRing(entries)
    if settings.api_keys:
        return KeyRing(parse_keys(settings.api_keys, "api_keys (FSAR_API_KEYS)"))
    return KeyRing([])


def describe_access(ring: KeyRing, settings: "Settings") -> str:
    """One start-up log line saying who may call the gateway and how fast."""
    if ring.enabled:
        who = (f"authentication ON: {len(ring)} API key(s) for tenant(s) {', '.join(ring.tenants)} "
               f"(header {API_KEY_HEADER}); open paths: /healthz, /readyz, /metrics, API docs")
    else:
        who = ("authentication OFF: no API keys configured (FSAR_API_KEYS / FSAR_API_KEYS_FILE), so anyone "
               "who can reach this port may register, read and delete support sets")
    if settings.rate_limit_per_minute:
        pace = f"rate limit {settings.rate_limit_per_minute:g}/min, burst {settings.rate_limit_burst}"
    else:
        pace = "no rate limit"
    return f"{who}; {pace}"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class AccessMiddleware:
    """Pure ASGI middleware: authenticate (401), then rate-limit (429), before the body is read.

    The rate limiter is looked up on `app.state.rate_limiter` at each request (the app's lifespan
    creates it with the store); None = no rate limit."""

    def __init__(self, app: ASGIApp, key_ring: KeyRing, metrics: "Metrics | None" = None) -> None:
        self.app = app
        self.key_ring = key_ring
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        tenant = None
        if self.key_ring.enabled:
            presented = (_header(scope, _HEADER_NAME) or "").strip() or None
            tenant = self.key_ring.authenticate(presented)
            if tenant is None:
                error = (Unauthorized(f"This endpoint needs an API key in the {API_KEY_HEADER} header.",
                                      code="missing_api_key") if not presented else
                         Unauthorized(f"The API key in the {API_KEY_HEADER} header is not valid."))
                client = (scope.get("client") or ("unknown",))[0]
                log.info("%s %s from %s -> 401 %s", scope.get("method"), scope.get("path"), client, error.code)
                self._count("unauthenticated")
                await render(error)(scope, receive, send)
                return
        limiter = getattr(getattr(scope.get("app"), "state", None), "rate_limiter", None)
        if limiter is not None:
            bucket = f"tenant:{tenant}" if tenant is not None else f"client:{(scope.get('client') or ('unknown',))[0]}"
            wait_s = await limiter.acquire(bucket)
            if wait_s > 0:
                retry_after = max(1, math.ceil(wait_s))
                self._count("rate_limited")
                who = f"tenant {tenant}" if tenant is not None else "this client address"
                error = RateLimited(f"Rate limit of {limiter.per_minute:g} requests per minute (burst "
                                    f"{limiter.burst}) reached for {who}; retry in {retry_after} s.",
                                    retry_after_s=retry_after)
                await render(error)(scope, receive, send)
                return
        scope[TENANT_SCOPE_KEY] = tenant
        await self.app(scope, receive, send)

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=reason).inc()

