"""Encoder graphs built once per model fingerprint and precision, kept in a cache folder.

    graphs = ensure_graphs(model, "int8")      # {"video_query": Path, "video_support": Path, "text": Path}

Layout: ``<cache>/<fingerprint>-<precision>/<graph>.onnx`` with ``<cache>`` from
:func:`default_cache_dir` (``$FSAR_ONNX_CACHE`` or ``~/.cache/fsar/onnx``). The fingerprint
(:meth:`FsarModel.fingerprint`) covers the config, the backbone weights and every trainable tensor,
so a retrained or reconfigured model gets new graphs; int8 graphs are quantised from the fp32 ones.
Concurrent builders (several gateway workers starting together) take a file lock, so one exports
and the others load its files.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Union

from training.model.fsar_model import FsarModel
from training.onnx.graphs import GRAPHS, export_graph, quantize_int8

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
CACHE_ENV = "FSAR_ONNX_CACHE"
PathLike = Union[str, os.PathLike]


def default_cache_dir() -> Path:
    """``$FSAR_ONNX_CACHE`` when set, else ``~/.cache/fsar/onnx``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fsar" / "onnx").expanduser()


def serving_fingerprint(fingerprint: str, precision: str) -> str:
    """The fingerprint of the features a model serves at ``precision``.

    fp32 graphs reproduce the torch model (within 1e-4), so they keep its fingerprint and share its
    feature caches; int8 features differ (cosine ~0.999), so they get their own:
    ``sha256("<fingerprint>:<precision>")``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return fingerprint
    return hashlib.sha256(f"{fingerprint}:{precision}".encode()).hexdigest()


def graph_folder(fingerprint: str, precision: str, cache_dir: Optional[PathLike] = None) -> Path:
    """``<cache>/<fingerprint>-<precision>``."""
    return Path(cache_dir or default_cache_dir()).expanduser() / f"{fingerprint}-{precision}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_graphs(model: FsarModel, precision: str = "fp32", cache_dir: Optional[PathLike] = None,
                  graphs: Sequence[str] = tuple(GRAPHS), fingerprint: Optional[str] = None) -> Dict[str, Path]:
    """Paths of ``model``'s encoder graphs at ``precision``, exporting (and quantising) missing ones.

    Args:
        model: an fp32 :class:`FsarModel` on the CPU.
        precision: ``fp32`` or ``int8`` (dynamic quantisation of the weights).
        cache_dir: the cache folder (default :func:`default_cache_dir`).
        graphs: which graphs (default all three).
        fingerprint: ``model.fingerprint()`` when the caller has it already.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    fingerprint = fingerprint or model.fingerprint()
    fp32_folder = graph_folder(fingerprint, "fp32", cache_dir)
    folder = graph_folder(fingerprint, precision, cache_dir)
    paths: Dict[str, Path] = {}
    with _locked(folder.parent / f"{fingerprint}.lock"):
        for graph in graphs:
            target = folder / f"{graph}.onnx"
            if not target.is_file():
                started = time.perf_counter()
                fp32 = fp32_folder / f"{graph}.onnx"
                if not fp32.is_file():
                    export_graph(model, graph, fp32)
                if precision == "int8":
                    quantize_int8(fp32, target)
                log.info("built the %s %s graph in %.1f s (%s)", precision, graph, time.perf_counter() - started,
                         target)
            paths[graph] = target
    return paths


__all__ = ["PRECISIONS", "CACHE_ENV", "default_cache_dir", "serving_fingerprint", "graph_folder", "ensure_graphs"]
