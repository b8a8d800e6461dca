"""Benchmark: sampling 8 frames with ``decode_clip`` against decoding every frame, same run.

Clips are generated with PyAV (a panning texture, moving blocks and light noise, so motion
estimation and residuals look like camera footage) and cached in ``workdir``:

| clip | full run | quick run |
| --- | --- | --- |
| ``h264_gop1s`` | 30 s 1280x720 30 fps H.264 (mp4), keyframe every 1 s | 10 s 320x180 |
| ``h264_gop10s`` | same, keyframe every 10 s | same, keyframe every 10 s |
| ``vp9_gop2s`` | 30 s 1280x720 30 fps VP9 (WebM), keyframe every 2 s | 10 s 320x180 |

Rows per clip (8 frames, 224 px, median of several interleaved repeats):

- ``exact/auto``: ``decode_clip`` as the gateway calls it (the planner picks seeks or one
  forward pass per file), plus ``exact/seek`` and ``exact/sequential`` with the strategy
  forced, to show what the planner chose between;
- ``keyframes``: ``decode_clip(fast=True)``, the keyframe nearest each sampling time.

The baseline (``baseline_ms``) decodes every frame of the file in one pass with the same
decoder settings (``thread_type="AUTO"``) and converts the 8 target frames with the same
resize/crop; it is handed the target timestamps for free (no index pass), so the speedups
are conservative. Exact rows are checked to return the very frames the baseline returns.

The JSON file holds ``{"machine": {...}, "quick": bool, "num_frames": 8, "size": 224,
"results": [row, ...]}``; each row has ``clip``, ``row``, ``ms``, ``baseline_ms``,
``speedup_vs_baseline`` (wall time), ``cpu_ms`` / ``baseline_cpu_ms`` (CPU time of all the
process's threads), ``seeks``, ``frames_passed`` (frames the decoder goes through, from
each seek or the start to each target, keyframes in the ``keyframes`` row; non-reference
frames among them are skipped, not decoded), ``video_frames``, ``frames_match`` and the
clip's ``codec``, ``resolution``, ``duration_s``, ``keyframe_interval_s``. ``machine`` has
the load average at start and end: other work on the machine skews wall times.

Run: ``python -m service.bench.decode [--quick] [--json out.json] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from training.video import DecodeLimits, decode_clip, frame_to_square
from training.video.index import open_indexed
from training.video.sampling import decoded_frame_count, plan_runs, sample_positions, seek_cost_for
from training.video.source import Deadline, VideoInput
from training.video.writer import write_video

NUM_FRAMES = 8
SIZE = 224


@dataclass(frozen=True)
class ClipSpec:
    """A generated benchmark clip."""

    name: str
    codec: str
    suffix: str
    seconds: float
    width: int
    height: int
    fps: int
    keyframe_s: float
    #: Seed of the synthetic scene: clips that differ only by seed show different textures, blocks
    #: and noise at the same decode cost (distinct files for pool benchmarks).
    seed: int = 0
    #: x264 preset (None: x264's default, medium). ``veryfast`` encodes 720p about 3x faster,
    #: which keeps generating a set of distinct clips within a benchmark's budget.
    preset: str | None = None

    @property
    def file_name(self) -> str:
        extras = (f"_seed{self.seed}" if self.seed else "") + (f"_{self.preset}" if self.preset else "")
        return f"{self.name}_{self.width}x{self.height}_{self.seconds:g}s{extras}{self.suffix}"


def clip_specs(quick: bool) -> list[ClipSpec]:
    """The clips of a full or quick run (same names and keyframe spacing, smaller in quick)."""
    seconds, width, height = (10, 320, 180) if quick else (30, 1280, 720)
    return [
        ClipSpec("h264_gop1s", "libx264", ".mp4", seconds, width, height, 30, 1.0),
        ClipSpec("h264_gop10s", "libx264", ".mp4", seconds, width, height, 30, 10.0),
        ClipSpec("vp9_gop2s", "libvpx-vp9", ".webm", seconds, width, height, 30, 2.0),
    ]


def _synthetic_frames(spec: ClipSpec) -> Iterator[np.ndarray]:
    """Frames ``[H, W, 3]`` uint8: a smooth texture panning 3 px/frame, four moving blocks,
    and light noise."""
    rng = np.random.default_rng(spec.seed)
    margin = 4 * spec.fps * int(spec.seconds) // 2
    coarse = rng.integers(0, 256, size=(spec.height // 16 + 2, spec.width // 16 + 2, 3), dtype=np.uint8)
    texture = av.VideoFrame.from_ndarray(coarse, format="rgb24").to_ndarray(
        width=spec.width + margin, height=spec.height + margin, format="rgb24", interpolation="BICUBIC"
    )
    noise_bank = rng.integers(-6, 7, size=(4, spec.height, spec.width, 3), dtype=np.int16)
    blocks = [(rng.uniform(0.1, 0.9, 2), rng.uniform(-0.01, 0.01, 2), rng.integers(0, 256, 3)) for _ in range(4)]
    block_h, block_w = spec.height // 6, spec.width // 8
    for i in range(int(spec.seconds * spec.fps)):
        dx, dy = (3 * i) % margin, (i // 2) % margin
        frame = texture[dy : dy + spec.height, dx : dx + spec.width].astype(np.int16)
        for start, velocity, colour in blocks:
            y, x = ((start + velocity * i) % 1.0) * (spec.height - block_h, spec.width - block_w)
            frame[int(y) : int(y) + block_h, int(x) : int(x) + block_w] = colour
        frame += noise_bank[i % 4]
        yield np.clip(frame, 0, 255).astype(np.uint8)


def make_clip(spec: ClipSpec, directory: Path) -> Path:
    """Write ``spec``'s clip into ``directory`` unless it is already there; its path."""
    path = directory / spec.file_name
    if path.exists():
        return path
    if spec.preset and spec.codec != "libx264":
        raise ValueError(f"ClipSpec.preset is an x264 preset; {spec.codec} has none")
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial{path.suffix}")
    keyint = round(spec.keyframe_s * spec.fps)
    if spec.codec == "libx264":
        options = {"x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0",
                   **({"preset": spec.preset} if spec.preset else {})}
    else:
        options = {"deadline": "realtime", "cpu-used": "8", "keyint_min": str(keyint), "row-mt": "1"}
    write_video(partial, _synthetic_frames(spec), fps=spec.fps, codec=spec.codec, pix_fmt="yuv420p",
                options=options, gop=keyint)
    partial.rename(path)
    return path


def _target_pts(path: Path, fast: bool) -> tuple[list[int], int, float, dict]:
    """The pts of the frames decode_clip returns (in order), and its plan for each strategy."""
    limits = DecodeLimits()
    container, _, index = open_indexed(VideoInput(str(path), limits), limits, Deadline(limits.time_budget_s))
    container.close()
    positions = sample_positions(index, NUM_FRAMES, "test", keyframes_only=fast)
    plans = {}
    for strategy in ("auto", "seek", "sequential"):
        runs = plan_runs(index, positions, seek_cost_for(strategy, keyframes_only=fast), keyframes_only=fast)
        seeks = sum(1 for i, run in enumerate(runs) if i > 0 or run.seek_to > 0)
        plans[strategy] = {"seeks": seeks, "frames_passed": decoded_frame_count(index, runs, keyframes_only=fast)}
    keyframe_pts = index.pts[index.is_keyframe]
    interval = float(np.diff(keyframe_pts).mean() * index.time_base) if keyframe_pts.size > 1 else index.duration_s
    return [int(index.pts[p]) for p in positions], index.num_frames, interval, plans


def exact_target_pts(path: Path) -> list[int]:
    """The pts of the frames ``decode_clip`` returns for ``path`` in exact mode, in order (one
    index pass): what :func:`naive_sample` is handed for free."""
    return _target_pts(path, fast=False)[0]


def naive_sample(source: Path | str | bytes, target_pts: list[int], size: int = SIZE) -> np.ndarray:
    """The baseline: decode every frame of the file (a path, or its bytes as an upload arrives),
    convert those at ``target_pts``: uint8 ``[T, size, size, 3]``."""
    wanted = set(target_pts)
    converted: dict[int, np.ndarray] = {}
    opened = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    with av.open(opened) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        sample_aspect, reformatter = stream.codec_context.sample_aspect_ratio, VideoReformatter()
        for frame in container.decode(stream):
            if frame.pts in wanted:
                converted[frame.pts] = frame_to_square(frame, size, sample_aspect, reformatter)
    return np.stack([converted[pts] for pts in target_pts])


def _timed(call: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU milliseconds (CPU: all threads of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "av": av.__version__,
        "ffmpeg": str(av.ffmpeg_version_info),
        "load_avg_at_start": [round(load, 2) for load in os.getloadavg()],
    }


def _default_workdir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "fsar" / "bench-decode"


def run(quick: bool = False, json_path: str | None = None, workdir: str | None = None) -> list[dict]:
    """Generate (or reuse) the clips, time every row against the baseline, print a table,
    write the JSON file if ``json_path`` is given; returns the rows."""
    machine = machine_info()
    directory = Path(workdir) if workdir else _default_workdir()
    repeats = 3 if quick else 5
    rows: list[dict] = []
    for spec in clip_specs(quick):
        path = make_clip(spec, directory)
        exact_pts, num_video_frames, keyframe_interval_s, exact_plans = _target_pts(path, fast=False)
        _, _, _, fast_plans = _target_pts(path, fast=True)
        baseline = naive_sample(path, exact_pts)  # warm-up, and the reference frames
        cases = [
            ("exact/auto", dict(strategy="auto"), exact_plans["auto"]),
            ("exact/seek", dict(strategy="seek"), exact_plans["seek"]),
            ("exact/sequential", dict(strategy="sequential"), exact_plans["sequential"]),
            ("keyframes", dict(fast=True), fast_plans["auto"]),
        ]
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
        baseline_times = []
        matches = {}
        for name, kwargs, _ in cases:  # warm-up and correctness check
            frames = decode_clip(str(path), NUM_FRAMES, SIZE, **kwargs)
            matches[name] = bool(np.array_equal(frames, baseline)) if name.startswith("exact") else None
        for _ in range(repeats):  # interleaved, so drifts in machine load hit every row alike
            baseline_times.append(_timed(functools.partial(naive_sample, path, exact_pts)))
            for name, kwargs, _ in cases:
                timings[name].append(_timed(functools.partial(decode_clip, str(path), NUM_FRAMES, SIZE, **kwargs)))
        baseline_ms = statistics.median(wall for wall, _ in baseline_times)
        baseline_cpu_ms = statistics.median(cpu for _, cpu in baseline_times)
        for name, _, plan in cases:
            ms = statistics.median(wall for wall, _ in timings[name])
            rows.append({
                "clip": spec.name,
                "row": name,
                "ms": round(ms, 2),
                "baseline_ms": round(baseline_ms, 2),
                "speedup_vs_baseline": round(baseline_ms / ms, 2),
                "cpu_ms": round(statistics.median(cpu for _, cpu in timings[name]), 2),
                "baseline_cpu_ms": round(baseline_cpu_ms, 2),
                "seeks": plan["seeks"],
                "frames_passed": plan["frames_passed"],
                "video_frames": num_video_frames,
                "frames_match": matches[name],
                "codec": spec.codec,
                "resolution": f"{spec.width}x{spec.height}",
                "duration_s": spec.seconds,
                "keyframe_interval_s": round(keyframe_interval_s, 3),
            })
    if json_path:
        machine["load_avg_at_end"] = [round(load, 2) for load in os.getloadavg()]
        report = {"machine": machine, "quick": quick, "num_frames": NUM_FRAMES, "size": SIZE, "results": rows}
        Path(json_path).write_text(json.dumps(report, indent=2))
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the rows."""
    header = ["clip", "row", "ms", "baseline_ms", "speedup", "cpu_ms", "baseline_cpu_ms", "seeks", "passed", "match"]
    lines = [[r["clip"], r["row"], f"{r['ms']:.1f}", f"{r['baseline_ms']:.1f}", f"{r['speedup_vs_baseline']:.2f}x",
              f"{r['cpu_ms']:.1f}", f"{r['baseline_cpu_ms']:.1f}",
              str(r["seeks"]), f"{r['frames_passed']}/{r['video_frames']}",
              "-" if r["frames_match"] is None else str(r["frames_match"]).lower()] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rules = fmt.format(*("-" * width for width in widths))
    return "\n".join([fmt.format(*header), rules, *(fmt.format(*line) for line in lines)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small clips, fewer repeats (under a minute)")
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--workdir", help="where generated clips are cached (default ~/.cache/fsar/bench-decode)")
    args = parser.parse_args(argv)
    run(quick=args.quick, json_path=args.json_path, workdir=args.workdir)


if __name__ == "__main__":
    main()
