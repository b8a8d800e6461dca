"""`fsar train` checks the config against the dataset first: one sentence naming the key, before any work.

Each case builds its own small dataset. The pre-flight check only lists files, so most datasets are
empty placeholder files; the case from the field (a 2-class validation split) uses real synthetic
videos. ``no_work`` makes the stand-in pretraining and the model build fail loudly, so a check that
comes too late cannot pass.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import training.pretrain
import training.train
from training.config import ConfigError, load_config
from training.data import DatasetError, load_dataset
from training.preflight import PreflightError, check_training_data
from training.train import train

ROOT = Path(__file__).resolve().parents[2]
# No stand-in pretraining needed to reach the check; FAST keeps a run that gets past it short.
FAST = ["data.num_workers=0", "threads=1"]


def _tree(root: Path, splits: Dict[str, Dict[str, int]], *, missing: Optional[Dict[str, List[str]]] = None,
          labels: Optional[Dict[str, str]] = None, frames: bool = False) -> Path:
    """A videos (or frames) tree of placeholder files: ``splits[split][class] = videos``; ``missing``
    lists extra ``class/video_id`` lines per split that have no file."""
    for split, classes in splits.items():
        lines = []
        for class_name, count in classes.items():
            for i in range(count):
                if frames:
                    folder = root / "frames" / class_name / f"v{i}"
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "000001.jpg").write_bytes(b"")
                else:
                    (root / "videos" / class_name).mkdir(parents=True, exist_ok=True)
                    (root / "videos" / class_name / f"v{i}.mp4").write_bytes(b"")
                lines.append(f"{class_name}/v{i}")
        lines += (missing or {}).get(split, [])
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    if labels is not None:
        (root / "labels.json").write_text(json.dumps(labels))
    return root


def _classes(prefix: str, count: int, videos: int) -> Dict[str, int]:
    return {f"{prefix}_{i}": videos for i in range(count)}


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretraining or building the model fails the test: the check must come before both."""
    def reached(*args, **kwargs):
        raise AssertionError("training went past the pre-flight check")

    monkeypatch.setattr(training.pretrain, "pretrain_backbone", reached)
    monkeypatch.setattr(training.train, "build_model", reached)


def _refusal(root: Path, out: Path, overrides: List[str], config: str = "synthetic-tiny") -> str:
    """Run ``train`` expecting a PreflightError; return its message after checking nothing was written."""
    started = time.perf_counter()
    with pytest.raises(PreflightError) as caught:
        train(config, root, out, overrides=[*FAST, *overrides], device="cpu", progress=False)
    assert time.perf_counter() - started < 5.0
    assert not out.exists()  # no backbone.pt, config.yaml or checkpoint
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_two_class_validation_split_stops_in_seconds_naming_val_way(synth_root, tmp_path, no_work):
    """The case from the field, on real videos with the preset's stand-in pretraining on."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "videos").symlink_to(synth_root / "videos")
    shutil.copy(synth_root / "labels.json", root / "labels.json")
    shutil.copytree(synth_root / "splits", root / "splits")
    val = (root / "splits" / "val.txt").read_text().split()
    kept = sorted({line.split("/")[0] for line in val})[:2]
    (root / "splits" / "val.txt").write_text("\n".join(v for v in val if v.split("/")[0] in kept) + "\n")
    assert load_config("synthetic-tiny").pretrain.steps > 0
    message = _refusal(root, tmp_path / "run", [])
    assert message == ("validation split has 2 classes but val.way is 5; set val.way to 2 or fewer "
                       "(append val.way=2 to the fsar train command) or add classes to the val split.")


def test_too_few_train_classes_names_episodic_way(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"train": _classes("a", 3, 6), "val": _classes("b", 5, 6)})
    message = _refusal(root, tmp_path / "run", [])
    assert message.startswith("train split has 3 classes but episodic.way is 5; set episodic.way to 3 or fewer")
    assert "episodic.way=3" in message


def test_too_few_train_videos_per_class_names_episodic_query(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"train": _classes("a", 6, 3), "val": _classes("b", 5, 6)})
    message = _refusal(root, tmp_path / "run", ["episodic.shot=1", "episodic.query=3"])
    assert message.startswith("only 0 of the 6 classes of the train split have 4 videos "
                              "(episodic.shot 1 + episodic.query 3) but episodic.way is 5")
    assert "set episodic.query to 2 or fewer (append episodic.query=2 to the fsar train command)" in message


def test_too_few_validation_videos_per_class_names_val_query(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"train": _classes("a", 5, 6), "val": {**_classes("b", 4, 6), "b_4": 2}})
    message = _refusal(root, tmp_path / "run", ["val.query=3"])
    assert "4 of the 5 classes of the validation split have 4 videos (val.shot 1 + val.query 3)" in message
    assert "set val.query to 1 or fewer (append val.query=1" in message


def test_single_video_classes_suggest_a_smaller_way(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"train": {**_classes("a", 3, 4), **_classes("c", 3, 1)}})
    message = _refusal(root, tmp_path / "run", ["episodic.query=1"])
    assert "set episodic.way to 3, episodic.shot to 1 and episodic.query to 1" in message


@pytest.mark.parametrize("frames", [False, True], ids=["videos", "frames"])
def test_missing_videos_are_counted_and_named_with_data_skip_missing(tmp_path, no_work, frames):
    missing = [f"a_0/gone{i}" for i in range(7)]
    root = _tree(tmp_path / "data", {"train": _classes("a", 5, 6), "val": _classes("b", 5, 6)},
                 missing={"train": missing}, frames=frames)
    message = _refusal(root, tmp_path / "run", [])
    assert message.startswith(f"7 of 37 videos listed in {root / 'splits' / 'train.txt'} (train split) are not on "
                              "disk (a_0/gone0, a_0/gone1, a_0/gone2, a_0/gone3, a_0/gone4 ...)")
    assert "set data.skip_missing to true (append data.skip_missing=true to the fsar train command)" in message
    cfg = load_config("synthetic-tiny", ["data.skip_missing=true"])
    with pytest.warns(UserWarning, match="7 of 37 listed videos not found"):  # training skips them, as it says
        splits = check_training_data(cfg, root)
        assert len(load_dataset(root, "train")) == 30 and len(splits["train"].entries) == 30


def test_missing_paths_of_a_csv_are_counted(tmp_path, no_work):
    folder = _tree(tmp_path / "data", {"train": _classes("a", 5, 2), "val": _classes("b", 5, 2)})
    rows = [f"videos/{c}/v{i}.mp4,{c},{s}" for s, prefix in (("train", "a"), ("val", "b"))
            for c in _classes(prefix, 5, 2) for i in range(2)]
    (folder / "data.csv").write_text("path,label,split\n" + "\n".join([*rows, "videos/a_0/lost.mp4,a_0,train"]))
    message = _refusal(folder / "data.csv", tmp_path / "run", ["episodic.query=1"])
    assert message.startswith(f"1 of 11 videos listed in {folder / 'data.csv'} (train split) are not on disk "
                              "(videos/a_0/lost.mp4)")
    assert "data.skip_missing=true" in message


def test_empty_label_text_names_labels_json(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"train": {**_classes("a", 4, 2), "__": 2}})
    message = _refusal(root, tmp_path / "run", ["episodic.query=1"])
    assert message.startswith("class '__' of the train split has an empty label text; map it to a text in "
                              f"{root / 'labels.json'}")


def test_label_texts_equal_after_normalisation_are_refused(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"train": _classes("a", 5, 2)},
                 labels={"a_0": "Open  the door", "a_3": "open the DOOR "})
    message = _refusal(root, tmp_path / "run", ["episodic.query=1"])
    assert message == (f"classes 'a_0' and 'a_3' of the train split both have the label text 'open the door' "
                       f"(compared lower-cased); give them distinct texts in {root / 'labels.json'}.")


def test_supervised_batch_larger_than_the_split_names_batch_size(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"train": _classes("a", 4, 5)})
    overrides = ["model.backbone=fsar-tiny", "model.pretrained=null", "supervised.batch_size=32", "grad_accum=1"]
    message = _refusal(root, tmp_path / "run", overrides, config="m2clip-k400")
    assert message == ("the train split's 20 videos make 0 batches of supervised.batch_size 32 but one optimiser "
                       "step takes grad_accum 1; set supervised.batch_size to 20 or fewer (append "
                       "supervised.batch_size=20 to the fsar train command) or add videos to the train split.")


def test_missing_train_split_names_data_train_split(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"base": _classes("a", 5, 6), "val": _classes("b", 5, 6)})
    message = _refusal(root, tmp_path / "run", [])
    assert "but data.train_split is 'train'; set data.train_split to one of base" in message
    assert "(append data.train_split=base to the fsar train command)" in message
    with pytest.raises(DatasetError, match="does not exist"):  # no dataset at all: the layout error
        train("synthetic-tiny", tmp_path / "nowhere", tmp_path / "run", overrides=FAST, device="cpu", progress=False)


def test_too_few_episodes_for_one_step_stop_before_pretraining(tmp_path, no_work):
    root = _tree(tmp_path / "data", {"train": _classes("a", 5, 6)})
    with pytest.raises(ConfigError, match=r"set episodic.episodes to 4 or more \(append episodic.episodes=4"):
        train("synthetic-tiny", root, tmp_path / "run", overrides=[*FAST, "episodic.episodes=3", "grad_accum=4"],
              device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_zero_shot_validation_does_not_need_val_way_classes(tmp_path):
    root = _tree(tmp_path / "data", {"train": _classes("a", 5, 6), "val": _classes("b", 2, 1)})
    splits = check_training_data(load_config("synthetic-tiny", ["val.mode=zero_shot"]), root)
    assert sorted(splits) == ["train", "val"]
    with pytest.raises(PreflightError, match="val.way"):
        check_training_data(load_config("synthetic-tiny"), root)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    root = _tree(tmp_path / "data", {"train": _classes("a", 5, 6), "val": _classes("b", 2, 6)})
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "service.cli", "train", "--config", "synthetic-tiny", "--data",
                             str(root), "--out", str(tmp_path / "run"), "--device", "cpu"],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: validation split has 2 classes but val.way is 5; set val.way to 2 or fewer (append val.way=2 to "
        "the fsar train command) or add classes to the val split."]
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 60  # the interpreter and torch import; no pretraining
