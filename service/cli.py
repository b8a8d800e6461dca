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
    videos_per_class: Optional[int] = typer.Option(None, help="Videos per class."),
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


# --------------------------------------------------------------------------- bench
@bench_app.command("decode")
def bench_decode_cmd(
    quick: bool = typer.Option(False, help="Smaller clips; finishes in under a minute on 2 cores."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    workdir: Optional[Path] = typer.Option(None, help="Where generated clips are cached."),
) -> None:
    """Frame sampling (ours) against decoding every frame (naive baseline)."""
    from bench.decode import run

    run(quick=quick, json_path=str(json_path) if json_path else None,
        workdir=str(workdir) if workdir else None)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: turn known user-facing errors into one readable line and exit 2."""
    try:
        app(args=argv, standalone_mode=True)
    except CliError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
