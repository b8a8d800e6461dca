"""Request checks shared by registration and classification: labels, names, lifetimes and files.

Every bound comes from `service/bounds.py`; the API declares the same bounds in its schema, and these
checks apply them again for in-process callers, before anything is written.
"""
from __future__ import annotations

import unicodedata
from typing import Iterable, Sequence

from service.bounds import MAX_LABEL_CHARS, MAX_LABEL_FIELD_CHARS, MAX_METRIC_CHARS, MAX_NAME_CHARS, MAX_TTL_S
from service.core.uploads import Upload
from service.errors import InvalidField, PayloadTooLarge, UnsupportedMedia

__all__ = ["MAX_LABEL_CHARS", "normalise_text", "clean_labels", "clean_name", "check_metric_name", "check_ttl",
           "unique", "check_not_empty", "check_files"]


def normalise_text(text: str) -> str:
    """`text` in Unicode NFC without format characters (category Cf: zero-width space U+200B, joiners
    U+200C/U+200D, word joiner U+2060, byte-order mark U+FEFF, bidi controls, ...) and without
    surrounding whitespace: the form two texts are compared in."""
    composed = unicodedata.normalize("NFC", text)
    return "".join(char for char in composed if unicodedata.category(char) != "Cf").strip()


def clean_labels(labels: Sequence[str], field: str = "labels") -> list[str]:
    """Labels normalised (`normalise_text`); an over-long field, or a label that is empty or over
    `MAX_LABEL_CHARS` once normalised, is a 422."""
    cleaned = []
    for position, label in enumerate(labels):
        raw = label or ""
        if len(raw) > MAX_LABEL_FIELD_CHARS:
            raise InvalidField(f"{field}[{position}] is longer than {MAX_LABEL_FIELD_CHARS} characters.",
                               code="label_too_long")
        text = normalise_text(raw)
        if not text:
            raise InvalidField(f"{field}[{position}] is empty (or only blanks and invisible characters); "
                               "every label needs some text.", code="empty_label")
        if len(text) > MAX_LABEL_CHARS:
            raise InvalidField(f"{field}[{position}] is longer than {MAX_LABEL_CHARS} characters.",
                               code="label_too_long")
        cleaned.append(text)
    return cleaned


def clean_name(name: str | None) -> str | None:
    """A set's name normalised (`normalise_text`), None when blank; over `MAX_NAME_CHARS` is a 422."""
    if name is None:
        return None
    if len(name) > MAX_NAME_CHARS:
        raise InvalidField(f"name is longer than {MAX_NAME_CHARS} characters.", code="name_too_long")
    return normalise_text(name) or None


def check_metric_name(metric: str | None) -> None:
    """A metric name over `MAX_METRIC_CHARS` is a 422 (before the model is asked about it)."""
    if metric is not None and len(metric) > MAX_METRIC_CHARS:
        raise InvalidField(f"metric is longer than {MAX_METRIC_CHARS} characters.", code="unknown_metric")


def check_ttl(ttl_seconds: int | None) -> None:
    """A lifetime is None (the server's default) or a whole number of seconds in 1..`MAX_TTL_S`."""
    if ttl_seconds is None:
        return
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 1 <= ttl_seconds <= MAX_TTL_S:
        raise InvalidField(f"ttl_seconds must be a whole number of seconds from 1 to {MAX_TTL_S} (10 years).",
                           code="invalid_ttl")


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
