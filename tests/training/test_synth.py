"""The synthetic motion dataset: layout, real decodable H.264 files, determinism, and reversed pairs
that only temporal order can tell apart."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest

from training.data.synth import (
    MOTION_CLASSES,
    write_mp4,
    SyntheticDatasetError,
    render_clip,
    split_synthetic_classes,
    write_synthetic_dataset,
)

FRAMES, SIZE, PER_CLASS = 8, 32, 10


def decode_all(path: Path) -> np.ndarray:
    """Every frame of a video file, uint8 [T, H, W, 3], with PyAV (independent of our decoder)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    summary = write_synthetic_dataset(root, videos_per_class=PER_CLASS, frames=FRAMES, size=SIZE, seed=7,
                                      progress=False)
    return root, summary


def read_split(root: Path, split: str) -> list[str]:
    return (root / "splits" / f"{split}.txt").read_text().split()


def test_layout_labels_and_splits_are_consistent(synth_root):
    root, summary = synth_root
    labels = json.loads((root / "labels.json").read_text())
    class_dirs = sorted(p.name for p in (root / "videos").iterdir())
    assert sorted(labels) == class_dirs and len(class_dirs) == summary["classes"] == len(MOTION_CLASSES)
    assert labels["moving_right"] == "moving right"
    assert labels["rotating_counter-clockwise"] == "rotating counter-clockwise"

    classes_of = {}
    listed = []
    for split in ("train", "val", "test"):
        lines = read_split(root, split)
        assert all(line.count("/") == 1 for line in lines)
        classes_of[split] = {line.split("/")[0] for line in lines}
        assert classes_of[split] == set(summary["splits"][split])
        listed += lines
    # Every file is listed exactly once and every listed video exists.
    on_disk = sorted(f"{p.parent.name}/{p.stem}" for p in (root / "videos").glob("*/*.mp4"))
    assert sorted(listed) == on_disk and len(on_disk) == summary["videos"] == 24 * PER_CLASS
    # Disjoint classes; 5-way evaluation possible on val and test, and test holds motion/reverse pairs.
    assert not classes_of["train"] & classes_of["val"]
    assert not classes_of["train"] & classes_of["test"]
    assert not classes_of["val"] & classes_of["test"]
    assert len(classes_of["test"]) >= 5 and len(classes_of["val"]) >= 5
    reverse_of = {m.name: m.reverse for m in MOTION_CLASSES}
    test_pairs = [c for c in classes_of["test"] if reverse_of[c] in classes_of["test"]]
    assert len(test_pairs) >= 4
    assert ["moving_right", "moving_left"] in summary["pairs"]


def test_every_file_is_h264_with_the_requested_frames(synth_root):
    root, _ = synth_root
    files = sorted((root / "videos").glob("*/*.mp4"))
    for path in files[:: max(1, len(files) // 24)]:
        with av.open(str(path)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
        frames = decode_all(path)
        assert frames.shape == (FRAMES, SIZE, SIZE, 3)


def test_same_seed_same_bytes_other_seed_other_videos(tmp_path):
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    kwargs = dict(classes=10, videos_per_class=2, frames=4, size=16, progress=False)
    first = digest(Path(write_synthetic_dataset(tmp_path / "a", seed=3, **kwargs)["root"]))
    second = digest(Path(write_synthetic_dataset(tmp_path / "b", seed=3, **kwargs)["root"]))
    other = digest(Path(write_synthetic_dataset(tmp_path / "c", seed=4, **kwargs)["root"]))
    assert first == second
    videos = [k for k in first if k.endswith(".mp4")]
    assert len(videos) == 20
    assert all(first[k] != other[k] for k in videos)


def test_reverse_class_is_the_same_scene_played_backwards():
    for motion in MOTION_CLASSES:
        if not motion.forward:
            continue
        for seed in range(3):
            forward = render_clip(motion.name, 12, 48, seed)
            backward = render_clip(motion.reverse, 12, 48, seed)
            # Same frames, opposite order: identical per-pixel mean over time ...
            np.testing.assert_array_equal(backward, forward[::-1])
            np.testing.assert_array_equal(forward.mean(axis=0), backward.mean(axis=0))
            # ... but the videos differ frame by frame (the motion is visible).
            assert np.abs(forward.astype(int) - backward.astype(int)).mean() > 0.5, motion.name


def test_reversed_pair_survives_h264(tmp_path):
    """Encoded and decoded, a motion and its reverse keep (nearly) the same per-pixel frame mean."""
    for name, reverse in (("moving_right", "moving_left"), ("rotating_clockwise", "rotating_counter-clockwise")):
        decoded = []
        for motion in (name, reverse):
            write_mp4(tmp_path / f"{motion}.mp4", render_clip(motion, 16, 64, seed=11))
            decoded.append(decode_all(tmp_path / f"{motion}.mp4").astype(np.float32))
        forward, backward = decoded
        assert np.abs(forward.mean(axis=0) - backward.mean(axis=0)).mean() < 1.0  # codec noise, 0-255 scale
        assert np.abs(forward - backward).mean() > 3 * np.abs(forward - backward[::-1]).mean()


def _nearest_centroid_loo(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier."""
    hits = 0
    for i in range(len(features)):
        keep = np.arange(len(features)) != i
        centroids = [features[keep & (labels == c)].mean(axis=0) for c in (0, 1)]
        hits += int(np.argmin([np.linalg.norm(features[i] - c) for c in centroids]) == labels[i])
    return hits / len(features)


def test_frame_mean_cannot_separate_a_motion_from_its_reverse_but_order_can(synth_root):
    root, summary = synth_root
    clips = {name: [decode_all(p).astype(np.float32) / 255.0 for p in sorted((root / "videos" / name).glob("*.mp4"))]
             for pair in summary["pairs"] for name in pair}  # each [T, S, S, 3]
    # What a frame-mean model sees: the per-pixel mean over time. Over all 12 pairs, a nearest-class-
    # mean classifier on it is at chance (0.5) telling a motion from its reverse.
    frame_mean_acc = []
    for forward, reverse in summary["pairs"]:
        features = np.array([clip.mean(axis=0).ravel() for clip in clips[forward] + clips[reverse]])
        labels = np.array([0] * len(clips[forward]) + [1] * len(clips[reverse]))
        frame_mean_acc.append(_nearest_centroid_loo(features, labels))
    assert len(frame_mean_acc) == 12
    assert np.mean(frame_mean_acc) <= 0.65, frame_mean_acc

    # Order separates them: the horizontal position of the moving object over time (pixels far from
    # the static background) rises for "moving right" and falls for "moving left".
    def x_slope(clip: np.ndarray) -> float:
        foreground = np.abs(clip - np.median(clip, axis=0)).sum(axis=-1)  # [T, S, S]
        column_mass = foreground.sum(axis=1) + 1e-6  # [T, S]
        centre_x = (column_mass * (np.arange(SIZE) + 0.5)).sum(axis=1) / column_mass.sum(axis=1)  # [T]
        return float(np.polyfit(np.arange(len(centre_x)), centre_x, 1)[0])

    assert all(x_slope(clip) > 0 for clip in clips["moving_right"])
    assert all(x_slope(clip) < 0 for clip in clips["moving_left"])


def test_class_cap_keeps_valid_splits():
    for n in range(4, len(MOTION_CLASSES) + 1):
        splits = split_synthetic_classes(n)
        names = [m.name for members in splits.values() for m in members]
        assert len(names) == len(set(names)) == n
        assert len(splits["val"]) in (0,) or len(splits["val"]) >= 5
        if n >= 10:
            assert len(splits["test"]) >= 5 and len(splits["train"]) >= 5
    default = split_synthetic_classes(None)
    assert {s: len(m) for s, m in default.items()} == {"train": 12, "val": 6, "test": 6}


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(SyntheticDatasetError, match="classes must be between 4 and 24"):
        write_synthetic_dataset(tmp_path / "x", classes=30, progress=False)
    with pytest.raises(SyntheticDatasetError, match="even"):
        write_synthetic_dataset(tmp_path / "x", size=33, progress=False)
    with pytest.raises(SyntheticDatasetError, match="frames"):
        write_synthetic_dataset(tmp_path / "x", frames=1, progress=False)
    with pytest.raises(SyntheticDatasetError, match="unknown synthetic motion class"):
        render_clip("dancing", 4, 32, 0)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.txt").write_text("keep me")
    with pytest.raises(SyntheticDatasetError, match="not empty"):
        write_synthetic_dataset(occupied, classes=4, videos_per_class=2, frames=2, size=16, progress=False)
    assert (occupied / "thesis.txt").read_text() == "keep me"


def test_rewriting_a_synthetic_folder_replaces_it(tmp_path):
    write_synthetic_dataset(tmp_path, classes=12, videos_per_class=2, frames=2, size=16, progress=False)
    summary = write_synthetic_dataset(tmp_path, classes=4, videos_per_class=3, frames=2, size=16, progress=False)
    assert len(list((tmp_path / "videos").iterdir())) == 4
    assert len(list((tmp_path / "videos").glob("*/*.mp4"))) == summary["videos"] == 12
