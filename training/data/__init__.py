"""Data for training and evaluation: video datasets in three layouts, split presets, episode and
batch samplers, and a synthetic motion dataset. See each module's docstring."""

from .datasets import (
    CorruptSampleWarning,
    DatasetError,
    VideoDataset,
    load_dataset,
    load_frames_folder,
    sample_frame_indices,
)
from .presets import DATASET_PRESETS, DatasetPreset, check_dataset, get_preset, write_ssv2_labels
from .sampler import (
    EpisodeCollate,
    EpisodeSampler,
    SupervisedBatchSampler,
    collate_supervised,
    episode_loader,
    supervised_loader,
)
from .synth import MOTION_CLASSES, SyntheticDatasetError, render_clip, write_synthetic_dataset

__all__ = [
    "CorruptSampleWarning",
    "DATASET_PRESETS",
    "DatasetError",
    "DatasetPreset",
    "EpisodeCollate",
    "EpisodeSampler",
    "MOTION_CLASSES",
    "SupervisedBatchSampler",
    "SyntheticDatasetError",
    "VideoDataset",
    "check_dataset",
    "collate_supervised",
    "episode_loader",
    "get_preset",
    "load_dataset",
    "load_frames_folder",
    "render_clip",
    "sample_frame_indices",
    "supervised_loader",
    "write_ssv2_labels",
    "write_synthetic_dataset",
]
