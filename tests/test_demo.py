"""`fsar demo` end to end, shortened: synthetic data, the one-off demo model, the embedded gateway over HTTP."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import httpx

from service.demo import ensure_checkpoint, run_demo


def test_demo_trains_once_registers_held_out_classes_and_classifies_over_http(tmp_path):
    said: list[str] = []
    short = ["pretrain.steps=3", "pretrain.batch_size=8", "episodic.episodes=6", "val.episodes=5"]
    result = run_demo(tmp_path, port=None, serve_forever=False, samples_per_class=1, overrides=short,
                      say=said.append)

    assert result.trained_now and result.checkpoint.is_file()
    classes = [c["label"] for c in result.support_set["classes"]]
    assert len(classes) >= 5 and all(c["shots"] == 1 for c in result.support_set["classes"])
    assert len(result.samples) == len(classes)
    for sample in result.samples:
        for mode in ("few_shot", "zero_shot"):
            assert {p["label"] for p in sample[mode]} <= set(classes)
        assert sample["true_label"] in classes
    # The printed commands are ready to paste: they name a real sample file and the registered set.
    assert any(result.support_set["id"] in block and "/classify" in block for block in result.curl)
    assert any("labels=" in block for block in result.curl)
    assert any("few-shot top-1" in line and "frame-mean baseline" in line for line in said)
    assert all(s["frame_mean"] in classes for s in result.samples)  # the baseline on the same clips
    assert 0 <= result.frame_mean_correct <= len(result.samples)
    # Its probabilities were calibrated on the validation classes, never on the held-out ones it classifies.
    from training.checkpoint import read_checkpoint_meta

    record = read_checkpoint_meta(result.checkpoint)["calibration"]
    assert record["split"] == "val" and record["temperature"] == record["temperatures"]["1"] > 0
    assert set(record["temperatures"]) == {"1", "5", "10"}  # the demo data has 60 clips a class
    assert all(after <= before for before, after in record["nll"].values())
    assert any("probabilities calibrated on the val classes" in line for line in said)

    # A second run, with two shots a class, reuses the cached checkpoint and dataset instead of making
    # them again, classifies the same held-out clips (so answers compare across shot counts), none of
    # them registered, and the model card says plainly that it is a demo model.
    seen: dict = {}

    def grab(text: str) -> None:
        said.append(text)
        for line in text.splitlines():  # fetch the printed model-card URL while the server is still up
            if line.startswith("curl -s http") and line.endswith("/model") and "card" not in seen:
                seen["card"] = httpx.get(line.split()[-1], timeout=30).json()

    again = run_demo(tmp_path, port=None, serve_forever=False, samples_per_class=1, overrides=short, shots=2,
                     say=grab)
    assert not again.trained_now and again.checkpoint == result.checkpoint
    assert "demo model" in seen["card"]["description"]
    assert seen["card"]["calibration"] == record  # the gateway serves with the recorded temperature
    for sample in again.samples:
        scores = [p["score"] for p in sample["few_shot"]]
        assert all(0.0 <= s <= 1.0 and not math.isnan(s) for s in scores) and sum(scores) <= 1.0 + 1e-5
    assert all(c["shots"] == 2 for c in again.support_set["classes"])
    assert [s["path"] for s in again.samples] == [s["path"] for s in result.samples]
    registered = {v["sha256"] for v in again.support_set["videos"]}
    assert len(registered) == 2 * len(classes)
    assert all(hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest() not in registered for s in again.samples)


def test_a_cached_demo_model_made_with_other_settings_is_made_again(tmp_path):
    said: list[str] = []
    short = ["pretrain.steps=3", "pretrain.batch_size=8"]
    first, made = ensure_checkpoint(tmp_path / "data", tmp_path / "demo", said.append, overrides=short)
    assert made and first.is_file()
    same, made = ensure_checkpoint(tmp_path / "data", tmp_path / "demo", said.append, overrides=short)
    assert not made and same == first and "reusing" in said[-1]
    # Another preset version (here: another override) must not be served under the current name.
    other, made = ensure_checkpoint(tmp_path / "data", tmp_path / "demo", said.append,
                                    overrides=[*short, "model.otam_lambda=0.5"])
    assert made and any("made with other settings" in line for line in said)
    from training.checkpoint import load_checkpoint

    assert load_checkpoint(other)[0].config.otam_lambda == 0.5
