"""Shared pieces of the gateway benchmarks (``service.bench.e2e``, ``service.bench.cache``, ``service.bench.encoder``).

- :func:`machine_info`: ``service.bench.decode``'s machine facts plus the CPU model, torch, the load
  average and the date, for every JSON report;
- :func:`format_table` / :func:`write_report`: plain-text tables and JSON files in the style of
  ``service.bench.decode``;
- :func:`scenario_clips` / :func:`retagged`: realistic H.264 clips generated once with PyAV
  (``service.bench.decode.make_clip``: a panning texture, moving blocks, light noise) and distinct byte
  strings of the same clip (a remux with a different metadata tag: same packets, same decode cost,
  another sha256, so the gateway's query cache cannot answer it);
- :func:`prepare_gateway_bench` / :func:`running_gateway` / :func:`add_gateway_arguments`: the set-up
  the gateway benchmarks share: machine facts, clips and settings, then the gateway as a real uvicorn
  process (:class:`service.harness.LiveGateway`, whose memory and CPU readings cover its decode
  workers too), and their common command-line options;
- :func:`parse_metrics` / :func:`stage_deltas`: ``GET /metrics`` text to numbers, and what a run
  added to each stage histogram and counter.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from service.bench.decode import ClipSpec, make_clip
from service.bench.decode import machine_info as decode_machine_info
from service.harness import LiveGateway, delete_redis_prefix

LABELS = ("open valve", "stand up", "wave hand", "sit down", "pick up box")
NUM_FRAMES = 8
Samples = dict[tuple[str, frozenset], float]


# ---------------------------------------------------------------------------------------- reports
def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name", from ``/proc/cpuinfo``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Facts about this machine for a report: ``service.bench.decode.machine_info()`` plus ``cpu_model``,
    ``torch``, ``cuda_device`` (None without CUDA), ``load_avg`` (1/5/15 min) and ``date``."""
    info = dict(decode_machine_info())
    info["cpu_model"] = cpu_model()
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"], info["cuda_device"] = None, None
    info["load_avg"] = [round(value, 2) for value in os.getloadavg()]
    info["date"] = _dt.date.today().isoformat()
    return info


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: one line per row, ``columns`` = ``(header, key, format spec)``; a value
    that is None (or missing) shows as ``-``."""
    def cell(row: Mapping[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, spec) if spec else str(value)

    lines = [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    headers = [header for header, _, _ in columns]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*line) for line in lines)])


def write_report(json_path: str | os.PathLike | None, report: Mapping[str, Any]) -> None:
    """Write ``report`` as indented JSON to ``json_path`` (nothing when it is None)."""
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def percentiles_ms(seconds: Iterable[float]) -> dict[str, float | None]:
    """``{"p50_ms", "p95_ms", "mean_ms"}`` of durations in seconds (None each when there are none)."""
    values = np.asarray(list(seconds), dtype=np.float64) * 1000.0
    if values.size == 0:
        return {"p50_ms": None, "p95_ms": None, "mean_ms": None}
    return {"p50_ms": round(float(np.percentile(values, 50)), 2),
            "p95_ms": round(float(np.percentile(values, 95)), 2),
            "mean_ms": round(float(values.mean()), 2)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded to 2 places; None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 2)


def default_workdir(name: str) -> Path:
    """Where a benchmark caches generated clips: ``$XDG_CACHE_HOME/fsar/bench-<name>``
    (``~/.cache`` when unset)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "fsar" / f"bench-{name}"


# ------------------------------------------------------------------------------------------ clips
@dataclass(frozen=True)
class ScenarioClips:
    """The clips of a gateway benchmark: ``support`` (one per class of :data:`LABELS`, as bytes)
    and ``queries`` (base clips to retag per request), with the spec they were made from."""

    support: list[bytes]
    queries: list[bytes]
    spec: ClipSpec

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {"codec": "h264" if spec.codec == "libx264" else spec.codec,
                "resolution": f"{spec.width}x{spec.height}", "duration_s": spec.seconds,
                "fps": spec.fps, "keyframe_interval_s": spec.keyframe_s,
                "support_bytes": [len(data) for data in self.support],
                "query_bytes": [len(data) for data in self.queries]}


def clip_spec(quick: bool) -> ClipSpec:
    """The clip shape of a run: 10 s 640x360 30 fps H.264 with a keyframe every second
    (quick: 2 s 192x108 15 fps)."""
    if quick:
        return ClipSpec("gw", "libx264", ".mp4", 2, 192, 108, 15, 1.0)
    return ClipSpec("gw", "libx264", ".mp4", 10, 640, 360, 30, 1.0)


def scenario_clips(quick: bool, workdir: str | os.PathLike | None = None, num_queries: int = 3) -> ScenarioClips:
    """Five support clips and ``num_queries`` query clips, generated once into ``workdir``
    (default :func:`default_workdir` ``("gateway")``) and read back as bytes.

    Clip k runs at ``fps - k`` frames a second (30, 29, ... in a full run), so each shows the scene
    panning at its own speed: different content and bytes, similar decode cost."""
    directory = Path(workdir) if workdir else default_workdir("gateway")
    base = clip_spec(quick)
    count = len(LABELS) + num_queries
    if not 0 < num_queries <= base.fps // 2:
        raise ValueError(f"num_queries must be 1..{base.fps // 2}, got {num_queries}")
    clips = []
    for k in range(count):
        kind = "support" if k < len(LABELS) else "query"
        spec = ClipSpec(f"{base.name}_{kind}{k}_{base.fps - k}fps", base.codec, base.suffix, base.seconds,
                        base.width, base.height, base.fps - k, base.keyframe_s)
        clips.append(make_clip(spec, directory).read_bytes())
    return ScenarioClips(support=clips[:len(LABELS)], queries=clips[len(LABELS):], spec=base)


def retagged(data: bytes, tag: str) -> bytes:
    """The same video with ``tag`` in its container metadata (``comment``): identical packets, so
    the same decode cost, but other bytes (another sha256). Remuxed, not re-encoded (milliseconds)."""
    output_buffer = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(output_buffer, "w", format="mp4") as output:
        in_stream = source.streams.video[0]
        out_stream = output.add_stream_from_template(in_stream)
        output.metadata["comment"] = tag
        for packet in source.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            output.mux(packet)
    return output_buffer.getvalue()


# ----------------------------------------------------------------------------------- the gateway
AUTO = "auto"
WARMUP = 3


def default_backbone(quick: bool) -> str:
    """``fsar-tiny`` (64 px) for a quick run, ``ViT-B-32`` (224 px) for a full one."""
    return "fsar-tiny" if quick else "ViT-B-32"


def local_redis_url(db: int = 12) -> str | None:
    """``redis://127.0.0.1:6379/<db>`` when a Redis answers there, else None."""
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            client.ping()
        finally:
            client.close()
        return f"redis://127.0.0.1:6379/{db}"
    except Exception:  # no redis package, nothing listening, or a Redis that refuses us
        return None


def resolve_redis(redis_url: str | None) -> str | None:
    """``"auto"``: the local Redis (db 12) when one answers, else None (in-process store)."""
    return local_redis_url() if redis_url == AUTO else redis_url


def gateway_settings(backbone: str, *, redis_url: str | None, **overrides: Any):
    """Settings for a benchmark gateway: ``backbone`` with random weights (``pretrained=None``,
    seed 0, demo mode), 8 frames, warnings-only logs and this run's own Redis prefix (the port is
    picked by :func:`running_gateway`)."""
    from service.settings import Settings

    values = dict(backbone=backbone, pretrained=None, num_frames=NUM_FRAMES, demo=True, log_level="warning",
                  redis_url=redis_url, redis_prefix=f"fsarbench:{uuid.uuid4().hex[:12]}:")
    values.update(overrides)
    return Settings(**values)


@dataclass(frozen=True)
class GatewayBench:
    """What a gateway benchmark run starts from: the machine facts (taken first), the clips and the
    gateway's settings."""

    machine: dict[str, Any]
    clips: ScenarioClips
    settings: Any


def prepare_gateway_bench(quick: bool, workdir: str | os.PathLike | None, backbone: str,
                          redis_url: str | None, **overrides: Any) -> GatewayBench:
    """:func:`machine_info`, then :func:`scenario_clips` and :func:`gateway_settings` (``redis_url``
    through :func:`resolve_redis`)."""
    machine = machine_info()
    clips = scenario_clips(quick, workdir)
    return GatewayBench(machine, clips, gateway_settings(backbone, redis_url=resolve_redis(redis_url), **overrides))


@contextmanager
def running_gateway(settings: Any, ready_timeout_s: float = 300.0) -> Iterator[LiveGateway]:
    """``settings`` served by a :class:`service.harness.LiveGateway` (one uvicorn worker on a free
    loopback port, log in a temporary file); Redis keys under the settings' prefix are deleted after."""
    try:
        with LiveGateway(settings, ready_timeout_s=ready_timeout_s) as gateway:
            yield gateway
    finally:
        if settings.redis_url:
            delete_redis_prefix(settings.redis_url, settings.redis_prefix)


def add_gateway_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options every gateway benchmark takes: ``--quick``, ``--json``, ``--backbone``,
    ``--workdir`` and ``--redis-url`` (read it with :func:`redis_url_argument`)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", dest="json_path", help="write the report here")
    parser.add_argument("--backbone", help="open_clip model (default: fsar-tiny quick, ViT-B-32 full)")
    parser.add_argument("--workdir", help="where generated clips are cached")
    parser.add_argument("--redis-url", default=AUTO,
                        help="gateway store: 'auto' (local Redis if any), a URL, or 'none'")


def redis_url_argument(value: str) -> str | None:
    """``--redis-url``: ``none`` (any case) is None, the in-process store."""
    return None if value.lower() == "none" else value


# ----------------------------------------------------------------------------------------- metrics
def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> ``{(sample name, frozenset(label items)): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = float(sample.value)
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent), e.g. ``sample(s, "fsar_backend_calls_total", op="classify")``."""
    return samples.get((name, frozenset(labels.items())), 0.0)


STAGES = ("decode", "encode", "match", "store")
COUNTERS = {
    "support_videos_encoded": ("fsar_videos_encoded_total", {"branch": "support"}),
    "query_videos_encoded": ("fsar_videos_encoded_total", {"branch": "query"}),
    "encode_videos_calls": ("fsar_backend_calls_total", {"op": "encode_videos"}),
    "build_prototypes_calls": ("fsar_backend_calls_total", {"op": "build_prototypes"}),
    "classify_calls": ("fsar_backend_calls_total", {"op": "classify"}),
    "query_cache_hits": ("fsar_cache_requests_total", {"cache": "query", "result": "hit"}),
    "query_cache_misses": ("fsar_cache_requests_total", {"cache": "query", "result": "miss"}),
    "support_cache_hits": ("fsar_cache_requests_total", {"cache": "support", "result": "hit"}),
    "prototype_cache_hits": ("fsar_cache_requests_total", {"cache": "prototypes", "result": "hit"}),
}


def stage_deltas(before: Samples, after: Samples, requests: int) -> dict[str, float | None]:
    """What happened between two scrapes: ``<stage>_ms`` = the stage's added seconds per request
    (ms), ``server_ms`` = mean server-side ``/classify`` duration, and the counters of
    :data:`COUNTERS` (support/query videos encoded, backend calls, cache hits and misses)."""
    out: dict[str, float | None] = {}
    for stage in STAGES:
        added = (sample(after, "fsar_stage_duration_seconds_sum", stage=stage)
                 - sample(before, "fsar_stage_duration_seconds_sum", stage=stage))
        out[f"{stage}_ms"] = round(added * 1000.0 / requests, 2) if requests else None
    route = dict(method="POST", route="/classify")
    server_sum = (sample(after, "fsar_http_request_duration_seconds_sum", **route)
                  - sample(before, "fsar_http_request_duration_seconds_sum", **route))
    server_count = (sample(after, "fsar_http_request_duration_seconds_count", **route)
                    - sample(before, "fsar_http_request_duration_seconds_count", **route))
    out["server_ms"] = round(server_sum * 1000.0 / server_count, 2) if server_count else None
    for key, (name, labels) in COUNTERS.items():
        out[key] = int(sample(after, name, **labels) - sample(before, name, **labels))
    return out


# ------------------------------------------------------------------------------------ HTTP calls
class BenchRequestError(RuntimeError):
    """The gateway answered a benchmark request with an error status."""


async def register_support_set(client: Any, videos: Sequence[bytes], labels: Sequence[str] = LABELS
                               ) -> tuple[str, float]:
    """``POST /support-sets`` with one video per label; the new set's id and the request's seconds."""
    files = [("videos", (f"support{i}.mp4", data, "video/mp4")) for i, data in enumerate(videos)]
    start = time.perf_counter()
    response = await client.post("/support-sets", files=files, data={"labels": list(labels)})
    seconds = time.perf_counter() - start
    if response.status_code != 201:
        raise BenchRequestError(f"POST /support-sets -> {response.status_code}: {response.text[:500]}")
    return response.json()["id"], seconds


async def classify(client: Any, video: bytes, support_set_id: str) -> tuple[dict[str, Any], float]:
    """``POST /classify`` (few-shot); the response body and the request's seconds (client side)."""
    start = time.perf_counter()
    response = await client.post("/classify", files=[("video", ("query.mp4", video, "video/mp4"))],
                                 data={"support_set_id": support_set_id})
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise BenchRequestError(f"POST /classify -> {response.status_code}: {response.text[:500]}")
    return response.json(), seconds


async def scrape(client: Any) -> Samples:
    """The gateway's ``GET /metrics``, parsed."""
    response = await client.get("/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)
