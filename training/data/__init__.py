"""Data for training and evaluation: video datasets in three layouts (``datasets``), split presets and
a dataset checker (``presets``), episode and batch samplers (``sampler``), and a synthetic motion
dataset (``synth``). See each module's docstring.

Names are imported lazily, so ``from training.data import write_synthetic_dataset`` (``fsar synth``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # static imports for type checkers and editors
    from .datasets import (CorruptSampleWarning, DatasetError, SplitListing, VideoDataset, list_split, load_dataset,
                           load_frames_folder, sample_frame_indices)
    from .presets import DATASET_PRESETS, DatasetPreset, check_dataset, get_preset, write_ssv2_labels
    from .sampler import (EpisodeCollate, EpisodeSampler, SupervisedBatchSampler, collate_supervised,
                          episode_loader, supervised_loader)
    from .synth import MOTION_CLASSES, SyntheticDatasetError, render_clip, write_mp4, write_synthetic_dataset

_EXPORTS = {
    "datasets": ("CorruptSampleWarning", "DatasetError", "SplitListing", "VideoDataset", "list_split", "load_dataset",
                 "load_frames_folder", "sample_frame_indices"),
    "presets": ("DATASET_PRESETS", "DatasetPreset", "check_dataset", "get_preset", "write_ssv2_labels"),
    "sampler": ("EpisodeCollate", "EpisodeSampler", "SupervisedBatchSampler", "collate_supervised",
                "episode_loader", "supervised_loader"),
    "synth": ("MOTION_CLASSES", "SyntheticDatasetError", "render_clip", "write_mp4", "write_synthetic_dataset"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
