"""Request checks shared by registration and classification: labels and uploaded files."""
from __future__ import annotations

from typing import Iterable, Sequence

from service.core.uploads import Upload
from service.errors import InvalidField, PayloadTooLarge, UnsupportedMedia

MAX_LABEL_CHARS = 200


def clean_labels(labels: Sequence[str], field: str = "labels") -> list[str]:
    """Labels with surrounding whitespace removed; empty or over-long labels are a 422."""
    cleaned = []
    for position, label in enumerate(labels):
        text = (label or "").strip()
        if not text:
            raise InvalidField(f"{field}[{position}] is empty; every label needs some text.",
                               code="empty_label")
        if len(text) > MAX_LABEL_CHARS:
            raise InvalidField(f"{field}[{position}] is longer than {MAX_LABEL_CHARS} characters.",
                               code="label_too_long")
        cleaned.append(text)
    return cleaned


def unique(items: Iterable[str]) -> list[str]:
    """`items` without repeats, in first-seen order."""
    return list(dict.fromkeys(items))


def check_not_empty(upload: Upload) -> None:
    """An empty file is a 415 (`not_a_video`) before anything is decoded."""
    if not upload.size:
        raise UnsupportedMedia(f"{upload.filename or 'upload'}: the file is empty.", code="not_a_video")


def check_files(uploads: Sequence[Upload], labels: Sequence[str], max_files: int) -> None:
    """One label per upload, at least one and at most `max_files` uploads (413 beyond), none empty."""
    if not uploads:
        raise InvalidField("At least one video is required (field 'videos').", code="missing_videos")
    if len(uploads) > max_files:
        raise PayloadTooLarge(f"{len(uploads)} files in one request; the limit is {max_files} "
                              "(max_files_per_request).", code="too_many_files")
    if len(labels) != len(uploads):
        raise InvalidField(f"Got {len(uploads)} videos but {len(labels)} labels; send one 'labels' "
                           "field per 'videos' file, in the same order.", code="label_count_mismatch")
    for upload in uploads:
        check_not_empty(upload)
