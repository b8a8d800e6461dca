"""Backbone loading: package configs, weights from a file / a cached tag / nothing, offline errors, hashing."""
from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from training.model.backbone import (BackboneError, PretrainedWeightsError, load_backbone,
                                     register_model_configs, weights_hash)

TINY = "fsar-tiny"


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Hugging Face and open_clip caches at an empty folder and switch downloads off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip for URL-only tags
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    return tmp_path


def _save_random_tiny(path: Path, seed: int = 0) -> torch.nn.Module:
    register_model_configs()
    torch.manual_seed(seed)
    reference = open_clip.create_model(TINY)
    torch.save(reference.state_dict(), path)
    return reference


def test_tiny_config_is_registered_and_random_weights_are_recorded(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        backbone = load_backbone(TINY, None)
    assert TINY in open_clip.list_models()
    assert backbone.weights_source == "random" and backbone.is_random
    assert any("RANDOM weights" in record.getMessage() for record in caplog.records)
    assert backbone.image_size == (64, 64)
    assert backbone.clip.visual.output_dim == backbone.clip.transformer.width == 64  # CMLM needs D == text width
    assert all(not p.requires_grad for p in backbone.clip.parameters())
    assert backbone.tokenizer(["a video of jumping"]).shape == (1, 77)


def test_weights_come_from_a_local_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    reference = _save_random_tiny(path, seed=1)
    torch.manual_seed(99)  # a different seed: random init would not match the file
    backbone = load_backbone(TINY, str(path))
    assert backbone.weights_source == f"file:{path.resolve()}"
    loaded = backbone.clip.state_dict()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    assert backbone.weights_hash == weights_hash(reference)
    assert backbone.weights_hash != load_backbone(TINY, None).weights_hash


def test_bad_weights_files_raise_readable_errors(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_backbone(TINY, str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="Could not load"):
        load_backbone(TINY, str(garbage))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(PretrainedWeightsError, match="Could not load"):
        load_backbone(TINY, str(wrong))


def test_uncached_tag_offline_stops_with_one_actionable_sentence(empty_caches: Path) -> None:
    with pytest.raises(PretrainedWeightsError) as info:
        load_backbone("ViT-B-32", "openai")
    message = str(info.value)
    assert message == (
        "Pretrained weights 'openai' for ViT-B-32 are not cached and cannot be downloaded (offline). "
        "Download them on a connected host (they land in ~/.cache/huggingface) or pass "
        "--pretrained /path/to/weights.pt (an open_clip state_dict).")
    assert "\n" not in message


def test_cached_tag_loads_from_the_cache_without_network(empty_caches: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A real Hugging Face cache layout holding a tiny model's weights, for a tag registered for the test.
    repo_dir = empty_caches / "hf-hub" / "models--fsar--tiny-test"
    snapshot = repo_dir / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    reference = _save_random_tiny(snapshot / "open_clip_pytorch_model.bin", seed=2)
    tag_cfg = {"hf_hub": "fsar/tiny-test/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"cachedtag": tag_cfg})

    backbone = load_backbone(TINY, "cachedtag")
    assert backbone.weights_source.startswith("tag:cachedtag (") and "0123abcd" in backbone.weights_source
    assert backbone.weights_hash == weights_hash(reference)
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.25, 0.25, 0.25)
    assert isinstance(backbone.clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)  # the tag's activation


def test_unknown_tag_and_unsupported_models_are_rejected(empty_caches: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="known tags: .*openai"):
        load_backbone("ViT-B-32", "no-such-tag")
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        load_backbone("ViT-Nope", None)
    with pytest.raises(BackboneError, match="not a plain open_clip CLIP ViT"):
        load_backbone("RN50", None)


def test_weights_hash_changes_with_any_weight() -> None:
    backbone = load_backbone(TINY, None)
    before = weights_hash(backbone.clip)
    assert before == backbone.weights_hash == weights_hash(backbone.clip)
    with torch.no_grad():
        backbone.clip.visual.proj[0, 0] += 1e-3
    assert weights_hash(backbone.clip) != before
