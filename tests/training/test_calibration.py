"""Temperature scaling of few-shot probabilities: the fit, the measures, the record, `fsar eval --calibrate`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.calibration import (calibration_summary, expected_calibration_error, fit_temperature, nll,
                                  recorded_temperature, temper, temperature_for_shots)
from training.checkpoint import CheckpointError, read_checkpoint_meta, record_calibration, save_checkpoint
from training.model import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sampled(temperature: float, queries: int = 20000, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): the fit should find that temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 6.0, size=(queries, classes))
    probs = np.exp(logits / temperature)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 3.0, 20.0])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    logits, labels = _sampled(true_t)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.1)
    # It is the minimum of the NLL: a step either way is worse.
    assert nll(logits, labels, fitted) < min(nll(logits, labels, fitted * 1.2), nll(logits, labels, fitted / 1.2))


def test_fit_temperature_at_its_bounds_and_on_bad_input():
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    assert fit_temperature(logits, np.array([0, 1])) == 1e-3  # all right with margins: as sharp as allowed
    assert fit_temperature(logits, np.array([1, 0])) == 1e4  # all wrong: as flat as allowed
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        fit_temperature(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="labels must lie"):
        fit_temperature(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))


def test_temper_keeps_every_ranking_and_sums_to_one():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(6) * 0.3, size=50)
    probs[0, 2] = 0.0  # a class with no probability keeps none
    probs[0] /= probs[0].sum()
    for t in (0.25, 1.0, 7.0):
        out = temper(probs, t)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(np.argsort(-out, axis=1, kind="stable"), np.argsort(-probs, axis=1, kind="stable"))
        assert out[0, 2] == 0.0
    np.testing.assert_array_equal(temper(probs, 1.0), probs)
    assert temper(probs, 50.0).max(axis=1).mean() < probs.max(axis=1).mean()  # hotter = less sure
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            temper(probs, bad)


def test_ece_and_summary_on_cases_worked_by_hand():
    # Always 90% sure, right half the time: ECE = |0.5 - 0.9| = 40 points.
    probs = np.tile([0.9, 0.1], (4, 1))
    labels = np.array([0, 0, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(40.0)
    summary = calibration_summary(probs, labels)
    assert summary["accuracy"] == 50.0 and summary["confidence"] == pytest.approx(90.0)
    assert summary["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.1)) / 2)
    assert summary["brier"] == pytest.approx((0.01 + 0.01 + 0.81 + 0.81) / 2)
    # 60% sure in one bin and right 60% of the time, 100% sure and always right: ECE 0.
    probs = np.array([[0.6, 0.4]] * 5 + [[1.0, 0.0]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-9)


def test_temperatures_by_shot_count_are_interpolated_in_log_shots():
    table = {1: 20.0, 5: 10.0, 10: 8.0}
    assert temperature_for_shots(table, 1) == 20.0 and temperature_for_shots(table, 5) == 10.0
    assert temperature_for_shots(table, 50) == 8.0  # past the last fit: the nearest
    x = np.log(2) / np.log(5)
    assert temperature_for_shots(table, 2) == pytest.approx(20.0 ** (1 - x) * 10.0 ** x)
    assert 10.0 > temperature_for_shots(table, 7) > 8.0
    record = {"calibration": {"temperature": 20.0, "temperatures": {"1": 20.0, "5": 10.0, "10": 8.0}}}
    assert recorded_temperature(record) == 20.0  # no shot count: the record's own temperature
    assert recorded_temperature(record, 5) == 10.0 and recorded_temperature(record, 0) == 20.0
    assert recorded_temperature({"calibration": {"temperature": 3.0}}, 5) == 3.0  # fitted at one count only
    for bad in ({"1": 0.0}, {"0": 2.0}, {"one": 2.0}, [], {}):
        with pytest.raises(ValueError, match="calibration"):
            recorded_temperature({"calibration": {"temperature": 2.0, "temperatures": bad}}, 1)


def test_the_record_round_trips_and_a_bad_one_is_refused(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, num_frames=4))
    path = tmp_path / "model.pt"
    checkpoint_hash = save_checkpoint(path, model)
    assert recorded_temperature(read_checkpoint_meta(path)) == 1.0
    record_calibration(path, {"temperature": 12.5, "split": "val"})
    meta = read_checkpoint_meta(path)
    assert meta["calibration"] == {"temperature": 12.5, "split": "val"} and recorded_temperature(meta) == 12.5
    assert meta["checkpoint_hash"] == checkpoint_hash  # the weights and their hash do not change
    for bad in ({"temperature": 0}, {"temperature": "hot"}, {"split": "val"}, {"temperature": float("nan")}):
        with pytest.raises(ValueError, match="temperature"):
            record_calibration(path, bad)
        with pytest.raises(ValueError, match="temperature"):
            recorded_temperature({"calibration": bad})
    assert recorded_temperature(read_checkpoint_meta(path)) == 12.5  # a refused record leaves the old one
    with pytest.raises(CheckpointError):
        record_calibration(tmp_path / "absent.pt", {"temperature": 2.0})


def test_calibration_table_fits_on_val_records_and_keeps_the_ranking(synth_root, tmp_path):
    from training.evaluate import calibration_table, load_for_eval

    torch.manual_seed(4)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, metric="otam", frame_centering=True))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    kwargs = dict(way=3, shot=1, episodes=30, num_workers=0, progress=False, device="cpu")
    result = calibration_table(path, synth_root, record=True, json_path=tmp_path / "cal.json", **kwargs)
    fitted = result["temperature"]
    before, after = result["fit"]["nll"]["1"]
    assert result["fit"]["split"] == "val" and after <= before
    assert list(result["fit"]["temperatures"]) == ["1"]  # 4 clips a class: no 5- or 10-shot episodes
    assert read_checkpoint_meta(path)["calibration"]["temperature"] == fitted
    names = [row["probabilities"] for row in result["rows"]]
    assert names == ["as the model gives them", "fitted on val (now recorded)"]
    assert len({row["accuracy"] for row in result["rows"]}) == 1  # temperature never changes an answer
    assert all(row["ece_ci95"] >= 0 and 0 <= row["ece"] <= 100 for row in result["rows"])
    assert json.loads((tmp_path / "cal.json").read_text())["temperature"] == fitted
    # Run again: the recorded temperature gets its own row, and the model's weights were never touched.
    again = calibration_table(path, synth_root, **kwargs)
    assert [row["probabilities"] for row in again["rows"]][1] == "recorded before this run"
    assert again["rows"][1]["temperature"] == fitted
    reloaded, _ = load_for_eval(path, None, "cpu")
    assert reloaded.fingerprint() == model.fingerprint()


def test_fsar_eval_calibrate_prints_the_table_and_refuses_other_modes(synth_root, tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    torch.manual_seed(5)
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, metric="otam")))
    runner = CliRunner()
    out = runner.invoke(app, ["eval", "--checkpoint", str(path), "--data", str(synth_root), "--way", "3",
                              "--episodes", "10", "--calibrate", "--record"])
    assert out.exit_code == 0, out.output
    assert "| as the model gives them | 1 |" in out.output and "recorded temperature" in out.output
    assert "calibration" in read_checkpoint_meta(path)
    for extra in (["--open-set"], ["--baselines"], ["--metric", "mean"]):
        refused = runner.invoke(app, ["eval", "--checkpoint", str(path), "--data", str(synth_root), "--calibrate",
                                      *extra])
        assert refused.exit_code != 0 and "--calibrate measures" in str(refused.exception)
    refused = runner.invoke(app, ["eval", "--checkpoint", str(path), "--data", str(synth_root), "--record"])
    assert refused.exit_code != 0 and "--record needs --open-set or --calibrate" in str(refused.exception)
