"""Checkpoints: the trained part of an :class:`FsarModel` plus everything needed to rebuild it.

A checkpoint is one ``torch.save`` file of plain dicts, strings, numbers and tensors (loaded with
``torch.load(weights_only=True)``: nothing is unpickled as code). It holds:

* ``trainable_state``: :meth:`FsarModel.trainable_state_dict` (adapters, TPCM, metric, scales);
  the frozen backbone is *not* stored when it comes from a pretrained tag or file;
* ``config``: the full :class:`ModelConfig` dict, and ``backbone``: its name, pretrained tag or
  file, weights source and weight hash (sha256 of the open_clip state_dict);
* ``backbone_state``: only for a backbone with random weights (tests, demos): the frozen weights
  themselves, so the model comes back exactly rather than re-randomised;
* training metadata (``step``, ``metrics``, ``extra``, time, library versions, parameter counts);
* optionally ``open_set``: the model-level open-set thresholds (:func:`record_open_set`);
* optionally ``calibration``: the temperature of its few-shot probabilities (:func:`record_calibration`);
* ``checkpoint_hash``: :meth:`FsarModel.fingerprint` at save time, sha256 over the config, the
  backbone weight hash and the trainable tensors. Saving the same model twice gives the same hash,
  and :func:`load_checkpoint` checks the rebuilt model against it.

    checkpoint_hash = save_checkpoint("runs/x/best.pt", model, step=1000, metrics={"val_acc": 61.2})
    model, meta = load_checkpoint("runs/x/best.pt")          # backbone from the recorded tag/file
    model, meta = load_checkpoint(path, pretrained_override="/weights/ViT-B-16.pt")  # same weights, local file
"""
from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from training.model import FsarModel, ModelConfig, build_model
from training.model.config import ModelConfigError
from training.model.hashing import state_hash

FORMAT = "fsar-checkpoint"
FORMAT_VERSION = 1
_TENSOR_KEYS = ("trainable_state", "backbone_state")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file is not a usable fsar checkpoint (missing, unreadable, wrong format, corrupt)."""


class BackboneMismatchError(CheckpointError):
    """The backbone weights loaded now differ from those the checkpoint was trained on."""


def save_checkpoint(path: PathLike, model: FsarModel, *, step: Optional[int] = None,
                    metrics: Optional[Mapping[str, Any]] = None,
                    extra: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``model``'s checkpoint to ``path`` (atomically) and return its checkpoint hash.

    Args:
        path: output file (parent folders are created).
        model: the model; only trainable tensors are stored, plus the frozen backbone when its
            weights are random (``model.weights_source == "random"``).
        step: training step, if any.
        metrics: JSON-like numbers (numpy scalars are converted), e.g. validation accuracy.
        extra: any other JSON-like metadata (e.g. the training config).

    Returns:
        The checkpoint hash (hex sha256, equal to ``model.fingerprint()``).
    """
    if not isinstance(model, FsarModel):
        raise TypeError(f"save_checkpoint takes an FsarModel, got {type(model).__name__}")
    trainable = {key: tensor.detach().to("cpu").clone() for key, tensor in model.trainable_state_dict().items()}
    backbone_state = None
    if model.weights_source == "random":
        backbone_state = {key: tensor.detach().to("cpu").clone() for key, tensor in model.state_dict().items()
                          if key not in trainable}
    counts = model.count_parameters()
    checkpoint_hash = model.fingerprint()
    payload: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_hash": checkpoint_hash,
        "config": model.config.to_dict(),
        "backbone": {
            "name": model.backbone_name,
            "pretrained": model.config.pretrained,
            "weights_source": model.weights_source,
            "weights_hash": model.backbone_hash,
            "weights_embedded": backbone_state is not None,
        },
        "step": None if step is None else int(step),
        "metrics": _plain(dict(metrics)) if metrics is not None else None,
        "extra": _plain(dict(extra)) if extra is not None else None,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "parameters": {"trainable": int(counts["trainable"]), "total": int(counts["total"])},
        "trainable_state": trainable,
        "backbone_state": backbone_state,
        "backbone_state_hash": state_hash(backbone_state) if backbone_state is not None else None,
    }
    _atomic_save(payload, Path(path))
    return checkpoint_hash


def read_checkpoint_meta(path: PathLike) -> Dict[str, Any]:
    """Everything in a checkpoint except its tensors, without building a model.

    Returns:
        ``{"format", "format_version", "checkpoint_hash", "config", "backbone": {"name",
        "pretrained", "weights_source", "weights_hash", "weights_embedded"}, "step", "metrics",
        "extra", "saved_at", "versions", "parameters": {"trainable", "total"},
        "trainable_tensors": int, "path"}``.

    Raises:
        CheckpointError: not a readable fsar checkpoint.
    """
    payload = _load_payload(path, mmap=True)
    meta = {key: value for key, value in payload.items() if key not in _TENSOR_KEYS}
    meta["trainable_tensors"] = len(payload["trainable_state"])
    meta["path"] = str(Path(path))
    return meta


def load_checkpoint(path: PathLike, *, pretrained_override: Optional[str] = None,
                    map_location: Union[str, torch.device] = "cpu") -> Tuple[FsarModel, Dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from.

    The model is built with :func:`training.model.build_model` from the recorded config; its
    backbone weights come from the recorded pretrained tag or file (or ``pretrained_override``,
    a tag or local file with the *same* weights, e.g. on a host where the tag is not cached), or
    from the checkpoint itself for random backbones. Then the trainable tensors are loaded and
    the result is checked against the recorded hashes.

    Args:
        path: checkpoint file from :func:`save_checkpoint`.
        pretrained_override: where to get the backbone weights instead of the recorded source;
            ignored (with a note in ``meta``) when the checkpoint carries its backbone weights.
        map_location: device the model ends up on.

    Returns:
        ``(model, meta)``: the model in eval mode, and :func:`read_checkpoint_meta`'s dict plus
        ``"pretrained_used"`` (what the backbone was actually loaded from).

    Raises:
        CheckpointError: unreadable file, wrong format, or tensors that do not fit the config.
        BackboneMismatchError: the backbone weights loaded differ from the recorded ones.
        PretrainedWeightsError: the backbone weights cannot be had (offline and not cached, ...).
    """
    payload = _load_payload(path, mmap=False)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except ModelConfigError as err:
        raise CheckpointError(f"{path}: the recorded model config is not valid here: {err}") from err
    recorded = payload["backbone"]
    meta = {key: value for key, value in payload.items() if key not in _TENSOR_KEYS}
    meta["trainable_tensors"] = len(payload["trainable_state"])
    meta["path"] = str(Path(path))

    embedded = payload.get("backbone_state") is not None
    if embedded:
        build_config = config.replace(pretrained=None)
        meta["pretrained_used"] = "checkpoint (random backbone weights saved with it)"
        if pretrained_override:
            meta["pretrained_override_ignored"] = pretrained_override
    else:
        source = pretrained_override or config.pretrained
        build_config = config.replace(pretrained=source)
        meta["pretrained_used"] = source
    model = build_model(build_config)

    if embedded:
        backbone_state = payload["backbone_state"]
        if state_hash(backbone_state) != payload.get("backbone_state_hash"):
            raise CheckpointError(f"{path}: the saved backbone weights do not match their recorded hash "
                                  f"(the file is corrupt)")
        _load_state(model, {**backbone_state, **payload["trainable_state"]}, path)
        # The backbone *is* the recorded one now; restore the facts that describe it.
        model.backbone_hash = recorded["weights_hash"]
        model.weights_source = recorded["weights_source"]
    else:
        if model.backbone_hash != recorded["weights_hash"]:
            raise BackboneMismatchError(
                f"{path} was trained on {recorded['name']} weights {recorded['weights_source']!r} "
                f"(sha256 {recorded['weights_hash'][:16]}...), but the weights loaded from "
                f"{meta['pretrained_used']!r} ({model.weights_source}) differ (sha256 {model.backbone_hash[:16]}...). "
                f"Point pretrained_override / FSAR_PRETRAINED at the same weights the model was trained with.")
        try:
            model.load_trainable_state_dict(payload["trainable_state"])
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from err
    # Record the config as saved (an override names another place for the same weights).
    model.config = config
    if model.fingerprint() != payload["checkpoint_hash"]:
        raise CheckpointError(f"{path}: the rebuilt model's fingerprint differs from the recorded checkpoint hash "
                              f"{payload['checkpoint_hash'][:16]}... (corrupt file, or a model code change)")
    model = model.to(map_location).eval()
    return model, meta


def record_open_set(path: PathLike, open_set: Mapping[str, Any]) -> None:
    """Write the model-level open-set calibration into a checkpoint (atomically), replacing any earlier one.

    ``open_set`` is JSON-like (``fsar eval --open-set --record`` writes ``default_thresholds``
    ``{score: threshold}`` and how they were measured); it appears as ``meta["open_set"]`` in
    :func:`read_checkpoint_meta` and :func:`load_checkpoint`. Weights and the checkpoint hash are
    unchanged; checkpoints without the key load as before.
    """
    payload = _load_payload(path, mmap=False)
    payload["open_set"] = _plain(dict(open_set))
    _atomic_save(payload, Path(path))


def record_calibration(path: PathLike, calibration: Mapping[str, Any]) -> None:
    """Write the few-shot probability calibration into a checkpoint (atomically), replacing any earlier one.

    ``calibration`` is JSON-like with a ``temperature`` > 0 (``fsar eval --calibrate --record`` writes it
    and how it was fitted; :mod:`training.calibration`); it appears as ``meta["calibration"]``. Weights and
    the checkpoint hash are unchanged; checkpoints without the key serve probabilities as before (T = 1).
    """
    from training.calibration import recorded_temperature

    recorded_temperature({"calibration": dict(calibration)})  # refuses a record without a valid temperature
    payload = _load_payload(path, mmap=False)
    payload["calibration"] = _plain(dict(calibration))
    _atomic_save(payload, Path(path))


# ---------------------------------------------------------------------- helpers
def _load_payload(path: PathLike, *, mmap: bool) -> Dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(file)!r} does not exist")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for a foreign or damaged file
        raise CheckpointError(f"{file} is not a readable fsar checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an fsar checkpoint (no format={FORMAT!r} marker); "
                              f"save one with training.checkpoint.save_checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} has checkpoint format version {payload.get('format_version')}; "
                              f"this code reads version {FORMAT_VERSION}")
    for key in ("checkpoint_hash", "config", "backbone", "trainable_state"):
        if key not in payload:
            raise CheckpointError(f"{file} lacks {key!r}; the file is incomplete")
    return payload


def _load_state(model: FsarModel, state: Dict[str, torch.Tensor], path: PathLike) -> None:
    """Load a full model state (frozen backbone + trainable); strict on names and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: saved weights do not fit the recorded config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
    model.load_state_dict(state, strict=True)


def _plain(value: Any) -> Any:
    """A JSON-like copy (dicts, lists, str, int, float, bool, None) that ``weights_only`` loads.

    numpy / torch scalars become numbers, arrays become lists, paths and anything else strings.
    """
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None:
        return None
    for plain in (bool, int, float, str):  # exact types: np.float64 subclasses float
        if isinstance(value, plain):
            return plain(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _plain(item())
        except (ValueError, RuntimeError):  # more than one element
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _plain(tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _versions() -> Dict[str, str]:
    import open_clip

    return {"torch": str(torch.__version__), "open_clip": str(getattr(open_clip, "__version__", "unknown"))}


def _atomic_save(payload: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
