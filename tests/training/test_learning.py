"""What makes training transfer (docs/learning.md): frame centering, TPCM without text, training on
cached features of a frozen image tower, the shipped stand-in backbone, and the second generator."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint
from training.config import PretrainConfig, load_config
from training.model import ModelConfig, build_model
from training.pretrain import (export_visual, pretrain_backbone, pretrain_recipe, restore_backbone,
                               shipped_visual_path)
from training.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(backbone="fsar-tiny", pretrained=None, adapter="none", tpcm_ffn=32, alpha=0.0)


def test_new_model_options_keep_old_fingerprints_and_round_trip():
    plain = ModelConfig(**TINY)
    assert not {"frame_centering", "tpcm_text", "frame_norm"} & set(plain.to_dict())
    changed = ModelConfig(**TINY, frame_centering=True, tpcm_text=False, frame_norm=True)
    data = changed.to_dict()
    assert data["frame_centering"] is True and data["tpcm_text"] is False and data["frame_norm"] is True
    assert ModelConfig.from_dict(data) == changed


def test_frame_centering_ignores_what_a_video_shows_and_keeps_how_it_changes():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, frame_centering=True, metric_scale_init=10.0)).eval()
    queries, support = torch.randn(3, 8, 64), torch.randn(2, 8, 64)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        base = model.q2s_logits(queries, model.build_prototypes(support, labels, None))
        shifted = model.q2s_logits(queries + torch.randn(3, 1, 64),  # a static offset per video
                                   model.build_prototypes(support + torch.randn(2, 1, 64), labels, None))
        reversed_ = model.q2s_logits(queries.flip(1), model.build_prototypes(support, labels, None))
    assert torch.allclose(base, shifted, atol=1e-4)
    assert not torch.allclose(base, reversed_, atol=1e-3)


def test_frame_norm_ignores_each_frames_feature_length():
    torch.manual_seed(0)
    config = ModelConfig(**TINY, frame_centering=True, frame_norm=True, metric_scale_init=10.0)
    model = build_model(config).eval()
    queries, support = torch.randn(3, 8, 64), torch.randn(2, 8, 64)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        base = model.q2s_logits(queries, model.build_prototypes(support, labels, None))
        scaled = model.q2s_logits(queries * torch.rand(3, 8, 1).add(0.2) * 5,  # every frame rescaled
                                  model.build_prototypes(support * torch.rand(2, 8, 1).add(0.2) * 5, labels, None))
        centred_only = build_model(config.replace(frame_norm=False)).eval()
        centred_only.load_state_dict(model.state_dict())
        plain = centred_only.q2s_logits(queries, centred_only.build_prototypes(support, labels, None))
    assert torch.allclose(base, scaled, atol=1e-4)
    assert not torch.allclose(base, plain, atol=1e-3)  # without it, lengths weigh in


def test_tpcm_text_off_makes_prototypes_ignore_label_texts():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, tpcm_text=False)).eval()
    for p in model.tpcm.parameters():  # move TPCM away from the identity so text could matter
        torch.nn.init.normal_(p, std=0.1)
    support, labels = torch.randn(2, 8, 64), torch.tensor([0, 1])
    with torch.no_grad():
        a = model.build_prototypes(support, labels, torch.randn(2, 64))
        b = model.build_prototypes(support, labels, torch.randn(2, 64))
    assert torch.equal(a, b)


def test_training_on_cached_features_runs_resumes_and_saves(synth_root, tmp_path):
    overrides = ["model.pretrained=null", "pretrain.steps=0", "model.tpcm_ffn=32", "data.num_workers=0",
                 "model.adapter=none", "episodic.feature_views=2", "episodic.query=1", "episodic.episodes=20",
                 "val.every=2", "val.episodes=10", "val.query=1", "log_every=1", "save_every=2", "threads=1"]
    out = tmp_path / "run"
    first = train("synthetic-tiny", synth_root, out, max_steps=3, overrides=overrides, device="cpu", progress=False)
    assert first["steps"] == 3 and (out / "best.pt").is_file()
    model, _ = load_checkpoint(out / "last.pt")
    assert model.config.frame_centering and not model.config.tpcm_text and model.config.adapter == "none"
    resumed = train("synthetic-tiny", synth_root, out, max_steps=4, overrides=overrides, device="cpu", progress=False)
    assert resumed["start_step"] == 3 and resumed["steps"] == 4
    with pytest.raises(Exception, match="feature_views"):
        train("synthetic-tiny", synth_root, tmp_path / "bad", max_steps=1,
              overrides=[*overrides, "model.adapter=ted+ma"], device="cpu", progress=False)


def test_shipped_image_tower_rebuilds_what_pretraining_writes(tmp_path):
    settings = PretrainConfig(steps=2, batch_size=8)
    made = tmp_path / "made.pt"
    pretrain_backbone("fsar-tiny", made, settings, progress=False)
    shipped = tmp_path / "shipped.pt"
    export_visual(made, shipped, settings, "fsar-tiny")
    rebuilt = tmp_path / "rebuilt.pt"
    assert restore_backbone(shipped, rebuilt, settings, "fsar-tiny") is not None
    a, b = torch.load(made, weights_only=True), torch.load(rebuilt, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert restore_backbone(shipped, rebuilt, PretrainConfig(steps=3, batch_size=8), "fsar-tiny") is None
    # A tower pretrained on other captions (the recipe names its caption generator) is not restored.
    export_visual(made, shipped, settings, "fsar-tiny", captions="scenes-v2")
    assert restore_backbone(shipped, rebuilt, settings, "fsar-tiny") is None


def test_the_shipped_asset_matches_the_preset_and_its_recorded_hash():
    from training.model.hashing import state_hash

    path = shipped_visual_path("fsar-tiny")
    record = torch.load(path, weights_only=True)
    preset = load_config("synthetic-tiny").pretrain
    assert record["backbone"] == "fsar-tiny"
    assert record["settings"] == pretrain_recipe(preset)
    assert record["settings"]["captions"] == "shapes-v1"
    expected = json.loads(path.with_suffix(".json").read_text())["visual_sha256"]
    assert state_hash(record["visual"]) == expected


def test_sprites_generator_layout_and_reversal(tmp_path):
    from training.data import load_dataset
    from training.data.synth2 import render_sprite_clip, sprite_classes, write_sprites_dataset

    classes = sprite_classes()
    assert len({c["name"] for c in classes}) == 20
    splits = {s: {c["name"] for c in classes if c["split"] == s} for s in ("train", "val", "test")}
    assert not (splits["train"] & splits["test"]) and len(splits["test"]) == 6
    forward = render_sprite_clip("a_ripple_running_to_the_right", 6, 32, 3).astype(np.float32)
    backward = render_sprite_clip("a_ripple_running_to_the_left", 6, 32, 3).astype(np.float32)
    assert np.abs(forward - backward[::-1]).mean() < 12  # the same scene played backwards, fresh noise
    assert np.abs(forward - backward).mean() > np.abs(forward - backward[::-1]).mean()
    summary = write_sprites_dataset(tmp_path / "sprites", videos_per_class=2, frames=4, size=32, progress=False)
    assert summary["videos"] == 40
    test = load_dataset(tmp_path / "sprites", "test", num_frames=4, size=32, mode="test")
    assert len(test.classes) == 6 and len(test) == 12


def test_frame_mean_baseline_of_a_centred_model_compares_raw_means():
    from training.evaluate import swap_metric

    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, frame_centering=True, frame_norm=True, metric_scale_init=10.0)).eval()
    swap_metric(model, "mean")
    assert model.config.metric == "mean" and not model.config.frame_centering and not model.config.frame_norm
    queries, support = torch.randn(3, 8, 64), torch.randn(3, 8, 64)
    with torch.no_grad():
        logits = model.classify(queries, model.build_prototypes(support, torch.arange(3), None))
    assert logits.std() > 0  # centred means would all be zero: every class tied
