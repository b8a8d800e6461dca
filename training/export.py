"""Export a checkpoint to a Triton model repository of three Python-backend models.

    summary = export_repository("runs/x/best.pt", "model_repository", version=1, instance_kind="gpu")

writes, for ``text_encoder``, ``video_encoder`` and ``fewshot_head``::

    model_repository/<model>/config.pbtxt          explicit dtypes and dims, batching, instance group,
                                                    and fsar_* parameters describing the model
    model_repository/<model>/<version>/model.py    thin shell, copied from training/triton_models/<model>.py
    model_repository/<model>/<version>/checkpoint.pt      the checkpoint, copied
    model_repository/<model>/<version>/fsar_export.json   checkpoint hash, config, inputs/outputs

Models and tensors (``B`` is Triton's implicit batch dimension where ``max_batch_size > 0``)::

    text_encoder   LABEL BYTES [B, 1] (a label; the prompt template is applied inside)
                   -> TEXT_FEATS FP32 [B, D]
    video_encoder  FRAMES UINT8 [B, T, H, W, 3] (RGB at the model's input size; normalised inside)
                   + TEXT_FEATS FP32 [B, D], optional: each support video's label text feature
                   -> FRAME_FEATS FP32 [B, T, D]
    fewshot_head   OP BYTES [1] = "prototypes" | "classify" | "zero_shot" | "explain", and by OP:
                   prototypes: SUPPORT_FEATS [S, T, D], SUPPORT_LABELS INT64 [S], TEXT_FEATS [N, D]
                               -> PROTOTYPES FP32 [N, T, D]
                   classify:   QUERY_FEATS [Q, T, D], PROTOTYPES [N, T, D], TEXT_FEATS [N, D] optional
                               -> LOGITS FP32 [Q, N]
                   zero_shot:  QUERY_FEATS [Q, T, D], TEXT_FEATS [N, D] -> LOGITS FP32 [Q, N]
                   explain:    QUERY_FEATS [Q, T, D], PROTOTYPES [N, T, D] -> SIMILARITY FP32 [Q, N, T, T],
                               ALIGNMENT FP32 [Q, N, 2, T, T] (training.model.explain)

The encoders batch dynamically; the dynamic batcher merges only consecutive requests with the
same inputs, so video requests with TEXT_FEATS (support videos) and without (queries) form
separate batches. ``fewshot_head`` takes one episode per request (``max_batch_size: 0``).

Backbone weights: the models rebuild the backbone from the checkpoint's pretrained tag or file,
or from the ``FSAR_PRETRAINED`` environment variable of the Triton server (a tag or a local file
with the same weights, checked against the recorded weight hash). A checkpoint of a random
backbone carries the backbone weights itself, so nothing is re-randomised.

Each ``model.py`` is a copy of a real module in :mod:`training.triton_models` (``initialize`` loads
the checkpoint, ``execute`` calls :class:`training.model.ModelRunner`); all model math stays in
:class:`training.model.FsarModel`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from training.checkpoint import read_checkpoint_meta
from training.model.card import ModelCard
from training.model.config import ModelConfig
from training.model.runner import ModelRunner
from training.triton_models.common import CHECKPOINT_FILE, decode_strings, load_runner, run_merged  # noqa: F401
from training.triton_models.common import fewshot_op as _fewshot_op

MODEL_NAMES = ("text_encoder", "video_encoder", "fewshot_head")
METADATA_FILE = "fsar_export.json"
#: The folder of the Triton shells; ``<name>.py`` there becomes ``<repository>/<name>/<version>/model.py``.
SHELLS_DIR = Path(__file__).resolve().parent / "triton_models"
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}

PathLike = Union[str, os.PathLike]


class ExportError(ValueError):
    """Export arguments or the target repository are not usable."""


# ====================================================================== export
def export_repository(checkpoint: PathLike, repository: PathLike, version: int = 1, *,
                      instance_kind: str = "gpu", max_batch_size: int = 64,
                      queue_delay_us: int = 2000, layout: str = "python",
                      tensorrt_fp16: bool = False) -> Dict[str, Any]:
    """Write the three Triton models for ``checkpoint`` into ``repository`` (version ``version``).

    Re-exporting into an existing version folder replaces its files; other versions and other
    models in the repository are left alone. The model is not built (the backbone weights need not
    be on this host); the checkpoint's format is checked.

    Args:
        checkpoint: an fsar checkpoint (:func:`training.checkpoint.save_checkpoint`).
        repository: the model repository folder (created if missing).
        version: Triton version folder number (>= 1).
        instance_kind: ``"gpu"`` (``KIND_GPU``, one instance per visible GPU) or ``"cpu"``.
        max_batch_size: largest dynamic batch of the encoders (videos or labels).
        queue_delay_us: how long the encoders' dynamic batcher waits to fill a batch.
        layout: ``"python"`` (the three Python-backend models above), ``"onnx"`` (adds the encoder
            graphs as ONNX Runtime models, see :mod:`training.onnx.triton_layout`) or ``"onnx-python"`` (the
            same graphs and tensors in Python-backend shells running ONNX Runtime, for a server with
            only the Python backend).
        tensorrt_fp16: ``layout="onnx"`` on GPU instances: add ONNX Runtime's TensorRT accelerator (FP16,
            engine cache) to the encoder graphs' configs.

    Returns:
        ``{"repository", "version", "checkpoint", "checkpoint_hash", "models": {name: folder},
        "instance_kind", "max_batch_size", "queue_delay_us", "backbone", "embed_dim", "num_frames",
        "image_size", "bytes"}``.

    Raises:
        ExportError: invalid arguments. CheckpointError: not a readable fsar checkpoint.
    """
    _check_export_args(version, instance_kind, max_batch_size, queue_delay_us)
    from training.onnx.triton_layout import LAYOUTS, write_onnx_models

    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if tensorrt_fp16 and (layout != "onnx" or instance_kind != "gpu"):
        raise ExportError("tensorrt_fp16 needs layout 'onnx' and GPU instances (instance_kind 'gpu')")
    source = Path(checkpoint)
    meta = read_checkpoint_meta(source)
    summary = _write_repository(Path(repository), meta, source, version, instance_kind, max_batch_size,
                                queue_delay_us)
    summary["layout"] = layout
    if layout != "python":
        summary["models"].update(write_onnx_models(
            source, Path(repository), version, layout=layout, instance_kind=INSTANCE_KINDS[instance_kind],
            max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, tensorrt_fp16=tensorrt_fp16))
    return summary


def write_placeholder_repository(repository: PathLike, config: Optional[ModelConfig] = None, version: int = 1,
                                 *, instance_kind: str = "gpu", max_batch_size: int = 64,
                                 queue_delay_us: int = 2000) -> Dict[str, Any]:
    """Write the three models for ``config`` *without* weights (the repository checked into git).

    The configs and ``model.py`` files are exactly what :func:`export_repository` writes for a
    checkpoint of that config; the models refuse to load, with a message saying to run
    ``fsar export``, until a checkpoint is exported into the same version.
    """
    _check_export_args(version, instance_kind, max_batch_size, queue_delay_us)
    config = config or ModelConfig()
    meta = {"checkpoint_hash": None, "config": config.to_dict(),
            "backbone": {"name": config.backbone, "pretrained": config.pretrained, "weights_source": None,
                         "weights_hash": None, "weights_embedded": False},
            "parameters": {}}
    return _write_repository(Path(repository), meta, None, version, instance_kind, max_batch_size, queue_delay_us)


def _check_export_args(version: int, instance_kind: str, max_batch_size: int, queue_delay_us: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"version must be an integer >= 1 (a Triton version folder), got {version!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise ExportError(f"instance_kind must be 'gpu' or 'cpu', got {instance_kind!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ExportError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if isinstance(queue_delay_us, bool) or not isinstance(queue_delay_us, int) or queue_delay_us < 0:
        raise ExportError(f"queue_delay_us must be a non-negative integer (microseconds), got {queue_delay_us!r}")


def _model_dims(config: ModelConfig) -> Tuple[int, int, int]:
    """``(D, image size, T)`` from the open_clip model config, without building the model."""
    import open_clip

    from training.model.backbone import register_model_configs

    register_model_configs()
    model_cfg = open_clip.get_model_config(config.backbone)
    if model_cfg is None:
        raise ExportError(f"unknown open_clip model {config.backbone!r} in the checkpoint's config")
    image_size = model_cfg["vision_cfg"].get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ExportError(f"{config.backbone} has a non-square input {image_size}; not supported")
        image_size = image_size[0]
    return int(model_cfg["embed_dim"]), int(image_size), int(config.num_frames)


def _write_repository(repository: Path, meta: Mapping[str, Any], checkpoint: Optional[Path], version: int,
                      instance_kind: str, max_batch_size: int, queue_delay_us: int) -> Dict[str, Any]:
    config = ModelConfig.from_dict(meta["config"])
    embed_dim, image_size, num_frames = _model_dims(config)
    if repository.exists() and not repository.is_dir():
        raise ExportError(f"repository {repository} exists and is not a folder")
    card = ModelCard.from_checkpoint_meta({**meta, "config": config.to_dict()}, input_size=image_size,
                                          embed_dim=embed_dim)
    parameters = card.to_triton_parameters()
    if meta.get("open_set"):  # thresholds `fsar eval --open-set --record` measured: the gateway reads them
        parameters["fsar_open_set"] = json.dumps(meta["open_set"], sort_keys=True)
    if meta.get("calibration"):  # the temperature `fsar eval --calibrate --record` fitted: the gateway applies it
        parameters["fsar_calibration"] = json.dumps(meta["calibration"], sort_keys=True)
    kind = INSTANCE_KINDS[instance_kind]
    configs = {
        "text_encoder": _text_encoder_config(embed_dim, kind, max_batch_size, queue_delay_us, parameters),
        "video_encoder": _video_encoder_config(embed_dim, image_size, num_frames, kind, max_batch_size,
                                               queue_delay_us, parameters),
        "fewshot_head": _fewshot_head_config(embed_dim, num_frames, kind, parameters),
    }
    exported_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    folders: Dict[str, str] = {}
    total_bytes = 0
    for name in MODEL_NAMES:
        model_dir = repository / name
        version_dir = model_dir / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(model_dir / "config.pbtxt", configs[name])
        _atomic_copy(SHELLS_DIR / f"{name}.py", version_dir / "model.py")
        if checkpoint is not None:
            _atomic_copy(checkpoint, version_dir / CHECKPOINT_FILE)
        else:
            (version_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        record = {
            "model": name,
            "version": version,
            "checkpoint_hash": meta.get("checkpoint_hash"),
            "fingerprint": meta.get("checkpoint_hash"),
            "source_checkpoint": str(checkpoint.resolve()) if checkpoint is not None else None,
            "placeholder": checkpoint is None,
            "exported_at": exported_at,
            "backbone": dict(meta["backbone"]),
            "config": config.to_dict(),
            "parameters": dict(meta.get("parameters") or {}),
            "step": meta.get("step"),
            "metrics": meta.get("metrics"),
            "instance_kind": instance_kind,
            "max_batch_size": max_batch_size if name != "fewshot_head" else 0,
            "queue_delay_us": queue_delay_us if name != "fewshot_head" else None,
            "io": _IO_DOC[name],
        }
        _atomic_write_text(version_dir / METADATA_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        folders[name] = str(model_dir)
        total_bytes += sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    return {
        "repository": str(repository),
        "version": version,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "checkpoint_hash": meta.get("checkpoint_hash"),
        "models": folders,
        "instance_kind": instance_kind,
        "max_batch_size": max_batch_size,
        "queue_delay_us": queue_delay_us,
        "backbone": config.backbone,
        "embed_dim": embed_dim,
        "num_frames": num_frames,
        "image_size": image_size,
        "bytes": total_bytes,
    }


# ---------------------------------------------------------------------- config.pbtxt
def _pbtxt_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _parameters_block(parameters: Mapping[str, str]) -> str:
    entries = ",\n".join(f"  {{ key: {_pbtxt_string(key)} value: {{ string_value: {_pbtxt_string(value)} }} }}"
                         for key, value in parameters.items())
    return f"parameters [\n{entries}\n]\n"


def _tensor(name: str, dtype: str, dims: Sequence[int], optional: bool = False) -> str:
    dims_text = ", ".join(str(d) for d in dims)
    return (f'  {{ name: "{name}" data_type: {dtype} dims: [ {dims_text} ]'
            f'{" optional: true" if optional else ""} }}')


def _config(name: str, max_batch_size: int, inputs: List[str], outputs: List[str], kind: str,
            parameters: Mapping[str, str], queue_delay_us: Optional[int], comment: str) -> str:
    lines = [f"# {line}" if line else "#" for line in comment.strip().splitlines()]
    text = "\n".join(lines) + "\n"
    text += f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
    text += "input [\n" + ",\n".join(inputs) + "\n]\n"
    text += "output [\n" + ",\n".join(outputs) + "\n]\n"
    if queue_delay_us is not None:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
    text += f"instance_group [ {{ kind: {kind} count: 1 }} ]\n"
    text += _parameters_block(parameters)
    return text


def _text_encoder_config(embed_dim: int, kind: str, max_batch_size: int, queue_delay_us: int,
                         parameters: Mapping[str, str]) -> str:
    return _config(
        "text_encoder", max_batch_size,
        [_tensor("LABEL", "TYPE_STRING", [1])],
        [_tensor("TEXT_FEATS", "TYPE_FP32", [embed_dim])],
        kind, parameters, queue_delay_us,
        "fsar text encoder (written by `fsar export`).\n"
        "LABEL: one UTF-8 label per row (the prompt template is applied inside).\n"
        "TEXT_FEATS: its text feature [D] (unnormalised).")


def _video_encoder_config(embed_dim: int, image_size: int, num_frames: int, kind: str, max_batch_size: int,
                          queue_delay_us: int, parameters: Mapping[str, str]) -> str:
    return _config(
        "video_encoder", max_batch_size,
        [_tensor("FRAMES", "TYPE_UINT8", [num_frames, image_size, image_size, 3]),
         _tensor("TEXT_FEATS", "TYPE_FP32", [embed_dim], optional=True)],
        [_tensor("FRAME_FEATS", "TYPE_FP32", [num_frames, embed_dim])],
        kind, parameters, queue_delay_us,
        "fsar video encoder (written by `fsar export`).\n"
        "FRAMES: one video per row, T RGB frames at the model's input size, uint8 (normalised inside).\n"
        "TEXT_FEATS (optional): the video's label text feature, for support videos only.\n"
        "FRAME_FEATS: per-frame features [T, D].\n"
        "Requests with and without TEXT_FEATS are batched separately.")


def _fewshot_head_config(embed_dim: int, num_frames: int, kind: str, parameters: Mapping[str, str]) -> str:
    feats = [-1, num_frames, embed_dim]
    return _config(
        "fewshot_head", 0,
        [_tensor("OP", "TYPE_STRING", [1]),
         _tensor("SUPPORT_FEATS", "TYPE_FP32", feats, optional=True),
         _tensor("SUPPORT_LABELS", "TYPE_INT64", [-1], optional=True),
         _tensor("TEXT_FEATS", "TYPE_FP32", [-1, embed_dim], optional=True),
         _tensor("QUERY_FEATS", "TYPE_FP32", feats, optional=True),
         _tensor("PROTOTYPES", "TYPE_FP32", feats, optional=True)],
        [_tensor("PROTOTYPES", "TYPE_FP32", feats),
         _tensor("LOGITS", "TYPE_FP32", [-1, -1]),
         _tensor("SIMILARITY", "TYPE_FP32", [-1, -1, num_frames, num_frames]),
         _tensor("ALIGNMENT", "TYPE_FP32", [-1, -1, 2, num_frames, num_frames])],
        kind, parameters, None,
        "fsar few-shot head: TPCM + temporal metric (written by `fsar export`). One episode a request.\n"
        'OP "prototypes": SUPPORT_FEATS [S,T,D], SUPPORT_LABELS [S] (0..N-1), TEXT_FEATS [N,D] -> PROTOTYPES [N,T,D]\n'
        'OP "classify": QUERY_FEATS [Q,T,D], PROTOTYPES [N,T,D], TEXT_FEATS [N,D] optional -> LOGITS [Q,N]\n'
        'OP "zero_shot": QUERY_FEATS [Q,T,D], TEXT_FEATS [N,D] -> LOGITS [Q,N]\n'
        'OP "explain": QUERY_FEATS [Q,T,D], PROTOTYPES [N,T,D] -> SIMILARITY [Q,N,T,T], ALIGNMENT [Q,N,2,T,T]\n'
        "softmax(LOGITS) over N gives the class probabilities.")


_IO_DOC = {
    "text_encoder": {"inputs": {"LABEL": "BYTES [B, 1]"}, "outputs": {"TEXT_FEATS": "FP32 [B, D]"}},
    "video_encoder": {"inputs": {"FRAMES": "UINT8 [B, T, H, W, 3]", "TEXT_FEATS": "FP32 [B, D] (optional)"},
                      "outputs": {"FRAME_FEATS": "FP32 [B, T, D]"}},
    "fewshot_head": {
        "inputs": {"OP": "BYTES [1]: prototypes | classify | zero_shot | explain", "SUPPORT_FEATS": "FP32 [S, T, D]",
                   "SUPPORT_LABELS": "INT64 [S]", "TEXT_FEATS": "FP32 [N, D]", "QUERY_FEATS": "FP32 [Q, T, D]",
                   "PROTOTYPES": "FP32 [N, T, D]"},
        "outputs": {"PROTOTYPES": "FP32 [N, T, D] (prototypes)", "LOGITS": "FP32 [Q, N] (classify, zero_shot)",
                    "SIMILARITY": "FP32 [Q, N, T, T] (explain)", "ALIGNMENT": "FP32 [Q, N, 2, T, T] (explain)"}},
}


# ---------------------------------------------------------------------- files
def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_copy(source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- model.py files of earlier exports
# Repositories exported before the shells moved to training/triton_models import these names from
# here; they keep loading until re-exported. New code uses ModelRunner and training.triton_models.
def load_exported_model(args: Mapping[str, str]) -> Any:
    """The :class:`FsarModel` of one exported model instance (see :func:`load_runner`)."""
    return load_runner(args).model


def encode_texts(model: Any, labels: Any) -> Any:
    """BYTES labels ``[N, 1]`` -> FP32 ``[N, D]``."""
    return ModelRunner(model).encode_texts(decode_strings(labels))


def encode_videos(model: Any, frames: Any, text_feats: Any = None) -> Any:
    """uint8 ``[B, T, H, W, 3]`` (+ FP32 ``[B, D]``) -> FP32 ``[B, T, D]``."""
    return ModelRunner(model).encode_videos(frames, text_feats)


def fewshot_op(model: Any, op: str, inputs: Mapping[str, Any]) -> Dict[str, Any]:
    """One ``fewshot_head`` request (see :func:`training.triton_models.common.fewshot_op`)."""
    return _fewshot_op(ModelRunner(model), op, inputs)
