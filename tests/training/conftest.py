"""Fixtures shared by the training tests: one torch thread, and one small synthetic dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from training.data import write_synthetic_dataset


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread is as fast and does not stall when other jobs share the cores.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset written once per session: 16 classes of 4 videos, 8 frames of 64 x 64 (read-only)."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, classes=16, videos_per_class=4, frames=8, size=64, seed=5, progress=False)
    return root
