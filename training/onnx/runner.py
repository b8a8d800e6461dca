"""OnnxModelRunner: :class:`ModelRunner` with the encoders on ONNX Runtime.

Same calls, same numpy in and out; the video and text encoders run the exported graphs
(:mod:`training.onnx.graphs`) in ONNX Runtime sessions, the few-shot head (TPCM + metric) stays in
torch::

    runner = OnnxModelRunner.build(model, precision="int8", threads=2)
    feats = runner.encode_videos(frames)             # uint8 [B, T, H, W, 3] -> float32 [B, T, D]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np

from training.model.fsar_model import FsarModel
from training.model.runner import ModelRunner
from training.onnx.cache import ensure_graphs, serving_fingerprint

PathLike = Union[str, os.PathLike]


def make_session(path: PathLike, threads: int = 1, providers: Optional[Sequence[str]] = None):
    """An ONNX Runtime session of one graph: ``threads`` intra-op threads that sleep instead of
    spinning when idle (the cores are shared with decode workers and other model calls)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


class OnnxModelRunner(ModelRunner):
    """A :class:`ModelRunner` whose ``encode_videos`` / ``encode_texts`` run ONNX Runtime sessions.

    Attributes:
        precision: ``fp32`` or ``int8``.
        fingerprint: the features' fingerprint (:func:`training.onnx.cache.serving_fingerprint`).
        graphs: graph name -> file.
    """

    def __init__(self, model: FsarModel, graphs: Mapping[str, PathLike], precision: str = "fp32",
                 threads: int = 1, fingerprint: Optional[str] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(model)
        self.precision = precision
        self.graphs: Dict[str, Path] = {name: Path(path) for name, path in graphs.items()}
        self.threads = threads
        self.fingerprint = serving_fingerprint(fingerprint or model.fingerprint(), precision)
        self.sessions = {name: make_session(path, threads, providers) for name, path in self.graphs.items()}

    @classmethod
    def build(cls, model: FsarModel, precision: str = "fp32", threads: int = 1,
              cache_dir: Optional[PathLike] = None, providers: Optional[Sequence[str]] = None) -> "OnnxModelRunner":
        """Export (or reuse from the cache) ``model``'s graphs at ``precision`` and open them."""
        fingerprint = model.fingerprint()
        graphs = ensure_graphs(model, precision, cache_dir, fingerprint=fingerprint)
        return cls(model, graphs, precision, threads, fingerprint, providers)

    # ------------------------------------------------------------------ encoders
    def encode_videos(self, frames: np.ndarray, text_feats: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 frames ``[B, T, H, W, 3]`` (+ support videos' label text features ``[B, D]``) ->
        frame features float32 ``[B, T, D]``."""
        model = self.model
        height, width = model.image_size
        expected = (model.num_frames, height, width, 3)
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 5 \
                or frames.shape[1:] != expected or frames.shape[0] == 0:
            shape = getattr(frames, "shape", type(frames).__name__)
            raise ValueError(f"frames must be uint8 [B, {', '.join(map(str, expected))}] (B videos, T frames at "
                             f"the model's input size, RGB), got {getattr(frames, 'dtype', '')} {shape}")
        feeds = {"FRAMES": np.ascontiguousarray(frames)}
        if text_feats is None:
            return self.sessions["video_query"].run(None, feeds)[0]
        texts = np.asarray(text_feats)
        if texts.ndim != 2 or texts.shape != (frames.shape[0], model.embed_dim):
            raise ValueError(f"texts must be [{frames.shape[0]}, {model.embed_dim}] text features, "
                             f"got {tuple(texts.shape)}")
        feeds["TEXT_FEATS"] = np.ascontiguousarray(texts, dtype=np.float32)
        return self.sessions["video_support"].run(None, feeds)[0]

    def encode_texts(self, labels: Sequence[str]) -> np.ndarray:
        """N labels -> text features float32 ``[N, D]`` (prompt template and tokenizer in Python)."""
        tokens = self.model.tokenize(list(labels)).cpu().numpy().astype(np.int64)  # [N, context]
        return self.sessions["text"].run(None, {"TOKENS": tokens})[0]


__all__ = ["OnnxModelRunner", "make_session"]
