"""Training loop: a few real steps on a tiny synthetic dataset, checkpoints, metrics, resume, both regimes."""
from __future__ import annotations

import csv

import pytest
import torch

from training.checkpoint import load_checkpoint, read_checkpoint_meta
from training.config import ConfigError, PretrainConfig
from training.data import EpisodeCollate, EpisodeSampler, DatasetError, load_dataset
from training.model import ModelConfig, build_model
from training.pretrain import pretrain_backbone, render_captioned_image
from training.train import EpisodicObjective, TrainingError, train

# A fast episodic run on the tiny random backbone (no stand-in pretraining in tests).
FAST = ["model.pretrained=null", "pretrain.steps=0", "model.tpcm_ffn=64", "data.num_workers=0", "model.adapter=ted+ma",
        "model.alpha=0.5", "threads=1", "episodic.feature_views=0",
        "episodic.query=1", "episodic.episodes=40", "val.every=2", "val.episodes=10", "val.query=1",
        "log_every=1", "save_every=2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_episodic_training_writes_checkpoints_metrics_and_resumes(synth_root, tmp_path):
    out = tmp_path / "run"
    first = train("synthetic-tiny", synth_root, out, max_steps=3, overrides=FAST, device="cpu", progress=False)
    assert first["steps"] == 3 and first["start_step"] == 0
    for name in ("last.pt", "last.state.pt", "best.pt", "metrics.csv", "config.yaml"):
        assert (out / name).is_file(), name
    rows = _rows(out / "metrics.csv")
    train_rows = [r for r in rows if r["loss"]]
    val_rows = [r for r in rows if r["val_acc"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3]
    assert all(float(r["loss"]) > 0 for r in train_rows) and train_rows[0]["loss_q2s"]
    assert [int(r["step"]) for r in val_rows] == [2, 3]
    assert first["best_val_accuracy"] == pytest.approx(max(float(r["val_acc"]) for r in val_rows), rel=1e-5)  # csv: 6 digits
    assert read_checkpoint_meta(out / "last.pt")["step"] == 3
    # best.pt's probabilities are calibrated on the val split (4 clips a class: only 1-shot episodes fit).
    calibration = read_checkpoint_meta(out / "best.pt")["calibration"]
    assert calibration == first["calibration"] and list(calibration["temperatures"]) == ["1"]
    assert calibration["split"] == "val" and calibration["way"] == 5 and calibration["episodes"] == 10
    trained, _ = load_checkpoint(out / "last.pt")
    torch.manual_seed(0)
    untrained = build_model(trained.config)
    assert trained.fingerprint() != untrained.fingerprint()  # the adapters moved

    resumed = train("synthetic-tiny", synth_root, out, max_steps=5, overrides=FAST, device="cpu", progress=False)
    assert resumed["start_step"] == 3 and resumed["steps"] == 5
    assert read_checkpoint_meta(out / "last.pt")["step"] == 5
    steps = [int(r["step"]) for r in _rows(out / "metrics.csv") if r["loss"]]
    assert steps == [1, 2, 3, 4, 5]  # appended after the resumed step, nothing repeated

    with pytest.raises(TrainingError, match="different config"):
        train("synthetic-tiny", synth_root, out, max_steps=6, overrides=[*FAST, "optim.lr=0.5"], device="cpu",
              progress=False)
    fresh = train("synthetic-tiny", synth_root, out, max_steps=1, overrides=[*FAST, "val.calibrate=false"],
                  resume=False, device="cpu", progress=False)
    assert fresh["start_step"] == 0 and fresh["steps"] == 1
    assert fresh["calibration"] is None and "calibration" not in read_checkpoint_meta(out / "best.pt")


def test_episodic_objective_learns_an_episode(synth_root):
    """Repeated Adam steps on one real episode drive its loss down: gradients reach the adapters."""
    dataset = load_dataset(synth_root, "train", num_frames=8, size=64, mode="test")
    sampler = EpisodeSampler(dataset.labels, 5, 1, 1, 1, seed=0)
    episode = EpisodeCollate(dataset.label_texts, 5, 1)([dataset[i] for i in next(iter(sampler))])
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, adapter="ted+ma", tpcm_ffn=64))
    objective = EpisodicObjective(model, alpha=0.5)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, parts, accuracy = objective(episode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(parts) == {"q2s", "q2t", "s2t"} and 0.0 <= accuracy <= 1.0
    assert losses[-1] < 0.7 * losses[0]


def test_supervised_multitask_regime_runs(synth_root, tmp_path):
    overrides = ["model.backbone=fsar-tiny", "model.pretrained=null", "supervised.batch_size=4", "grad_accum=1",
                 "data.num_workers=0", "val.every=2", "log_every=1", "amp=off"]
    summary = train("m2clip-k400", synth_root, tmp_path / "sup", max_steps=2, overrides=overrides, device="cpu",
                    progress=False)
    assert summary["steps"] == 2
    rows = [r for r in _rows(tmp_path / "sup" / "metrics.csv") if r["loss"]]
    for part in ("loss_kl", "loss_cmc", "loss_vc", "loss_mlm"):
        assert float(rows[-1][part]) > 0.0, part
    assert summary["best_val_accuracy"] is not None  # zero-shot over the validation classes
    state = torch.load(tmp_path / "sup" / "last.state.pt", weights_only=False)
    assert any(key.startswith("cmlm_head.") for key in state["heads"])
    resumed = train("m2clip-k400", synth_root, tmp_path / "sup", max_steps=3, overrides=overrides, device="cpu",
                    progress=False)
    assert resumed["start_step"] == 2 and resumed["steps"] == 3


def test_bad_inputs_fail_clearly(synth_root, tmp_path):
    with pytest.raises(DatasetError):
        train("synthetic-tiny", tmp_path / "nowhere", tmp_path / "run", overrides=FAST, device="cpu", progress=False)
    with pytest.raises(TrainingError, match="does not fit preset 'ucf101'"):
        train("synthetic-tiny", synth_root, tmp_path / "run", overrides=[*FAST, "data.preset=ucf101"], device="cpu",
              progress=False)
    with pytest.raises(ConfigError, match="max_steps must be a positive integer"):
        train("synthetic-tiny", synth_root, tmp_path / "run", max_steps=0, overrides=FAST, progress=False)
    with pytest.raises(ConfigError, match="set model.pretrained to null"):
        train("synthetic-tiny", synth_root, tmp_path / "run", overrides=["pretrain.steps=5", "model.pretrained=openai"])


def test_stand_in_pretraining_writes_loadable_weights(tmp_path):
    image, caption = render_captioned_image(__import__("numpy").random.default_rng(0), 64)
    assert image.shape == (64, 64, 3) and image.dtype.name == "uint8" and caption.startswith("a ")
    result = pretrain_backbone("fsar-tiny", tmp_path / "backbone.pt", PretrainConfig(steps=2, batch_size=8),
                               progress=False)
    assert result["steps"] == 2 and result["final_loss"] > 0
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=str(tmp_path / "backbone.pt")))
    assert model.weights_source.startswith("file:")
    saved = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert torch.equal(model.clip.visual.conv1.weight, saved["visual.conv1.weight"])
