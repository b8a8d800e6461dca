"""ONNX graphs of the fsar encoders, exported from the same :class:`FsarModel` code torch runs.

Three graphs, each with a dynamic batch dimension ``B`` (videos or labels)::

    video_query    FRAMES uint8 [B, T, H, W, 3]                       -> FRAME_FEATS float32 [B, T, D]
    video_support  FRAMES uint8 [B, T, H, W, 3], TEXT_FEATS f32 [B, D] -> FRAME_FEATS float32 [B, T, D]
    text           TOKENS int64 [B, context]                           -> TEXT_FEATS float32 [B, D]

The graphs include pixel normalisation, every adapter (TED, MA with the support branch's label
text, the temporal adapter, text adapters) and CLIP's projections; the tokenizer and the few-shot
head (TPCM + metric) stay in Python. ``video_support`` differs from ``video_query`` only for models
with MA adapters (other models ignore the label text; the graph still takes it, so callers need not
know the adapter type).
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
from torch import Tensor, nn

from training.model.fsar_model import FsarModel

log = logging.getLogger(__name__)

#: ONNX operator set of the graphs (ONNX Runtime >= 1.15 and Triton's ONNX Runtime backend run it).
OPSET = 18
#: Graph names -> (input names, output name).
GRAPHS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "video_query": (("FRAMES",), "FRAME_FEATS"),
    "video_support": (("FRAMES", "TEXT_FEATS"), "FRAME_FEATS"),
    "text": (("TOKENS",), "TEXT_FEATS"),
}
PathLike = Union[str, os.PathLike]


class VideoQueryGraph(nn.Module):
    """``FRAMES uint8 [B, T, H, W, 3]`` -> ``FRAME_FEATS [B, T, D]`` (query branch, no label text)."""

    def __init__(self, model: FsarModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: Tensor) -> Tensor:
        return self.model.encode_video(frames).float()


class VideoSupportGraph(nn.Module):
    """``FRAMES uint8 [B, T, H, W, 3]``, ``TEXT_FEATS [B, D]`` -> ``FRAME_FEATS [B, T, D]`` (support branch)."""

    def __init__(self, model: FsarModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: Tensor, texts: Tensor) -> Tensor:
        feats = self.model.encode_video(frames, texts=texts).float()
        if not self.model.config.uses_ma:
            # The label text does not reach the features; keep it a graph input all the same (x * 0
            # of finite text features adds exact zeros) so every model's support graph has one signature.
            feats = feats + (texts.float().sum(-1) * 0.0).view(-1, 1, 1)
        return feats


class TextGraph(nn.Module):
    """``TOKENS int64 [B, context]`` -> ``TEXT_FEATS [B, D]`` (prompt template and tokenizer applied before)."""

    def __init__(self, model: FsarModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text_tokens(tokens).float()


def example_inputs(model: FsarModel, graph: str, batch: int = 2) -> Tuple[Tensor, ...]:
    """Inputs of ``graph`` for ``batch`` rows (random frames, text features and a tokenized label)."""
    generator = torch.Generator().manual_seed(0)
    height, width = model.image_size
    frames = torch.randint(0, 256, (batch, model.num_frames, height, width, 3), dtype=torch.uint8,
                           generator=generator)
    if graph == "video_query":
        return (frames,)
    if graph == "video_support":
        return frames, torch.randn(batch, model.embed_dim, generator=generator)
    if graph == "text":
        return (model.tokenize(["an example label"] * batch).cpu(),)
    raise ValueError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPHS)}")


def _module(model: FsarModel, graph: str) -> nn.Module:
    return {"video_query": VideoQueryGraph, "video_support": VideoSupportGraph, "text": TextGraph}[graph](model)


def export_graph(model: FsarModel, graph: str, path: PathLike) -> Path:
    """Export one graph of ``model`` (fp32, on CPU) to ``path`` atomically; returns the path.

    The model must be fp32 (``config.precision``); it is exported as it is (any training state), in eval mode.
    """
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPHS)}")
    if model.dtype != torch.float32 or model.device.type != "cpu":
        raise ValueError(f"export an fp32 model on the CPU, got {model.dtype} on {model.device}")
    input_names, output_name = GRAPHS[graph]
    inputs = example_inputs(model, graph)
    batch = torch.export.Dim("batch", min=1, max=4096)
    arg_names = {"video_query": ("frames",), "video_support": ("frames", "texts"), "text": ("tokens",)}[graph]
    dynamic_shapes = {name: {0: batch} for name in arg_names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _module(model, graph), inputs, None, dynamo=True, opset_version=OPSET,
                input_names=list(input_names), output_names=[output_name], dynamic_shapes=dynamic_shapes,
                external_data=False, verbose=False)
            program.save(tmp, external_data=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training)
    log.info("exported the %s graph of %s to %s (%.1f MB)", graph, model.backbone_name, path,
             path.stat().st_size / 1e6)
    return path


def quantize_int8(source: PathLike, target: PathLike) -> Path:
    """Dynamic int8 quantisation of a graph's weights (MatMul / Gemm; activations quantised per call).

    Convolutions (the patch embedding, the adapters' small depthwise convs) stay fp32: ONNX Runtime's
    ConvInteger is slower than its fp32 convolution on CPU.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        quantize_dynamic(str(source), tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=False, reduce_range=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


__all__ = ["GRAPHS", "OPSET", "VideoQueryGraph", "VideoSupportGraph", "TextGraph", "example_inputs",
           "export_graph", "quantize_int8"]
