"""The encoders of a Triton model repository as ONNX graphs (``fsar export --layout onnx | onnx-python``).

``--layout onnx`` writes, besides the Python-backend ``text_encoder`` and ``fewshot_head``::

    video_encoder          platform onnxruntime_onnx   FRAMES UINT8 [B, T, H, W, 3] -> FRAME_FEATS FP32 [B, T, D]
    video_encoder_support  platform onnxruntime_onnx   FRAMES UINT8 [B, T, H, W, 3], TEXT_FEATS FP32 [B, D]
                                                       -> FRAME_FEATS FP32 [B, T, D]   (support videos)
    text_tokens_encoder    platform onnxruntime_onnx   TOKENS INT64 [B, context] -> TEXT_FEATS FP32 [B, D]

each with ``<version>/model.onnx`` (fp32; :mod:`training.onnx.graphs`), dynamic batching and, with
``tensorrt_fp16``, ONNX Runtime's TensorRT accelerator in FP16 with a persisted engine cache. The
video encoder has no optional input here: support videos (with their label text) go to
``video_encoder_support``; every config carries ``fsar_layout`` so a client can tell.
``--layout onnx-python`` writes the same models, tensors and graphs with ``backend: "python"`` and
``training/triton_models/onnx_encoder.py`` as ``model.py`` (ONNX Runtime inside the Python backend),
for a Triton server with only the Python backend (the local test server).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping

from training.onnx.graphs import export_graph

LAYOUTS = ("python", "onnx", "onnx-python")
#: Triton model name -> graph name.
ONNX_MODELS = {"video_encoder": "video_query", "video_encoder_support": "video_support",
               "text_tokens_encoder": "text"}
SHELL = Path(__file__).resolve().parents[1] / "triton_models" / "onnx_encoder.py"
TRT_CACHE_PATH = "/tmp/fsar_trt_cache"


def tensorrt_block(cache_path: str = TRT_CACHE_PATH) -> str:
    """``optimization`` block: ONNX Runtime's TensorRT execution provider, FP16, engines cached on disk
    (an engine build takes minutes; mount ``cache_path`` on a volume so restarts reuse them)."""
    params = {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30),
              "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache_path}
    entries = "\n".join(f'      parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return ("optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
            f'      name: "tensorrt"\n{entries}\n    }} ] }} }}\n')


def _tensors(model: str, embed_dim: int, image_size: int, num_frames: int, context: int) -> Dict[str, List[str]]:
    from training.export import _tensor

    frames = _tensor("FRAMES", "TYPE_UINT8", [num_frames, image_size, image_size, 3])
    feats = _tensor("FRAME_FEATS", "TYPE_FP32", [num_frames, embed_dim])
    return {
        "video_encoder": {"input": [frames], "output": [feats]},
        "video_encoder_support": {"input": [frames, _tensor("TEXT_FEATS", "TYPE_FP32", [embed_dim])],
                                  "output": [feats]},
        "text_tokens_encoder": {"input": [_tensor("TOKENS", "TYPE_INT64", [context])],
                                "output": [_tensor("TEXT_FEATS", "TYPE_FP32", [embed_dim])]},
    }[model]


_COMMENTS = {
    "video_encoder": "fsar video encoder, query videos (ONNX graph; written by `fsar export --layout {layout}`).\n"
                     "FRAMES: one video per row, T RGB frames at the model's input size, uint8 (normalised inside).\n"
                     "FRAME_FEATS: per-frame features [T, D]. Support videos go to video_encoder_support.",
    "video_encoder_support": "fsar video encoder, support videos (ONNX graph; `fsar export --layout {layout}`).\n"
                             "FRAMES as video_encoder; TEXT_FEATS: the video's label text feature [D].\n"
                             "FRAME_FEATS: per-frame features [T, D].",
    "text_tokens_encoder": "fsar text encoder on token ids (ONNX graph; `fsar export --layout {layout}`).\n"
                           "TOKENS: the open_clip token ids of one prompt (template applied, tokenized by the "
                           "client).\nTEXT_FEATS: its text feature [D] (unnormalised).",
}


def model_config(model: str, layout: str, *, embed_dim: int, image_size: int, num_frames: int, context: int,
                 instance_kind: str, max_batch_size: int, queue_delay_us: int, parameters: Mapping[str, str],
                 tensorrt_fp16: bool = False) -> str:
    """``config.pbtxt`` of one ONNX encoder model (``layout`` onnx: ONNX Runtime platform; onnx-python: shell)."""
    from training.export import _config

    tensors = _tensors(model, embed_dim, image_size, num_frames, context)
    text = _config(model, max_batch_size, tensors["input"], tensors["output"], instance_kind,
                   {**parameters, "fsar_layout": layout}, queue_delay_us, _COMMENTS[model].format(layout=layout))
    if layout == "onnx":
        text = text.replace('backend: "python"\n', 'platform: "onnxruntime_onnx"\n', 1)
        if tensorrt_fp16:
            text += tensorrt_block()
    return text


def write_onnx_models(checkpoint: Path, repository: Path, version: int, *, layout: str, instance_kind: str,
                      max_batch_size: int, queue_delay_us: int, tensorrt_fp16: bool = False) -> Dict[str, str]:
    """Build the checkpoint's model, export its three encoder graphs into ``repository`` (``layout`` onnx
    or onnx-python) and write their configs; tag the Python-backend models' configs with ``fsar_layout``.

    Returns:
        ``{model name: folder}`` of the models written.
    """
    from training.checkpoint import load_checkpoint
    from training.export import _atomic_copy, _atomic_write_text

    if layout not in ("onnx", "onnx-python"):
        raise ValueError(f"layout must be 'onnx' or 'onnx-python', got {layout!r}")
    model, _ = load_checkpoint(checkpoint, map_location="cpu")
    model = model.float().eval()
    parameters = _parameters(repository / "fewshot_head" / "config.pbtxt")
    context = int(model.tokenize(["x"]).shape[1])
    folders: Dict[str, str] = {}
    for name, graph in ONNX_MODELS.items():
        model_dir = repository / name
        version_dir = model_dir / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("model.py", "checkpoint.pt"):
            (version_dir / stale).unlink(missing_ok=True)
        export_graph(model, graph, version_dir / "model.onnx")
        if layout == "onnx-python":
            _atomic_copy(SHELL, version_dir / "model.py")
        _atomic_write_text(model_dir / "config.pbtxt", model_config(
            name, layout, embed_dim=model.embed_dim, image_size=int(model.image_size[0]),
            num_frames=model.num_frames, context=context, instance_kind=instance_kind,
            max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, parameters=parameters,
            tensorrt_fp16=tensorrt_fp16))
        folders[name] = str(model_dir)
    for name in ("text_encoder", "fewshot_head"):
        config = repository / name / "config.pbtxt"
        text = config.read_text()
        if '"fsar_layout"' not in text:
            text = text.replace("parameters [\n", f'parameters [\n  {{ key: "fsar_layout" value: {{ string_value: '
                                                  f'"{layout}" }} }},\n', 1)
            _atomic_write_text(config, text)
    return folders


def _parameters(config: Path) -> Dict[str, str]:
    """The ``fsar_*`` parameters of a config written by :mod:`training.export` (key -> string value)."""
    import re

    found = re.findall(r'\{ key: "([^"]+)" value: \{ string_value: "((?:[^"\\]|\\.)*)" \} \}', config.read_text())
    unescape = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
    return {key: re.sub(r'\\[\\"n]', lambda m: unescape[m.group(0)], value) for key, value in found}


__all__ = ["LAYOUTS", "ONNX_MODELS", "model_config", "tensorrt_block", "write_onnx_models"]
