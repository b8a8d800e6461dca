"""Video datasets for few-shot training and evaluation: three on-disk layouts, one ``VideoDataset``.

Layouts ``load_dataset`` reads:

1. Videos tree::

       ROOT/videos/<class_name>/<video_id>.<ext>
       ROOT/splits/{train,val,test}.txt     one "class_name/video_id" per line (extension optional)
       ROOT/labels.json                     optional {"class_name": "label text"}

2. Pre-extracted frames (common for SSv2): the same, with ``ROOT/frames/<class_name>/<video_id>/``
   folders of ``*.jpg`` / ``*.png`` images (sorted by name, numbers compared as numbers) instead of
   ``ROOT/videos``. T frames are sampled by index segments: the frames are split into T equal
   segments and the middle frame (``mode="test"``) or a random frame (``mode="train"``) of each is
   taken. When a root has both folders, ``videos/`` is used.

3. A CSV file ``path,label[,split]`` (an optional header row naming those columns). ``path`` is a
   video file or a frames folder, relative to the CSV's folder or absolute; ``label`` is the class
   name. A ``labels.json`` beside the CSV maps class names to label texts.

Label texts default to the class folder name with ``_`` read as spaces.

The dataset holds file lists only; frames are decoded in ``__getitem__`` (in DataLoader workers).
Corrupt samples: a video that fails to decode (``training.video.VideoDecodeError``) or an unreadable
frame folder does not stop training. ``__getitem__`` warns (``CorruptSampleWarning``, once per file
and process) and returns another, randomly chosen video of the SAME class instead, so the label and
an episode's structure stay right; it gives up with ``DatasetError`` after ``max_retries`` bad files
in a row or when every video of the class is bad.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from training.video import VideoDecodeError, decode_clip, frame_to_square

__all__ = [
    "DatasetError",
    "CorruptSampleWarning",
    "VideoDataset",
    "load_dataset",
    "list_split",
    "SplitListing",
    "read_labels_json",
    "read_split_file",
    "default_label_text",
    "sample_frame_indices",
    "load_frames_folder",
    "FRAME_EXTENSIONS",
]

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")
Mode = Literal["train", "test"]


class DatasetError(ValueError):
    """A dataset that cannot be loaded: missing files, malformed split/CSV/labels, empty split."""


class CorruptSampleWarning(UserWarning):
    """A video or frame folder in the dataset could not be read; another sample was used."""


def default_label_text(class_name: str) -> str:
    """The label text of a class without labels.json: the folder name with ``_`` read as spaces."""
    return class_name.replace("_", " ").strip()


def read_labels_json(path: Path) -> dict[str, str]:
    """Read ``labels.json`` ({"class_name": "label text"}); raise DatasetError if malformed."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read labels ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                             for k, v in data.items()):
        raise DatasetError(f"{path}: expected a JSON object mapping class folder names to label texts")
    return data


def read_split_file(path: Path) -> list[tuple[str, str]]:
    """Read a split file of ``class_name/video_id`` lines into (class_name, video_id) pairs.

    Blank lines and lines starting with ``#`` are skipped; a malformed line raises DatasetError
    naming the line.
    """
    entries = []
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read split file ({err})") from err
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        class_name, sep, video_id = line.rpartition("/")
        if not sep or not class_name.strip() or not video_id.strip() or "/" in class_name:
            raise DatasetError(f"{path}:{number}: expected `class_name/video_id`, got {line!r}")
        entries.append((class_name.strip(), video_id.strip()))
    return entries


# --------------------------------------------------------------------------------------------
# Frame folders.
# --------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[str]:
    """Image files of a frames folder, sorted by name with numbers compared as numbers."""
    names = [e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(FRAME_EXTENSIONS)]
    return sorted(names, key=_natural_key)


def sample_frame_indices(count: int, num_frames: int, mode: Mode = "test",
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """Split ``count`` frames into ``num_frames`` equal segments and pick one index per segment:
    the middle (``mode="test"``) or a random one (``mode="train"``). With fewer frames than
    segments, indices repeat in order. Returns int64 [num_frames], non-decreasing."""
    if count < 1:
        raise DatasetError("no frames to sample from")
    edges = np.linspace(0.0, count, num_frames + 1)
    if mode == "test":
        picks = (edges[:-1] + edges[1:]) / 2
    elif mode == "train":
        rng = rng if rng is not None else np.random.default_rng()
        picks = edges[:-1] + rng.uniform(0.0, 1.0, num_frames) * (edges[1:] - edges[:-1])
    else:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    return np.clip(np.floor(picks).astype(np.int64), 0, count - 1)


def _square_frame(image, size: int) -> np.ndarray:
    """PIL image -> uint8 [size, size, 3], resized and cropped exactly as video frames are
    (``training.video.frame_to_square``: short side to ``size`` in swscale, centre crop)."""
    rgb = np.asarray(image.convert("RGB"))
    return frame_to_square(av.VideoFrame.from_ndarray(rgb, format="rgb24"), size, None)


def load_frames_folder(folder: str | Path, num_frames: int = 8, size: int = 224, mode: Mode = "test",
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """Sample ``num_frames`` images from a folder of frames (see ``sample_frame_indices``).

    Returns uint8 [T, size, size, 3]. Raises DatasetError for an empty/missing folder and OSError
    (PIL) for an unreadable image.
    """
    from PIL import Image

    folder = Path(folder)
    try:
        names = _frame_files(folder)
    except OSError as err:
        raise DatasetError(f"{folder}: cannot list frames ({err})") from err
    if not names:
        raise DatasetError(f"{folder}: no {'/'.join(FRAME_EXTENSIONS)} frames")
    out = np.empty((num_frames, size, size, 3), np.uint8)
    cache: dict[int, np.ndarray] = {}
    for t, index in enumerate(sample_frame_indices(len(names), num_frames, mode, rng)):
        index = int(index)
        if index not in cache:
            with Image.open(folder / names[index]) as image:
                cache[index] = _square_frame(image, size)
        out[t] = cache[index]
    return out


# --------------------------------------------------------------------------------------------
# The dataset.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    path: str
    is_frames: bool


class VideoDataset(Dataset):
    """A list of videos (files or frame folders) with class labels; decodes on access.

    ``dataset[i]`` returns (frames uint8 tensor [T, S, S, 3], label int). Attributes: ``classes``
    (class names, sorted), ``label_texts`` (aligned with ``classes``), ``labels`` (class index per
    item), ``paths`` (file or folder per item), ``num_frames`` (T), ``size`` (S), ``mode``.
    """

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int], is_frames: Sequence[bool],
                 classes: Sequence[str], label_texts: Sequence[str], num_frames: int = 8, size: int = 224,
                 mode: Mode = "test", max_retries: int = 5) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if num_frames < 1 or size < 1:
            raise ValueError(f"num_frames and size must be positive, got {num_frames}, {size}")
        if not (len(paths) == len(labels) == len(is_frames)):
            raise ValueError("paths, labels and is_frames must have the same length")
        if len(classes) != len(label_texts):
            raise ValueError("classes and label_texts must have the same length")
        self._sources = [_Source(str(p), bool(f)) for p, f in zip(paths, is_frames)]
        self.labels: list[int] = [int(label) for label in labels]
        if self.labels and not 0 <= min(self.labels) <= max(self.labels) < len(classes):
            raise ValueError("labels must index into classes")
        self.classes: list[str] = list(classes)
        self.label_texts: list[str] = list(label_texts)
        self.num_frames, self.size, self.mode = int(num_frames), int(size), mode
        self.max_retries = int(max_retries)
        self._bad: set[int] = set()  # per process: DataLoader workers each keep their own
        self._by_class: list[list[int]] | None = None

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self._sources]

    def __len__(self) -> int:
        return len(self._sources)

    def indices_of_class(self, label: int) -> list[int]:
        """Item indices of class ``label``."""
        if self._by_class is None:
            by_class: list[list[int]] = [[] for _ in self.classes]
            for i, y in enumerate(self.labels):
                by_class[y].append(i)
            self._by_class = by_class
        return self._by_class[label]

    def _rng(self) -> np.random.Generator:
        # Drawn from torch's generator so torch.manual_seed and DataLoader worker seeding apply.
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def load(self, index: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Decode item ``index`` without any fallback. Returns uint8 [T, S, S, 3]; raises
        ``training.video.VideoDecodeError`` / DatasetError / OSError when it cannot be read."""
        source = self._sources[index]
        if self.mode == "train" and rng is None:
            rng = self._rng()
        if source.is_frames:
            return load_frames_folder(source.path, self.num_frames, self.size, self.mode, rng)
        return decode_clip(source.path, num_frames=self.num_frames, size=self.size, mode=self.mode, rng=rng)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.labels[index]
        current = index
        for _ in range(self.max_retries + 1):
            try:
                frames = self.load(current)
                return torch.from_numpy(frames), label
            except (VideoDecodeError, DatasetError, OSError) as err:
                if current not in self._bad:
                    self._bad.add(current)
                    warnings.warn(f"skipping unreadable sample {self._sources[current].path}: {err}; "
                                  f"using another video of class {self.classes[label]!r}",
                                  CorruptSampleWarning, stacklevel=2)
            candidates = [i for i in self.indices_of_class(label) if i not in self._bad]
            if not candidates:
                break
            current = candidates[int(self._rng().integers(len(candidates)))]
        raise DatasetError(f"could not read item {index} ({self._sources[index].path}) nor another video "
                           f"of class {self.classes[label]!r} ({len(self._bad)} unreadable samples so far)")


def _label_texts(classes: list[str], labels_json: Path) -> list[str]:
    mapping = read_labels_json(labels_json) if labels_json.is_file() else {}
    return [mapping.get(name, default_label_text(name)) for name in classes]


def _index_videos(class_dir: Path) -> dict[str, str]:
    """video_id (file stem) -> file name, for one class folder of ROOT/videos."""
    index: dict[str, str] = {}
    try:
        entries = sorted(e.name for e in os.scandir(class_dir) if e.is_file())
    except OSError:
        return index
    for name in entries:
        index.setdefault(name, name)
        stem = name.rsplit(".", 1)[0] if "." in name else name
        index.setdefault(stem, name)
    return index


def _warn_missing(listing: "SplitListing") -> None:
    if listing.missing:
        shown = ", ".join(listing.missing[:5]) + (" ..." if len(listing.missing) > 5 else "")
        warnings.warn(f"{listing.where}: {len(listing.missing)} of {listing.listed} listed videos not found on disk, "
                      f"skipped ({shown})", stacklevel=3)


@dataclass(frozen=True)
class SplitListing:
    """What one split lists, resolved against the disk, without decoding anything.

    ``where``: the split file or CSV; ``entries``: (class_name, path, is_frames) of each video found;
    ``missing``: the listed videos not on disk (``class_name/video_id`` or the CSV path); ``listed``:
    how many the split lists; ``labels_json``: where label texts are read from (it may not exist).
    """

    where: str
    entries: tuple[tuple[str, str, bool], ...]
    missing: tuple[str, ...]
    listed: int
    labels_json: Path

    @property
    def classes(self) -> list[str]:
        """Class names of the videos found, sorted (the order ``VideoDataset.classes`` uses)."""
        return sorted({c for c, _, _ in self.entries})

    def class_sizes(self) -> dict[str, int]:
        """Videos found per class."""
        sizes: dict[str, int] = {}
        for class_name, _, _ in self.entries:
            sizes[class_name] = sizes.get(class_name, 0) + 1
        return sizes

    def label_texts(self) -> list[str]:
        """Label texts aligned with :attr:`classes` (``labels.json``, else the class name)."""
        return _label_texts(self.classes, self.labels_json)


def _build(listing: SplitListing, num_frames: int, size: int, mode: Mode) -> VideoDataset:
    """A listing -> VideoDataset with classes sorted by name."""
    if not listing.entries:
        raise DatasetError(f"{listing.where}: no videos found")
    classes = listing.classes
    class_index = {c: i for i, c in enumerate(classes)}
    entries = listing.entries
    return VideoDataset(paths=[p for _, p, _ in entries], labels=[class_index[c] for c, _, _ in entries],
                        is_frames=[f for _, _, f in entries], classes=classes, label_texts=listing.label_texts(),
                        num_frames=num_frames, size=size, mode=mode)


def _list_tree(root: Path, split: str) -> SplitListing:
    videos_dir, frames_dir = root / "videos", root / "frames"
    if not videos_dir.is_dir() and not frames_dir.is_dir():
        raise DatasetError(f"{root}: neither {videos_dir} nor {frames_dir} exists; expected "
                           "ROOT/videos/<class>/<video_id>.<ext> or ROOT/frames/<class>/<video_id>/*.jpg")
    split_file = root / "splits" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"{split_file} not found; expected `class_name/video_id` lines")
    use_videos = videos_dir.is_dir()
    entries: list[tuple[str, str, bool]] = []
    missing: list[str] = []
    listed = read_split_file(split_file)
    indexes: dict[str, dict[str, str]] = {}
    for class_name, video_id in listed:
        if use_videos:
            if class_name not in indexes:
                indexes[class_name] = _index_videos(videos_dir / class_name)
            name = indexes[class_name].get(video_id)
            if name is not None:
                entries.append((class_name, str(videos_dir / class_name / name), False))
                continue
        else:
            folder = frames_dir / class_name / video_id
            if folder.is_dir():
                entries.append((class_name, str(folder), True))
                continue
        missing.append(f"{class_name}/{video_id}")
    return SplitListing(str(split_file), tuple(entries), tuple(missing), len(listed), root / "labels.json")


def _read_csv_rows(csv_path: Path) -> tuple[list[tuple[str, str, str | None]], bool]:
    """Rows (path, label, split or None) of a ``path,label[,split]`` CSV; also whether it has splits."""
    try:
        with open(csv_path, newline="") as handle:
            rows = [r for r in csv.reader(handle) if r and any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{csv_path}: cannot read CSV ({err})") from err
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise DatasetError(f"{csv_path}: no rows; expected `path,label[,split]`")
    widths = {len(r) for r in rows}
    if not widths <= {2, 3} or len(widths) != 1:
        raise DatasetError(f"{csv_path}: every row must have 2 (path,label) or 3 (path,label,split) "
                           f"columns, found rows with {sorted(widths)}")
    has_split = widths == {3}
    out = []
    for number, row in enumerate(rows, start=1):
        path, label = row[0].strip(), row[1].strip()
        if not path or not label:
            raise DatasetError(f"{csv_path}: row {number} has an empty path or label: {row}")
        out.append((path, label, row[2].strip() if has_split else None))
    return out, has_split


def _list_csv(csv_path: Path, split: str | None) -> SplitListing:
    rows, has_split = _read_csv_rows(csv_path)
    if split is not None and not has_split:
        raise DatasetError(f"{csv_path} has no split column; add a third column (train/val/test) "
                           "or pass split=None to use every row")
    base = csv_path.parent
    entries: list[tuple[str, str, bool]] = []
    missing: list[str] = []
    selected = [r for r in rows if split is None or r[2] == split]
    if not selected:
        found = sorted({r[2] for r in rows if r[2]})
        raise DatasetError(f"{csv_path}: no rows with split {split!r} (splits present: {found})")
    for path, label, _ in selected:
        full = Path(path) if Path(path).is_absolute() else base / path
        if full.is_dir():
            entries.append((label, str(full), True))
        elif full.is_file():
            entries.append((label, str(full), False))
        else:
            missing.append(path)
    return SplitListing(str(csv_path), tuple(entries), tuple(missing), len(selected), base / "labels.json")


def list_split(root_or_csv: str | Path, split: str | None = "train") -> SplitListing:
    """List one split of a dataset in any of the three layouts (see the module doc) against the disk.

    Nothing is decoded; raises DatasetError for a layout that cannot be read (no such folder, no
    split file, no rows of that split). ``load_dataset`` builds its dataset from this listing.
    """
    path = Path(root_or_csv)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: expected a dataset folder or a .csv file")
        return _list_csv(path, split)
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist")
    if split is None:
        raise DatasetError(f"{path}: a dataset folder needs a split name ({', '.join(SPLITS)})")
    return _list_tree(path, split)


def load_dataset(root_or_csv: str | Path, split: str | None = "train", num_frames: int = 8, size: int = 224,
                 mode: Mode = "test") -> VideoDataset:
    """Load one split of a dataset in any of the three layouts (see the module doc).

    Args:
        root_or_csv: dataset root folder (videos tree or frames folders) or a ``.csv`` file.
        split: "train", "val", "test" (any ``ROOT/splits/<split>.txt``); for a CSV, the value of the
            split column, or None for every row.
        num_frames: T frames sampled per video.
        size: S, output frames are S x S.
        mode: "train" (random frame within each segment) or "test" (segment centres).

    Entries of the split that are not on disk are skipped with one warning (common with Kinetics,
    whose videos disappear from YouTube); ``check_dataset`` lists them.
    """
    if mode not in ("train", "test"):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    listing = list_split(root_or_csv, split)
    _warn_missing(listing)
    return _build(listing, num_frames, size, mode)
