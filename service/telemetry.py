"""Prometheus metrics of one gateway app (one registry per app, so several apps can live in a process).

Exposed at `GET /metrics`:
- `fsar_http_requests_total{method, route, status}` and `fsar_http_request_duration_seconds{method, route}`
  (route = the templated path, e.g. `/support-sets/{set_id}`; unmatched paths count as `<unmatched>`);
- `fsar_stage_duration_seconds{stage}`: decode, encode, match, store;
- `fsar_cache_requests_total{cache, result}`: cache = query | text | support | prototypes, result = hit | miss;
- `fsar_backend_calls_total{op}`: one per backend call (encode_videos, encode_texts, build_prototypes,
  classify, zero_shot; open_set for the calls of a set's open-set calibration and a query's score);
- `fsar_videos_encoded_total{branch}`: videos the backend encoded (branch = support | query).
- `fsar_rejected_requests_total{reason}`: requests refused before reaching a route
  (reason = unauthenticated | rate_limited);
- `fsar_decode_worker_restarts_total{reason}`: decode worker processes replaced
  (reason = timeout | crash | recycled).
- `fsar_triton_server_up{server}` (1 in service, 0 out), `fsar_triton_server_in_flight{server}` and
  `fsar_triton_requests_total{server, outcome}` (outcome = ok | unavailable (a server error: retried on
  another server) | timeout | error (the model refused the request)), per Triton server (backend=triton).
With several uvicorn workers each process exposes its own numbers.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGES = ("decode", "encode", "match", "store")


class TritonServersCollector(Collector):
    """Per-server Triton metrics, read at scrape time from `source` (the backend's `server_states`)."""

    def __init__(self) -> None:
        self.source: Callable[[], list[dict[str, Any]]] | None = None

    def collect(self) -> Iterable[Metric]:
        states = self.source() if self.source is not None else []
        if not states:
            return []
        up = GaugeMetricFamily("fsar_triton_server_up", "1 when the Triton server is in service, else 0.",
                               labels=["server"])
        in_flight = GaugeMetricFamily("fsar_triton_server_in_flight", "Requests in flight on the Triton server.",
                                      labels=["server"])
        requests = CounterMetricFamily("fsar_triton_requests", "Triton requests by server and outcome.",
                                       labels=["server", "outcome"])
        for state in states:
            up.add_metric([state["url"]], 1.0 if state["healthy"] else 0.0)
            in_flight.add_metric([state["url"]], float(state["in_flight"]))
            for outcome, count in state["requests"].items():
                requests.add_metric([state["url"], outcome], float(count))
        return [up, in_flight, requests]

    def describe(self) -> Iterable[Metric]:
        return []  # samples depend on the servers known at scrape time


class Metrics:
    """The gateway's Prometheus collectors, registered in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fsar_http_requests", "HTTP requests by templated route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram("fsar_http_request_duration_seconds", "HTTP request latency.",
                                         ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("fsar_stage_duration_seconds",
                                       "Time per stage: decode, encode, match, store.",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.cache = Counter("fsar_cache_requests", "Feature cache look-ups by cache and result (hit/miss).",
                             ["cache", "result"], registry=self.registry)
        self.backend_calls = Counter("fsar_backend_calls", "Backend calls by operation.", ["op"],
                                     registry=self.registry)
        self.videos_encoded = Counter("fsar_videos_encoded", "Videos encoded by the backend, by branch.",
                                      ["branch"], registry=self.registry)
        self.rejected = Counter("fsar_rejected_requests", "Requests refused by authentication or rate limiting.",
                                ["reason"], registry=self.registry)
        self.decode_restarts = Counter("fsar_decode_worker_restarts", "Decode worker processes replaced, by reason.",
                                       ["reason"], registry=self.registry)
        self.triton_servers = TritonServersCollector()
        self.registry.register(self.triton_servers)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time a stage; the yielded dict gets `seconds` when the block ends."""
        record: dict = {}
        start = time.perf_counter()
        try:
            yield record
        finally:
            record["seconds"] = time.perf_counter() - start
            self.stage_seconds.labels(stage=name).observe(record["seconds"])

    def cache_result(self, cache: str, hit: bool) -> None:
        self.cache.labels(cache=cache, result="hit" if hit else "miss").inc()

    def backend_call(self, op: str) -> None:
        self.backend_calls.labels(op=op).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (e.g. `value("fsar_backend_calls_total", op="classify")`), 0 if absent."""
        found = self.registry.get_sample_value(name, labels)
        return float(found) if found is not None else 0.0


class RequestMetricsMiddleware:
    """Pure ASGI middleware counting requests and latency per templated route."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            self.metrics.requests.labels(method=method, route=template, status=str(status)).inc()
            self.metrics.request_seconds.labels(method=method, route=template).observe(
                time.perf_counter() - start)
