"""Benchmark: video-encoder throughput on a GPU, eager fp16 against our optimised path and Triton.

The video encoder is ``FsarModel.encode_video`` (frozen open_clip ViT with the default TED
adapters and temporal adapter, random weights, seed 0): uint8 frames ``[B, 8, 224, 224, 3]`` in host
memory -> frame features ``[B, 8, D]`` in host memory, as the gateway needs them. Rows per backbone
(ViT-B-16 and ViT-B-32) and batch size (1 to 128 videos):

- ``eager fp16`` (the baseline): the model in fp16, called the way the embedded backend calls it:
  ``torch.from_numpy(frames).to(device)`` from pageable memory, ``encode_video``,
  ``.float().cpu().numpy()``, one batch after another.
- ``bf16 + overlap``: the model in bf16 (the dtype autocast would pick for every matmul, without
  re-casting fp32 weights on each call), frames staged into pinned host buffers and copied to the
  GPU on a side stream while the previous batch computes (two buffers, events in both directions),
  the result copied back asynchronously into pinned memory and read one batch later.
- ``bf16 + overlap + compile``: the same with ``torch.compile(mode="max-autotune-no-cudagraphs")`` on
  ``encode_video``, at ``compile_batches`` only (autotuning takes a while per shape). A compile
  failure is reported in the row, not raised.
- ``triton``: the exported ``video_encoder`` (``training.export``, fp16 checkpoint, dynamic batching:
  max batch 64, 2 ms queue delay, one GPU instance) served by ``service.triton_local.LocalTritonServer``,
  driven by ``triton_clients`` concurrent asyncio gRPC clients sending one video per request.

Throughput = videos / wall time over a steady stretch of batches after warm-up (each point runs
for at least ``seconds_per_point``). ``speedup_vs_baseline`` = videos/s over eager fp16 at the same
batch size (Triton: over eager fp16 at batch 32). ``max_abs_diff`` / ``cosine_min`` compare each
optimised row's features with the baseline's on the same frames (the first batch).

On CPU with ONNX Runtime installed the rows are instead ``eager fp32`` (the baseline), ``onnxruntime
fp32`` and ``onnxruntime int8`` (:class:`training.onnx.OnnxModelRunner`, the embedded backend's
``runtime=onnxruntime``), timed back to back at each batch size:
``fsar bench encoder --device cpu --backbones ViT-B-32 ViT-B-16 --batches 1 8 --threads 2``.

Without CUDA the benchmark refuses (:class:`EncoderBenchUnavailable`) unless ``device="cpu"``: a
smoke run of the same code (fp32 baseline, bf16 "optimised" path without streams or pinned memory,
no compile, no Triton unless asked), by default on ``fsar-tiny`` with ``quick``.

JSON: ``{"machine", "quick", "device", "num_frames", "results": [row], "errors": [...]}``; each row
has ``backbone``, ``path``, ``batch`` (Triton: None, with ``clients``), ``videos_per_s``,
``ms_per_batch``, ``batches_timed``, ``precision``, ``compiled``, ``overlap``,
``speedup_vs_baseline``, ``max_abs_diff``, ``cosine_min``, ``error``.

Run: ``python -m service.bench.encoder [--quick] [--json out.json] [--device cuda|cpu] [--backbones ...]
[--batches ...] [--compile-batches ...] [--no-compile] [--no-triton] [--triton-clients N]``.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.bench.common import NUM_FRAMES, format_table, machine_info, ratio, write_report

BACKBONES = ("ViT-B-16", "ViT-B-32")
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
COMPILE_BATCHES = (1, 8, 32, 128)
TRITON_CLIENTS = 32
BASELINE = "eager fp16"


class EncoderBenchUnavailable(RuntimeError):
    """The encoder benchmark cannot run here (no CUDA device and no explicit CPU smoke run)."""


def resolve_device(device: str | None) -> str:
    """``"cuda"`` when asked for (or by default) and present; ``"cpu"`` only when asked for."""
    import torch

    if device is None or device == "cuda":
        if not torch.cuda.is_available():
            raise EncoderBenchUnavailable(
                "the encoder benchmark measures GPU throughput and torch sees no CUDA device here; run it on a "
                "GPU host, or pass device='cpu' (fsar bench encoder --device cpu --quick) for a smoke run "
                "whose numbers mean nothing for a GPU")
        return "cuda"
    if device != "cpu":
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return "cpu"


def build_encoder_model(backbone: str, precision: str, device: str) -> Any:
    """``FsarModel`` with random weights (seed 0, 8 frames, default adapters) in ``precision`` on ``device``."""
    import torch

    from training.model import ModelConfig, build_model

    config = ModelConfig(backbone=backbone, pretrained=None, num_frames=NUM_FRAMES, precision=precision)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model(config, device=device).eval()


# ------------------------------------------------------------------------------------ encoders
class EagerEncoder:
    """The baseline: what the embedded backend does per call (pageable H2D, encode, D2H, sync)."""

    overlap = False

    def __init__(self, model: Any, encode: Callable | None = None) -> None:
        self.model = model
        self.encode = encode or model.encode_video

    def run(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features ``[B, T, D]`` float32 of each uint8 ``[B, T, H, W, 3]`` batch, in order."""
        import torch

        outputs = []
        with torch.inference_mode():
            for frames in batches:
                device_frames = torch.from_numpy(frames).to(self.model.device)
                outputs.append(self.encode(device_frames).float().cpu().numpy())
        return outputs


class OverlappedEncoder:
    """Pinned double buffers and a copy stream: batch i+1 goes host -> GPU while batch i computes;
    features come back into pinned memory asynchronously and are read one batch later.
    On CPU it degrades to a plain loop (no streams, no pinned memory)."""

    overlap = True

    def __init__(self, model: Any, batch_shape: Sequence[int], encode: Callable | None = None) -> None:
        import torch

        self.model = model
        self.encode = encode or model.encode_video
        self.cuda = model.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream()
            self.host_in = [torch.empty(tuple(batch_shape), dtype=torch.uint8).pin_memory() for _ in range(2)]
            self.device_in = [torch.empty(tuple(batch_shape), dtype=torch.uint8, device=model.device) for _ in range(2)]
            self.copied = [torch.cuda.Event() for _ in range(2)]
            self.consumed = [torch.cuda.Event() for _ in range(2)]

    def run(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features ``[B, T, D]`` float32 of each uint8 ``[B, T, H, W, 3]`` batch, in order."""
        import torch

        if not self.cuda:
            with torch.inference_mode():
                return [self.encode(torch.from_numpy(frames)).float().numpy() for frames in batches]
        compute = torch.cuda.current_stream()
        pending: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        outputs: list[np.ndarray] = []
        with torch.inference_mode():
            for i, frames in enumerate(batches):
                slot = i % 2
                if i >= 2:
                    self.copied[slot].synchronize()  # batch i-2's copy has finished reading this host buffer
                self.host_in[slot].numpy()[...] = frames
                with torch.cuda.stream(self.copy_stream):
                    if i >= 2:
                        self.copy_stream.wait_event(self.consumed[slot])  # batch i-2 is done with the device buffer
                    self.device_in[slot].copy_(self.host_in[slot], non_blocking=True)
                    self.copied[slot].record()
                compute.wait_event(self.copied[slot])
                feats = self.encode(self.device_in[slot]).float()  # [B, T, D] on the GPU
                host_feats = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
                host_feats.copy_(feats, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self.consumed[slot].record()
                pending.append((host_feats, done))
                if len(pending) > 1:  # read the previous batch's features while this one computes
                    previous, event = pending.pop(0)
                    event.synchronize()
                    outputs.append(previous.numpy().copy())
            for previous, event in pending:
                event.synchronize()
                outputs.append(previous.numpy().copy())
        return outputs


class OnnxEncoder:
    """The encoder on ONNX Runtime (:class:`training.onnx.OnnxModelRunner`: graphs exported from the same
    model, fp32 or int8, cached per fingerprint), called the way the embedded backend calls it."""

    overlap = False

    def __init__(self, model: Any, precision: str, threads: int, cache_dir: str | None = None) -> None:
        from training.onnx import OnnxModelRunner, ensure_graphs

        graphs = ensure_graphs(model, precision, cache_dir, graphs=["video_query"])
        self.runner = OnnxModelRunner(model, graphs, precision, threads)

    def run(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features ``[B, T, D]`` float32 of each uint8 ``[B, T, H, W, 3]`` batch, in order."""
        return [self.runner.encode_videos(frames) for frames in batches]


# --------------------------------------------------------------------------------------- timing
def _frames(batch: int, size: int, seed: int) -> np.ndarray:
    """Random uint8 frames ``[batch, T, size, size, 3]``."""
    return np.random.default_rng(seed).integers(0, 256, size=(batch, NUM_FRAMES, size, size, 3), dtype=np.uint8)


def time_encoder(encoder: Any, batch: int, size: int, seconds: float, warmup: int = 3) -> dict[str, Any]:
    """Videos/s of ``encoder.run`` over a stretch of batches lasting at least ``seconds`` (two
    distinct host arrays alternate); the first batch's features come back for the numerics check."""
    pool = [_frames(batch, size, seed) for seed in (1, 2)]
    start = time.perf_counter()
    first = encoder.run(pool[:1])[0]
    if time.perf_counter() - start > 1.0:  # a slow point (big batch on a CPU): one more warm-up call is enough
        warmup = 1
    start = time.perf_counter()
    encoder.run([pool[i % 2] for i in range(warmup)])
    estimate = max((time.perf_counter() - start) / warmup, 1e-4)
    count = int(min(max(math.ceil(seconds / estimate), 3), 1000))
    start = time.perf_counter()
    encoder.run([pool[i % 2] for i in range(count)])
    wall = time.perf_counter() - start
    return {"videos_per_s": round(batch * count / wall, 2), "ms_per_batch": round(wall * 1000 / count, 3),
            "batches_timed": count, "features": first}


def _compare(features: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    flat, ref = features.reshape(-1, features.shape[-1]), reference.reshape(-1, reference.shape[-1])
    cosine = (flat * ref).sum(-1) / (np.linalg.norm(flat, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
    return {"max_abs_diff": round(float(np.abs(flat - ref).max()), 5), "cosine_min": round(float(cosine.min()), 5)}


# ---------------------------------------------------------------------------------------- Triton
def triton_throughput(backbone: str, device: str, clients: int, seconds: float, workdir: Path,
                      precision: str) -> dict[str, Any]:
    """Export the model (``precision``) and serve ``video_encoder`` with a local Triton server;
    ``clients`` concurrent gRPC clients send one video each per request for about ``seconds``."""
    import tritonclient.grpc.aio as grpcclient

    from service.triton_local import LocalTritonServer
    from training.checkpoint import save_checkpoint
    from training.export import export_repository

    model = build_encoder_model(backbone, precision, "cpu")
    size = int(model.image_size[0])
    checkpoint = workdir / f"{backbone}-{precision}.pt"
    save_checkpoint(checkpoint, model)
    del model
    repository = workdir / f"repository-{backbone}-{precision}"
    export_repository(checkpoint, repository, instance_kind="gpu" if device == "cuda" else "cpu",
                      max_batch_size=64, queue_delay_us=2000)
    frames = _frames(1, size, 3)

    async def drive(url: str) -> dict[str, Any]:
        client = grpcclient.InferenceServerClient(url)
        done = 0
        try:
            async def one() -> None:
                tensor = grpcclient.InferInput("FRAMES", list(frames.shape), "UINT8")
                tensor.set_data_from_numpy(frames)
                result = await client.infer("video_encoder", [tensor],
                                            outputs=[grpcclient.InferRequestedOutput("FRAME_FEATS")])
                result.as_numpy("FRAME_FEATS")

            async def worker(stop_at: float) -> None:
                nonlocal done
                while time.perf_counter() < stop_at:
                    await one()
                    done += 1

            await asyncio.gather(*(one() for _ in range(clients)))  # warm-up
            done = 0
            start = time.perf_counter()
            await asyncio.gather(*(worker(start + seconds) for _ in range(clients)))
            wall = time.perf_counter() - start
        finally:
            await client.close()
        return {"videos_per_s": round(done / wall, 2), "requests": done, "seconds": round(wall, 2)}

    with LocalTritonServer(repository, models=["video_encoder"]) as server:
        return asyncio.run(drive(server.grpc_url))


# ------------------------------------------------------------------------------------------- run
def run(quick: bool = False, json_path: str | None = None, *, device: str | None = None,
        backbones: Sequence[str] | None = None, batches: Sequence[int] | None = None,
        compile_batches: Sequence[int] | None = None, compile: bool | None = None,
        triton: bool | None = None, triton_clients: int = TRITON_CLIENTS,
        seconds_per_point: float | None = None, workdir: str | None = None, onnx: bool | None = None,
        threads: int | None = None, onnx_cache_dir: str | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table, write the JSON report when ``json_path`` is given.

    Args:
        quick: fewer batch sizes and shorter points (GPU: batches 1, 8, 32; CPU: ``fsar-tiny``, 1 and 4).
        device: ``"cuda"`` (default; refused without one) or ``"cpu"`` (smoke run).
        backbones: open_clip models (default ViT-B-16 and ViT-B-32; CPU: ``fsar-tiny``).
        batches: videos per batch (default 1..128; quick: 1, 8, 32; CPU quick: 1, 4).
        compile_batches: batches that also get a ``torch.compile`` row (default 1, 8, 32, 128 within ``batches``).
        compile: add the compiled rows (default: on CUDA only).
        triton: add the Triton row (default: on CUDA only).
        triton_clients: concurrent clients of the Triton row.
        seconds_per_point: minimum timed stretch per point (default 3 s; quick 1 s; CPU 0.2 s).
        workdir: where the Triton checkpoint and repository go (default: a temporary folder).
        onnx: CPU only: the rows ``onnxruntime fp32`` and ``onnxruntime int8`` instead of ``bf16`` (default:
            when onnxruntime is installed). Graphs come from the cache (``onnx_cache_dir``), built on first use.
        threads: CPU intra-op threads of torch and ONNX Runtime (default: torch's current setting).

    Returns:
        The report (see the module docstring).

    Raises:
        EncoderBenchUnavailable: no CUDA device and ``device`` is not ``"cpu"``.
    """
    import torch

    device = resolve_device(device)
    on_gpu = device == "cuda"
    backbones = list(backbones or (BACKBONES if on_gpu else ("fsar-tiny",)))
    if batches is None:
        batches = BATCHES if not quick else ((1, 8, 32) if on_gpu else (1, 4))
    batches = [int(b) for b in batches]
    compile = on_gpu if compile is None else compile
    compile_batches = [b for b in (compile_batches or COMPILE_BATCHES) if b in batches] if compile else []
    if compile and not compile_batches:
        compile_batches = [max(batches)]
    triton = on_gpu if triton is None else triton
    seconds = seconds_per_point or (0.2 if not on_gpu else 1.0 if quick else 3.0)
    baseline_precision, fast_precision = ("fp16", "bf16") if on_gpu else ("fp32", "bf16")
    if onnx is None:
        from training.onnx import onnx_available

        onnx = not on_gpu and onnx_available()
    onnx = bool(onnx) and not on_gpu
    if threads is not None and not on_gpu:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    machine = machine_info()
    for backbone in backbones:
        baseline_model = build_encoder_model(backbone, baseline_precision, device)
        fast_model = None if onnx else build_encoder_model(backbone, fast_precision, device)
        size = int(baseline_model.image_size[0])
        onnx_encoders = {precision: OnnxEncoder(baseline_model, precision, threads, onnx_cache_dir)
                         for precision in ("fp32", "int8")} if onnx else {}
        for batch in batches:
            shape = (batch, NUM_FRAMES, size, size, 3)
            base = time_encoder(EagerEncoder(baseline_model), batch, size, seconds)
            rows.append(_row(backbone, BASELINE if on_gpu else "eager fp32", batch, base, baseline_precision,
                             compiled=False, overlap=False))
            reference = base.pop("features")
            if onnx:  # eager, ORT fp32, ORT int8 back to back at each batch size: drifts in load hit all
                for precision, encoder in onnx_encoders.items():
                    timed = time_encoder(encoder, batch, size, seconds)
                    rows.append(_row(backbone, f"onnxruntime {precision}", batch, timed, precision, compiled=False,
                                     overlap=False, baseline=base, reference=reference))
                continue
            fast = time_encoder(OverlappedEncoder(fast_model, shape), batch, size, seconds)
            rows.append(_row(backbone, "bf16 + overlap", batch, fast, fast_precision, compiled=False, overlap=on_gpu,
                             baseline=base, reference=reference))
            if batch in compile_batches:
                try:
                    compiled = torch.compile(fast_model.encode_video, mode="max-autotune-no-cudagraphs")
                    timed = time_encoder(OverlappedEncoder(fast_model, shape, encode=compiled), batch, size, seconds)
                    rows.append(_row(backbone, "bf16 + overlap + compile", batch, timed, fast_precision, compiled=True,
                                     overlap=on_gpu, baseline=base, reference=reference))
                except Exception as err:  # compile support varies by platform; say so in the report
                    message = f"{backbone} batch {batch}: torch.compile failed: {type(err).__name__}: {err}"
                    errors.append(message[:500])
                    rows.append({"backbone": backbone, "path": "bf16 + overlap + compile", "batch": batch,
                                 "error": message[:200]})
        del baseline_model, fast_model
        if on_gpu:
            torch.cuda.empty_cache()
        if triton:
            try:
                with tempfile.TemporaryDirectory(prefix="fsar-bench-triton-", dir=workdir) as folder:
                    served = triton_throughput(backbone, device, triton_clients, max(seconds, 2.0), Path(folder),
                                               baseline_precision)
                reference_batch = 32 if 32 in batches else max(batches)
                base_row = next(r for r in rows if r["backbone"] == backbone and r["batch"] == reference_batch
                                and r["path"] in (BASELINE, "eager fp32"))
                rows.append({"backbone": backbone, "path": "triton", "batch": None, "clients": triton_clients,
                             "videos_per_s": served["videos_per_s"], "batches_timed": served["requests"],
                             "precision": baseline_precision, "compiled": False, "overlap": False,
                             "speedup_vs_baseline": ratio(served["videos_per_s"], base_row["videos_per_s"]),
                             "baseline_batch": reference_batch})
            except Exception as err:  # a server that cannot start here is reported, not fatal
                message = f"{backbone}: Triton row failed: {type(err).__name__}: {err}"
                errors.append(message[:2000])
                rows.append({"backbone": backbone, "path": "triton", "batch": None, "error": message[:200]})
    report = {"machine": machine, "quick": quick, "device": device, "num_frames": NUM_FRAMES,
              "threads": threads if not on_gpu else None,
              "results": rows, "errors": errors}
    print(format_report(report))
    write_report(json_path, report)
    return report


def _row(backbone: str, path: str, batch: int, timed: dict[str, Any], precision: str, *, compiled: bool,
         overlap: bool, baseline: dict[str, Any] | None = None, reference: np.ndarray | None = None) -> dict[str, Any]:
    row = {"backbone": backbone, "path": path, "batch": batch, "videos_per_s": timed["videos_per_s"],
           "ms_per_batch": timed["ms_per_batch"], "batches_timed": timed["batches_timed"], "precision": precision,
           "compiled": compiled, "overlap": overlap,
           "speedup_vs_baseline": 1.0 if baseline is None else ratio(timed["videos_per_s"], baseline["videos_per_s"])}
    if reference is not None:
        row.update(_compare(timed["features"], reference))
    return row


COLUMNS = [("backbone", "backbone", ""), ("path", "path", ""), ("batch", "batch", ""), ("clients", "clients", ""),
           ("videos/s", "videos_per_s", ".1f"), ("ms/batch", "ms_per_batch", ".2f"),
           ("speedup", "speedup_vs_baseline", ".2f"), ("cos_min", "cosine_min", ".4f"), ("error", "error", "")]


def format_report(report: dict[str, Any]) -> str:
    header = f"device: {report['device']} ({report['machine'].get('cuda_device') or report['machine']['cpu_model']})"
    if report.get("threads"):
        header += f", {report['threads']} threads"
    return "\n".join([header, format_table(report["results"], COLUMNS)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes, shorter points")
    parser.add_argument("--json", dest="json_path", help="write the report here")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="cuda (default) or cpu (smoke run)")
    parser.add_argument("--backbones", nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--compile-batches", type=int, nargs="+")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    parser.add_argument("--triton", dest="triton", action="store_true", default=None, help="force the Triton row")
    parser.add_argument("--no-triton", dest="triton", action="store_false")
    parser.add_argument("--triton-clients", type=int, default=TRITON_CLIENTS)
    parser.add_argument("--seconds", dest="seconds_per_point", type=float)
    parser.add_argument("--workdir")
    parser.add_argument("--onnx", dest="onnx", action="store_true", default=None,
                        help="CPU: ONNX Runtime fp32 and int8 rows (default when installed)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (torch and ONNX Runtime)")
    parser.add_argument("--onnx-cache-dir")
    args = parser.parse_args(argv)
    try:
        run(**vars(args))
    except EncoderBenchUnavailable as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
