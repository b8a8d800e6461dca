"""Benchmark: videos/s of the gateway's decode pool with every CPU core busy, exact sampling
against keyframe mode, and against decoding every frame through the same pool, same run.

On a GPU host the encoder is fast (about 1,250 videos/s for eager ViT-B/16 on one H100, docs/performance.md)
and decoding runs on the host's CPU cores, so decode throughput with all cores busy is what bounds
the service. This benchmark measures it with the gateway's own machinery:

- the pool: ``service.core.create_decode_pool`` (``ProcessDecodePool``, one worker process per
  core by default, the gateway's hard timeout), the jobs as ``FsarService.decode`` sends an HTTP
  upload (which the gateway has stored as a file): ``decode_file(path, num_frames=8, size=224,
  mode="test", limits=...)``, the worker opening the file, with the gateway's default
  ``DecodeLimits``; ``FSAR_*`` variables are ignored, so runs compare;
- the clips (generated once with ``service.bench.decode.make_clip`` into ``workdir``): 10 s 1280x720
  30 fps H.264 (mp4, x264 ``veryfast``), 8 distinct files (scene seeds 1-8) per keyframe
  spacing: ``h264_gop2s`` (a keyframe every 2 s, like much phone and web video) and
  ``h264_gop10s`` (one keyframe in the clip). Quick run: 2 files per spacing, 192x108 15 fps;
- rows per clip set and worker count (1 and ``--workers``, default ``os.cpu_count()``):
  ``decode-all`` (the baseline: ``service.bench.decode.naive_sample``, every frame decoded, the 8 target
  frames converted; handed the target timestamps for free), ``exact`` (``decode_file`` as the
  gateway calls it) and ``keyframes`` (``fast=True``);
- a round submits every file at once (repeated until there are at least 4 jobs per worker, so the
  pool never idles waiting for the last job of a short batch) and times it from the first
  submission to the last result; rounds interleave every row, so load drifts hit all alike; the
  figures are medians over rounds. A warm-up round first checks each job's frames: ``exact`` and
  ``keyframes`` against ``decode_clip`` run in this process, ``decode-all`` against exact.

Each decoder uses FFmpeg's frame and slice threads (``thread_type="AUTO"``, as in the gateway),
so one worker alone can use more than one core: the per-worker figure that scales to a host with
more cores is the one measured with every worker busy; ``cpu_ms_per_video`` is the cost in CPU
time (worker processes plus this process, which plays the gateway's part).

The JSON file holds ``{"machine", "quick", "num_frames", "size", "workers", "rounds", "clips",
"encoder", "results", "encoder_comparison", "pool_restarts"}``. Each row of ``results`` has
``clip``, ``row``, ``workers``, ``videos_per_round``, ``videos_per_s``,
``videos_per_s_per_worker``, ``baseline_videos_per_s``, ``speedup_vs_baseline`` (videos/s over
the ``decode-all`` row's, same clips and workers), ``cpu_ms_per_video``,
``worker_cpu_ms_per_video``, ``baseline_cpu_ms_per_video``, ``scaling_vs_one_worker``,
``frames_match``, ``round_s`` (median) and the clips' ``codec``, ``resolution``, ``duration_s``,
``keyframe_interval_s``. ``encoder_comparison`` sets each mode's videos/s with every worker busy
against ``--encoder-videos-per-s``: ``bound`` (the slower side), ``ratio`` (how many times
slower), ``workers_to_match_encoder`` (workers like these that would keep up, by linear
scaling of the per-worker videos/s) and ``cores_to_match_encoder`` (encoder videos/s x CPU
seconds per video: the same question answered from CPU time, which other load on the machine
skews less). The encoder figure is an input, not measured here. ``machine`` has the CPU model,
core count and the load average at start and end: other work on the machine skews wall times.

Run: ``fsar bench decode-pool [--quick] [--json out.json] [--workers N] [--workdir DIR]
[--encoder-videos-per-s X]`` or ``python -m service.bench.decode_pool`` with the same options.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.bench.common import cpu_model, default_workdir, format_table, ratio, write_report
from service.bench.decode import NUM_FRAMES, SIZE, ClipSpec, exact_target_pts, machine_info, make_clip, naive_sample
from service.harness import process_tree_cpu_seconds
from service.decode_pool import decode_file
from training.video import DecodeLimits, decode_clip

BASELINE = "decode-all"
MODES = (BASELINE, "exact", "keyframes")
#: Eager ViT-B/16 fp16 on one H100, batch 8-32, 8 frames at 224 px (docs/performance.md): 1,240-1,257 videos/s.
DEFAULT_ENCODER_VIDEOS_PER_S = 1250.0
ENCODER_SOURCE = ("eager ViT-B/16 fp16 on one H100, 8 frames at 224 px, batch 8-32 (docs/performance.md); "
                  "an input of this benchmark, not measured here")
JOBS_PER_WORKER = 4


class BenchArgumentError(ValueError):
    """A bad option; its message is the whole story (the CLI prints it on one line)."""


@dataclass(frozen=True)
class Video:
    """One benchmark file: its path (what a decode job gets, as for a stored upload), its bytes
    (for the in-process reference decode) and the pts of the frames exact sampling returns (what
    the baseline is handed for free)."""

    path: Path
    data: bytes
    target_pts: list[int]


@dataclass(frozen=True)
class ClipSet:
    """Distinct files of one shape and keyframe spacing."""

    name: str
    specs: tuple[ClipSpec, ...]

    def describe(self, videos: Sequence[Video]) -> dict[str, Any]:
        spec = self.specs[0]
        mean_bytes = statistics.fmean(len(video.data) for video in videos)
        return {"clip": self.name, "files": len(videos), "codec": "h264", "x264_preset": spec.preset,
                "resolution": f"{spec.width}x{spec.height}", "duration_s": spec.seconds, "fps": spec.fps,
                "keyframe_interval_s": spec.keyframe_s, "mean_bytes": round(mean_bytes),
                "mean_mbit_per_s": round(mean_bytes * 8 / spec.seconds / 1e6, 2)}


def clip_sets(quick: bool) -> list[ClipSet]:
    """The clip sets of a full or quick run: same names and keyframe spacing, fewer and smaller
    files in quick."""
    width, height, fps, files = (192, 108, 15, 2) if quick else (1280, 720, 30, 8)
    return [ClipSet(f"h264_gop{keyframe_s:g}s",
                    tuple(ClipSpec(f"h264_gop{keyframe_s:g}s", "libx264", ".mp4", 10, width, height, fps,
                                   keyframe_s, seed=seed, preset="veryfast") for seed in range(1, files + 1)))
            for keyframe_s in (2.0, 10.0)]


def load_videos(clip_set: ClipSet, directory: Path) -> list[Video]:
    """Generate (or reuse) the set's files and read them back, with their exact target pts."""
    videos = []
    for number, spec in enumerate(clip_set.specs, 1):
        if not (directory / spec.file_name).exists():
            print(f"generating {spec.file_name} ({number}/{len(clip_set.specs)})", file=sys.stderr, flush=True)
        path = make_clip(spec, directory)
        videos.append(Video(path, path.read_bytes(), exact_target_pts(path)))
    return videos


# ------------------------------------------------------------------------------- the gateway's pool
def gateway_settings(workers: int) -> Any:
    """The gateway's default settings (no ``FSAR_*`` variables read) with ``workers`` decode
    worker processes."""
    from service.settings import Settings

    return Settings.model_construct(decode_concurrency=workers, decode_isolation="process")


def gateway_limits(settings: Any) -> DecodeLimits:
    """The ``DecodeLimits`` ``FsarService`` decodes uploads with under ``settings``."""
    from service.core import decode_limits

    return decode_limits(settings)


def create_pool(workers: int) -> Any:
    """The gateway's decode pool (``service.core.create_decode_pool``) with ``workers`` processes."""
    from service.core import create_decode_pool

    return create_decode_pool(gateway_settings(workers))


def job(mode: str, video: Video, limits: DecodeLimits) -> tuple[Callable[..., np.ndarray], tuple, dict]:
    """``(fn, args, kwargs)`` of one decode job of ``mode`` for the pool: the file's path travels,
    the worker reads the file, as for an upload the gateway stored."""
    if mode == BASELINE:
        return naive_sample, (str(video.path), video.target_pts, SIZE), {}
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kwargs: dict[str, Any] = dict(num_frames=NUM_FRAMES, size=SIZE, mode="test", limits=limits)
    if mode == "keyframes":
        kwargs["fast"] = True
    return decode_file, (str(video.path),), kwargs


def in_process_frames(mode: str, video: Video, limits: DecodeLimits) -> np.ndarray:
    """What a ``mode`` job must return, decoded here from the bytes: ``decode_clip`` (``fast`` for
    keyframes); decode-all picks the exact frames."""
    return decode_clip(video.data, num_frames=NUM_FRAMES, size=SIZE, mode="test", limits=limits,
                       fast=mode == "keyframes")


async def decode_through_pool(pool: Any, mode: str, videos: Sequence[Video], limits: DecodeLimits) -> list[np.ndarray]:
    """Every video's frames, all jobs submitted at once (the pool runs as many as it has workers
    and queues the rest, as under a burst of requests), in order."""
    calls = [job(mode, video, limits) for video in videos]
    return list(await asyncio.gather(*(pool.run(fn, *args, **kwargs) for fn, args, kwargs in calls)))


async def timed_batch(pool: Any, mode: str, videos: Sequence[Video], limits: DecodeLimits
                      ) -> tuple[float, float, float]:
    """Wall seconds of one batch, CPU seconds of this process and all its children (the decode
    workers), and CPU seconds of this process alone."""
    tree, own, wall = process_tree_cpu_seconds(os.getpid()), time.process_time(), time.perf_counter()
    await decode_through_pool(pool, mode, videos, limits)
    wall = time.perf_counter() - wall
    return wall, process_tree_cpu_seconds(os.getpid()) - tree, time.process_time() - own


def batch_for(videos: Sequence[Video], workers: int) -> list[Video]:
    """The jobs of one round: every video, repeated until each worker has ``JOBS_PER_WORKER``."""
    return list(videos) * max(1, math.ceil(JOBS_PER_WORKER * workers / len(videos)))


# ------------------------------------------------------------------------------------- measuring
Key = tuple[str, int, str]  # (clip set, workers, mode)


async def measure(sets: dict[str, list[Video]], worker_counts: Sequence[int], rounds: int
                  ) -> tuple[dict[Key, list[tuple[float, float, float]]], dict[Key, bool], dict[str, int]]:
    """Per (clip set, workers, mode): each round's ``timed_batch``; whether the warm-up's frames
    matched the in-process reference; restarts of the pools' workers (timeouts, crashes, recycling)."""
    limits = gateway_limits(gateway_settings(1))
    reference = {(name, mode): [in_process_frames(mode, video, limits) for video in videos]
                 for name, videos in sets.items() for mode in MODES if mode != BASELINE}
    for name in sets:
        reference[name, BASELINE] = reference[name, "exact"]
    pools: dict[int, Any] = {}
    samples: dict[Key, list[tuple[float, float, float]]] = {}
    matches: dict[Key, bool] = {}
    try:
        for workers in worker_counts:
            pools[workers] = create_pool(workers)
        for workers, pool in pools.items():  # warm-up (imports, first allocations) and the frame check
            for name, videos in sets.items():
                for mode in MODES:
                    frames = await decode_through_pool(pool, mode, videos, limits)
                    matches[name, workers, mode] = all(
                        np.array_equal(got, want) for got, want in zip(frames, reference[name, mode], strict=True))
        for _ in range(rounds):  # interleaved, so drifts in machine load hit every row alike
            for workers, pool in pools.items():
                for name, videos in sets.items():
                    batch = batch_for(videos, workers)
                    for mode in MODES:
                        samples.setdefault((name, workers, mode), []).append(
                            await timed_batch(pool, mode, batch, limits))
    finally:
        restarts: dict[str, int] = {}
        for pool in pools.values():
            for reason, count in pool.describe()["restarts"].items():
                restarts[reason] = restarts.get(reason, 0) + count
            await pool.close()
    return samples, matches, restarts


def summarise(samples: list[tuple[float, float, float]], videos: int) -> dict[str, float]:
    """Medians over rounds: videos/s (wall), CPU ms per video (all, and the workers' share), round s."""
    return {"videos_per_s": statistics.median(videos / wall for wall, _, _ in samples),
            "cpu_ms_per_video": statistics.median(cpu for _, cpu, _ in samples) * 1000 / videos,
            "worker_cpu_ms_per_video": statistics.median(cpu - own for _, cpu, own in samples) * 1000 / videos,
            "round_s": statistics.median(wall for wall, _, _ in samples)}


def build_rows(clip_sets_: Sequence[ClipSet], sets: dict[str, list[Video]], worker_counts: Sequence[int],
               samples: dict[Key, list[tuple[float, float, float]]], matches: dict[Key, bool]) -> list[dict]:
    """One row per clip set, worker count and mode, each against the baseline row of its set and
    worker count."""
    rows = []
    for clip_set in clip_sets_:
        name, spec, videos = clip_set.name, clip_set.specs[0], sets[clip_set.name]
        for workers in worker_counts:
            jobs = len(batch_for(videos, workers))
            base = summarise(samples[name, workers, BASELINE], jobs)
            for mode in MODES:
                figures = summarise(samples[name, workers, mode], jobs)
                one_worker = summarise(samples[name, worker_counts[0], mode],
                                       len(batch_for(videos, worker_counts[0])))["videos_per_s"]
                rows.append({
                    "clip": name,
                    "row": mode,
                    "workers": workers,
                    "videos_per_round": jobs,
                    "videos_per_s": round(figures["videos_per_s"], 2),
                    "videos_per_s_per_worker": round(figures["videos_per_s"] / workers, 2),
                    "baseline_videos_per_s": round(base["videos_per_s"], 2),
                    "speedup_vs_baseline": round(figures["videos_per_s"] / base["videos_per_s"], 2),
                    "cpu_ms_per_video": round(figures["cpu_ms_per_video"], 1),
                    "worker_cpu_ms_per_video": round(figures["worker_cpu_ms_per_video"], 1),
                    "baseline_cpu_ms_per_video": round(base["cpu_ms_per_video"], 1),
                    "scaling_vs_one_worker": round(figures["videos_per_s"] / one_worker, 2),
                    "frames_match": matches[name, workers, mode],
                    "round_s": round(figures["round_s"], 3),
                    "codec": "h264",
                    "resolution": f"{spec.width}x{spec.height}",
                    "duration_s": spec.seconds,
                    "keyframe_interval_s": spec.keyframe_s,
                })
    return rows


def encoder_comparison(rows: Sequence[dict], encoder_videos_per_s: float) -> list[dict]:
    """Each sampling mode with every worker busy against the encoder's videos/s: which side is
    slower (``bound``), by how much (``ratio``), and what would keep up with the encoder: workers
    like these at this run's per-worker rate (wall time, which other load on the machine lowers),
    and cores by CPU time per video (less sensitive to other load; cores like these)."""
    most = max(row["workers"] for row in rows)
    out = []
    for row in rows:
        if row["workers"] != most or row["row"] == BASELINE:
            continue
        decode = row["videos_per_s"]
        bound = "decode" if decode < encoder_videos_per_s else "encoder"
        out.append({
            "clip": row["clip"],
            "row": row["row"],
            "workers": most,
            "decode_videos_per_s": decode,
            "decode_videos_per_s_per_worker": row["videos_per_s_per_worker"],
            "encoder_videos_per_s": encoder_videos_per_s,
            "bound": bound,
            "ratio": ratio(max(decode, encoder_videos_per_s), min(decode, encoder_videos_per_s)),
            "workers_to_match_encoder": (math.ceil(encoder_videos_per_s * most / decode) if decode > 0 else None),
            "decode_cpu_ms_per_video": row["cpu_ms_per_video"],
            "cores_to_match_encoder": math.ceil(encoder_videos_per_s * row["cpu_ms_per_video"] / 1000),
        })
    return out


# ------------------------------------------------------------------------------------- reporting
COLUMNS = [("clip", "clip", ""), ("row", "row", ""), ("workers", "workers", "d"),
           ("videos/s", "videos_per_s", ".2f"), ("per worker", "videos_per_s_per_worker", ".2f"),
           ("baseline videos/s", "baseline_videos_per_s", ".2f"), ("speedup", "speedup_vs_baseline", ".2f"),
           ("cpu ms/video", "cpu_ms_per_video", ".1f"), ("worker cpu ms", "worker_cpu_ms_per_video", ".1f"),
           ("vs 1 worker", "scaling_vs_one_worker", ".2f"), ("match", "frames_match", "")]
COMPARISON_COLUMNS = [("clip", "clip", ""), ("mode", "row", ""), ("workers", "workers", "d"),
                      ("decode videos/s", "decode_videos_per_s", ".2f"),
                      ("encoder videos/s (input)", "encoder_videos_per_s", ".0f"), ("bound", "bound", ""),
                      ("ratio", "ratio", ".1f"), ("workers to match", "workers_to_match_encoder", "d"),
                      ("cpu ms/video", "decode_cpu_ms_per_video", ".1f"),
                      ("cores to match (cpu time)", "cores_to_match_encoder", "d")]


def format_report(report: dict) -> str:
    """The printed form of a report: both tables and what the encoder figure is."""
    encoder = report["encoder"]
    lines = [format_table(report["results"], COLUMNS), "",
             f"Decode against the GPU encoder ({encoder['videos_per_s']:g} videos/s: {encoder['source']}):",
             format_table(report["encoder_comparison"], COMPARISON_COLUMNS)]
    for entry in report["encoder_comparison"]:
        slower = "decoding" if entry["bound"] == "decode" else "the encoder"
        lines.append(f"  {entry['clip']} {entry['row']}: {slower} bounds, {entry['ratio']:.1f}x slower with "
                     f"{entry['workers']} workers; keeping up with the encoder takes about "
                     f"{entry['workers_to_match_encoder']} workers at this run's per-worker rate, or "
                     f"{entry['cores_to_match_encoder']} cores by CPU time per video.")
    machine = report["machine"]
    lines.append(f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores; load average "
                 f"{machine['load_avg_at_start']} at start, {machine['load_avg_at_end']} at end.")
    return "\n".join(lines)


def run(quick: bool = False, json_path: str | None = None, workdir: str | None = None, workers: int | None = None,
        encoder_videos_per_s: float = DEFAULT_ENCODER_VIDEOS_PER_S, rounds: int | None = None) -> dict:
    """Generate (or reuse) the clips, measure every row against the baseline through the gateway's
    decode pool with 1 and ``workers`` processes, print the tables, write the JSON file if
    ``json_path`` is given; returns the report."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise BenchArgumentError(f"workers must be a whole number >= 1, got {workers!r}")
    if not (encoder_videos_per_s > 0 and math.isfinite(encoder_videos_per_s)):
        raise BenchArgumentError(f"encoder videos/s must be a finite number > 0, got {encoder_videos_per_s!r}")
    rounds = rounds if rounds is not None else (2 if quick else 5)
    if rounds < 1:
        raise BenchArgumentError(f"rounds must be >= 1, got {rounds!r}")
    machine = machine_info()
    machine.update(cpu_model=cpu_model(), usable_cores=len(os.sched_getaffinity(0)),
                   date=_dt.date.today().isoformat())
    directory = Path(workdir) if workdir else default_workdir("decode-pool")
    chosen = clip_sets(quick)
    sets = {clip_set.name: load_videos(clip_set, directory) for clip_set in chosen}
    worker_counts = sorted({1, workers})
    samples, matches, restarts = asyncio.run(measure(sets, worker_counts, rounds))
    rows = build_rows(chosen, sets, worker_counts, samples, matches)
    machine["load_avg_at_end"] = [round(load, 2) for load in os.getloadavg()]
    report = {
        "machine": machine, "quick": quick, "num_frames": NUM_FRAMES, "size": SIZE,
        "workers": worker_counts, "rounds": rounds,
        "clips": [clip_set.describe(sets[clip_set.name]) for clip_set in chosen],
        "encoder": {"videos_per_s": encoder_videos_per_s, "measured": False, "source": ENCODER_SOURCE},
        "results": rows,
        "encoder_comparison": encoder_comparison(rows, encoder_videos_per_s),
        "pool_restarts": restarts,
    }
    write_report(json_path, report)
    print(format_report(report))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 tiny files per set, 2 rounds (seconds)")
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--workers", type=int, help="decode worker processes (default: os.cpu_count())")
    parser.add_argument("--workdir", help="where generated clips are cached (default ~/.cache/fsar/bench-decode-pool)")
    parser.add_argument("--encoder-videos-per-s", type=float, default=DEFAULT_ENCODER_VIDEOS_PER_S,
                        help="the GPU encoder's videos/s to compare against (an input, not measured)")
    args = parser.parse_args(argv)
    run(quick=args.quick, json_path=args.json_path, workdir=args.workdir, workers=args.workers,
        encoder_videos_per_s=args.encoder_videos_per_s)


if __name__ == "__main__":
    main()
