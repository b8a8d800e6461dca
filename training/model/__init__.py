"""The fsar model: a frozen open_clip CLIP adapted to video (M2-CLIP TED / MA-CLIP adapters), TPCM and a
temporal metric, built from one :class:`ModelConfig` by :func:`build_model`.

Names are imported on first use, so torch-free submodules (``training.model.card``) can be imported
without torch (the Triton gateway reads model cards and installs no torch).
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_EXPORTS = {
    "BackboneError": "training.model.backbone",
    "PretrainedWeightsError": "training.model.backbone",
    "load_backbone": "training.model.backbone",
    "register_model_configs": "training.model.backbone",
    "ModelCard": "training.model.card",
    "ModelConfig": "training.model.config",
    "ModelConfigError": "training.model.config",
    "CheckpointMismatchError": "training.model.fsar_model",
    "FsarModel": "training.model.fsar_model",
    "build_model": "training.model.fsar_model",
    "ModelRunner": "training.model.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
