"""Presets for the standard few-shot action recognition splits, and a dataset checker.

We cannot ship the split files (no network at build time, and they belong to their authors). Each
preset says where its split comes from; put the three lists in ``ROOT/splits/{train,val,test}.txt``
(one ``class_name/video_id`` per line) next to ``ROOT/videos/`` or ``ROOT/frames/`` and run
``check_dataset(ROOT, preset)``, which lists everything missing or inconsistent.

The training recipes for these datasets (optimiser, learning rate, episodes, loss weights) are the
packaged training configs of the same names (``training/configs/<name>.yaml``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import (
    SPLITS,
    DatasetError,
    _index_videos,
    _read_csv_rows,
    read_labels_json,
    read_split_file,
)

__all__ = ["DatasetPreset", "DATASET_PRESETS", "get_preset", "check_dataset", "write_ssv2_labels"]


@dataclass(frozen=True)
class DatasetPreset:
    """A standard few-shot split: class counts per split, the usual layout and where the lists live."""

    name: str
    title: str
    class_counts: dict[str, int]  # {"train": 64, "val": 12, "test": 24}
    layout: str  # the layout this dataset is usually prepared in: "frames" or "videos" (both load)
    split_name: str  # e.g. "OTAM split"
    split_paper: str  # the paper that defined the split
    split_files: str  # where its list files are published; {split} is train, val or test
    videos_source: str  # where the videos come from
    labels_note: str  # how to get label texts into ROOT/labels.json
    videos_per_class: int | None = None  # fixed per-class size, when the split defines one
    anonymous_classes: bool = False  # class folders are placeholders (train0, test17): labels.json needed
    notes: tuple[str, ...] = field(default_factory=tuple)


_TRX = "https://github.com/tobyperrett/trx"
DATASET_PRESETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in (
        DatasetPreset(
            name="ssv2-full",
            title="Something-Something V2, full (OTAM split)",
            class_counts={"train": 64, "val": 12, "test": 24},
            layout="frames",
            split_name="OTAM split",
            split_paper="Cao et al., 'Few-Shot Video Classification via Temporal Alignment' (OTAM), CVPR 2020",
            split_files=f"splits/ssv2_OTAM/{{split}}list07.txt of {_TRX}",
            videos_source="Something-Something V2 (Qualcomm / 20BN), webm videos, usually extracted to frames",
            labels_note=("class folders are anonymous (train0 ... test23); build labels.json from SSv2's "
                         "annotation JSON files with training.data.write_ssv2_labels(ROOT, [train.json, "
                         "validation.json])"),
            anonymous_classes=True,
        ),
        DatasetPreset(
            name="ssv2-small",
            title="Something-Something V2, small (CMN split, 100 videos a class)",
            class_counts={"train": 64, "val": 12, "test": 24},
            layout="frames",
            split_name="CMN split",
            split_paper=("Zhu and Yang, 'Compound Memory Networks for Few-shot Video Classification' (CMN), "
                         "ECCV 2018 (https://github.com/ffmpbgrnn/CMN)"),
            split_files=f"splits/ssv2_CMN/{{split}}list03.txt of {_TRX}",
            videos_source="Something-Something V2 (Qualcomm / 20BN), webm videos, usually extracted to frames",
            labels_note=("class folders are anonymous; build labels.json with "
                         "training.data.write_ssv2_labels(ROOT, [train.json, validation.json])"),
            videos_per_class=100,
            anonymous_classes=True,
        ),
        DatasetPreset(
            name="kinetics-100",
            title="Kinetics-100 (CMN split)",
            class_counts={"train": 64, "val": 12, "test": 24},
            layout="videos",
            split_name="CMN split",
            split_paper="Zhu and Yang, CMN, ECCV 2018 (https://github.com/ffmpbgrnn/CMN)",
            split_files=f"splits/kinetics_CMN/{{split}}list03.txt of {_TRX}",
            videos_source=("Kinetics-400 clips (YouTube id + start/end seconds); some are no longer "
                           "downloadable, check_dataset counts the missing ones"),
            labels_note="class folders are Kinetics class names (e.g. 'blasting sand'); labels.json optional",
            videos_per_class=100,
        ),
        DatasetPreset(
            name="ucf101",
            title="UCF101 (ARN split)",
            class_counts={"train": 70, "val": 10, "test": 21},
            layout="videos",
            split_name="ARN split",
            split_paper="Zhang et al., 'Few-shot Action Recognition with Permutation-invariant Attention' (ARN), ECCV 2020",
            split_files=f"splits/ucf_ARN/{{split}}list03.txt of {_TRX}",
            videos_source="UCF101 (https://www.crcv.ucf.edu/data/UCF101.php), .avi videos",
            labels_note=("class folders are CamelCase (ApplyEyeMakeup); write labels.json with spaced "
                         "texts ('apply eye makeup') for the text branch"),
        ),
        DatasetPreset(
            name="hmdb51",
            title="HMDB51 (ARN split)",
            class_counts={"train": 31, "val": 10, "test": 10},
            layout="videos",
            split_name="ARN split",
            split_paper="Zhang et al., ARN, ECCV 2020",
            split_files=f"splits/hmdb_ARN/{{split}}list03.txt of {_TRX}",
            videos_source="HMDB51 (Serre lab, Brown University), .avi videos",
            labels_note="class folders are snake_case (brush_hair); the default label text reads _ as spaces",
        ),
    )
}


def get_preset(name: str) -> DatasetPreset:
    """Look a preset up by name, forgiving case and ``_``/``-`` ("SSv2_Full" -> "ssv2-full")."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"k100": "kinetics-100", "kinetics100": "kinetics-100", "ssv2full": "ssv2-full",
               "ssv2small": "ssv2-small", "ucf-101": "ucf101", "hmdb-51": "hmdb51"}
    key = aliases.get(key.replace("-", ""), aliases.get(key, key))
    if key not in DATASET_PRESETS:
        raise DatasetError(f"unknown dataset preset {name!r}; known: {', '.join(DATASET_PRESETS)}")
    return DATASET_PRESETS[key]


_ANONYMOUS_CLASS = re.compile(r"^(train|val|test)\d+$")
_SHOW = 5


def _some(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f" ... ({len(items)} in all)" if len(items) > _SHOW else "")


def _check_labels(root: Path, classes: set[str], preset: DatasetPreset | None, problems: list[str]) -> None:
    labels_path = root / "labels.json"
    mapping: dict[str, str] = {}
    if labels_path.is_file():
        try:
            mapping = read_labels_json(labels_path)
        except DatasetError as err:
            problems.append(str(err))
            return
    anonymous = sorted(c for c in classes if _ANONYMOUS_CLASS.match(c) and c not in mapping)
    if anonymous:
        how = preset.labels_note if preset is not None else "map them to label texts in ROOT/labels.json"
        problems.append(f"{len(anonymous)} class folders are placeholders without a label text in "
                        f"{labels_path} ({_some(anonymous)}): the text branch would read them literally; {how}")


def _check_tree(root: Path, preset: DatasetPreset | None, problems: list[str]) -> None:
    videos_dir, frames_dir = root / "videos", root / "frames"
    if not videos_dir.is_dir() and not frames_dir.is_dir():
        want = "frames" if preset is not None and preset.layout == "frames" else "videos"
        problems.append(
            f"{root} has neither videos/ nor frames/; expected {root}/videos/<class>/<video_id>.<ext> or "
            f"{root}/frames/<class>/<video_id>/*.jpg" + (f" ({preset.name} is usually prepared as {want})"
                                                         if preset is not None else ""))
    use_videos = videos_dir.is_dir()
    required = SPLITS if preset is not None else ("train", "test")
    classes_of: dict[str, set[str]] = {}
    all_classes: set[str] = set()
    indexes: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        path = root / "splits" / f"{split}.txt"
        if not path.is_file():
            if split in required:
                source = (f" from the {preset.split_name} ({preset.split_paper}), published as "
                          f"{preset.split_files.format(split=split)}" if preset is not None else "")
                problems.append(f"{path} not found; expected `class_name/video_id` lines{source}")
            continue
        try:
            entries = read_split_file(path)
        except DatasetError as err:
            problems.append(str(err))
            continue
        if not entries:
            problems.append(f"{path} lists no videos")
            continue
        counts = Counter(c for c, _ in entries)
        classes_of[split] = set(counts)
        all_classes |= set(counts)
        if preset is not None and len(counts) != preset.class_counts[split]:
            problems.append(f"{path} has {len(counts)} classes; the {preset.split_name} of {preset.name} has "
                            f"{preset.class_counts[split]} {split} classes")
        few = sorted(c for c, n in counts.items() if n < 2)
        if few:
            problems.append(f"{path}: classes with fewer than 2 videos cannot give both a support and a query "
                            f"video: {_some(few)}")
        if not (videos_dir.is_dir() or frames_dir.is_dir()):
            continue
        missing = []
        for class_name, video_id in entries:
            if use_videos:
                if class_name not in indexes:
                    indexes[class_name] = _index_videos(videos_dir / class_name)
                found = video_id in indexes[class_name]
            else:
                found = (frames_dir / class_name / video_id).is_dir()
            if not found:
                missing.append(f"{class_name}/{video_id}")
        if missing:
            where = videos_dir if use_videos else frames_dir
            problems.append(f"{len(missing)} of {len(entries)} videos listed in {path} are not under {where} "
                            f"({_some(missing)})")
    _check_disjoint(classes_of, problems, str(root / "splits"))
    _check_labels(root, all_classes, preset, problems)


def _check_disjoint(classes_of: dict[str, set[str]], problems: list[str], where: str) -> None:
    names = sorted(classes_of)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(classes_of[a] & classes_of[b])
            if shared:
                problems.append(f"{where}: splits {a} and {b} share {len(shared)} classes ({_some(shared)}); "
                                "few-shot splits need disjoint classes")


def _check_csv(csv_path: Path, preset: DatasetPreset | None, problems: list[str]) -> None:
    try:
        rows, has_split = _read_csv_rows(csv_path)
    except DatasetError as err:
        problems.append(str(err))
        return
    base = csv_path.parent
    missing = [p for p, _, _ in rows if not (Path(p) if Path(p).is_absolute() else base / p).exists()]
    if missing:
        problems.append(f"{len(missing)} of {len(rows)} paths in {csv_path} do not exist ({_some(missing)})")
    if not has_split:
        problems.append(f"{csv_path} has no split column (path,label,split): a few-shot benchmark needs "
                        "train/val/test rows with disjoint classes")
        return
    classes_of: dict[str, set[str]] = {}
    for _, label, split in rows:
        classes_of.setdefault(split, set()).add(label)
    unknown = sorted(set(classes_of) - set(SPLITS))
    if unknown:
        problems.append(f"{csv_path}: unknown split names {unknown}; use train, val and test")
    if preset is not None:
        for split in SPLITS:
            count = len(classes_of.get(split, ()))
            if count != preset.class_counts[split]:
                problems.append(f"{csv_path}: split {split} has {count} classes; the {preset.split_name} of "
                                f"{preset.name} has {preset.class_counts[split]}")
    _check_disjoint(classes_of, problems, str(csv_path))
    _check_labels(base, set().union(*classes_of.values()), preset, problems)


def check_dataset(root: str | Path, preset: str | DatasetPreset | None = None) -> list[str]:
    """List what is missing or inconsistent in a dataset (empty list: ready to train).

    Checks, for a root folder: videos/ or frames/ present; splits/{train,val,test}.txt present (val
    only required with a preset) and well formed; every listed video on disk; classes disjoint
    across splits; class counts as the preset says; every class has at least 2 videos; labels.json
    well formed and covering placeholder class names. For a CSV: columns, paths, split column, class
    counts, disjoint classes. Each problem is one readable sentence naming the file.
    """
    spec = get_preset(preset) if isinstance(preset, str) else preset
    path = Path(root)
    problems: list[str] = []
    if not path.exists():
        problems.append(f"{path} does not exist")
    elif path.is_file():
        if path.suffix.lower() != ".csv":
            problems.append(f"{path}: expected a dataset folder or a .csv file")
        else:
            _check_csv(path, spec, problems)
    else:
        _check_tree(path, spec, problems)
    return problems


def write_ssv2_labels(root: str | Path, annotation_files: list[str | Path]) -> dict[str, str]:
    """Write ``ROOT/labels.json`` for an SSv2 few-shot split whose class folders are anonymous.

    ``annotation_files`` are SSv2's own JSON lists (``something-something-v2-train.json``,
    ``...-validation.json``: ``[{"id": "78687", "template": "Holding [something] next to
    [something]", ...}]``). Each class gets the template (brackets removed) most of its listed
    videos carry. Returns the mapping written.
    """
    root = Path(root)
    template_of: dict[str, str] = {}
    for file in annotation_files:
        try:
            items = json.loads(Path(file).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetError(f"{file}: cannot read SSv2 annotations ({err})") from err
        for item in items:
            if isinstance(item, dict) and "id" in item and "template" in item:
                template_of[str(item["id"])] = re.sub(r"[\[\]]", "", str(item["template"]))
    votes: dict[str, Counter] = {}
    for split in SPLITS:
        path = root / "splits" / f"{split}.txt"
        if path.is_file():
            for class_name, video_id in read_split_file(path):
                if video_id in template_of:
                    votes.setdefault(class_name, Counter())[template_of[video_id]] += 1
    if not votes:
        raise DatasetError(f"none of the video ids in {root}/splits/*.txt appear in {list(map(str, annotation_files))}")
    mapping = {c: counter.most_common(1)[0][0] for c, counter in sorted(votes.items())}
    (root / "labels.json").write_text(json.dumps(mapping, indent=2) + "\n")
    return mapping
