"""Open-set ("none of these"): the score, its per-set calibration, AUROC, and `fsar eval --open-set`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.open_set import (DEFAULT_THRESHOLDS, SCORE_NAMES, SetCalibration, SetReference, accept_threshold,
                               auroc, calibrate_support_set, default_threshold, leave_one_out_logits,
                               margin_score, mix_probabilities, msp_score, open_set_score, plan_calibration)

ROOT = Path(__file__).resolve().parents[2]


def _cosine_backend(num_frames: int = 4):
    """Numpy stand-ins for the backend: prototypes are class means, Q2S logits = 10 x mean frame cosine."""

    def build(feats: np.ndarray, labels: np.ndarray, texts):
        count = int(labels.max()) + 1 if texts is None else len(texts)
        return np.stack([feats[labels == c].mean(axis=0) for c in range(count)])

    def q2s(queries: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
        q = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
        p = prototypes / np.linalg.norm(prototypes, axis=-1, keepdims=True)
        return 10.0 * np.einsum("qtd,ntd->qn", q, p) / num_frames

    return build, q2s


def _clustered(rng: np.random.Generator, classes: int, shots: int, noise: float = 0.3, dim: int = 16):
    centres = rng.normal(size=(classes, 4, dim))
    labels = np.repeat(np.arange(classes), shots)
    feats = centres[labels] + noise * rng.normal(size=(labels.size, 4, dim))
    return feats, labels, centres


def test_score_range_monotonicity_and_invariance():
    reference = SetReference(own=-2.0, spread=0.5)
    logits = np.array([[-1.0, -5.0], [-2.0, -3.0], [-3.0, -9.0], [-40.0, -50.0], [1e6, 0.0]])
    scores = open_set_score(logits, reference)
    assert scores.shape == (5,) and np.all((scores >= 0.0) & (scores <= 1.0))
    assert scores[1] == pytest.approx(0.5)  # exactly as close as the set's own clips
    assert scores[0] < scores[1] < scores[2] < scores[3]  # farther from the nearest class -> higher
    # Scale and offset of the metric cancel once the reference is in the same units.
    scaled = open_set_score(3.0 * logits + 7.0, SetReference(own=3.0 * -2.0 + 7.0, spread=1.5))
    np.testing.assert_allclose(scaled, scores)
    assert msp_score(np.array([[0.7, 0.2, 0.1]]))[0] == pytest.approx(0.3)
    assert margin_score(np.array([[0.7, 0.2, 0.1]]))[0] == pytest.approx(0.5)
    np.testing.assert_allclose(mix_probabilities(np.zeros((1, 2)), np.array([[0.0, 100.0]]), 0.5), [[0.25, 0.75]])


def test_a_query_identical_to_a_support_clip_scores_as_known():
    rng = np.random.default_rng(0)
    build, q2s = _cosine_backend()
    feats, labels, _ = _clustered(rng, classes=5, shots=3)
    calibration = calibrate_support_set(feats, labels, None, build, q2s, default_threshold=0.5)
    prototypes = build(feats, labels, None)
    assert np.all(open_set_score(q2s(feats, prototypes), calibration.reference) <= calibration.threshold)
    far = rng.normal(size=(20, 4, 16))  # unrelated clips
    assert np.median(open_set_score(q2s(far, prototypes), calibration.reference)) > calibration.threshold


def test_plan_leaves_out_each_shot_of_multi_shot_classes_only():
    plan = plan_calibration(np.array([0, 0, 0, 1, 2, 2]))
    assert plan.heldout.tolist() == [0, 1, 2, 4, 5]  # class 1 has a single shot: never left out
    assert plan.loo_support.tolist() == [1, 2, 0, 2, 0, 1, 5, 4]
    assert plan.loo_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert plan.loo_classes.tolist() == [0, 0, 0, 2, 2]
    support = np.arange(18, dtype=float).reshape(6, 3)
    rows = leave_one_out_logits(plan, support, np.array([-1.0, -2.0, -3.0, -4.0, -5.0]))
    assert rows[:, 0].tolist()[:3] == [-1.0, -2.0, -3.0] and rows[3:, 2].tolist() == [-4.0, -5.0]
    assert rows[3, 0] == support[4, 0]  # the other classes keep their full prototypes


def test_calibration_accepts_the_designed_fraction_of_left_out_clips():
    rng = np.random.default_rng(1)
    build, q2s = _cosine_backend()
    feats, labels, _ = _clustered(rng, classes=5, shots=8, noise=0.8)
    for score in SCORE_NAMES:
        calibration = calibrate_support_set(feats, labels, None, build, q2s, default_threshold=0.5, accept=0.9,
                                            score=score)
        assert calibration.source == "leave-one-out" and calibration.heldout == 40
        # Re-score each left-out clip as calibrate does: its own shot removed from its class.
        plan = plan_calibration(labels)
        prototypes = build(feats, labels, None)
        own = np.array([q2s(feats[i:i + 1], build(feats[plan.loo_support[plan.loo_labels == j]],
                                                  np.zeros(len(feats) // 5 - 1, int), None))[0, 0]
                        for j, i in enumerate(plan.heldout)])
        loo = leave_one_out_logits(plan, q2s(feats, prototypes), own)
        from training.open_set import score_by_name
        scores = score_by_name(score, loo, mix_probabilities(loo, None, 0.0), calibration.reference)
        accepted = (scores <= calibration.threshold).mean()
        assert 0.9 <= accepted < 0.9 + 1.0 / 40 + 1e-9
    assert SetCalibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration


def test_one_shot_sets_fall_back_to_the_model_default():
    rng = np.random.default_rng(2)
    build, q2s = _cosine_backend()
    feats, labels, _ = _clustered(rng, classes=4, shots=1)
    calibration = calibrate_support_set(feats, labels, None, build, q2s, default_threshold=0.61)
    assert (calibration.source, calibration.threshold, calibration.heldout) == ("default", 0.61, 0)
    assert calibration.reference.spread > 0.0
    single = calibrate_support_set(feats[:1], labels[:1], None, build, q2s, default_threshold=0.61)
    assert single.reference.spread > 0.0  # one clip in all: the score is still defined
    assert default_threshold(None) == DEFAULT_THRESHOLDS["distance"]
    assert default_threshold({"open_set": {"default_thresholds": {"distance": 0.8, "msp": 0.4}}}, "msp") == 0.4
    assert default_threshold({"open_set": None}, "margin") == DEFAULT_THRESHOLDS["margin"]


def test_accept_threshold_and_auroc_by_hand():
    assert accept_threshold(np.array([0.5, 0.1, 0.4, 0.2, 0.3]), 0.8) == 0.4  # 4 of 5 at or below
    assert accept_threshold(np.array([0.5, 0.1, 0.4, 0.2, 0.3]), 0.81) == 0.5
    # unknown 0.8 beats all 3 knowns; 0.4 beats 0.1 and ties 0.4 (1.5); 0.05 beats none: 4.5 / 6.
    assert auroc(np.array([0.1, 0.4, 0.6]), np.array([0.8, 0.4, 0.05])) == pytest.approx(4.5 / 9)
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.9])) == 1.0
    with pytest.raises(ValueError):
        auroc(np.array([]), np.array([0.5]))


def test_open_set_module_does_not_import_torch():
    code = "import sys, training.open_set; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.usefixtures("one_torch_thread")
def test_fsar_eval_open_set_end_to_end(synth_root, tmp_path):
    import torch

    from training.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
    from training.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, adapter="ted+ma", tpcm_ffn=64))
    path = tmp_path / "model.pt"
    checkpoint_hash = save_checkpoint(path, model)
    json_path = tmp_path / "open.json"
    args = ["eval", "--checkpoint", str(path), "--data", str(synth_root), "--way", "3", "--shot", "2",
            "--episodes", "6", "--device", "cpu", "--open-set", "--json", str(json_path)]
    result = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| open_set_score" in result.stdout and "| MSP baseline" in result.stdout
    written = json.loads(json_path.read_text())
    assert [row["score"] for row in written["rows"]] == list(SCORE_NAMES)
    for row in written["rows"]:
        for field in ("auroc", "accuracy", "known_accuracy", "unknown_rejection", "known_accepted"):
            assert 0.0 <= row[field] <= 100.0 and row[field + "_ci95"] >= 0.0
    assert written["threshold_source"] == "DEFAULT_THRESHOLDS" and written["checkpoint_hash"] == checkpoint_hash

    from training.evaluate import open_set_table

    recorded = open_set_table(path, synth_root, way=3, shot=1, episodes=6, record=True, num_workers=0,
                              progress=False, device="cpu")
    meta = read_checkpoint_meta(path)
    assert meta["open_set"]["default_thresholds"] == recorded["default_thresholds"]
    assert meta["open_set"]["split"] == "val" and meta["checkpoint_hash"] == checkpoint_hash
    assert default_threshold(meta) == recorded["default_thresholds"]["distance"]
    assert load_checkpoint(path)[1]["open_set"]["way"] == 3  # the model still loads, with the record
    again = open_set_table(path, synth_root, way=3, shot=1, episodes=6, num_workers=0, progress=False, device="cpu")
    assert again["threshold_source"] == "checkpoint"
    assert again["rows"] == recorded["rows"]  # same seed, same episodes, same thresholds
