"""Benchmark: classifying every fixed window of a long video, one decoding pass and batched
encoding (ours) against the per-window loop a user would script (baseline), same run, same model.

The video is generated once with PyAV and cached in ``workdir`` (``service.bench.decode.make_clip``:
a panning texture, moving blocks, light noise): 10 minutes of 640x360 30 fps H.264 with a keyframe
every 2 s (a 60 s clip repeated ten times by remuxing, see :func:`make_long_clip`; quick: 60 s). It is cut into 2 s windows (``training.video.window_spans``: 300 windows
in a full run), 8 frames a window at the model's input size (224 px; fsar-tiny: 64 px).

- ``ours``: the gateway's path (``Features.query_windows``): the video in pieces of ``WINDOW_CHUNK``
  (32) windows, each piece one ``decode_windows`` plan over its stretch of the file (each frame decoded
  and converted once), the next piece decoding in a worker thread while this one is encoded in batches
  of ``batch`` (8) on the encoder runtime the embedded backend picks (``runtime`` auto: ONNX Runtime
  fp32 on a CPU when it is installed, as the gateway serves; ``--runtime torch`` for the torch-eager
  encoder, ``--precision int8`` for the quantised graphs) and each batch classified few-shot against
  the prototype set.
- ``naive`` (the baseline): for each window, open the file, seek with PyAV to the keyframe before
  the window's start, decode forward (threaded decoding, every frame) until the window's last
  sampling time, convert the 8 frames shown at the centres of 8 equal parts of the window (the
  same resize/crop as ours), then encode and classify that window alone (batch 1).

Both paths use the same model (``backbone`` with random weights, seed 0, built as the embedded
backend builds it; torch and ONNX Runtime with torch's default intra-op threads, one per core) and the same prototype set: a 5-way 1-shot set of
five windows of the video itself with the labels of ``service.bench.common.LABELS``, built once
before timing (``setup_s``). ``frames_match`` checks the two paths fed the model identical frames;
``predictions_agree`` is the share of windows where both predicted the same label.

Per row: ``wall_s`` (end to end: decoding, encoding and classification of every window),
``decode_s`` and ``encode_s`` (encoding and classification; in ours they overlap), ``video_s_per_s`` (seconds of video
classified per wall-clock second), ``windows_per_s``, ``speedup_vs_baseline`` (baseline wall time
/ wall time), ``decode_speedup`` and ``encode_speedup`` (the same ratio per stage), ``cpu_s`` and
``cpu_speedup_vs_baseline`` (CPU time of all this process's threads: unlike wall time, it hardly
moves when other jobs share the machine; the load average is in ``machine``), and for ours
``distinct_frames`` (frames converted) of ``video_frames``. The target is ``speedup_vs_baseline
>= 3``. The baseline's encoder stays torch eager at batch 1 (what a user scripts, as in ``bench e2e``);
with ``--runtime torch`` both paths run the same encoder and the speedup is bounded by what one
decoding pass and batching save (``encode_share_ours``). ``predictions_agree`` checks that the
runtimes answer alike (ONNX Runtime fp32 is within 1e-4 of torch).

JSON: ``{"machine", "quick", "settings", "clip", "setup_s", "results": [row], "frames_match",
"predictions_agree", "encode_share_ours", "targets"}``; ``targets`` holds the target's ``value``,
``target`` and ``met``.

Run: ``python -m service.bench.segments [--quick] [--json out.json] [--backbone NAME] [--batch N]
[--seconds S] [--workdir DIR] [--runtime auto|torch|onnxruntime] [--precision fp32|int8] [--onnx-cache-dir DIR]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np

from service.bench.common import LABELS, NUM_FRAMES, default_workdir, format_table, machine_info, ratio, write_report
from service.bench.decode import ClipSpec, make_clip
from service.bench.decode_pool import BenchArgumentError
from service.core.features import WINDOW_CHUNK
from training.video import DecodeLimits, decode_windows, frame_to_square

SEGMENT_S = 2.0
BATCH = 8
TARGET_SPEEDUP = 3.0
PIECE_S = 60.0  # longer videos repeat a clip this long
COLUMNS = [("path", "path", ""), ("windows", "windows", "d"), ("wall_s", "wall_s", ".2f"),
           ("decode_s", "decode_s", ".2f"), ("encode_s", "encode_s", ".2f"),
           ("video_s/s", "video_s_per_s", ".1f"), ("windows/s", "windows_per_s", ".2f"),
           ("cpu_s", "cpu_s", ".2f"), ("speedup", "speedup_vs_baseline", ".2f"),
           ("cpu_x", "cpu_speedup_vs_baseline", ".2f"), ("decode_x", "decode_speedup", ".2f"),
           ("encode_x", "encode_speedup", ".2f"), ("distinct_frames", "distinct_frames", "d")]


def default_backbone(quick: bool) -> str:
    """``fsar-tiny`` for a quick run, ``ViT-B-32`` for a full one."""
    return "fsar-tiny" if quick else "ViT-B-32"


def clip_spec(quick: bool, seconds: float | None = None) -> ClipSpec:
    """The long video: 640x360 30 fps H.264, keyframe every 2 s, 600 s (quick: 60 s; ``seconds``
    overrides), encoded with x264's ``veryfast`` preset so that generating it stays short."""
    duration = seconds if seconds is not None else (60 if quick else 600)
    return ClipSpec("segments", "libx264", ".mp4", duration, 640, 360, 30, 2.0, preset="veryfast")


def make_long_clip(spec: ClipSpec, directory: Path) -> Path:
    """Write ``spec``'s video into ``directory`` unless it is already there; its path. Up to
    :data:`PIECE_S` seconds it is ``make_clip``'s; longer, a ``PIECE_S`` clip repeated by remuxing
    (same packets, timestamps shifted: no re-encoding; ``make_clip`` pans a texture as wide as the
    clip is long, which swscale refuses past a few minutes), cut at the keyframe that reaches
    ``spec.seconds``."""
    if spec.seconds <= PIECE_S:
        return make_clip(spec, directory)
    path = directory / spec.file_name
    if path.exists():
        return path
    piece = make_clip(dataclasses.replace(spec, seconds=PIECE_S), directory)
    partial = path.with_name(f".{path.name}.partial{path.suffix}")
    with av.open(str(partial), "w", format="mp4") as output:
        out_stream = None
        for copy in range(math.ceil(spec.seconds / PIECE_S)):
            with av.open(str(piece)) as source:
                in_stream = source.streams.video[0]
                if out_stream is None:
                    out_stream = output.add_stream_from_template(in_stream)
                shift = round(copy * PIECE_S / in_stream.time_base)
                end = round(spec.seconds / in_stream.time_base)
                for packet in source.demux(in_stream):
                    if packet.dts is None:
                        continue
                    if packet.is_keyframe and packet.pts + shift >= end:
                        break
                    packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                    packet.stream = out_stream
                    output.mux(packet)
    partial.rename(path)
    return path


def decode_limits(seconds: float) -> DecodeLimits:
    """Limits that let a long video through: twice its duration, a 10 minute budget."""
    return DecodeLimits(max_duration_s=max(2 * seconds, 600.0), time_budget_s=600.0)


# ------------------------------------------------------------------------------------- model
class Classifier:
    """The model built as the embedded backend builds it (random weights, seed 0, 8 frames) and a
    5-way 1-shot prototype set; ``classify`` = encode + few-shot logits with torch eager,
    ``classify_fast`` the same with the encoder on ``runtime`` (the embedded backend's choice:
    :func:`service.backends.embedded.choose_runtime`)."""

    def __init__(self, backbone: str, labels: Sequence[str] = LABELS, seed: int = 0, runtime: str = "auto",
                 precision: str = "fp32", threads: int | None = None, onnx_cache_dir: str | None = None) -> None:
        import torch

        from service.backends.embedded import choose_runtime
        from training.model import ModelConfig, build_model

        config = ModelConfig(backbone=backbone, pretrained=None, num_frames=NUM_FRAMES)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(config).eval()
        if threads:  # else torch's own default (one thread per core), left as it is for the caller
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.runtime, self.runtime_why = choose_runtime(runtime, "cpu")
        if self.runtime == "torch" and precision != "fp32":
            raise BenchArgumentError(f"precision={precision} needs the onnxruntime runtime ({self.runtime_why})")
        self.precision = precision
        self.runner: Any = None
        if self.runtime == "onnxruntime":
            from training.onnx import OnnxModelRunner

            self.runner = OnnxModelRunner.build(self.model, precision, self.threads, cache_dir=onnx_cache_dir)
        self.size = int(self.model.image_size[0])
        self.labels = list(labels)
        self.text_feats: Any = None
        self.prototypes: Any = None

    @property
    def encoder_name(self) -> str:
        return "torch eager fp32" if self.runner is None else f"onnxruntime {self.precision}"

    def build_prototypes(self, support: np.ndarray) -> None:
        """``support``: uint8 ``[N, T, S, S, 3]``, one video per label."""
        import torch

        with torch.inference_mode():
            self.text_feats = self.model.encode_text(self.labels)  # [N, D]
            support_feats = self.model.encode_video(support, texts=self.text_feats)  # [N, T, D]
            self.prototypes = self.model.build_prototypes(support_feats, torch.arange(len(self.labels)),
                                                          self.text_feats)  # [N, T, D]

    def _head(self, feats: Any) -> np.ndarray:
        logits = self.model.classify(feats, self.prototypes, self.text_feats)  # [B, N]
        return logits.argmax(dim=1).numpy().astype(np.int64)

    def classify(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[B, T, S, S, 3]`` -> predicted label index per video, int64 ``[B]`` (torch eager)."""
        import torch

        with torch.inference_mode():
            return self._head(self.model.encode_video(frames))  # feats [B, T, D]

    def classify_fast(self, frames: np.ndarray) -> np.ndarray:
        """The same on the chosen encoder runtime (torch eager when that is torch)."""
        import torch

        if self.runner is None:
            return self.classify(frames)
        feats = self.runner.encode_videos(frames)  # float32 [B, T, D]
        with torch.inference_mode():
            return self._head(torch.from_numpy(feats))


# --------------------------------------------------------------------------------------- paths
def ours(path: Path, classifier: Classifier, batch: int, limits: DecodeLimits) -> dict[str, Any]:
    """The gateway's path (``Features.query_windows``): the video in pieces of ``WINDOW_CHUNK`` windows,
    each piece one ``decode_windows`` plan over its stretch of the file, encoded in batches (the chosen
    runtime) and classified while the next piece decodes in a worker thread (``decode_s`` and
    ``encode_s`` overlap: ``wall_s`` is the end-to-end time)."""
    from concurrent.futures import ThreadPoolExecutor

    def decode_piece(first: int) -> tuple[Any, float]:
        began = time.perf_counter()
        piece = decode_windows(path, NUM_FRAMES, classifier.size, segment_s=SEGMENT_S, limits=limits,
                               only=(first, first + WINDOW_CHUNK))
        return piece, time.perf_counter() - began

    decode_s = encode_s = 0.0
    frames, spans, predictions, distinct = [], [], [], 0
    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(1, thread_name_prefix="bench-decode") as pool:
        pending: Any = pool.submit(decode_piece, 0)
        while pending is not None:
            piece, seconds = pending.result()
            decode_s += seconds
            done = piece.first + len(piece)
            pending = pool.submit(decode_piece, done) if len(piece) and done < piece.total else None
            began = time.perf_counter()
            predictions.extend(classifier.classify_fast(piece.frames[b:b + batch]) for b in range(0, len(piece), batch))
            encode_s += time.perf_counter() - began
            frames.append(piece.frames)
            spans.append(piece.spans)
            distinct += piece.distinct_frames
    end = time.perf_counter()
    return {"frames": np.concatenate(frames), "spans": np.concatenate(spans), "predictions": np.concatenate(predictions),
            "decode_s": decode_s, "encode_s": encode_s, "wall_s": end - start,
            "cpu_s": time.process_time() - cpu_start, "distinct_frames": distinct}


def naive_window(path: Path, start_s: float, end_s: float, num_frames: int, size: int) -> np.ndarray:
    """What a user scripts for one window: open the file, seek to the keyframe before ``start_s``,
    decode forward and keep the frames shown at the centres of ``num_frames`` equal parts of
    ``[start_s, end_s)``: uint8 ``[T, size, size, 3]`` (times from the stream's first frame)."""
    centres = [start_s + (2 * k + 1) * (end_s - start_s) / (2 * num_frames) for k in range(num_frames)]
    picked: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        time_base, first_pts = float(stream.time_base), stream.start_time or 0
        aspect = stream.codec_context.sample_aspect_ratio
        container.seek(first_pts + int(start_s / time_base), stream=stream, backward=True)
        previous = None
        for frame in container.decode(stream):
            shown_at = (frame.pts - first_pts) * time_base
            while len(picked) < num_frames and shown_at > centres[len(picked)] and previous is not None:
                picked.append(frame_to_square(previous, size, aspect))
            if len(picked) == num_frames:
                break
            previous = frame
        while len(picked) < num_frames and previous is not None:  # the video ended first
            picked.append(frame_to_square(previous, size, aspect))
    return np.stack(picked)


def naive(path: Path, spans: np.ndarray, classifier: Classifier) -> dict[str, Any]:
    """Each window decoded on its own, then encoded (torch eager) and classified alone (batch 1)."""
    decode_s = encode_s = 0.0
    frames, predictions = [], []
    start, cpu_start = time.perf_counter(), time.process_time()
    for start_s, end_s in spans:
        before = time.perf_counter()
        window = naive_window(path, float(start_s), float(end_s), NUM_FRAMES, classifier.size)
        decoded = time.perf_counter()
        predictions.append(classifier.classify(window[None])[0])
        encode_s += time.perf_counter() - decoded
        decode_s += decoded - before
        frames.append(window)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"frames": np.stack(frames), "predictions": np.asarray(predictions), "decode_s": decode_s,
            "encode_s": encode_s, "wall_s": wall, "cpu_s": cpu}


# ----------------------------------------------------------------------------------------- run
def _row(name: str, result: dict[str, Any], baseline: dict[str, Any], seconds: float, windows: int,
         video_frames: int) -> dict[str, Any]:
    return {
        "path": name,
        "windows": windows,
        "wall_s": round(result["wall_s"], 3),
        "decode_s": round(result["decode_s"], 3),
        "encode_s": round(result["encode_s"], 3),
        "video_s_per_s": round(seconds / result["wall_s"], 2),
        "windows_per_s": round(windows / result["wall_s"], 3),
        "cpu_s": round(result["cpu_s"], 3),
        "speedup_vs_baseline": ratio(baseline["wall_s"], result["wall_s"]),
        "cpu_speedup_vs_baseline": ratio(baseline["cpu_s"], result["cpu_s"]),
        "decode_speedup": ratio(baseline["decode_s"], result["decode_s"]),
        "encode_speedup": ratio(baseline["encode_s"], result["encode_s"]),
        "distinct_frames": result.get("distinct_frames"),
        "video_frames": video_frames,
    }


def run(quick: bool = False, json_path: str | None = None, workdir: str | None = None, backbone: str | None = None,
        batch: int = BATCH, seconds: float | None = None, runtime: str = "auto", precision: str = "fp32",
        onnx_cache_dir: str | None = None) -> dict[str, Any]:
    """Generate (or reuse) the video, time both paths, print a table, write the JSON report if
    ``json_path`` is given; returns the report."""
    if not isinstance(batch, int) or batch < 1:
        raise BenchArgumentError(f"batch must be >= 1, got {batch!r}")
    if runtime not in ("auto", "torch", "onnxruntime"):
        raise BenchArgumentError(f"runtime must be auto, torch or onnxruntime, got {runtime!r}")
    if precision not in ("fp32", "int8"):
        raise BenchArgumentError(f"precision must be fp32 or int8, got {precision!r}")
    if runtime == "torch" and precision != "fp32":
        raise BenchArgumentError(f"precision={precision} needs the onnxruntime runtime (runtime=torch)")
    machine = machine_info()
    backbone = backbone or default_backbone(quick)
    spec = clip_spec(quick, seconds)
    path = make_long_clip(spec, Path(workdir) if workdir else default_workdir("segments"))
    limits = decode_limits(spec.seconds)

    setup_start = time.perf_counter()
    classifier = Classifier(backbone, runtime=runtime, precision=precision, onnx_cache_dir=onnx_cache_dir)
    # The prototype set: five windows spread over the video, one per label (decoded apart from the runs).
    probe_windows = decode_windows(path, NUM_FRAMES, classifier.size, segment_s=SEGMENT_S, limits=limits)
    picks = np.linspace(0, len(probe_windows) - 1, len(LABELS)).round().astype(int)
    classifier.build_prototypes(probe_windows.frames[picks])
    spans = probe_windows.spans
    del probe_windows
    # Warm-up at both batch sizes, so neither path pays torch's first calls.
    warm = np.zeros((batch, NUM_FRAMES, classifier.size, classifier.size, 3), dtype=np.uint8)
    classifier.classify_fast(warm)
    classifier.classify(warm[:1])
    setup_s = time.perf_counter() - setup_start

    ours_result = ours(path, classifier, batch, limits)
    naive_result = naive(path, spans, classifier)

    windows = len(spans)
    video_frames = round(spec.seconds * spec.fps)
    rows = [_row(f"ours ({classifier.encoder_name})", ours_result, naive_result, spec.seconds, windows, video_frames),
            _row("naive (torch eager fp32)", naive_result, naive_result, spec.seconds, windows, video_frames)]
    frames_match = bool(np.array_equal(ours_result["frames"], naive_result["frames"]))
    agree = float(np.mean(ours_result["predictions"] == naive_result["predictions"]))
    speedup = rows[0]["speedup_vs_baseline"]
    encode_share = round(ours_result["encode_s"] / ours_result["wall_s"], 3)
    report = {
        "machine": {**machine, "load_avg_at_end": machine_info()["load_avg"]},
        "quick": quick,
        "settings": {"backbone": backbone, "num_frames": NUM_FRAMES, "size": classifier.size,
                     "segment_s": SEGMENT_S, "stride_s": SEGMENT_S, "batch": batch, "labels": list(LABELS),
                     "runtime": classifier.runtime, "runtime_why": classifier.runtime_why,
                     "precision": classifier.precision, "threads": classifier.threads},
        "clip": {"codec": "h264", "resolution": f"{spec.width}x{spec.height}", "duration_s": spec.seconds,
                 "fps": spec.fps, "keyframe_interval_s": spec.keyframe_s, "preset": spec.preset,
                 "bytes": path.stat().st_size},
        "setup_s": round(setup_s, 2),
        "results": rows,
        "frames_match": frames_match,
        "predictions_agree": round(agree, 4),
        "encode_share_ours": encode_share,
        "targets": {"speedup_vs_baseline": {"value": speedup, "target": TARGET_SPEEDUP,
                                            "met": bool(speedup is not None and speedup >= TARGET_SPEEDUP)}},
    }
    print(format_table(rows, COLUMNS))
    print(f"{backbone}, {windows} windows of {SEGMENT_S:g} s, batch {batch}, ours on {classifier.encoder_name} "
          f"({classifier.runtime_why}): frames match {frames_match}, "
          f"predictions agree {agree:.1%}; encoding is {encode_share:.0%} of our wall time")
    write_report(json_path, report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 60 s video and the fsar-tiny backbone")
    parser.add_argument("--json", dest="json_path", help="write the report here")
    parser.add_argument("--backbone", help="backbone with random weights (default: ViT-B-32; quick: fsar-tiny)")
    parser.add_argument("--batch", type=int, default=BATCH, help="windows per encoder call in our path")
    parser.add_argument("--seconds", type=float, help="video duration (default 600; quick 60)")
    parser.add_argument("--workdir", help="where the generated video is cached (default ~/.cache/fsar/bench-segments)")
    parser.add_argument("--runtime", choices=["auto", "torch", "onnxruntime"], default="auto",
                        help="our path's encoder runtime (default auto, as the embedded backend: ONNX Runtime on "
                             "a CPU when installed); the baseline stays torch eager")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="ONNX Runtime graphs' precision (int8: dynamic quantisation)")
    parser.add_argument("--onnx-cache-dir", help="where the ONNX graphs are cached (default ~/.cache/fsar/onnx)")
    args = parser.parse_args(argv)
    run(quick=args.quick, json_path=args.json_path, workdir=args.workdir, backbone=args.backbone,
        batch=args.batch, seconds=args.seconds, runtime=args.runtime, precision=args.precision,
        onnx_cache_dir=args.onnx_cache_dir)


if __name__ == "__main__":
    main()
