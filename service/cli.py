"""The `fsar` command line: one entry point, one subcommand per job.

Every subcommand imports its implementation lazily, so `fsar serve --backend triton` on a
gateway-only install never imports torch, and `fsar --help` is instant.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="fsar",
    help="Few-shot and zero-shot video action recognition: train CLIP adapters, export them, serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: each compares against a baseline measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


class CliError(Exception):
    """An error whose message is the whole story for the user (printed without a traceback)."""


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# --------------------------------------------------------------------------- model
@app.command("model-info")
def model_info_cmd(
    backbone: str = typer.Option("ViT-B-16", help="open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, fsar-tiny)."),
    adapter: str = typer.Option("ted", help="none | ted | ma | ted+ma"),
    metric: str = typer.Option("otam", help="otam | bimhm | mean | trx"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print trainable and total parameter counts (random weights, works offline)."""
    from training.model.info import format_model_info, model_info

    info = model_info(backbone=backbone, adapter=adapter, metric=metric)
    typer.echo(json.dumps(info, indent=2) if json_out else format_model_info(info))


# --------------------------------------------------------------------------- data
@app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., help="Output folder (ROOT/videos, ROOT/splits, ROOT/labels.json)."),
    classes: Optional[int] = typer.Option(None, help="Number of motion classes (default: all defined)."),
    videos_per_class: Optional[int] = typer.Option(None, help="Videos per class (default 60)."),
    frames: Optional[int] = typer.Option(None, help="Frames per video."),
    size: Optional[int] = typer.Option(None, help="Frame size in pixels (square)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same dataset)."),
) -> None:
    """Write a synthetic motion dataset whose classes differ only by how shapes move."""
    from training.data.synth import write_synthetic_dataset

    kwargs = {k: v for k, v in dict(classes=classes, videos_per_class=videos_per_class,
                                    frames=frames, size=size).items() if v is not None}
    summary = write_synthetic_dataset(out, seed=seed, **kwargs)
    typer.echo(json.dumps(summary, indent=2, default=str))


# --------------------------------------------------------------------------- training
@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: str = typer.Option(..., help="A packaged preset (synthetic-tiny, ssv2-full, ssv2-small, kinetics-100, "
                                         "ucf101, hmdb51, m2clip-k400) or a YAML file."),
    data: Path = typer.Option(..., help="Dataset root (videos/, splits/, labels.json) or a CSV path,label[,split]."),
    out: Path = typer.Option(..., help="Run folder: config.yaml, metrics.csv, last.pt, best.pt."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps."),
    fresh: bool = typer.Option(False, help="Start afresh instead of resuming from OUT/last.pt."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: CUDA when available)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value config overrides, e.g. optim.lr=1e-4."),
) -> None:
    """Train adapters on episodes (MA-CLIP loss) or labelled batches (M2-CLIP multi-task loss)."""
    from training.train import train

    summary = train(config, data, out, max_steps=max_steps, overrides=list(overrides or []),
                    resume=not fresh, device=device)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Option(..., help="Checkpoint from `fsar train` (best.pt / last.pt)."),
    data: Path = typer.Option(..., help="Dataset root or CSV."),
    split: str = typer.Option("test", help="Split whose classes are evaluated."),
    way: int = typer.Option(5, help="N-way."),
    shot: int = typer.Option(1, help="K-shot."),
    query: int = typer.Option(1, help="Queries per class per episode."),
    episodes: int = typer.Option(10000, help="Number of seeded episodes."),
    seed: Optional[int] = typer.Option(None, help="Episode seed (same seed, same episodes)."),
    metric: Optional[str] = typer.Option(None, help="Evaluate with another metric (otam | bimhm | mean | trx)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: CUDA when available)."),
    baselines: bool = typer.Option(
        False, help="Compare on the same episodes: trained vs untrained model, each with its metric and frame-mean."),
    open_set: bool = typer.Option(
        False, "--open-set", help="Open-set episodes (as many unknown queries as known): AUROC and accuracy at the "
                                  "calibrated threshold of open_set_score beside the MSP baseline."),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="Do the few-shot probabilities mean what they say? Fit a temperature on the val "
                                   "split's episodes, then ECE, NLL and Brier on this split's, before and after."),
    record: bool = typer.Option(
        False, "--record", help="With --open-set: measure the 1-shot default thresholds on the val split and write "
                                "them into the checkpoint. With --calibrate: write the fitted temperature into it "
                                "(the gateway applies it to every few-shot answer)."),
    accept: float = typer.Option(0.95, help="With --open-set: fraction of a set's left-out known clips accepted."),
    precision: bool = typer.Option(
        False, "--precision", help="What serving precision costs, on the same episodes on the CPU: the encoders on "
                                   "torch fp32, ONNX Runtime fp32 and int8 (accuracy, paired difference to fp32, "
                                   "feature cosine)."),
    onnx_cache_dir: Optional[Path] = typer.Option(None, help="With --precision: where the ONNX graphs are cached."),
) -> None:
    """Few-shot accuracy with its 95% interval over seeded episodes, plus zero-shot accuracy."""
    kwargs = {"seed": seed} if seed is not None else {}
    if record and not (open_set or calibrate):
        raise CliError("--record needs --open-set or --calibrate")
    if calibrate and (open_set or baselines or precision or metric is not None):
        raise CliError("--calibrate measures the checkpoint's own few-shot probabilities; leave out --open-set, "
                       "--baselines, --precision and --metric")
    if calibrate:
        from training.evaluate import calibration_table

        table = calibration_table(checkpoint, data, split=split, way=way, shot=shot, query=query, episodes=episodes,
                                  record=record, json_path=json_path, device=device, **kwargs)
        typer.echo(table["table"])
        if record:
            typer.echo(f"recorded temperature {table['temperature']:.4g} in {checkpoint}")
        return
    if precision and (open_set or baselines or metric is not None):
        raise CliError("--precision compares encoders with the checkpoint's own metric; leave out --open-set, "
                       "--baselines and --metric")
    if precision:
        from training.evaluate import precision_table

        table = precision_table(checkpoint, data, split=split, way=way, shot=shot, query=query, episodes=episodes,
                                json_path=json_path, onnx_cache_dir=onnx_cache_dir, **kwargs)
        typer.echo(table["table"])
        return
    if open_set and (baselines or metric is not None):
        raise CliError("--open-set evaluates the checkpoint's own metric; leave out --baselines and --metric")
    if open_set:
        from training.evaluate import open_set_table

        table = open_set_table(checkpoint, data, split=split, way=way, shot=shot, query=query, episodes=episodes,
                               accept=accept, record=record, json_path=json_path, device=device, **kwargs)
        typer.echo(table["table"])
        return
    if baselines:
        from training.evaluate import baseline_table

        table = baseline_table(checkpoint, data, split=split, way=way, shot=shot, query=query,
                               episodes=episodes, json_path=json_path, device=device, **kwargs)
        typer.echo(table["table"])
        return
    from training.evaluate import evaluate

    result = evaluate(checkpoint, data, split=split, way=way, shot=shot, query=query, episodes=episodes,
                      json_path=json_path, metric=metric, device=device, **kwargs)
    typer.echo(json.dumps(result, indent=2, default=str))


# --------------------------------------------------------------------------- demo
@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("runs"), help="Holds demo-data/, demo/ (the cached checkpoint), demo-samples/."),
    host: str = typer.Option("127.0.0.1", help="Bind address."),
    port: int = typer.Option(8000, help="HTTP port (0: any free port)."),
    shots: int = typer.Option(1, min=1, max=10, help="Support clips registered per held-out class."),
    train: bool = typer.Option(False, "--train", help="Serve the synthetic-tiny preset trained on the demo data "
                                                      "(minutes) instead of its training-free model, which scored "
                                                      "higher on held-out classes (docs/learning.md)."),
    max_steps: Optional[int] = typer.Option(None, help="With --train: cap the one-off training (default: the preset's)."),
    retrain: bool = typer.Option(False, help="Make the demo model again even if it is cached."),
    no_serve: bool = typer.Option(False, "--no-serve", help="Stop after the checks instead of serving."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides of the synthetic-tiny preset."),
) -> None:
    """Offline demo: synthetic data, the tiny model made once (training-free by default), served with curl
    examples and its answers on held-out clips beside a frame-mean baseline."""
    _setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo's own requests: results are printed
    from service.demo import run_demo

    run_demo(workdir, host=host, port=port or None, max_steps=max_steps, retrain=retrain,
             serve_forever=not no_serve, overrides=list(overrides or []), shots=shots, train_model=train)


# --------------------------------------------------------------------------- serve
@app.command("serve")
def serve_cmd(
    host: Optional[str] = typer.Option(None, help="Bind address (env FSAR_HOST, default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="HTTP port (env FSAR_PORT, default 8000)."),
    backbone: Optional[str] = typer.Option(None, help="open_clip backbone (env FSAR_BACKBONE, default ViT-B-16)."),
    pretrained: Optional[str] = typer.Option(
        None, help="Pretrained tag, local weights file, or 'none' (env FSAR_PRETRAINED, default openai)."),
    checkpoint: Optional[Path] = typer.Option(
        None, help="Adapted checkpoint from `fsar train` (overrides backbone/pretrained) (env FSAR_CHECKPOINT)."),
    backend: Optional[str] = typer.Option(None, help="embedded | triton (env FSAR_BACKEND, default embedded)."),
    triton_url: Optional[str] = typer.Option(None, help="Triton gRPC host:port (env FSAR_TRITON_URL)."),
    redis_url: Optional[str] = typer.Option(
        None, help="redis://host:port/db; unset = in-process store (lost on restart) (env FSAR_REDIS_URL)."),
    workers: Optional[int] = typer.Option(None, help="uvicorn worker processes (>1 needs Redis) (env FSAR_WORKERS)."),
) -> None:
    """Run the HTTP gateway (settings from flags, then FSAR_* environment variables, then defaults)."""
    from service.server import serve
    from service.settings import Settings

    settings = Settings.from_cli(host=host, port=port, backbone=backbone, pretrained=pretrained,
                                 checkpoint=str(checkpoint) if checkpoint else None, backend=backend,
                                 triton_url=triton_url, redis_url=redis_url, workers=workers)
    serve(settings)


# --------------------------------------------------------------------------- export
@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Option(..., help="Checkpoint written by `fsar train` (last.pt / best.pt)."),
    repository: Path = typer.Option(Path("model_repository"), help="Triton model repository to write into."),
    version: int = typer.Option(1, help="Model version folder to write."),
    instance_kind: str = typer.Option("gpu", help="gpu | cpu: Triton instance_group kind."),
    max_batch_size: int = typer.Option(64, help="max_batch_size of the encoders."),
    queue_delay_us: int = typer.Option(2000, help="Dynamic-batching queue delay of the encoders (microseconds)."),
    layout: str = typer.Option("python", help="python: every model in Triton's Python backend; onnx: the video "
                                              "encoders as ONNX Runtime models (no Python, for a full Triton image; "
                                              "GPU hosts); onnx-python: the same ONNX graphs inside Python-backend "
                                              "shells (a Triton with only the Python backend)."),
    tensorrt_fp16: bool = typer.Option(False, help="With --layout onnx: ask ONNX Runtime for the TensorRT FP16 "
                                                   "accelerator (GPU hosts)."),
) -> None:
    """Export a checkpoint as Triton models: text_encoder, video_encoder, fewshot_head (+ ONNX encoders)."""
    from training.export import export_repository

    summary = export_repository(checkpoint, repository, version=version, instance_kind=instance_kind,
                                max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, layout=layout,
                                tensorrt_fp16=tensorrt_fp16)
    typer.echo(json.dumps(summary, indent=2, default=str))


# --------------------------------------------------------------------------- bench
@bench_app.command("decode")
def bench_decode_cmd(
    quick: bool = typer.Option(False, help="Smaller clips; finishes in under a minute on 2 cores."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    workdir: Optional[Path] = typer.Option(None, help="Where generated clips are cached."),
) -> None:
    """Frame sampling (ours) against decoding every frame (naive baseline)."""
    from service.bench.decode import run

    run(quick=quick, json_path=str(json_path) if json_path else None,
        workdir=str(workdir) if workdir else None)


@bench_app.command("decode-pool")
def bench_decode_pool_cmd(
    quick: bool = typer.Option(False, help="2 tiny files per keyframe spacing, 2 rounds (seconds)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    workers: Optional[int] = typer.Option(None, help="Decode worker processes (default: os.cpu_count())."),
    workdir: Optional[Path] = typer.Option(None, help="Where generated clips are cached."),
    encoder_videos_per_s: Optional[float] = typer.Option(
        None, "--encoder-videos-per-s",
        help="GPU encoder videos/s to compare with (default 1250: eager ViT-B/16 on one H100, docs/performance.md, H100 reference figures); "
             "an input, not measured."),
) -> None:
    """Decode pool on all cores: exact and keyframe sampling vs decoding every frame, and vs the GPU encoder."""
    from service.bench.decode_pool import run

    options = {} if encoder_videos_per_s is None else {"encoder_videos_per_s": encoder_videos_per_s}
    run(quick=quick, json_path=str(json_path) if json_path else None, workdir=str(workdir) if workdir else None,
        workers=workers, **options)


@bench_app.command("segments")
def bench_segments_cmd(
    quick: bool = typer.Option(False, help="A 60 s video and the fsar-tiny backbone (under a minute)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (random weights); default fsar-tiny quick, ViT-B-32 full."),
    batch: int = typer.Option(8, help="Windows per encoder call in our path."),
    seconds: Optional[float] = typer.Option(None, help="Video duration in seconds (default 600; quick 60)."),
    workdir: Optional[Path] = typer.Option(None, help="Where the generated video is cached."),
    runtime: str = typer.Option("auto", help="Our path's encoder runtime: auto (as the embedded backend: ONNX Runtime "
                                             "on a CPU when installed) | torch | onnxruntime. The baseline stays torch eager."),
    precision: str = typer.Option("fp32", help="ONNX Runtime precision: fp32 | int8."),
    onnx_cache_dir: Optional[Path] = typer.Option(None, help="Where ONNX graphs are cached (default ~/.cache/fsar/onnx)."),
) -> None:
    """Every 2 s window of a long video: one decoding pass + batched encoding vs the per-window loop."""
    from service.bench.segments import run

    run(quick=quick, json_path=str(json_path) if json_path else None, workdir=str(workdir) if workdir else None,
        backbone=backbone, batch=batch, seconds=seconds, runtime=runtime, precision=precision,
        onnx_cache_dir=str(onnx_cache_dir) if onnx_cache_dir else None)


@bench_app.command("e2e")
def bench_e2e_cmd(
    quick: bool = typer.Option(False, help="Tiny clips, fewer requests, the fsar-tiny backbone (under a minute)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (random weights); default fsar-tiny quick, ViT-B-32 full."),
) -> None:
    """/classify over HTTP at concurrency 1, 4, 16 against the naive decode-all / encode-all pipeline."""
    from service.bench.e2e import run

    run(quick=quick, json_path=str(json_path) if json_path else None, backbone=backbone)


@bench_app.command("cache")
def bench_cache_cmd(
    quick: bool = typer.Option(False, help="Tiny clips, the fsar-tiny backbone, 3 requests a row."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (random weights)."),
) -> None:
    """Feature-cache hit vs miss, and classify against a registered set vs re-registering it."""
    from service.bench.cache import run

    run(quick=quick, json_path=str(json_path) if json_path else None, backbone=backbone)


@bench_app.command("encoder")
def bench_encoder_cmd(
    quick: bool = typer.Option(False, help="A short run (on CPU: a tiny smoke run only)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda)."),
    backbones: Optional[List[str]] = typer.Option(None, help="open_clip models (repeat the option)."),
    batches: Optional[List[int]] = typer.Option(None, help="Videos per batch (repeat the option)."),
    threads: Optional[int] = typer.Option(None, help="CPU intra-op threads (torch and ONNX Runtime)."),
    seconds: Optional[float] = typer.Option(None, help="Seconds measured per point."),
    onnx: Optional[bool] = typer.Option(None, "--onnx/--no-onnx", help="CPU: ONNX Runtime fp32 and int8 rows "
                                                                       "beside torch eager (default on)."),
    onnx_cache_dir: Optional[Path] = typer.Option(None, help="Where the ONNX graphs are cached."),
) -> None:
    """Video-encoder throughput. GPU: eager fp16 baseline vs our path, and through Triton. CPU: torch eager
    fp32 (baseline) vs ONNX Runtime fp32 and int8."""
    from service.bench.encoder import run

    run(quick=quick, json_path=str(json_path) if json_path else None, device=device, backbones=backbones or None,
        batches=batches or None, threads=threads, seconds_per_point=seconds, onnx=onnx,
        onnx_cache_dir=str(onnx_cache_dir) if onnx_cache_dir else None)


def _is_user_error(err: BaseException) -> bool:
    """Our own error types (bad config, missing weights, bad data...) carry a complete message."""
    if isinstance(err, CliError):
        return True
    module = type(err).__module__ or ""
    return module.startswith(("training.", "service.")) and isinstance(err, (ValueError, RuntimeError, OSError))


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: turn our user-facing errors into one readable line and exit 2."""
    try:
        app(args=argv, standalone_mode=True)
    except Exception as err:  # noqa: BLE001 - anything else keeps its traceback
        if not _is_user_error(err):
            raise
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
