"""The fsar model: a frozen open_clip CLIP adapted to video (M2-CLIP TED / MA-CLIP adapters), TPCM and a
temporal metric, built from one :class:`ModelConfig` by :func:`build_model`."""
from training.model.backbone import BackboneError, PretrainedWeightsError, load_backbone, register_model_configs
from training.model.config import ModelConfig, ModelConfigError
from training.model.fsar_model import CheckpointMismatchError, FsarModel, build_model

__all__ = [
    "BackboneError",
    "CheckpointMismatchError",
    "FsarModel",
    "ModelConfig",
    "ModelConfigError",
    "PretrainedWeightsError",
    "build_model",
    "load_backbone",
    "register_model_configs",
]
