"""Datasets in the three layouts, corrupt-sample handling, samplers, presets and the dataset checker,
all on real files: synthetic H.264 videos and PNG/JPEG frame folders written here."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.video import decode_clip
from training.data import (
    DATASET_PRESETS,
    CorruptSampleWarning,
    DatasetError,
    EpisodeCollate,
    EpisodeSampler,
    SupervisedBatchSampler,
    check_dataset,
    collate_supervised,
    episode_loader,
    get_preset,
    load_dataset,
    sample_frame_indices,
    write_ssv2_labels,
    write_synthetic_dataset,
)

PER_CLASS = 6


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """10 classes (5 train, 5 test), 6 videos each, 8 frames of 32 x 32."""
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(root, classes=10, videos_per_class=PER_CLASS, frames=8, size=32, seed=1, progress=False)
    return root


def gray_frames(folder: Path, count: int, ext: str = "png", size: tuple[int, int] = (40, 30)) -> None:
    """``count`` frames named img_1 ... img_<count> (not zero padded); frame k is gray level 20 * k."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", size, (20 * k,) * 3).save(folder / f"img_{k + 1}.{ext}")


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


def test_videos_tree_layout_decodes_items(synth):
    dataset = load_dataset(synth, "test", num_frames=4, size=24, mode="test")
    labels_json = json.loads((synth / "labels.json").read_text())
    assert len(dataset) == 5 * PER_CLASS
    assert dataset.classes == sorted(dataset.classes) and len(dataset.classes) == 5
    assert dataset.label_texts == [labels_json[c] for c in dataset.classes]
    assert sorted(set(dataset.labels)) == list(range(5))
    frames, label = dataset[7]
    assert frames.dtype == torch.uint8 and frames.shape == (4, 24, 24, 3)
    assert dataset.classes[label] == Path(dataset.paths[7]).parent.name
    # The same frames the serving decoder gives for that file.
    np.testing.assert_array_equal(frames.numpy(), decode_clip(dataset.paths[7], num_frames=4, size=24))
    assert not set(load_dataset(synth, "train", 4, 24).classes) & set(dataset.classes)


def test_train_mode_follows_torch_seed(synth):
    dataset = load_dataset(synth, "train", num_frames=3, size=32, mode="train")
    torch.manual_seed(0)
    first = dataset[0][0]
    torch.manual_seed(0)
    again = dataset[0][0]
    torch.manual_seed(1)
    other = [dataset[0][0] for _ in range(4)]
    assert torch.equal(first, again)
    assert any(not torch.equal(first, o) for o in other)


def test_frames_folder_layout_samples_segment_centres(tmp_path):
    root = tmp_path / "ds"
    for cls, count in (("open_door", 10), ("close_door", 3)):
        for vid in ("v1", "v2"):
            gray_frames(root / "frames" / cls / vid, count, ext="png" if cls == "open_door" else "jpg")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("open_door/v1\nopen_door/v2\nclose_door/v1\nclose_door/v2\n")
    dataset = load_dataset(root, "train", num_frames=4, size=16, mode="test")
    assert dataset.classes == ["close_door", "open_door"]
    assert dataset.label_texts == ["close door", "open door"]  # default: _ read as spaces
    frames, label = dataset[0]
    assert dataset.classes[label] == "open_door" and frames.shape == (4, 16, 16, 3)
    # 10 frames, 4 segments: centres floor((2k+1)*10/8) = 1, 3, 6, 8 (img_10 sorts after img_9).
    assert frames[:, 8, 8, 0].tolist() == [20, 60, 120, 160]
    # Fewer frames than T: frames repeat, in order (lossy JPEG: compare roughly).
    short, _ = dataset[2]
    assert np.allclose(short[:, 8, 8, 0].numpy(), [0, 20, 20, 40], atol=3)
    assert sample_frame_indices(10, 4, "test").tolist() == [1, 3, 6, 8]
    picks = sample_frame_indices(100, 4, "train", np.random.default_rng(0))
    assert [25 * k <= p < 25 * (k + 1) for k, p in enumerate(picks)] == [True] * 4


def test_csv_layout_mixes_videos_and_frame_folders(synth, tmp_path):
    videos = sorted((synth / "videos" / "moving_right").glob("*.mp4"))[:3]
    for i, video in enumerate(videos):
        shutil.copy(video, tmp_path / f"r{i}.mp4")
    gray_frames(tmp_path / "frames" / "a", 5)
    gray_frames(tmp_path / "frames" / "b", 5)
    (tmp_path / "labels.json").write_text(json.dumps({"moving_right": "moving to the right"}))
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("path,label,split\n"
                        "r0.mp4,moving_right,train\nr1.mp4,moving_right,train\nr2.mp4,moving_right,test\n"
                        f"frames/a,static_gray,train\n{tmp_path / 'frames' / 'b'},static_gray,test\n")
    train = load_dataset(csv_path, "train", num_frames=2, size=16)
    assert train.classes == ["moving_right", "static_gray"]
    assert train.label_texts == ["moving to the right", "static gray"]
    assert len(train) == 3 and train.labels == [0, 0, 1]
    assert [train[i][0].shape for i in range(3)] == [(2, 16, 16, 3)] * 3
    assert len(load_dataset(csv_path, "test", num_frames=2, size=16)) == 2
    assert [p for p in check_dataset(csv_path) if "share 2 classes" in p and "few-shot splits need disjoint" in p]

    no_split = tmp_path / "nosplit.csv"
    no_split.write_text("r0.mp4,moving_right\nframes/a,static_gray\n")
    assert len(load_dataset(no_split, None, num_frames=2, size=16)) == 2
    with pytest.raises(DatasetError, match="no split column"):
        load_dataset(no_split, "train")
    assert any("no split column" in p for p in check_dataset(no_split))


def test_bad_layouts_raise_readable_errors(synth, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match=r"splits/val2\.txt not found"):
        load_dataset(synth, "val2")
    root = tmp_path / "bad"
    (root / "videos").mkdir(parents=True)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("cls/ok\njust_a_name\n")
    with pytest.raises(DatasetError, match=r"train\.txt:2: expected `class_name/video_id`"):
        load_dataset(root, "train")
    (root / "splits" / "train.txt").write_text("cls/gone\n")
    with pytest.warns(UserWarning, match="1 of 1 listed videos not found"), pytest.raises(DatasetError, match="no videos found"):
        load_dataset(root, "train")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a.mp4,x,train,extra\n")
    with pytest.raises(DatasetError, match="2 \\(path,label\\) or 3"):
        load_dataset(bad_csv, "train")
    with pytest.raises(ValueError, match="mode"):
        load_dataset(synth, "train", mode="eval")


def test_missing_videos_are_skipped_with_one_warning(synth, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(synth, root)
    (root / "videos" / "moving_right" / "0000.mp4").unlink()
    with pytest.warns(UserWarning, match=r"test\.txt: 1 of 30 listed videos not found on disk, skipped \(moving_right/0000\)"):
        dataset = load_dataset(root, "test", num_frames=2, size=16)
    assert len(dataset) == 29


def test_corrupt_video_is_replaced_by_another_of_its_class(synth, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(synth, root)
    bad = root / "videos" / "moving_left" / "0002.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    dataset = load_dataset(root, "test", num_frames=2, size=16)
    index = dataset.paths.index(str(bad))
    with pytest.warns(CorruptSampleWarning, match="0002.mp4"):
        frames, label = dataset[index]
    assert dataset.classes[label] == "moving_left" and frames.shape == (2, 16, 16, 3)
    # Once every video of the class is unreadable, a clear error.
    for path in (root / "videos" / "moving_left").glob("*.mp4"):
        path.write_bytes(b"not a video")
    dataset = load_dataset(root, "test", num_frames=2, size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        with pytest.raises(DatasetError, match="moving_left"):
            dataset[index]


# ------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------


LABELS = [c for c in range(8) for _ in range(7)]  # 8 classes x 7 items


def test_episode_sampler_structure():
    sampler = EpisodeSampler(LABELS, way=5, shot=2, query=3, episodes=50, seed=0)
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 50
    for indices in episodes:
        assert len(indices) == 5 * 2 + 5 * 3
        support, query = indices[:10], indices[10:]
        assert not set(support) & set(query) and len(set(indices)) == 25
        support_classes = [LABELS[i] for i in support]
        class_order = support_classes[::2]
        assert len(set(class_order)) == 5  # N distinct classes, never repeated
        assert support_classes == [c for c in class_order for _ in range(2)]  # class by class
        assert [LABELS[i] for i in query] == [c for c in class_order for _ in range(3)]
    assert len({tuple(e) for e in episodes}) == 50


def test_episode_sampler_is_seeded_and_shardable():
    def run(**kwargs):
        return list(EpisodeSampler(LABELS, 5, 1, 5, 40, **kwargs))

    assert run(seed=3) == run(seed=3)
    assert run(seed=3) != run(seed=4)
    sampler = EpisodeSampler(LABELS, 5, 1, 5, 40, seed=3)
    first_pass, second_pass = list(sampler), list(sampler)
    sampler.set_epoch(1)
    assert first_pass == second_pass != list(sampler)
    shards = [run(seed=3, rank=r, world_size=3) for r in range(3)]
    assert sorted(map(tuple, sum(shards, []))) == sorted(map(tuple, run(seed=3)))
    with pytest.raises(ValueError, match="only 2 of 3 classes"):
        EpisodeSampler([0] * 6 + [1] * 6 + [2] * 3, way=3, shot=1, query=5, episodes=1)


def test_episode_loader_with_two_workers(synth):
    dataset = load_dataset(synth, "test", num_frames=2, size=16)
    loader = episode_loader(dataset, way=5, shot=1, query=2, episodes=3, seed=0, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3
    for sampled, batch in zip(loader.batch_sampler, batches):
        assert batch["support_frames"].shape == (5, 2, 16, 16, 3)
        assert batch["support_frames"].dtype == torch.uint8
        assert batch["query_frames"].shape == (10, 2, 16, 16, 3)
        assert batch["support_labels"].tolist() == [0, 1, 2, 3, 4]
        assert batch["query_labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        class_ids = batch["class_ids"].tolist()
        assert class_ids == [dataset.labels[i] for i in sampled[:5]]
        assert batch["label_texts"] == [dataset.label_texts[c] for c in class_ids]
        np.testing.assert_array_equal(batch["query_frames"][0].numpy(), dataset[sampled[5]][0].numpy())


def test_episode_collate_rejects_a_batch_out_of_order():
    frame = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    collate = EpisodeCollate(["a", "b", "c"], way=2, shot=1)
    assert collate([(frame, 2), (frame, 0), (frame, 0)])["label_texts"] == ["c", "a"]
    with pytest.raises(ValueError, match="queries must belong"):
        collate([(frame, 2), (frame, 0), (frame, 1)])
    with pytest.raises(ValueError, match="groups of 1"):
        collate([(frame, 2), (frame, 2), (frame, 2)])


def test_supervised_batches_cover_every_item_once_per_epoch(synth):
    sampler = SupervisedBatchSampler(list(range(23)), batch_size=5, seed=0, drop_last=False)
    batches = list(sampler)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3] and sorted(sum(batches, [])) == list(range(23))
    assert list(SupervisedBatchSampler(list(range(23)), 5, seed=0, drop_last=True)) == batches[:4]
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(SupervisedBatchSampler(list(range(23)), 5, 0, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2 and not set(sum(ranks[0], [])) & set(sum(ranks[1], []))
    dataset = load_dataset(synth, "train", num_frames=2, size=16)
    loader = DataLoader(dataset, batch_sampler=SupervisedBatchSampler(dataset.labels, 4, 0),
                        collate_fn=collate_supervised)
    batch = next(iter(loader))
    assert batch["frames"].shape == (4, 2, 16, 16, 3) and batch["labels"].shape == (4,)


# ------------------------------------------------------------------------------------------------
# Presets and the checker
# ------------------------------------------------------------------------------------------------


def test_presets_have_the_standard_class_counts():
    counts = {name: tuple(p.class_counts[s] for s in ("train", "val", "test")) for name, p in DATASET_PRESETS.items()}
    assert counts == {"ssv2-full": (64, 12, 24), "ssv2-small": (64, 12, 24), "kinetics-100": (64, 12, 24),
                      "ucf101": (70, 10, 21), "hmdb51": (31, 10, 10)}
    assert get_preset("SSv2_Full").name == "ssv2-full"
    with pytest.raises(DatasetError, match="unknown dataset preset"):
        get_preset("imagenet")


def test_check_dataset_reports_what_is_missing(synth, tmp_path):
    assert check_dataset(synth) == []
    problems = check_dataset(synth, "hmdb51")
    assert any("train.txt has 5 classes; the ARN split of hmdb51 has 31 train classes" in p for p in problems)
    assert any("val.txt not found" in p and "ARN" in p for p in problems)

    empty = tmp_path / "empty"
    empty.mkdir()
    problems = check_dataset(empty, "ssv2-full")
    assert any("has neither videos/ nor frames/" in p for p in problems)
    assert any(p.startswith(f"{empty}/splits/train.txt not found; expected `class_name/video_id` lines from the "
                            "OTAM split") for p in problems)

    root = tmp_path / "ssv2"
    gray_frames(root / "frames" / "train0" / "101", 3)
    gray_frames(root / "frames" / "train0" / "102", 3)
    gray_frames(root / "frames" / "test0" / "201", 3)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("train0/101\ntrain0/102\n")
    (root / "splits" / "test.txt").write_text("test0/201\ntest0/202\ntrain0/103\n")
    problems = check_dataset(root)
    assert any("2 of 3 videos listed" in p and "test0/202" in p for p in problems)
    assert any("share 1 classes (train0)" in p for p in problems)
    assert any("placeholders without a label text" in p for p in problems)
    annotations = tmp_path / "something-something-v2-train.json"
    annotations.write_text(json.dumps([{"id": "101", "template": "Pushing [something] from left to right"},
                                       {"id": "201", "template": "Opening [something]"}]))
    assert write_ssv2_labels(root, [annotations]) == {"test0": "Opening something",
                                                      "train0": "Pushing something from left to right"}
    assert not any("placeholders" in p for p in check_dataset(root))
