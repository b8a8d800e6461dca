"""Pre-flight check of a training config against its dataset, run before any pretraining or training.

``fsar train`` calls :func:`check_training_data` first: it lists each split training uses (the
train split; the validation split when there is one) without decoding anything, and stops with one
:class:`PreflightError` sentence naming the config key to change when the data cannot serve the
config::

    validation split has 2 classes but val.way is 5; set val.way to 2 or fewer (append val.way=2
    to the fsar train command) or add classes to the val split.

What it checks, per split: the split exists (``data.train_split``); every listed video or frame
folder is on disk (``data.skip_missing``); label texts are not empty and stay distinct once
lower-cased with runs of spaces collapsed (what the text encoder reads); episodic splits have
``way`` classes with at least ``shot + query`` videos each (``episodic.*`` for training, ``val.*``
for validation episodes); supervised training gets ``grad_accum`` batches of
``supervised.batch_size`` per process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from training.config import ConfigError, TrainConfig
from training.data.datasets import DatasetError, SplitListing, _read_csv_rows, list_split

__all__ = ["PreflightError", "check_training_data", "has_split", "validation_mode"]

_SHOW = 5  # missing videos named in a message


class PreflightError(ConfigError):
    """The training config does not fit the dataset; the one-sentence message names the key to change."""


def _append(*settings: str) -> str:
    """How to set keys on the command line: ``(append a=1 b=2 to the fsar train command)``."""
    return f"(append {' '.join(settings)} to the fsar train command)"


def validation_mode(cfg: TrainConfig) -> str:
    """``val.mode`` resolved: "auto" is episodes for the episodic regime, zero-shot for the supervised one."""
    if cfg.val.mode != "auto":
        return cfg.val.mode
    return "episodes" if cfg.regime == "episodic" else "zero_shot"


def has_split(data: Path, split: str) -> bool:
    """Whether the dataset lists ``split``: ``ROOT/splits/<split>.txt``, or CSV rows with that split."""
    if data.is_file():
        if data.suffix.lower() != ".csv":
            return False
        rows, with_split = _read_csv_rows(data)
        return with_split and any(row[2] == split for row in rows)
    return (data / "splits" / f"{split}.txt").is_file()


def _present_splits(data: Path) -> List[str]:
    """Split names the dataset lists (for suggestions)."""
    if data.is_file():
        rows, with_split = _read_csv_rows(data)
        return sorted({row[2] for row in rows if row[2]}) if with_split else []
    return sorted(p.stem for p in (data / "splits").glob("*.txt"))


def _list_train_split(cfg: TrainConfig, data: Path) -> SplitListing:
    """The train split's listing; a missing split names ``data.train_split``."""
    split = cfg.data.train_split
    if data.exists() and not has_split(data, split):
        others = [s for s in _present_splits(data) if s != cfg.data.val_split]
        where = f"{data}/splits/{split}.txt" if data.is_dir() else f"{data} (no rows with split {split!r})"
        if others:
            raise PreflightError(f"the train split {where} is not there but data.train_split is {split!r}; set "
                                 f"data.train_split to one of {', '.join(others)} "
                                 f"{_append(f'data.train_split={others[0]}')} or add that split.")
        raise PreflightError(f"the train split {where} is not there; add it or set data.train_split to the "
                             f"split that lists the training videos {_append('data.train_split=NAME')}.")
    return list_split(data, split)


def _check_missing(listing: SplitListing, name: str, cfg: TrainConfig) -> None:
    if not listing.missing or cfg.data.skip_missing:
        return
    shown = ", ".join(listing.missing[:_SHOW]) + (" ..." if len(listing.missing) > _SHOW else "")
    raise PreflightError(f"{len(listing.missing)} of {listing.listed} videos listed in {listing.where} ({name} split) "
                         f"are not on disk ({shown}); restore them, remove them from the list, or set "
                         f"data.skip_missing to true {_append('data.skip_missing=true')} to train without them.")


def _normalise(text: str) -> str:
    """A label text as the text encoder tells texts apart: lower-cased, runs of spaces collapsed."""
    return " ".join(text.lower().split())


def _check_labels(listing: SplitListing, name: str) -> None:
    """Label texts must be non-empty and distinct once normalised."""
    seen: Dict[str, str] = {}
    for class_name, text in zip(listing.classes, listing.label_texts()):
        key = _normalise(text)
        if not key:
            raise PreflightError(f"class {class_name!r} of the {name} split has an empty label text; map it to "
                                 f"a text in {listing.labels_json} (e.g. {{\"{class_name}\": \"a label text\"}}).")
        if key in seen:
            raise PreflightError(f"classes {seen[key]!r} and {class_name!r} of the {name} split both have the label "
                                 f"text {key!r} (compared lower-cased); give them distinct texts in "
                                 f"{listing.labels_json}.")
        seen[key] = class_name


def _episode_fix(sizes: List[int], section: str, way: int, shot: int) -> str:
    """The smallest change of ``section``'s episode settings that the class sizes (largest first) allow,
    followed by " or "; empty when no setting fits (fewer than 2 classes have 2 videos)."""
    smallest = sizes[way - 1]  # the most videos `way` classes all have
    if smallest - shot >= 1:
        return f"set {section}.query to {smallest - shot} or fewer {_append(f'{section}.query={smallest - shot}')} or "
    if smallest >= 2:
        return (f"set {section}.shot to {smallest - 1} and {section}.query to 1 "
                f"{_append(f'{section}.shot={smallest - 1}', f'{section}.query=1')} or ")
    pairs = sum(size >= 2 for size in sizes)  # classes with one support and one query video
    if pairs >= 2:
        return (f"set {section}.way to {pairs}, {section}.shot to 1 and {section}.query to 1 "
                f"{_append(f'{section}.way={pairs}', f'{section}.shot=1', f'{section}.query=1')} or ")
    return ""


def _check_episodes(listing: SplitListing, split: str, section: str, way: int, shot: int, query: int) -> None:
    """``way`` classes of ``split`` must each have ``shot + query`` videos (``section``: episodic or val)."""
    sizes = sorted(listing.class_sizes().values(), reverse=True)
    subject = "validation" if section == "val" else "train"
    if len(sizes) < way:
        count = f"{len(sizes)} class{'es' if len(sizes) != 1 else ''}"
        if len(sizes) >= 2:
            raise PreflightError(f"{subject} split has {count} but {section}.way is {way}; set {section}.way to "
                                 f"{len(sizes)} or fewer {_append(f'{section}.way={len(sizes)}')} or add classes "
                                 f"to the {split} split.")
        raise PreflightError(f"{subject} split has {count} but {section}.way is {way} and cannot be below 2; "
                             f"add classes to the {split} split ({listing.where}).")
    need = shot + query
    eligible = sum(size >= need for size in sizes)
    if eligible >= way:
        return
    raise PreflightError(f"only {eligible} of the {len(sizes)} classes of the {subject} split have {need} videos "
                         f"({section}.shot {shot} + {section}.query {query}) but {section}.way is {way}; "
                         f"{_episode_fix(sizes, section, way, shot)}add videos to the {split} split's smaller classes.")


def _check_batches(listing: SplitListing, cfg: TrainConfig, world_size: int) -> None:
    """Supervised training needs ``grad_accum`` full batches per process per epoch."""
    videos, batch, accum = len(listing.entries), cfg.supervised.batch_size, cfg.grad_accum
    per_process = (videos // batch) // world_size
    if per_process >= accum:
        return
    fitting = videos // (world_size * accum)
    processes = f" on each of {world_size} processes" if world_size > 1 else ""
    head = (f"the train split's {videos} videos make {per_process} batches of supervised.batch_size {batch}"
            f"{processes} but one optimiser step takes grad_accum {accum}; ")
    if fitting >= 1:
        fix = f"set supervised.batch_size to {fitting} or fewer {_append(f'supervised.batch_size={fitting}')}"
    else:
        fix = f"set grad_accum to 1 and supervised.batch_size to {max(1, videos // world_size)} or fewer"
    raise PreflightError(f"{head}{fix} or add videos to the train split.")


def _check_split(listing: SplitListing, name: str, cfg: TrainConfig) -> None:
    _check_missing(listing, name, cfg)
    if not listing.entries:
        raise DatasetError(f"{listing.where}: no videos found")
    _check_labels(listing, name)


def check_training_data(cfg: TrainConfig, data: Path, world_size: int = 1) -> Dict[str, SplitListing]:
    """Check ``cfg`` against the dataset at ``data`` before anything is trained; return the splits' listings.

    Returns ``{"train": listing}`` plus ``"val"`` when the dataset has ``data.val_split`` (validation
    runs). Raises :class:`PreflightError` (one sentence naming the key to change) when the config
    and the data do not fit, and ``DatasetError`` for a layout that cannot be read at all.
    """
    data = Path(data)
    splits = {"train": _list_train_split(cfg, data)}
    if has_split(data, cfg.data.val_split):
        splits["val"] = list_split(data, cfg.data.val_split)
    for role, listing in splits.items():
        _check_split(listing, cfg.data.train_split if role == "train" else cfg.data.val_split, cfg)
    if cfg.regime == "episodic":
        _check_episodes(splits["train"], cfg.data.train_split, "episodic", cfg.episodic.way, cfg.episodic.shot,
                        cfg.episodic.query)
    else:
        _check_batches(splits["train"], cfg, world_size)
    if "val" in splits and validation_mode(cfg) == "episodes":
        _check_episodes(splits["val"], cfg.data.val_split, "val", cfg.val.way, cfg.val.shot, cfg.val.query)
    return splits

