"""`Manifest`: what the store keeps about one support set (JSON under `keys.manifest_key`).

The JSON is the one the gateway has always written (`Manifest.to_json`, same fields in the same
order); `Manifest.from_json` also reads manifests written before tenants existed (no `tenant` field)
and tolerates the optional fields older manifests may lack. A document it cannot read (wrong types,
missing fields, timestamps no date can show) raises `ManifestError`: no stored value can make a read
fail later, when the set is rendered.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from service.core.checks import unique

#: The latest timestamp a manifest may hold: the end of year 9999, the last a date can render.
MAX_TIMESTAMP = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()


class ManifestError(ValueError):
    """A stored manifest that cannot be read (the message says which field is wrong)."""


def now() -> float:
    """The current time (seconds since the epoch), as manifests store it."""
    return time.time()


def iso(timestamp: float | None) -> str | None:
    """`2024-05-01T12:00:00.123456Z` (UTC) for a timestamp, None for None or for a timestamp no date
    can show (never raises: rendering a stored set must not fail)."""
    if timestamp is None:
        return None
    try:
        return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError, TypeError):
        return None


def _timestamp(data: dict[str, Any], name: str, *, required: bool = False) -> float | None:
    """The timestamp field `name` of a stored manifest: a finite number from 0 to `MAX_TIMESTAMP`."""
    value = data.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_TIMESTAMP:
        raise ManifestError(f"{name} is not a timestamp: {str(value)[:40]!r}")
    return float(value)


def _text(data: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ManifestError(f"{name} is not a string")
    return value


@dataclass
class Video:
    """One support video: the sha256 of its bytes, its label, the uploaded file's name and size."""

    sha256: str
    label: str
    filename: str | None = None
    bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "label": self.label, "filename": self.filename, "bytes": self.bytes}


@dataclass
class Manifest:
    """One support set. `classes` are the distinct labels of `videos` in first-seen order (the order of
    its prototypes); `revision` grows by one with every write; times are seconds since the epoch."""

    id: str
    tenant: str | None
    created_at: float
    revision: int
    name: str | None = None
    metric: str | None = None  # None: the model's own
    updated_at: float | None = None
    expires_at: float | None = None  # None: never
    sampling: dict[str, int] | None = None
    videos: list[Video] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any], tenant: str | None) -> "Manifest":
        """The manifest stored as `data` in `tenant`'s namespace (the namespace it was read from is
        its tenant, whatever `data` says: manifests written before tenants existed lack the field).

        Raises `ManifestError` for a document that is not a manifest this gateway can serve."""
        if not isinstance(data, dict):
            raise ManifestError("the manifest is not a JSON object")
        revision = data.get("revision")
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise ManifestError("revision is not a whole number")
        sampling = data.get("sampling")
        if sampling is not None and not (isinstance(sampling, dict) and all(
                isinstance(sampling.get(k), int) and not isinstance(sampling.get(k), bool)
                for k in ("num_frames", "size"))):
            raise ManifestError("sampling is not {num_frames, size}")
        videos_data, classes = data.get("videos"), data.get("classes")
        if not isinstance(videos_data, list) or not isinstance(classes, list) \
                or not all(isinstance(label, str) for label in classes):
            raise ManifestError("videos or classes are not lists")
        videos = []
        for entry in videos_data:
            if not isinstance(entry, dict):
                raise ManifestError("a video entry is not an object")
            size = entry.get("bytes")
            if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
                raise ManifestError("a video's bytes is not a whole number")
            videos.append(Video(_text(entry, "sha256", required=True), _text(entry, "label", required=True),
                                _text(entry, "filename"), size))
        if unique(video.label for video in videos) != classes:
            raise ManifestError("classes are not the labels of the videos")
        return cls(
            id=_text(data, "id", required=True), tenant=tenant,
            created_at=_timestamp(data, "created_at", required=True), revision=revision,
            name=_text(data, "name"), metric=_text(data, "metric"), updated_at=_timestamp(data, "updated_at"),
            expires_at=_timestamp(data, "expires_at"), sampling=sampling, videos=videos, classes=list(classes),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON document stored for the set."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "metric": self.metric,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "expires_at": self.expires_at,
            "revision": self.revision,
            "sampling": self.sampling,
            "videos": [video.to_json() for video in self.videos],
            "classes": list(self.classes),
        }

    def add(self, videos: list[Video]) -> None:
        """Append videos and make them the next revision (classes follow, `updated_at` is now)."""
        self.videos.extend(videos)
        self.classes = unique(video.label for video in self.videos)
        self.revision += 1
        self.updated_at = now()

    def shots(self) -> dict[str, int]:
        """Clips of each class."""
        shots: dict[str, int] = {}
        for video in self.videos:
            shots[video.label] = shots.get(video.label, 0) + 1
        return shots

    def fewest_shots(self) -> int:
        """Clips of the class with the fewest (0 for a set without videos)."""
        return min(self.shots().values(), default=0)

    def remaining_ttl(self) -> float | None:
        """Seconds until the set expires (<= 0: it has), None if it never does."""
        return None if self.expires_at is None else self.expires_at - now()

    def describe(self, model_ref: dict[str, Any], model_metric: str) -> dict[str, Any]:
        """The public view of the set (the `SupportSet` response body)."""
        shots = self.shots()
        return {
            "id": self.id,
            "name": self.name,
            "classes": [{"label": label, "shots": shots[label]} for label in self.classes],
            "num_videos": len(self.videos),
            "metric": self.metric or model_metric,
            "model": model_ref,
            "sampling": self.sampling,
            "revision": self.revision,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "expires_at": iso(self.expires_at),
            "videos": [{"label": v.label, "filename": v.filename, "sha256": v.sha256} for v in self.videos],
        }
