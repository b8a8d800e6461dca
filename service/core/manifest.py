"""`Manifest`: what the store keeps about one support set (JSON under `keys.manifest_key`).

The JSON is the one the gateway has always written (`Manifest.to_json`, same fields in the same
order); `Manifest.from_json` also reads manifests written before tenants existed (no `tenant` field)
and tolerates the optional fields older manifests may lack.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from service.core.checks import unique


def now() -> float:
    """The current time (seconds since the epoch), as manifests store it."""
    return time.time()


def iso(timestamp: float | None) -> str | None:
    """`2024-05-01T12:00:00.123456Z` (UTC) for a timestamp, None for None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat().replace("+00:00", "Z")


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
        its tenant, whatever `data` says: manifests written before tenants existed lack the field)."""
        return cls(
            id=data["id"], tenant=tenant, created_at=data["created_at"], revision=data["revision"],
            name=data.get("name"), metric=data.get("metric"), updated_at=data.get("updated_at"),
            expires_at=data.get("expires_at"), sampling=data.get("sampling"),
            videos=[Video(v["sha256"], v["label"], v.get("filename"), v.get("bytes")) for v in data["videos"]],
            classes=list(data["classes"]),
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

    def remaining_ttl(self) -> float | None:
        """Seconds until the set expires (<= 0: it has), None if it never does."""
        return None if self.expires_at is None else self.expires_at - now()

    def describe(self, model_ref: dict[str, Any], model_metric: str) -> dict[str, Any]:
        """The public view of the set (the `SupportSet` response body)."""
        shots: dict[str, int] = {}
        for video in self.videos:
            shots[video.label] = shots.get(video.label, 0) + 1
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
