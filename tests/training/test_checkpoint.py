"""Checkpoints: exact round trips, stable hashes, refusal of a different backbone, clear errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from training.checkpoint import (BackboneMismatchError, CheckpointError, load_checkpoint, read_checkpoint_meta,
                                 save_checkpoint)
from training.model import FsarModel, ModelConfig, build_model
from training.model.backbone import register_model_configs

T, SIZE = 8, 64


def _config(pretrained, **overrides) -> ModelConfig:
    return ModelConfig(backbone="fsar-tiny", pretrained=pretrained, adapter="ted+ma", num_frames=T,
                       tpcm_ffn=64, text_adapter_width=16, **overrides)


def _perturb(model: FsarModel, seed: int) -> FsarModel:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def _weights_file(path: Path, seed: int) -> str:
    """A random fsar-tiny open_clip state_dict saved as a weights file (a stand-in for a download)."""
    register_model_configs()
    torch.manual_seed(seed)
    torch.save(open_clip.create_model("fsar-tiny").state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("weights")
    first = _weights_file(folder / "tiny-a.pt", seed=1)
    copy = folder / "elsewhere" / "tiny-a-copy.pt"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    return {"a": first, "a_copy": str(copy), "b": _weights_file(folder / "tiny-b.pt", seed=2)}


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return torch.randint(0, 256, (2, T, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def test_round_trip_restores_the_exact_model(weights, frames, tmp_path: Path) -> None:
    model = _perturb(build_model(_config(weights["a"])), seed=0)
    path = tmp_path / "ckpt.pt"
    checkpoint_hash = save_checkpoint(path, model, step=12, metrics={"val_acc": np.float64(55.5)},
                                      extra={"note": "unit test", "sizes": (1, 2)})
    loaded, meta = load_checkpoint(path)
    assert checkpoint_hash == model.fingerprint() == loaded.fingerprint() == meta["checkpoint_hash"]
    for key, tensor in model.trainable_state_dict().items():
        assert torch.equal(tensor, loaded.trainable_state_dict()[key]), key
    with torch.inference_mode():
        text = model.encode_text(["waving", "running"])
        np.testing.assert_array_equal(loaded.encode_text(["waving", "running"]).numpy(), text.numpy())
        np.testing.assert_array_equal(loaded.encode_video(frames, texts=text).numpy(),
                                      model.encode_video(frames, texts=text).numpy())
    assert meta["step"] == 12 and meta["metrics"] == {"val_acc": 55.5}
    assert meta["extra"] == {"note": "unit test", "sizes": [1, 2]}
    assert meta["backbone"]["weights_hash"] == model.backbone_hash and not meta["backbone"]["weights_embedded"]
    assert not loaded.training


def test_only_trainable_weights_are_stored_for_a_pretrained_backbone(weights, tmp_path: Path) -> None:
    model = build_model(_config(weights["a"]))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    stored = torch.load(path, weights_only=True)
    assert set(stored["trainable_state"]) == set(model.trainable_state_dict())
    assert stored["backbone_state"] is None
    assert all(not key.startswith("clip.") or ".block." not in key for key in stored["trainable_state"])


def test_random_backbone_is_saved_not_rerandomised(frames, tmp_path: Path) -> None:
    torch.manual_seed(10)
    model = _perturb(build_model(_config(None)), seed=1)
    path = tmp_path / "random.pt"
    save_checkpoint(path, model)
    torch.manual_seed(99)  # a re-randomised backbone would differ
    loaded, meta = load_checkpoint(path, pretrained_override="openai")
    assert meta["backbone"]["weights_embedded"] and meta["pretrained_override_ignored"] == "openai"
    assert loaded.backbone_hash == model.backbone_hash and loaded.weights_source == "random"
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    with torch.inference_mode():
        np.testing.assert_array_equal(loaded.encode_video(frames).numpy(), model.encode_video(frames).numpy())


def test_hash_is_stable_and_tracks_weights(weights, tmp_path: Path) -> None:
    model = _perturb(build_model(_config(weights["a"])), seed=3)
    first = save_checkpoint(tmp_path / "one.pt", model, step=1)
    second = save_checkpoint(tmp_path / "two.pt", model, step=2, metrics={"loss": 0.1})
    assert first == second  # metadata does not change the hash; weights and config do
    _perturb(model, seed=4)
    assert save_checkpoint(tmp_path / "three.pt", model) != first


def test_same_weights_from_another_file_are_accepted(weights, tmp_path: Path) -> None:
    model = _perturb(build_model(_config(weights["a"])), seed=5)
    checkpoint_hash = save_checkpoint(tmp_path / "ckpt.pt", model)
    loaded, meta = load_checkpoint(tmp_path / "ckpt.pt", pretrained_override=weights["a_copy"])
    assert meta["pretrained_used"] == weights["a_copy"]
    assert loaded.config.pretrained == weights["a"]  # the config as saved
    assert loaded.fingerprint() == checkpoint_hash


def test_mismatched_backbone_is_refused(weights, tmp_path: Path) -> None:
    model = build_model(_config(weights["a"]))
    save_checkpoint(tmp_path / "ckpt.pt", model)
    with pytest.raises(BackboneMismatchError, match="differ.*same weights the model was trained with"):
        load_checkpoint(tmp_path / "ckpt.pt", pretrained_override=weights["b"])


def test_read_meta_without_building(weights, tmp_path: Path) -> None:
    model = build_model(_config(weights["a"], metric="bimhm"))
    checkpoint_hash = save_checkpoint(tmp_path / "ckpt.pt", model, step=7)
    meta = read_checkpoint_meta(tmp_path / "ckpt.pt")
    assert meta["checkpoint_hash"] == checkpoint_hash and meta["step"] == 7
    assert ModelConfig.from_dict(meta["config"]) == model.config
    assert meta["backbone"]["name"] == "fsar-tiny" and meta["backbone"]["pretrained"] == weights["a"]
    assert meta["parameters"]["trainable"] == model.count_parameters()["trainable"]
    assert not any(isinstance(value, torch.Tensor) for value in meta.values())


def test_bad_files_raise_checkpoint_error(weights, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable fsar checkpoint"):
        read_checkpoint_meta(tmp_path / "text.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an fsar checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    # A checkpoint whose config no longer matches its tensors (edited by hand).
    model = build_model(_config(weights["a"]))
    save_checkpoint(tmp_path / "ckpt.pt", model)
    payload = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    payload["config"]["adapter"] = "ted"
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="trainable state does not match"):
        load_checkpoint(tmp_path / "edited.pt")
