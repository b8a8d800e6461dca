"""Job callbacks: where they may go, how they are signed and sent, and how a receiver checks them.

Signature (scheme `v1`): the gateway POSTs the job as JSON with the headers

    X-Fsar-Timestamp: <unix seconds when it was signed>
    X-Fsar-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

where `body` is the exact bytes received and `secret` the tenant's entry of the `webhook_secrets`
setting. A receiver recomputes the HMAC over the raw body, compares in constant time and refuses a
timestamp more than 5 minutes from its own clock (a replayed delivery): `verify_signature` does it.

Destinations (server-side request forgery): a callback URL must be http(s) without credentials, and
every address its host name resolves to must be public (no loopback, private, link-local, shared,
reserved, multicast or unspecified address, IPv4-mapped ones included) unless `webhook_allow_private`
is set. It is checked when the job is created (422) and again at every delivery, where the request
goes to the address just checked (with the original Host header and TLS server name), so a DNS
answer that changes in between cannot redirect it. Redirects are not followed.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

import httpx

from service.errors import InvalidField

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Fsar-Signature"
TIMESTAMP_HEADER = "X-Fsar-Timestamp"
JOB_HEADER = "X-Fsar-Job"
#: A receiver refuses signatures older (or further in the future) than this: replay protection.
TOLERANCE_S = 300
#: Longest callback URL accepted.
MAX_URL_CHARS = 2048
#: Pause between delivery attempts: 1, 2, 4 ... seconds, at most this.
MAX_BACKOFF_S = 60.0


class CallbackRefused(InvalidField):
    """A callback URL this gateway will not call (422)."""

    code = "callback_url_refused"


# ---------------------------------------------------------------------------- secrets and signatures
def parse_secrets(spec: str | None) -> dict[str, str]:
    """`'tenant:secret,tenant:secret'` as a dict ('*' = the default entry). Raises ValueError."""
    secrets: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, secret = item.partition(":")
        if not sep or not tenant.strip() or len(secret.strip()) < 16:
            raise ValueError("webhook_secrets must be 'tenant:secret,...' with secrets of 16+ characters")
        secrets[tenant.strip()] = secret.strip()
    return secrets


def tenant_secret(secrets: Mapping[str, str], tenant: str | None) -> str | None:
    """The secret signing `tenant`'s callbacks: its own entry, else the '*' entry, else None."""
    if tenant is not None and tenant in secrets:
        return secrets[tenant]
    return secrets.get("*")


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The `X-Fsar-Signature` value of `body` signed at `timestamp`: `v1=<hex>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify_signature(secret: str, timestamp: str | int | None, body: bytes, header: str | None,
                     now: float | None = None, tolerance_s: float = TOLERANCE_S) -> bool:
    """Whether a delivery is authentic and fresh: `header` (the `X-Fsar-Signature` value; several
    comma-separated `v1=` entries allowed) holds the HMAC-SHA256 of `timestamp + "." + body` under
    `secret`, and `timestamp` (the `X-Fsar-Timestamp` value) lies within `tolerance_s` of `now`
    (default: the clock). Compare with the raw body bytes, before parsing the JSON."""
    if not secret or timestamp is None or not header:
        return False
    try:
        stamp = int(str(timestamp).strip())
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance_s:
        return False
    expected = sign(secret, stamp, body)
    return any(hmac.compare_digest(expected.encode(), part.strip().encode()) for part in header.split(","))


# ---------------------------------------------------------------------------- destinations
@dataclass(frozen=True)
class Target:
    """A checked callback URL: its parts and the addresses its host resolved to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not public (None when it is)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _refusal(address.ipv4_mapped)
    for name in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if not address.is_global:
        return "not public"
    return None


def _split(url: str) -> tuple[str, str, int]:
    """scheme, host, port of a callback URL (CallbackRefused for anything but plain http(s))."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise CallbackRefused(f"callback_url: at most {MAX_URL_CHARS} characters.")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as err:
        raise CallbackRefused(f"callback_url: not a valid URL ({err}).") from err
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise CallbackRefused("callback_url: only http and https URLs are called.")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("callback_url: credentials in the URL are not accepted.")
    if not parts.hostname:
        raise CallbackRefused("callback_url: the URL has no host.")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (a literal address: itself)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise CallbackRefused(f"callback_url: the host '{host}' cannot be resolved.") from err
    return list(dict.fromkeys(str(ipaddress.ip_address(info[4][0].split("%", 1)[0])) for info in infos))


async def check_callback_url(url: str, *, allow_private: bool) -> Target:
    """The checked target of `url`, or CallbackRefused (422) for a URL the gateway will not call: not
    http(s), credentials, no host, unresolvable, or (unless `allow_private`) any resolved address that
    is not public."""
    scheme, host, port = _split(url)
    addresses = await resolve(host, port)
    if not addresses:
        raise CallbackRefused(f"callback_url: the host '{host}' has no address.")
    if not allow_private:
        for address in addresses:
            reason = _refusal(ipaddress.ip_address(address))
            if reason is not None:
                raise CallbackRefused(f"callback_url: '{host}' resolves to a {reason} address ({address}); "
                                      "callbacks go to public addresses only.")
    return Target(url=url.strip(), scheme=scheme, host=host, port=port, addresses=tuple(addresses))


# ---------------------------------------------------------------------------- delivery
@dataclass
class Delivery:
    """The outcome of a callback: `delivered`, or `failed` after `attempts`, with the last answer."""

    state: str
    attempts: int
    last_status: int | None = None
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "attempts": self.attempts, "last_status": self.last_status,
                "last_error": self.last_error}


def _pinned_request(target: Target, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """The URL naming `address` instead of the host, with the Host header and TLS server name of the host."""
    url = httpx.URL(target.url).copy_with(host=address)
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if ":" in target.host and not host_header.startswith("["):
        host_header = f"[{target.host}]" if target.port == default_port else f"[{target.host}]:{target.port}"
    return url, {"Host": host_header}, {"sni_hostname": target.host}


async def deliver(url: str, payload: Mapping[str, Any], *, secret: str, job_id: str, allow_private: bool,
                  max_attempts: int, timeout_s: float, client: httpx.AsyncClient | None = None) -> Delivery:
    """POST `payload` (JSON) to `url`, signed with `secret`, until a 2xx answer or `max_attempts`
    attempts (backoff 1, 2, 4 ... s, at most `MAX_BACKOFF_S`; a 4xx other than 408/429 ends it). The
    URL is checked again before every attempt and the request goes to the checked address."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    owned = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    outcome = Delivery("failed", 0)
    try:
        for attempt in range(1, max_attempts + 1):
            outcome.attempts = attempt
            retry = True
            try:
                target = await check_callback_url(url, allow_private=allow_private)
                request_url, headers, extensions = _pinned_request(target, target.addresses[0])
                stamp = int(time.time())
                headers.update({"Content-Type": "application/json", TIMESTAMP_HEADER: str(stamp),
                                SIGNATURE_HEADER: sign(secret, stamp, body), JOB_HEADER: job_id,
                                "User-Agent": "fsar-webhooks/1"})
                response = await client.post(request_url, content=body, headers=headers, extensions=extensions,
                                              timeout=timeout_s)
                outcome.last_status, outcome.last_error = response.status_code, None
                if 200 <= response.status_code < 300:
                    outcome.state = "delivered"
                    return outcome
                retry = response.status_code >= 500 or response.status_code in (408, 429)
            except CallbackRefused as err:
                outcome.last_status, outcome.last_error = None, err.message
                retry = False
            except httpx.HTTPError as err:
                outcome.last_status, outcome.last_error = None, f"{type(err).__name__}: {err}"[:300]
            if not retry or attempt == max_attempts:
                break
            await asyncio.sleep(min(MAX_BACKOFF_S, 2.0 ** (attempt - 1)))
        log.warning("job %s: callback not delivered after %d attempt(s): %s", job_id, outcome.attempts,
                    outcome.last_error or f"status {outcome.last_status}")
        return outcome
    finally:
        if owned:
            await client.aclose()
