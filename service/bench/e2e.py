"""Benchmark: the gateway end to end over HTTP against the naive pipeline, same run, same model.

The gateway runs as a real uvicorn process on 127.0.0.1 (``service.server.serve``, embedded
backend with its default encoder runtime: ``runtime=auto``, ONNX Runtime fp32 on a CPU when installed,
recorded in ``settings.runtime``; random weights, seed 0, 8 frames; Redis on 127.0.0.1:6379 db 12 under this run's own key
prefix when one answers, else the in-process store). A 5-way 1-shot support set is registered once
(five generated H.264 clips, see ``service.bench.common.scenario_clips``), then ``/classify`` is driven by
an httpx ``AsyncClient`` at each concurrency (1, 4, 16: that many requests in flight at all times):

- ``gateway``: every request sends other bytes (a retagged copy of one of three query clips:
  same packets, other sha256), so nothing is answered from the query-feature cache;
- ``gateway (repeated query)``: the same bytes every time (the query cache answers; warmed first);
- ``naive``: the pipeline a user would otherwise script, in this process with a thread pool of the
  same size: for every request decode EVERY frame of the query and of the five support clips with
  PyAV (threaded decoding; only the 8 frames at the centres of 8 equal segments are converted to
  RGB, with the gateway's own resize/crop), encode the five label texts, the five support videos
  (one batch) and the query with torch eager, build prototypes and classify, with no cache. Same model: built like
  the embedded backend (same config and seed); its fingerprint is checked against ``GET /model``.

Per row: p50/p95/mean client latency, throughput (requests / wall time of the level), the stage
times the gateway itself recorded (``/metrics`` histograms, ms per request: decode, encode, match,
store; ``server_ms`` is its mean ``/classify`` duration), gateway overhead = client latency minus the
request's own ``timings_ms`` decode + encode + match (p50, per request), and the backend counters
added during the level (support videos encoded must stay 0: classify never re-encodes the set).
``speedup_vs_baseline`` = throughput / naive throughput at the same concurrency;
``p50_speedup_vs_baseline`` = naive p50 latency / p50 latency; ``cpu_ms_per_request`` is the CPU
time the gateway (server process and decode workers) or the naive pipeline (this process) used per
request, and ``cpu_speedup_vs_baseline`` its ratio: unlike wall time, it hardly moves when other jobs
share the machine. Each level runs the gateway rows
and then the naive row, level after level, so drifts in machine load hit both sides.
``baseline_agrees_with_gateway`` is the share of requests where both gave the same top label.

JSON: ``{"machine", "quick", "settings", "clips", "gateway_startup_s", "gateway_memory",
"registration", "baseline": [row], "results": [row], "baseline_agrees_with_gateway",
"support_reencoded_during_classify", "targets"}``; ``targets`` holds each target's ``value``,
``target`` and ``met``.

Run: ``python -m service.bench.e2e [--quick] [--json out.json] [--backbone NAME] [--concurrency 1 4 16]
[--requests N] [--workdir DIR] [--redis-url URL|none] [--gateway-setting NAME=VALUE ...]``;
``python -m service.bench.e2e --memory [--json out.json]`` runs :func:`upload_memory` instead.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import av
import numpy as np

from service.bench import common
from service.bench.common import LABELS, NUM_FRAMES, WARMUP, classify, retagged, scrape, stage_deltas
from service.harness import LiveGateway

CONCURRENCY = (1, 4, 16)
TARGET_SPEEDUP_C4 = 12.0  # issue 18: with the encoders on ONNX Runtime (was 5 on torch eager)
TARGET_OVERHEAD_P50_MS = 10.0


def requests_per_level(concurrency: int, quick: bool) -> int:
    """Requests timed at one concurrency: ``concurrency``, and at least 8 (quick: 3)."""
    return max(3 if quick else 8, concurrency)


# ------------------------------------------------------------------------------- naive pipeline
def naive_decode(data: bytes, num_frames: int, size: int) -> np.ndarray:
    """Decode every frame of a video, keep the ``num_frames`` at the centres of equal segments:
    uint8 ``[T, size, size, 3]``. Frame count from the stream header (what a script would read)."""
    from training.video import frame_to_square

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        total = stream.frames
        if total <= 0:
            raise ValueError("the naive baseline needs a frame count in the stream header")
        wanted = {((2 * k + 1) * total) // (2 * num_frames): k for k in range(num_frames)}
        picked: list[np.ndarray | None] = [None] * num_frames
        aspect = stream.codec_context.sample_aspect_ratio
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                picked[wanted[index]] = frame_to_square(frame, size, aspect)
    if any(frame is None for frame in picked):
        raise ValueError("the video has fewer frames than its header says")
    return np.stack(picked)


class NaivePipeline:
    """The model built exactly as the embedded backend builds it (``backbone``, random weights,
    ``seed``, 8 frames), used the naive way: everything decoded and encoded on every request."""

    def __init__(self, backbone: str, seed: int = 0, num_frames: int = NUM_FRAMES) -> None:
        import torch

        from training.model import ModelConfig, build_model

        config = ModelConfig(backbone=backbone, pretrained=None, num_frames=num_frames)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(config).eval()
        self.size = int(self.model.image_size[0])
        self.num_frames = num_frames

    @property
    def fingerprint(self) -> str:
        return str(self.model.describe()["fingerprint"])

    def classify(self, support: Sequence[bytes], labels: Sequence[str], query: bytes) -> str:
        """The predicted label of ``query`` against one support video per label."""
        import torch

        # [N, T, S, S, 3] and [1, T, S, S, 3]
        support_clips = np.stack([naive_decode(data, self.num_frames, self.size) for data in support])
        query_clip = naive_decode(query, self.num_frames, self.size)[None]
        with torch.inference_mode():
            text_feats = self.model.encode_text(list(labels))  # [N, D]
            support_feats = self.model.encode_video(support_clips, texts=text_feats)  # [N, T, D]
            prototypes = self.model.build_prototypes(support_feats, torch.arange(len(labels)), text_feats)
            query_feats = self.model.encode_video(query_clip)  # [1, T, D]
            logits = self.model.classify(query_feats, prototypes, text_feats)  # [1, N]
        return labels[int(logits.argmax())]


def run_naive(pipeline: NaivePipeline, support: Sequence[bytes], queries: Sequence[bytes],
              concurrency: int) -> tuple[list[float], float, list[str], float]:
    """Every query through the naive pipeline with ``concurrency`` threads: per-request seconds,
    wall seconds, predicted labels, and the CPU seconds this process used meanwhile."""
    def one(query: bytes) -> tuple[float, str]:
        start = time.perf_counter()
        label = pipeline.classify(support, LABELS, query)
        return time.perf_counter() - start, label

    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="naive") as pool:
        results = list(pool.map(one, queries))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return [seconds for seconds, _ in results], wall, [label for _, label in results], cpu


# ------------------------------------------------------------------------------------- gateway
async def drive(client: Any, queries: Sequence[bytes], support_set_id: str, concurrency: int
                ) -> tuple[list[tuple[dict, float]], float]:
    """Send every query to ``/classify`` with ``concurrency`` requests in flight; the
    (response, client seconds) of each, in order, and the wall seconds."""
    results: list[tuple[dict, float] | None] = [None] * len(queries)
    next_index = iter(range(len(queries)))

    async def worker() -> None:
        for index in next_index:
            results[index] = await classify(client, queries[index], support_set_id)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [result for result in results if result is not None], time.perf_counter() - start


def gateway_row(name: str, concurrency: int, responses: list[tuple[dict, float]], wall: float, cpu: float,
                deltas: dict[str, Any]) -> dict[str, Any]:
    """One result row from a level's responses, the gateway's CPU seconds and the metrics it added."""
    latencies = [seconds for _, seconds in responses]
    overheads = [seconds * 1000.0 - sum(body["timings_ms"][k] for k in ("decode", "encode", "match"))
                 for body, seconds in responses]
    return {
        "row": name,
        "concurrency": concurrency,
        "requests": len(responses),
        **common.percentiles_ms(latencies),
        "throughput_rps": round(len(responses) / wall, 3),
        "cpu_ms_per_request": round(cpu * 1000.0 / len(responses), 1),
        **{key: deltas[key] for key in ("decode_ms", "encode_ms", "match_ms", "store_ms", "server_ms")},
        "overhead_p50_ms": round(float(np.percentile(overheads, 50)), 2),
        "overhead_p95_ms": round(float(np.percentile(overheads, 95)), 2),
        "query_cache_hits": sum(1 for body, _ in responses if body["query_cache_hit"]),
        "counters": {key: value for key, value in deltas.items() if not key.endswith("_ms")},
    }


async def _measure(gateway: LiveGateway, pipeline: NaivePipeline, clips, concurrency_levels: Sequence[int],
                   quick: bool, requests: int | None, repeated: bool, run_tag: str) -> dict[str, Any]:
    """Register the set and warm both sides up, then per level: the gateway with distinct queries,
    with a repeated query, and the naive pipeline (interleaved, so drifts in machine load hit all)."""
    import httpx

    connections = max(concurrency_levels) + 4
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=900, limits=limits) as client:
        model = (await client.get("/model")).json()
        if pipeline.fingerprint != model.get("model_fingerprint", model["fingerprint"]):  # int8 serves its own
            raise RuntimeError("the naive pipeline's model differs from the gateway's (fingerprints differ)")
        before_registration = await scrape(client)
        set_id, registration_s = await common.register_support_set(client, clips.support)
        after_registration = await scrape(client)
        registration = {"seconds": round(registration_s, 3),
                        **stage_deltas(before_registration, after_registration, 1)}
        # Warm-up (first calls allocate and initialise lazily): a few alone, then a few at once.
        warmup = [retagged(clips.queries[i % len(clips.queries)], f"{run_tag}-warmup{i}") for i in range(WARMUP * 2)]
        await drive(client, warmup[:WARMUP], set_id, 1)
        await drive(client, warmup[WARMUP:], set_id, min(WARMUP, max(concurrency_levels)))
        await asyncio.to_thread(run_naive, pipeline, clips.support, clips.queries[:WARMUP], 1)
        rows, baseline_rows, agree, compared = [], [], 0, 0
        for concurrency in concurrency_levels:
            count = requests or requests_per_level(concurrency, quick)
            bases = [i % len(clips.queries) for i in range(count)]
            queries = [retagged(clips.queries[b], f"{run_tag}-c{concurrency}-{i}") for i, b in enumerate(bases)]
            before, cpu = await scrape(client), gateway.cpu_seconds()
            responses, wall = await drive(client, queries, set_id, concurrency)
            cpu = gateway.cpu_seconds() - cpu
            deltas = stage_deltas(before, await scrape(client), count)
            rows.append(gateway_row("gateway", concurrency, responses, wall, cpu, deltas))
            gateway_labels = [body["predictions"][0]["label"] for body, _ in responses]
            if repeated:
                same = retagged(clips.queries[0], f"{run_tag}-c{concurrency}-repeated")
                await classify(client, same, set_id)  # the first one fills the cache
                before, cpu = await scrape(client), gateway.cpu_seconds()
                responses, wall = await drive(client, [same] * count, set_id, concurrency)
                cpu = gateway.cpu_seconds() - cpu
                deltas = stage_deltas(before, await scrape(client), count)
                rows.append(gateway_row("gateway (repeated query)", concurrency, responses, wall, cpu, deltas))
            latencies, wall, labels, cpu = await asyncio.to_thread(
                run_naive, pipeline, clips.support, [clips.queries[b] for b in bases], concurrency)
            baseline_rows.append({"row": "naive", "concurrency": concurrency, "requests": count,
                                  **common.percentiles_ms(latencies), "throughput_rps": round(count / wall, 3),
                                  "cpu_ms_per_request": round(cpu * 1000.0 / count, 1)})
            compared += count
            agree += sum(ours == theirs for ours, theirs in zip(gateway_labels, labels, strict=True))
    return {"model": model, "registration": registration, "rows": rows, "baseline": baseline_rows,
            "agreement": round(agree / compared, 3)}


# ----------------------------------------------------------------------------------------- run
def run(quick: bool = False, json_path: str | None = None, *, backbone: str | None = None,
        concurrency: Sequence[int] = CONCURRENCY, requests: int | None = None, workdir: str | None = None,
        redis_url: str | None = common.AUTO, repeated: bool = True, gateway: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table, write the JSON report when ``json_path`` is given.

    Args:
        quick: tiny clips (2 s 192x108), fewer requests, ``fsar-tiny`` by default (under a minute).
        json_path: where to write the report.
        backbone: open_clip model name (default :func:`default_backbone`).
        concurrency: requests in flight, one level each.
        requests: requests per level (default :func:`requests_per_level`).
        workdir: where generated clips are cached (default ``~/.cache/fsar/bench-gateway``).
        redis_url: the gateway's Redis (``"auto"``: the local one if it answers; None: in-process store).
        repeated: also time the same query bytes over and over (query cache hits).
        gateway: other gateway settings (``service.settings.Settings`` fields), e.g.
            ``{"encode_concurrency": 2}``; recorded in the report.

    Returns:
        The report (see the module docstring).
    """
    backbone = backbone or common.default_backbone(quick)
    concurrency = [int(c) for c in concurrency]
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency levels must be >= 1, got {concurrency}")
    overrides = dict(gateway or {})
    bench = common.prepare_gateway_bench(quick, workdir, backbone, redis_url, **overrides)
    machine, clips, settings = bench.machine, bench.clips, bench.settings
    pipeline = NaivePipeline(backbone, seed=settings.seed)
    with common.running_gateway(settings) as server:
        measured = asyncio.run(_measure(server, pipeline, clips, concurrency, quick, requests, repeated,
                                        f"e2e-{time.time_ns()}"))
        memory = server.memory()
    machine["load_avg_end"] = [round(value, 2) for value in os.getloadavg()]
    rows, baseline_rows = measured["rows"], measured["baseline"]
    baseline_by_level = {row["concurrency"]: row for row in baseline_rows}
    for row in rows:
        base = baseline_by_level[row["concurrency"]]
        row["speedup_vs_baseline"] = common.ratio(row["throughput_rps"], base["throughput_rps"])
        row["p50_speedup_vs_baseline"] = common.ratio(base["p50_ms"], row["p50_ms"])
        row["cpu_speedup_vs_baseline"] = common.ratio(base["cpu_ms_per_request"], row["cpu_ms_per_request"])
    reencoded = sum(row["counters"]["support_videos_encoded"] for row in rows)
    report = {
        "machine": machine,
        "quick": quick,
        "settings": {"backbone": backbone, "num_frames": NUM_FRAMES, "input_size": measured["model"]["input_size"],
                     "store": "redis" if settings.redis_url else "memory",
                     "decode_concurrency": settings.decode_concurrency,
                     "encode_concurrency": measured["model"].get("encode_concurrency", settings.encode_concurrency),
                     "threads_per_model_call": measured["model"].get("threads_per_call"),
                     "runtime": measured["model"].get("runtime"), "precision": measured["model"].get("precision"),
                     "overrides": overrides, "torch_threads_naive": _torch_threads(),
                     "fingerprint": measured["model"]["fingerprint"]},
        "clips": clips.describe(),
        "gateway_startup_s": round(server.startup_s or 0.0, 2),
        "gateway_memory": memory,
        "registration": measured["registration"],
        "baseline": baseline_rows,
        "results": rows,
        "baseline_agrees_with_gateway": measured["agreement"],
        "support_reencoded_during_classify": reencoded,
        "targets": _targets(rows, reencoded),
    }
    print(format_report(report))
    common.write_report(json_path, report)
    return report


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _targets(rows: list[dict[str, Any]], reencoded: int) -> dict[str, dict[str, Any]]:
    distinct = {row["concurrency"]: row for row in rows if row["row"] == "gateway"}
    targets: dict[str, dict[str, Any]] = {}
    if 4 in distinct:
        value = distinct[4]["speedup_vs_baseline"]
        targets["throughput_c4_speedup"] = {"value": value, "target": f">= {TARGET_SPEEDUP_C4:g}",
                                            "met": value is not None and value >= TARGET_SPEEDUP_C4}
    if 1 in distinct:
        value = distinct[1]["overhead_p50_ms"]
        targets["overhead_p50_ms_c1"] = {"value": value, "target": f"<= {TARGET_OVERHEAD_P50_MS:g}",
                                         "met": value <= TARGET_OVERHEAD_P50_MS}
    targets["support_videos_encoded_during_classify"] = {"value": reencoded, "target": "== 0", "met": reencoded == 0}
    return targets


COLUMNS = [("row", "row", ""), ("conc", "concurrency", ""), ("req", "requests", ""), ("p50_ms", "p50_ms", ".1f"),
           ("p95_ms", "p95_ms", ".1f"), ("req/s", "throughput_rps", ".2f"), ("speedup", "speedup_vs_baseline", ".2f"),
           ("p50_speedup", "p50_speedup_vs_baseline", ".2f"), ("cpu_ms/req", "cpu_ms_per_request", ".0f"),
           ("cpu_speedup", "cpu_speedup_vs_baseline", ".2f"), ("decode_ms", "decode_ms", ".1f"),
           ("encode_ms", "encode_ms", ".1f"), ("match_ms", "match_ms", ".1f"), ("store_ms", "store_ms", ".1f"),
           ("overhead_p50_ms", "overhead_p50_ms", ".1f"), ("support_enc", "support_videos_encoded", "")]


def format_report(report: dict[str, Any]) -> str:
    """The results and baseline rows as one table, then the registration and the targets."""
    ordered = []
    for level in sorted({row["concurrency"] for row in report["results"]}):
        ordered += [dict(row, **row.get("counters", {})) for row in report["results"] if row["concurrency"] == level]
        ordered += [row for row in report["baseline"] if row["concurrency"] == level]
    reg = report["registration"]
    lines = [common.format_table(ordered, COLUMNS), "",
             f"registration of 5 support videos: {reg['seconds'] * 1000:.0f} ms, "
             f"support videos encoded {reg['support_videos_encoded']}",
             f"support videos encoded while classifying (all levels): {report['support_reencoded_during_classify']}",
             f"naive baseline agrees with the gateway's top label: {report['baseline_agrees_with_gateway']}"]
    for name, target in report["targets"].items():
        lines.append(f"target {name}: {target['value']} (want {target['target']}) -> "
                     f"{'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_gateway_arguments(parser, "tiny clips, fsar-tiny, few requests (under a minute)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--requests", type=int, help="requests per concurrency level")
    parser.add_argument("--no-repeated", dest="repeated", action="store_false", help="skip the repeated-query rows")
    parser.add_argument("--gateway-setting", dest="gateway", action="append", default=[], metavar="NAME=VALUE",
                        help="another gateway setting, e.g. encode_concurrency=2 (repeatable)")
    parser.add_argument("--memory", action="store_true",
                        help="instead: gateway RSS under 16 concurrent 50 MB uploads (see upload_memory)")
    args = parser.parse_args(argv)
    if args.memory:
        upload_memory(json_path=args.json_path, workdir=args.workdir)
        return
    gateway = dict(item.split("=", 1) for item in args.gateway)
    run(quick=args.quick, json_path=args.json_path, backbone=args.backbone, concurrency=args.concurrency,
        requests=args.requests, workdir=args.workdir, redis_url=common.redis_url_argument(args.redis_url),
        repeated=args.repeated, gateway=gateway)



# ------------------------------------------------------------------------------ upload memory
class PaddedUpload(io.RawIOBase):
    """A valid MP4 of exactly ``total_bytes``: a real clip followed by a top-level ``free`` box of
    zeros (players and FFmpeg skip it). Read-only and seekable; the padding is produced while
    reading, so a 50 MB upload costs the client no memory or disk."""

    def __init__(self, clip: bytes, total_bytes: int) -> None:
        super().__init__()
        pad = total_bytes - len(clip)
        if pad < 8 or pad >= 2 ** 32:
            raise ValueError(f"cannot pad a {len(clip)}-byte clip to {total_bytes} bytes with one box")
        self._head = clip + pad.to_bytes(4, "big") + b"free"
        self.total_bytes = total_bytes
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.total_bytes}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self.total_bytes - self._position))
        from_head = max(0, min(count, len(self._head) - self._position))
        if from_head:
            view[:from_head] = self._head[self._position:self._position + from_head]
        view[from_head:count] = bytes(count - from_head)
        self._position += count
        return count


def upload_memory(uploads: int = 16, upload_mb: float = 50.0, *, backbone: str = "fsar-tiny",
                  workdir: str | None = None, json_path: str | None = None, **settings: Any) -> dict[str, Any]:
    """Gateway RSS while ``uploads`` clients each send one ``upload_mb`` MB video to ``/classify``
    (zero-shot, two labels) at the same time.

    Every upload is a real 2 s H.264 clip (retagged: distinct bytes) padded to ``upload_mb`` MB
    (:class:`PaddedUpload`). The gateway is a real uvicorn process (in-process store; ``settings``
    overrides any gateway setting). Memory counts the server process and its children (decode
    workers): RSS (``VmRSS``) before the uploads, the summed peaks (``VmHWM``, restarted after
    start-up: an upper bound of the tree's peak) after, and the summed RSS sampled every 50 ms while
    the uploads run (a lower bound).

    Returns:
        ``{"uploads", "upload_bytes", "statuses", "idle_rss_bytes", "peak_rss_bytes",
        "peak_sampled_rss_bytes", "peak_over_idle_bytes", "rss_after_bytes", "processes", "seconds",
        "machine"}``.
    """
    import httpx

    clip = common.scenario_clips(True, workdir, num_queries=1).queries[0]
    total_bytes = int(upload_mb * 1024 * 1024)
    gateway_config = common.gateway_settings(backbone, redis_url=None, **settings)
    with common.running_gateway(gateway_config) as gateway:
        tag = f"memory-{time.time_ns()}"
        with httpx.Client(base_url=gateway.url, timeout=120) as client:  # load the text encoder once
            client.post("/classify", files=[("video", ("warm.mp4", retagged(clip, tag), "video/mp4"))],
                        data={"labels": ["wave hand", "stand up"]}).raise_for_status()
        idle = gateway.memory()
        gateway.reset_peak()
        samples: list[int] = []

        async def send_all() -> list[int]:
            async def one(i: int) -> int:
                body = PaddedUpload(retagged(clip, f"{tag}-{i}"), total_bytes)
                response = await client.post("/classify", files=[("video", (f"big{i}.mp4", body, "video/mp4"))],
                                             data={"labels": ["wave hand", "stand up"]})
                return response.status_code

            async def sample_rss() -> None:
                while True:
                    samples.append(gateway.memory()["rss_bytes"])
                    await asyncio.sleep(0.05)

            limits = httpx.Limits(max_connections=uploads + 2)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=300, limits=limits) as client:
                sampler = asyncio.ensure_future(sample_rss())
                try:
                    return list(await asyncio.gather(*(one(i) for i in range(uploads))))
                finally:
                    sampler.cancel()

        start = time.perf_counter()
        statuses = asyncio.run(send_all())
        seconds = time.perf_counter() - start
        after = gateway.memory()
    report = {
        "uploads": uploads,
        "upload_bytes": total_bytes,
        "statuses": statuses,
        "idle_rss_bytes": idle["rss_bytes"],
        "peak_rss_bytes": after["peak_rss_bytes"],
        "peak_sampled_rss_bytes": max(samples, default=0),
        "peak_over_idle_bytes": after["peak_rss_bytes"] - idle["rss_bytes"],
        "rss_after_bytes": after["rss_bytes"],
        "processes": after["processes"],
        "seconds": round(seconds, 2),
        "machine": common.machine_info(),
    }
    mb = 1024 * 1024
    print(f"{uploads} concurrent uploads of {total_bytes / mb:.0f} MB to /classify in {seconds:.1f} s: "
          f"statuses {sorted(set(statuses))}; gateway RSS ({after['processes']} processes) idle "
          f"{idle['rss_bytes'] / mb:.0f} MB, peak {after['peak_rss_bytes'] / mb:.0f} MB "
          f"(+{report['peak_over_idle_bytes'] / mb:.0f} MB; "
          f"sampled peak {report['peak_sampled_rss_bytes'] / mb:.0f} MB)")
    common.write_report(json_path, report)
    return report


if __name__ == "__main__":
    main()
