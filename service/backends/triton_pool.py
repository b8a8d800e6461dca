"""Several Triton servers serving one model: health checks, balancing, retries, one model at a time.

`TritonPool` holds one gRPC client per server address (`triton_targets`: fixed `host:port` entries
and `dns:///name:port` names resolved again every `dns_refresh_s`). Each server is in one state:

    starting   known, not checked yet
    pending    ready, waiting for the pool to choose its model (during a check round only)
    up         ready, serving the pool's model: requests go here
    down       not reachable, not ready, or its last request failed with a server error
    mismatch   ready, but serving another model (fingerprint or batch limits): kept out, reported
    unusable   serving models that are not one fsar export: kept out, reported

A health loop checks every server every `health_interval_s` (`server_ready` and `model_ready` of the
three models); a server coming back (down/starting -> up) has its model facts read again and compared
with the pool's, so a server restarted with another export is never mixed in silently.

Requests go to the up server with the fewest requests in flight (round robin among equals). A request
failing with a server error (connection refused or reset, UNAVAILABLE, model not loaded...) takes that
server out and is sent to the next server, at most once per server and within the request's
`timeout_s` budget. This is safe because every call the backend makes is idempotent: the models are
pure functions of their inputs and keep no state between requests. A timeout is not retried (the
budget is spent) and model errors (INVALID_ARGUMENT, a rejected input) are not either (every server
would answer the same). When no server is up, a request first re-checks a down server inline and is
sent there only if it is ready and serves the pool's model.

The pool serves one model: at start, the one most servers serve; later, the same one while any up
server serves it. When none does any more (a rolling upgrade finished, or the only server came back
with another export), it adopts the model the ready servers serve, logs the change, and every
fingerprint the gateway reports changes with it (caches are keyed by fingerprint).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from service.backends.triton_targets import Target, resolve
from service.errors import BackendUnavailable, InvalidField

log = logging.getLogger(__name__)

TEXT_MODEL, VIDEO_MODEL, HEAD_MODEL = "text_encoder", "video_encoder", "fewshot_head"
MODEL_NAMES = (TEXT_MODEL, VIDEO_MODEL, HEAD_MODEL)
#: Parameters every exported model must carry (written by `training.export`).
REQUIRED_PARAMETERS = ("fsar_fingerprint", "fsar_backbone", "fsar_metric", "fsar_num_frames", "fsar_image_size",
                       "fsar_embed_dim")
#: gRPC statuses that mean "this server cannot serve this now" (another server, or later, may).
UNAVAILABLE_STATUSES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                        "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.NOT_FOUND", "StatusCode.UNKNOWN",
                        "StatusCode.ABORTED"}
#: Of those, the ones a request is retried on another server for (a timeout has spent the budget).
RETRY_STATUSES = UNAVAILABLE_STATUSES - {"StatusCode.DEADLINE_EXCEEDED"}
#: Exceptions the model code raises for inputs it rejects; the Python backend sends "Name: message".
INPUT_ERROR_PREFIXES = ("ValueError: ", "TypeError: ")
#: Reconnect quickly after Triton restarts (gRPC's default backoff grows to two minutes).
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 250, "grpc.min_reconnect_backoff_ms": 250,
                        "grpc.max_reconnect_backoff_ms": 2000}
START_RETRY_S = 0.5
#: Outcomes counted per server (`fsar_triton_requests_total{server, outcome}`).
OUTCOMES = ("ok", "unavailable", "timeout", "error")
STATES = ("starting", "pending", "up", "down", "mismatch", "unusable")


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's default channel options (message sizes, keepalive) plus a short reconnect backoff."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        *RECONNECT_BACKOFF_MS.items(),
    ]


def unavailable(url: str, timeout_s: float, what: str, err: InferenceServerException) -> BackendUnavailable:
    """`BackendUnavailable` for a failed call to the server at `url` (one sentence saying why)."""
    status = err.status() or ""
    if status == "StatusCode.DEADLINE_EXCEEDED":
        reason = f"no answer within {timeout_s:g} s (triton_timeout_s)"
    elif status == "StatusCode.UNAVAILABLE":
        reason = f"not reachable ({err.message()})"
    else:
        reason = f"{status.replace('StatusCode.', '') or 'error'}: {err.message()}"
    return BackendUnavailable(f"Triton at {url} failed {what}: {reason}.")


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    """`config.pbtxt` parameters as strings (protobuf JSON drops empty strings: read them as "")."""
    return {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}


@dataclass(frozen=True)
class ServerFacts:
    """What one server serves: the video encoder's `fsar_*` parameters and each model's `max_batch_size`."""

    params: dict[str, str]
    max_batch: dict[str, int]

    @property
    def fingerprint(self) -> str:
        return self.params["fsar_fingerprint"]

    @property
    def key(self) -> tuple:
        """Two servers are interchangeable when their keys are equal."""
        return self.fingerprint, tuple(sorted(self.max_batch.items()))

    def difference(self, other: "ServerFacts") -> str | None:
        """Why a server with these facts cannot stand in for one with `other` (None: it can)."""
        if self.fingerprint != other.fingerprint:
            return f"serves model {self.fingerprint[:16]}, not {other.fingerprint[:16]}"
        if self.max_batch != other.max_batch:
            return f"serves the model with max_batch_size {self.max_batch}, not {other.max_batch}"
        return None


class TritonServer:
    """One Triton server of the pool: its client, state and counters."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.client = grpcclient.InferenceServerClient(url, channel_args=channel_args())
        self.state = "starting"
        self.facts: ServerFacts | None = None
        self.stale = False  # re-read the facts at the next check (Triton rejected a shape)
        self.in_flight = 0
        self.last_error: str | None = None
        self.requests: Counter[str] = Counter()
        self.check_lock = asyncio.Lock()

    @property
    def healthy(self) -> bool:
        return self.state == "up"

    def set_state(self, state: str, error: str | None = None) -> None:
        """Move to `state` (logging a change in or out of service); `error` becomes `last_error`."""
        if error is not None:
            self.last_error = error
        if state == self.state:
            return
        was_up, self.state = self.state == "up", state
        if state == "up":
            log.info("Triton server %s is in service (model %s)", self.url,
                     self.facts.fingerprint[:16] if self.facts else "?")
        elif was_up or state in ("mismatch", "unusable"):
            log.warning("Triton server %s is out of service (%s): %s", self.url, state, self.last_error)

    async def probe(self, timeout_s: float) -> None:
        """Raise `BackendUnavailable` unless the server and the three models are ready."""
        try:
            if not await self.client.is_server_ready(client_timeout=timeout_s):
                raise BackendUnavailable(f"Triton at {self.url} is not ready")
            for name in MODEL_NAMES:
                if not await self.client.is_model_ready(name, client_timeout=timeout_s):
                    raise BackendUnavailable(f"model {name} is not ready on Triton at {self.url}")
        except InferenceServerException as err:
            raise unavailable(self.url, timeout_s, "readiness check", err) from None

    async def read_facts(self, timeout_s: float) -> ServerFacts:
        """The three models' facts; `BackendUnavailable` when the server cannot answer, `RuntimeError`
        when its models are not one fsar export."""
        configs: dict[str, dict[str, Any]] = {}
        for name in MODEL_NAMES:
            try:
                configs[name] = (await self.client.get_model_config(name, as_json=True,
                                                                    client_timeout=timeout_s))["config"]
            except InferenceServerException as err:
                raise unavailable(self.url, timeout_s, f"reading {name}'s config", err) from None
        params = {name: _parameters(config) for name, config in configs.items()}
        for name, values in params.items():
            missing = [key for key in REQUIRED_PARAMETERS if not values.get(key)]
            if missing:
                raise RuntimeError(f"model {name} on Triton at {self.url} lacks the parameters "
                                   f"{', '.join(missing)}: it was not written by `fsar export` or is a placeholder "
                                   "without a checkpoint")
        fingerprints = {name: values["fsar_fingerprint"] for name, values in params.items()}
        if len(set(fingerprints.values())) != 1:
            listed = ", ".join(f"{name} {fp[:12]}" for name, fp in fingerprints.items())
            raise RuntimeError(f"the models on Triton at {self.url} serve different checkpoints ({listed}); "
                               "export one checkpoint into all three")
        return ServerFacts(params[VIDEO_MODEL],
                           {name: int(config.get("max_batch_size", 0) or 0) for name, config in configs.items()})

    def snapshot(self) -> dict[str, Any]:
        """The server's state for `/readyz` and `/metrics`."""
        return {"url": self.url, "state": self.state, "healthy": self.healthy, "in_flight": self.in_flight,
                "last_error": self.last_error,
                "fingerprint": self.facts.fingerprint if self.facts is not None else None,
                "requests": {outcome: self.requests[outcome] for outcome in OUTCOMES}}

    async def close(self) -> None:
        await self.client.close()


class TritonPool:
    """The Triton servers behind `targets`, balanced, health-checked and retried (see the module docstring)."""

    def __init__(self, targets: Sequence[Target], timeout_s: float, health_interval_s: float = 2.0,
                 dns_refresh_s: float = 30.0) -> None:
        self.targets = list(targets)
        self.where = ",".join(target.text for target in self.targets)
        self.timeout_s = float(timeout_s)
        self.health_interval_s = float(health_interval_s)
        self.dns_refresh_s = float(dns_refresh_s)
        #: Timeout of one health check call: a hung server is out within about two intervals.
        self.probe_timeout_s = min(self.timeout_s, max(1.0, 2 * self.health_interval_s))
        self.servers: dict[str, TritonServer] = {}
        self.reference: ServerFacts | None = None
        self.dns_error: str | None = None
        self._resolved: dict[Target, list[str]] = {}
        self._tasks: list[asyncio.Task] = []
        self._retiring: set[asyncio.Task] = set()
        self._next = 0

    @property
    def pooled(self) -> bool:
        """More than one fixed server, or a DNS name (which may stand for several)."""
        return len(self.targets) > 1 or any(target.dns for target in self.targets)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Wait (up to `timeout_s`) until a server serves the fsar models, then start the health loops.

        Raises:
            RuntimeError: no server served them in time, or every server serves models that are not
                one fsar export (one sentence saying why).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        await self._sync_servers()
        while True:
            remaining = deadline - loop.time()
            await self._check_round([s for s in self.servers.values() if not s.healthy],
                                    max(0.05, min(remaining, self.probe_timeout_s)))
            if any(server.healthy for server in self.servers.values()):
                break
            if self.servers and all(server.state == "unusable" for server in self.servers.values()):
                await self.close()
                raise RuntimeError(self._reasons(prefix=False))
            remaining = deadline - loop.time()
            if remaining <= 0:
                reasons = self._reasons(prefix=False)
                await self.close()
                raise RuntimeError(
                    f"Triton at {self.where} did not serve the fsar models within {self.timeout_s:g} s "
                    f"({reasons}); start Triton with an exported model repository or point FSAR_TRITON_URL at it.")
            await asyncio.sleep(min(START_RETRY_S, remaining))
            if not self.servers or any(target.dns for target in self.targets):
                await self._sync_servers()
        self._tasks = [asyncio.create_task(self._health_loop(), name="triton-health")]
        if any(target.dns for target in self.targets):
            self._tasks.append(asyncio.create_task(self._dns_loop(), name="triton-dns"))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks + list(self._retiring), []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        servers, self.servers = list(self.servers.values()), {}
        await asyncio.gather(*(server.close() for server in servers), return_exceptions=True)

    async def ready(self) -> bool:
        """True when a server is up (when none is, every server is checked now first).

        Raises:
            BackendUnavailable: no server is up (the message gives each server's last error).
        """
        if not any(server.healthy for server in self.servers.values()):
            await self._check_round(list(self.servers.values()), self.probe_timeout_s)
        if any(server.healthy for server in self.servers.values()):
            return True
        raise BackendUnavailable(self._reasons(prefix=True))

    def snapshots(self) -> list[dict[str, Any]]:
        return [server.snapshot() for server in self.servers.values()]

    # ------------------------------------------------------------------ requests
    async def infer(self, model: str, inputs: list[grpcclient.InferInput], outputs: Sequence[str]
                    ) -> grpcclient.InferResult:
        """One inference request on the best up server, retried on the next one after a server error.

        Raises:
            BackendUnavailable: every server that could answer failed, or the request timed out.
            InvalidField: the model rejected the input (a `ValueError`/`TypeError` of the model code).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        tried: set[str] = set()
        failures: list[str] = []
        while True:
            server = await self._pick(tried, failures, deadline)
            if server is None:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                failures.append(f"Triton at {self.where} gave no answer within {self.timeout_s:g} s "
                                "(triton_timeout_s).")
                break
            server.in_flight += 1
            try:
                result = await server.client.infer(
                    model, inputs, outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
                    client_timeout=remaining)
            except InferenceServerException as err:
                error = self._failed(server, model, err)
                if error is None:  # a server error: that server is out, try the next one
                    failures.append(server.last_error or "")
                    continue
                raise error from None
            finally:
                server.in_flight -= 1
            server.requests["ok"] += 1
            return result
        if len(failures) == 1:
            raise BackendUnavailable(failures[0])
        if failures:
            raise BackendUnavailable(f"No Triton server could answer a {model} request: {' '.join(failures)}")
        raise BackendUnavailable(self._reasons(prefix=True))

    def _failed(self, server: TritonServer, model: str, err: InferenceServerException) -> Exception | None:
        """Count a failed request; None for a server error (the server is taken out: retry elsewhere),
        else the error to raise."""
        status, message = err.status() or "", err.message() or ""
        if status in RETRY_STATUSES:
            server.requests["unavailable"] += 1
            server.set_state("down", unavailable(server.url, self.timeout_s, f"a {model} request", err).message)
            return None
        if status == "StatusCode.DEADLINE_EXCEEDED":
            server.requests["timeout"] += 1
            return unavailable(server.url, self.timeout_s, f"a {model} request", err)
        server.requests["error"] += 1
        if status == "StatusCode.INTERNAL" and message.startswith(INPUT_ERROR_PREFIXES):
            return InvalidField(f"The model ({model}) rejected the input: {message.split(': ', 1)[1]}",
                                code="invalid_model_input")
        if status == "StatusCode.INVALID_ARGUMENT":
            # Triton checks shapes and dtypes against config.pbtxt: this server's models may differ
            # from what the pool read (a new export?). Its facts are read again at the next check.
            server.stale = True
        return unavailable(server.url, self.timeout_s, f"a {model} request", err)

    async def _pick(self, tried: set[str], failures: list[str], deadline: float) -> TritonServer | None:
        """The up server not tried yet with the fewest requests in flight; when there is none, a server
        not tried yet that a check finds ready with the pool's model; None when no server is left."""
        candidates = [s for s in self.servers.values() if s.healthy and s.url not in tried]
        if candidates:
            fewest = min(server.in_flight for server in candidates)
            least = [server for server in candidates if server.in_flight == fewest]
            self._next += 1
            server = least[self._next % len(least)]
            tried.add(server.url)
            return server
        loop = asyncio.get_running_loop()
        for server in [s for s in self.servers.values() if s.url not in tried and s.state != "unusable"]:
            tried.add(server.url)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await self._check(server, min(remaining, self.probe_timeout_s))
            self._settle()
            if server.healthy:
                return server
            if server.last_error:
                failures.append(server.last_error)
        return None

    # ------------------------------------------------------------------ health
    async def _check(self, server: TritonServer, timeout_s: float) -> None:
        """Probe `server`; read and compare its facts when it is not up (or they are stale)."""
        if server.check_lock.locked():  # a check is running: its result will do
            async with server.check_lock:
                return
        async with server.check_lock:
            try:
                await server.probe(timeout_s)
                if server.healthy and not server.stale:
                    return
                facts = await server.read_facts(timeout_s)
            except BackendUnavailable as err:
                server.set_state("down", err.message)
                return
            except RuntimeError as err:
                server.set_state("unusable", str(err))
                return
            server.facts, server.stale = facts, False
            self._admit(server)

    def _admit(self, server: TritonServer) -> None:
        """Up when `server` serves the pool's model, kept out (mismatch) when not."""
        assert server.facts is not None
        if self.reference is None:
            server.state = "pending"  # the pool chooses its model after this round (`_settle`)
            return
        reason = server.facts.difference(self.reference)
        if reason is None:
            server.set_state("up")
        else:
            server.set_state("mismatch", f"Triton at {server.url} {reason}; kept out of the pool")

    def _settle(self) -> None:
        """Choose the pool's model when no up server serves one: the model most ready servers serve."""
        servers = list(self.servers.values())
        if any(server.healthy for server in servers):
            return
        ready = [s for s in servers if s.state in ("pending", "mismatch") and s.facts is not None]
        if not ready:
            return
        counts = Counter(server.facts.key for server in ready if server.facts is not None)
        best = max(counts.values())
        chosen = next(s.facts for s in ready if s.facts is not None and counts[s.facts.key] == best)
        old, self.reference = self.reference, chosen
        if old is not None and old.key != chosen.key:
            log.warning("no Triton server serves model %s any more: now serving %s from %s", old.fingerprint[:16],
                        chosen.fingerprint[:16], ", ".join(s.url for s in ready if s.facts == chosen))
        for server in ready:
            self._admit(server)
        others = [server.url for server in ready if not server.healthy]
        if others:
            log.warning("Triton servers %s serve another model than %s and are kept out", ", ".join(others),
                        chosen.fingerprint[:16])

    async def _check_round(self, servers: list[TritonServer], timeout_s: float) -> None:
        await asyncio.gather(*(self._check(server, timeout_s) for server in servers))
        self._settle()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self._check_round(list(self.servers.values()), self.probe_timeout_s)
            except Exception:  # the loop must survive anything; the next round tries again
                log.exception("Triton health check failed")

    # ------------------------------------------------------------------ membership
    async def _sync_servers(self) -> None:
        """Resolve the targets; add servers for new addresses, retire those gone (after their requests)."""
        addresses: list[str] = []
        errors = []
        for target in self.targets:
            try:
                found = await resolve(target)
                self._resolved[target] = found
            except OSError as err:
                errors.append(f"{target.text} does not resolve ({err})")
                found = self._resolved.get(target, [])
            addresses += [url for url in found if url not in addresses]
        self.dns_error = "; ".join(errors) or None
        if errors:
            log.warning("Triton targets: %s; keeping the servers known before", self.dns_error)
        known, self.servers = self.servers, {}
        for url in addresses:  # in target order, as /readyz lists them
            if url not in known and known:
                log.info("Triton server %s joined %s", url, self.where)
            self.servers[url] = known.pop(url, None) or TritonServer(url, self.timeout_s)
        for url, server in known.items():
            log.info("Triton server %s left %s", url, self.where)
            task = asyncio.create_task(self._retire(server))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, server: TritonServer) -> None:
        """Close a server that left once its requests are done (at most `timeout_s` later)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            while server.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await server.close()

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.dns_refresh_s)
            try:
                await self._sync_servers()
            except Exception:
                log.exception("resolving the Triton targets failed")

    # ------------------------------------------------------------------ messages
    def _reasons(self, prefix: bool) -> str:
        """Why no server serves: the only server's last error, or every server's."""
        servers = list(self.servers.values())
        if len(servers) == 1 and not self.pooled:
            return servers[0].last_error or f"Triton at {servers[0].url} is {servers[0].state}"
        parts = [f"{s.url} {s.state}: {s.last_error or 'not checked yet'}" for s in servers]
        if self.dns_error:
            parts.append(self.dns_error)
        listed = "; ".join(parts) or "no server address known"
        return f"No Triton server of {self.where} is in service ({listed})" if prefix else listed


def as_numpy(result: grpcclient.InferResult, model: str, outputs: Sequence[str]) -> list[np.ndarray]:
    """The named outputs of a result; `BackendUnavailable` when one is missing."""
    arrays = [result.as_numpy(name) for name in outputs]
    if any(array is None for array in arrays):
        raise BackendUnavailable(f"Triton's {model} answered without the outputs {', '.join(outputs)}.")
    return arrays
