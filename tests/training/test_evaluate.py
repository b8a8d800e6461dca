"""Evaluation: seeded episodes on features encoded once, accuracy with its 95% interval, checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.checkpoint import save_checkpoint
from training.data import EpisodeSampler, load_dataset
from training.evaluate import encode_split, episode_accuracies, evaluate, mean_ci95
from training.model import ModelConfig, build_model

TINY = dict(backbone="fsar-tiny", pretrained=None, adapter="ted+ma", metric="otam", tpcm_ffn=64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturbed_model(metric: str = "otam", seed: int = 0):
    """A tiny model whose adapters and TPCM are no longer identities (so training-like weights matter)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**TINY, "metric": metric})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name != "metric_log_scale":
                param.add_(0.05 * torch.randn_like(param))
    return model


def test_mean_ci95_is_the_normal_interval():
    accuracies = np.array([100.0, 0.0, 50.0, 50.0])
    mean, ci95 = mean_ci95(accuracies)
    assert mean == 50.0
    assert ci95 == pytest.approx(1.96 * accuracies.std() / 2.0)


def test_evaluate_reports_accuracy_interval_and_is_seeded(synth_root, tmp_path):
    kwargs = dict(model_config=TINY, split="test", episodes=40, num_workers=0, progress=False, device="cpu")
    torch.manual_seed(0)
    first = evaluate(None, synth_root, seed=7, json_path=tmp_path / "eval.json", **kwargs)
    torch.manual_seed(0)  # the untrained model's random backbone
    again = evaluate(None, synth_root, seed=7, **kwargs)
    assert 0.0 <= first["accuracy"] <= 100.0 and first["ci95"] > 0.0
    assert first["accuracy"] == again["accuracy"] and first["ci95"] == again["ci95"]
    assert first["zero_shot_accuracy"] is not None
    assert (first["way"], first["shot"], first["episodes"], first["metric"]) == (5, 1, 40, "otam")
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["accuracy"] == first["accuracy"] and written["ci95"] == first["ci95"]
    mean_metric = evaluate(None, synth_root, seed=7, metric="mean", zero_shot=False, **kwargs)
    assert mean_metric["metric"] == "mean" and mean_metric["zero_shot_accuracy"] is None


def test_batched_episodes_equal_one_episode_at_a_time(synth_root):
    dataset = load_dataset(synth_root, "test", num_frames=8, size=64, mode="test")
    for metric in ("otam", "mean", "trx"):
        model = _perturbed_model(metric)
        encoded = encode_split(model, dataset, batch_size=8, progress=False)
        assert encoded.query_feats.shape == (len(dataset), 8, 64)
        assert not torch.equal(encoded.query_feats, encoded.support_feats)  # MA reads the label text
        batched = episode_accuracies(model, encoded, way=5, shot=2, query=1, episodes=12, seed=3, chunk=5,
                                     progress=False)
        sampler = EpisodeSampler(encoded.labels.tolist(), 5, 2, 1, 12, seed=3)
        looped = []
        with torch.no_grad():
            for i in range(12):
                indices, class_ids = sampler.episode(i)
                support_labels = torch.arange(5).repeat_interleave(2)
                text_feats = encoded.text_feats[class_ids]
                prototypes = model.build_prototypes(encoded.support_feats[indices[:10]], support_labels, text_feats)
                logits = model.classify(encoded.query_feats[indices[10:]], prototypes, text_feats)
                looped.append(100.0 * (logits.argmax(-1) == torch.arange(5)).float().mean().item())
        np.testing.assert_allclose(batched, looped)
        other_seed = episode_accuracies(model, encoded, way=5, shot=1, query=1, episodes=12, seed=4, progress=False)
        same_seed = episode_accuracies(model, encoded, way=5, shot=1, query=1, episodes=12, seed=4, progress=False)
        np.testing.assert_array_equal(other_seed, same_seed)


def test_checkpoint_round_trip_gives_identical_evaluation(synth_root, tmp_path):
    model = _perturbed_model("otam", seed=1)
    path = tmp_path / "model.pt"
    checkpoint_hash = save_checkpoint(path, model, step=3)
    dataset = load_dataset(synth_root, "test", num_frames=8, size=64, mode="test")
    encoded = encode_split(model, dataset, batch_size=8, progress=False)
    in_memory = mean_ci95(episode_accuracies(model, encoded, episodes=30, seed=5, progress=False))
    result = evaluate(path, synth_root, episodes=30, seed=5, num_workers=0, progress=False, device="cpu")
    assert (result["accuracy"], result["ci95"]) == pytest.approx(in_memory, abs=1e-9)
    assert result["checkpoint_hash"] == checkpoint_hash == result["fingerprint"]


def test_bad_arguments_are_clear(synth_root, tmp_path):
    with pytest.raises(ValueError, match="checkpoint or a model_config"):
        evaluate(None, synth_root, episodes=5, progress=False)
    with pytest.raises(ValueError, match="way must be a positive integer"):
        evaluate(None, synth_root, way=0, model_config=TINY, progress=False)
    with pytest.raises(ValueError, match="needs 7"):
        evaluate(None, synth_root, way=7, model_config=TINY, episodes=5, num_workers=0, progress=False, device="cpu")


def test_baseline_table_compares_trained_with_untrained_and_frame_mean(synth_root, tmp_path):
    from training.evaluate import baseline_table, untrained_like

    model = _perturbed_model("otam", seed=2)
    path = tmp_path / "trained.pt"
    save_checkpoint(path, model)
    untrained = untrained_like(model)
    frames = load_dataset(synth_root, "test", num_frames=8, size=64, mode="test")[0][0].unsqueeze(0)  # [1, T, S, S, 3]
    torch.manual_seed(2)  # the same random backbone as _perturbed_model(seed=2), without adapters
    frozen_clip = build_model(ModelConfig(**{**TINY, "adapter": "none"})).eval()
    with torch.no_grad():
        frozen_feats = frozen_clip.encode_video(frames)  # the frozen backbone's own per-frame features
        assert torch.allclose(untrained.encode_video(frames), frozen_feats, atol=1e-5)  # adapters back to identity
        assert not torch.allclose(model.encode_video(frames), frozen_feats, atol=1e-3)
    result = baseline_table(path, synth_root, episodes=20, num_workers=0, progress=False, device="cpu",
                            json_path=tmp_path / "table.json")
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["trained adapters + OTAM", "trained adapters + frame-mean",
                       "untrained adapters + OTAM", "untrained adapters + frame-mean"]
    assert all(0.0 <= row["accuracy"] <= 100.0 and row["ci95"] >= 0.0 for row in result["rows"])
    assert "| trained adapters + OTAM |" in result["table"]
    assert json.loads((tmp_path / "table.json").read_text())["rows"][0]["method"] == methods[0]


def test_precision_table_compares_torch_onnx_fp32_and_int8_on_the_same_episodes(synth_root, tmp_path):
    pytest.importorskip("onnxruntime")
    from training.evaluate import precision_table

    torch.manual_seed(0)
    table = precision_table(None, synth_root, split="test", episodes=60, num_workers=0, model_config=TINY,
                            threads=1, onnx_cache_dir=tmp_path / "onnx", json_path=tmp_path / "precision.json",
                            progress=False)
    rows = {(r["runtime"], r["precision"]): r for r in table["rows"]}
    assert list(rows) == [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    fp32, torch_row, int8 = rows["onnxruntime", "fp32"], rows["torch", "fp32"], rows["onnxruntime", "int8"]
    # The reference row compares with itself; torch and ONNX Runtime fp32 are the same features.
    assert (fp32["delta_vs_fp32"], fp32["delta_ci95"], fp32["frame_cosine_min"]) == (0.0, 0.0, pytest.approx(1.0))
    assert torch_row["frame_cosine_min"] > 0.99999 and torch_row["text_cosine_min"] > 0.99999
    # int8 changes the features a little, measurably, and its accuracy is reported on the same episodes.
    assert 0.9 < int8["frame_cosine_min"] < 0.999999 and int8["frame_cosine_mean"] >= int8["frame_cosine_min"]
    assert int8["delta_ci95"] >= 0.0 and 0.0 <= int8["accuracy"] <= 100.0
    assert int8["delta_vs_fp32"] == pytest.approx(int8["accuracy"] - fp32["accuracy"])
    assert "onnxruntime int8" in table["table"] and table["episodes"] == 60
    assert json.loads((tmp_path / "precision.json").read_text())["rows"][2]["precision"] == "int8"


def test_fsar_eval_precision_prints_the_table_and_refuses_other_modes(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    refused = subprocess.run([sys.executable, "-m", "service.cli", "eval", "--checkpoint", str(tmp_path / "none.pt"),
                              "--data", str(tmp_path), "--precision", "--open-set"], cwd=root, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: --precision compares encoders with the checkpoint's own metric; leave "
                                      "out --open-set, --baselines and --metric")
