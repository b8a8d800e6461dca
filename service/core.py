"""Support sets and classification, independent of HTTP.

`FsarService` decodes uploads (in worker processes, off the event loop: `service.decode_pool`), asks the backend for
features, keeps support sets in the store and answers classification requests. The API layer
(`service/api/`) only parses requests and renders what this module returns.

Store layout (relative keys; the store adds its prefix; `fp` = model fingerprint, `h` = sha256 of
the uploaded bytes, `lk` = sha256 of the label, `s` = sampling, e.g. `t8x224` = 8 frames at 224 px;
`{ns}` = the tenant's namespace, `tenant:{name}:`, or nothing when the gateway runs without API keys):

    {ns}set:{id}:manifest              JSON: name, metric (None: the model's), classes, videos [{sha256, label,
                                       filename}], sampling, revision, tenant, created/updated/expires times
                                       (written last)
    {ns}set:{id}:clip:{h}              uint8 [T, S, S, 3] decoded frames of each support video
    {ns}set:{id}:feat:{fp}:{h}:{lk}    float32 [T, D] support features (support branch, label text)
    {ns}set:{id}:proto:{fp}:{rev}      float32 [N, T, D] prototypes of manifest revision `rev`
    {ns}cache:query:{fp}:{s}:{h}       float32 [T, D] query features             (query_cache_ttl_s)
    {ns}cache:support:{fp}:{s}:{h}:{lk} float32 [T, D] support features, shared by the tenant's sets
    cache:text:{fp}:{lk}               float32 [D] label text features, shared (query_cache_ttl_s)

Tenants: every support set and every cache that depends on uploaded bytes lives under its tenant's
namespace, so another tenant can neither read, classify against, list nor delete a set (404, as for a
set that does not exist), nor learn from a cache hit that someone uploaded the same file. Only label
text features are shared: they depend on the label text and the model alone.

Model changes: every feature and prototype key carries the model fingerprint, so a new model
never serves stale results. The decoded clips are kept with the set, so after a model change the
prototypes are rebuilt from them (re-encoding the support videos once for the new model) instead of
asking the user to upload again. Only a change of frame count needs a new registration (409).

Support set lifetimes: every key of a set gets the set's remaining TTL (None: forever); adding
videos keeps the original expiry. Writes of a set go in one transaction with the manifest last and a
revision check, so a failed or concurrent registration never leaves a half-written set visible.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from service.backends.base import Backend, softmax
from service.decode_pool import DecodePool, ProcessDecodePool, ThreadDecodePool, decode_file, hard_timeout_for
from service.errors import (
    Conflict,
    InvalidField,
    PayloadTooLarge,
    SupportSetNotFound,
    UnsupportedMedia,
    from_decode_error,
)
from service.telemetry import Metrics
from service.settings import Settings
from service.store.base import Batch, Store, StoreConflict
from training.video import DecodeLimits, VideoDecodeError, decode_clip, frame_to_square

log = logging.getLogger(__name__)

MAX_LABEL_CHARS = 200
ENCODE_BATCH = 8
CONFLICT_RETRIES = 3
_SET_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def namespace(tenant: str | None) -> str:
    """The key prefix of a tenant's data: `tenant:{name}:`, or "" for the open (no API keys) namespace."""
    if tenant is None:
        return ""
    if not _TENANT.fullmatch(tenant):
        raise ValueError(f"invalid tenant name {tenant!r}")
    return f"tenant:{tenant}:"


class Upload:
    """One uploaded file: its name (for messages), size, sha256, and where its bytes are.

    The gateway streams every upload to a temporary file (`service.api.deps.stored_uploads`) and builds
    the Upload from that `path`, with the size and hash computed while streaming: no upload is held in
    gateway memory, and a decode worker opens the file itself. In-process callers and tests may pass
    the bytes instead (`Upload(filename=..., data=...)` or `Upload.from_bytes`); size and hash are then
    computed here. Exactly one of `data` and `path` is set.
    """

    __slots__ = ("filename", "size", "sha256", "path", "data")

    def __init__(self, filename: str, data: bytes | None = None, *, path: str | None = None,
                 size: int | None = None, sha256: str | None = None) -> None:
        if (data is None) == (path is None):
            raise ValueError("an Upload needs either its bytes (data) or the path of a file holding them")
        if data is not None:
            size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        elif size is None or sha256 is None:
            raise ValueError("an Upload from a file needs the file's size and sha256")
        self.filename = filename
        self.data = data
        self.path = path
        self.size = size
        self.sha256 = sha256

    @classmethod
    def from_bytes(cls, filename: str, data: bytes) -> "Upload":
        """An upload held in memory (in-process callers, tests)."""
        return cls(filename, data)

    @property
    def source(self) -> bytes | str:
        """What a decode job is given: the bytes, or the path of the file (opened by the worker)."""
        return self.data if self.data is not None else self.path  # type: ignore[return-value]

    def __repr__(self) -> str:
        where = f"path={self.path!r}" if self.path is not None else "in memory"
        return f"Upload(filename={self.filename!r}, size={self.size}, sha256={self.sha256[:12]}..., {where})"


def _label_key(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()[:16]


def _now() -> float:
    return time.time()


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat().replace("+00:00", "Z")


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


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time (seconds) to `timings[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] += time.perf_counter() - start


class FsarService:
    """Support-set registration and classification on top of a backend and a store."""

    def __init__(self, settings: Settings, store: Store, backend: Backend, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.metrics = metrics
        self._decode_pool = create_decode_pool(settings, metrics)
        self._decode_slots = asyncio.Semaphore(settings.decode_concurrency)
        self._limits = decode_limits(settings)

    async def close(self) -> None:
        await self._decode_pool.close()

    @property
    def decode_pool(self) -> DecodePool:
        return self._decode_pool

    # ------------------------------------------------------------------ model facts
    @property
    def model(self) -> dict[str, Any]:
        return self.backend.info()

    @property
    def fingerprint(self) -> str:
        return str(self.model["fingerprint"])

    @property
    def num_frames(self) -> int:
        return int(self.model["num_frames"])

    @property
    def input_size(self) -> int:
        return int(self.model["input_size"])

    @property
    def sampling(self) -> dict[str, int]:
        return {"num_frames": self.num_frames, "size": self.input_size}

    @staticmethod
    def _sampling_key(sampling: dict[str, int]) -> str:
        return f"t{sampling['num_frames']}x{sampling['size']}"

    def model_ref(self) -> dict[str, Any]:
        """The short model description embedded in responses."""
        info = self.model
        return {key: info.get(key) for key in
                ("fingerprint", "backbone", "adapter", "metric", "checkpoint_hash", "weights_source", "demo")}

    def model_card(self) -> dict[str, Any]:
        """`GET /model`: the backend's info, the store, and a one-line description."""
        card = dict(self.model)
        card["demo"] = bool(self.settings.demo or card.get("demo"))
        summary = (f"{card.get('backbone')} with {card.get('adapter')} adapters, metric {card.get('metric')}, "
                   f"weights: {card.get('weights_source')}")
        card["description"] = (f"demo model ({summary}): for trying the API, not for real predictions"
                               if card["demo"] else summary)
        card["store"] = self.store.describe()
        return card

    # ------------------------------------------------------------------ decoding
    async def decode(self, upload: Upload) -> np.ndarray:
        """Frames `[T, S, S, 3]` uint8 of one upload, decoded in the decode pool (a worker process
        unless decode_isolation=thread). An upload on disk travels as its path and the worker opens the
        file (`decode_file`); one held in memory travels as its bytes.

        Raises `PayloadTooLarge` (413) or `UnsupportedMedia` (415) with the decoder's code."""
        decode = decode_clip if upload.path is None else decode_file
        async with self._decode_slots:
            with self.metrics.stage("decode"):
                try:
                    return await self._decode_pool.run(
                        decode, upload.source, num_frames=self.num_frames, size=self.input_size, mode="test",
                        limits=self._limits)
                except VideoDecodeError as err:
                    raise from_decode_error(err, upload.filename) from err

    async def _decode_many(self, uploads: dict[str, Upload]) -> dict[str, np.ndarray]:
        hashes = list(uploads)
        clips = await asyncio.gather(*(self.decode(uploads[h]) for h in hashes))
        return dict(zip(hashes, clips))

    # ------------------------------------------------------------------ backend calls (counted)
    async def _encode_videos(self, clips: list[np.ndarray], text_feats: np.ndarray | None,
                             branch: str) -> np.ndarray:
        """Features `[B, T, D]` of B clips `[T, S, S, 3]`, in batches of `ENCODE_BATCH`."""
        outputs = []
        for start in range(0, len(clips), ENCODE_BATCH):
            frames = np.stack(clips[start:start + ENCODE_BATCH])
            texts = None if text_feats is None else text_feats[start:start + ENCODE_BATCH]
            self.metrics.backend_call("encode_videos")
            self.metrics.videos_encoded.labels(branch=branch).inc(len(frames))
            with self.metrics.stage("encode"):
                outputs.append(await self.backend.encode_videos(frames, texts))
        return np.concatenate(outputs).astype(np.float32, copy=False)

    async def text_features(self, labels: list[str]) -> np.ndarray:
        """Text features `[N, D]` of labels, from the cache where possible."""
        fp = self.fingerprint
        keys = [f"cache:text:{fp}:{_label_key(label)}" for label in labels]
        with self.metrics.stage("store"):
            cached = await self.store.get_arrays(keys)
        missing = [i for i, feat in enumerate(cached) if feat is None]
        for i in range(len(labels)):
            self.metrics.cache_result("text", hit=i not in missing)
        if missing:
            self.metrics.backend_call("encode_texts")
            with self.metrics.stage("encode"):
                fresh = await self.backend.encode_texts([labels[i] for i in missing])
            batch = Batch()
            for row, i in enumerate(missing):
                cached[i] = fresh[row].astype(np.float32, copy=False)
                batch.array(keys[i], cached[i])
            with self.metrics.stage("store"):
                await self.store.write_batch(batch, ttl_s=self.settings.query_cache_ttl_s)
        return np.stack(cached).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ support sets
    @staticmethod
    def _set_key(tenant: str | None, set_id: str, rest: str) -> str:
        """`{ns}set:{id}:{rest}`: a key of one set in its tenant's namespace."""
        return f"{namespace(tenant)}set:{set_id}:{rest}"

    def _manifest_key(self, tenant: str | None, set_id: str) -> str:
        return self._set_key(tenant, set_id, "manifest")

    async def _load_manifest(self, set_id: str, tenant: str | None) -> dict[str, Any]:
        """The set's manifest in the tenant's namespace; 404 when absent there (whoever else owns it)."""
        if not _SET_ID.fullmatch(set_id or ""):  # ids are hex; anything else cannot name a key of ours
            raise SupportSetNotFound(set_id)
        with self.metrics.stage("store"):
            manifest = await self.store.get_json(self._manifest_key(tenant, set_id))
        if manifest is None:
            raise SupportSetNotFound(set_id)
        manifest["tenant"] = tenant  # manifests written before tenants existed lack it
        return manifest

    def _check_files(self, uploads: Sequence[Upload], labels: Sequence[str]) -> None:
        if not uploads:
            raise InvalidField("At least one video is required (field 'videos').", code="missing_videos")
        if len(uploads) > self.settings.max_files_per_request:
            raise PayloadTooLarge(f"{len(uploads)} files in one request; the limit is "
                                  f"{self.settings.max_files_per_request} (max_files_per_request).",
                                  code="too_many_files")
        if len(labels) != len(uploads):
            raise InvalidField(f"Got {len(uploads)} videos but {len(labels)} labels; send one 'labels' "
                               "field per 'videos' file, in the same order.", code="label_count_mismatch")
        for upload in uploads:
            if not upload.size:
                raise UnsupportedMedia(f"{upload.filename or 'upload'}: the file is empty.", code="not_a_video")

    def _check_metric(self, metric: str | None) -> str | None:
        """A requested per-set metric, validated; None (the default) means "whatever the model uses"."""
        info = self.model
        if metric is None or not metric.strip():
            return None
        metric = metric.strip()
        available = list(info.get("metrics") or [info["metric"]])
        if metric not in available:
            raise InvalidField(f"metric '{metric}' is not available with this model; choose one of "
                               f"{', '.join(available)}.", code="unknown_metric")
        return metric

    def _set_metric(self, manifest: dict[str, Any]) -> str | None:
        """The metric to classify a set with (None: the model's own), or 409 if the model lacks it."""
        info = self.model
        metric = manifest.get("metric")
        if metric is None or metric == info["metric"]:
            return None
        if metric not in (info.get("metrics") or []):
            raise Conflict(f"Support set '{manifest['id']}' was registered with metric '{metric}', which the "
                           f"current model does not offer (it uses '{info['metric']}'); register it again.",
                           code="metric_unavailable")
        return metric

    async def create_support_set(self, uploads: Sequence[Upload], labels: Sequence[str], *,
                                 name: str | None = None, metric: str | None = None,
                                 ttl_seconds: int | None = None, tenant: str | None = None) -> dict[str, Any]:
        """Register a support set in the tenant's namespace: one label per video. Returns the public
        description (201 body)."""
        namespace(tenant)  # a bad tenant name fails before any work
        labels = clean_labels(labels)
        self._check_files(uploads, labels)
        metric = self._check_metric(metric)
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise InvalidField("ttl_seconds must be a positive number of seconds.", code="invalid_ttl")
        ttl = ttl_seconds if ttl_seconds is not None else self.settings.support_set_ttl_s
        now = _now()
        manifest = {
            "id": uuid.uuid4().hex,
            "tenant": tenant,
            "name": (name or "").strip() or None,
            "metric": metric,
            "created_at": now,
            "updated_at": now,
            "expires_at": None if ttl is None else now + ttl,
            "revision": 0,
            "sampling": self.sampling,
            "videos": [],
            "classes": [],
        }
        return await self._add_to_set(manifest, list(uploads), labels, new=True)

    async def add_videos(self, set_id: str, uploads: Sequence[Upload], labels: Sequence[str], *,
                         tenant: str | None = None) -> dict[str, Any]:
        """Add shots or new classes to a set; prototypes are rebuilt. Returns the updated description."""
        labels = clean_labels(labels)
        self._check_files(uploads, labels)
        for attempt in range(1, CONFLICT_RETRIES + 1):
            manifest = await self._load_manifest(set_id, tenant)
            try:
                return await self._add_to_set(manifest, list(uploads), labels, new=False)
            except StoreConflict:
                # Another request updated the set meanwhile: redo on top of its revision (the
                # features it needs are cached by now, so a retry costs little).
                if attempt == CONFLICT_RETRIES:
                    raise
                log.info("support set %s changed during an update; retrying (%d)", set_id, attempt)
        raise AssertionError("unreachable")

    async def _add_to_set(self, manifest: dict[str, Any], uploads: list[Upload], labels: list[str], *,
                          new: bool) -> dict[str, Any]:
        set_id, tenant = manifest["id"], manifest.get("tenant")
        old_revision = None if new else manifest["revision"]
        ttl = self._remaining_ttl(manifest)
        if ttl is not None and ttl <= 0:
            raise SupportSetNotFound(set_id)
        batch = Batch()

        # Decode each distinct upload once (unless the set already holds its clip).
        by_hash = {upload.sha256: upload for upload in uploads}
        known_hashes = {video["sha256"] for video in manifest["videos"]}
        to_decode = {h: u for h, u in by_hash.items() if h not in known_hashes}
        new_clips = await self._decode_many(to_decode)
        for h, clip in new_clips.items():
            batch.array(self._set_key(tenant, set_id, f"clip:{h}"), clip)

        for upload, label in zip(uploads, labels):
            manifest["videos"].append({"sha256": upload.sha256, "label": label, "filename": upload.filename,
                                       "bytes": upload.size})
        manifest["classes"] = _unique(video["label"] for video in manifest["videos"])
        manifest["revision"] = (old_revision or 0) + 1
        manifest["updated_at"] = _now()

        prototypes = await self._build_prototypes(manifest, batch, fresh_clips=new_clips)
        batch.array(self._set_key(tenant, set_id, f"proto:{self.fingerprint}:{manifest['revision']}"), prototypes)
        batch.json(self._manifest_key(tenant, set_id), manifest)  # last: the set becomes visible with everything
        with self.metrics.stage("store"):
            await self.store.write_batch(batch, ttl_s=ttl, guard=(self._manifest_key(tenant, set_id), old_revision))
        if not new:
            await self._drop_old_prototypes(tenant, set_id, keep_revision=manifest["revision"])
        return self.describe(manifest)

    def _remaining_ttl(self, manifest: dict[str, Any]) -> float | None:
        expires_at = manifest.get("expires_at")
        return None if expires_at is None else expires_at - _now()

    async def _support_features(self, manifest: dict[str, Any], batch: Batch | None,
                                fresh_clips: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Support features `[S, T, D]` of every video of the set, in manifest order.

        Order of look-up per (video, label): the set's own features for this model, the shared
        support cache, else encode (from a fresh clip or the set's stored clip). New features go
        into `batch` (written with the set) and into the shared cache."""
        set_id, tenant, fp = manifest["id"], manifest.get("tenant"), self.fingerprint
        sampling_key = self._sampling_key(self.sampling)
        pairs = list(dict.fromkeys((v["sha256"], v["label"]) for v in manifest["videos"]))  # (sha256, label)
        set_keys = {(h, label): self._set_key(tenant, set_id, f"feat:{fp}:{h}:{_label_key(label)}")
                    for h, label in pairs}
        cache_keys = {(h, label): f"{namespace(tenant)}cache:support:{fp}:{sampling_key}:{h}:{_label_key(label)}"
                      for h, label in pairs}
        with self.metrics.stage("store"):
            found = dict(zip(pairs, await self.store.get_arrays([set_keys[p] for p in pairs])))
            missing = [p for p in pairs if found[p] is None]
            from_cache = await self.store.get_arrays([cache_keys[p] for p in missing])
        to_encode = []
        for pair, feat in zip(missing, from_cache):
            self.metrics.cache_result("support", hit=feat is not None)
            if feat is None:
                to_encode.append(pair)
            else:
                found[pair] = feat
                if batch is not None:
                    batch.array(set_keys[pair], feat)
        if to_encode:
            clips = await self._clips_for(manifest, [h for h, _ in to_encode], fresh_clips or {})
            text_feats = await self.text_features([label for _, label in to_encode])  # [B, D]
            feats = await self._encode_videos(clips, text_feats, branch="support")  # [B, T, D]
            cache_batch = Batch()
            for pair, feat in zip(to_encode, feats):
                found[pair] = feat
                cache_batch.array(cache_keys[pair], feat)
                if batch is not None:
                    batch.array(set_keys[pair], feat)
            with self.metrics.stage("store"):
                await self.store.write_batch(cache_batch, ttl_s=self.settings.query_cache_ttl_s)
        return np.stack([found[v["sha256"], v["label"]] for v in manifest["videos"]])

    async def _clips_for(self, manifest: dict[str, Any], hashes: list[str],
                         fresh: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Clips `[T, S, S, 3]` for the given hashes: freshly decoded, or the set's stored ones
        (resized when the model's input size changed since registration)."""
        stored_needed = _unique(h for h in hashes if h not in fresh)
        stored: dict[str, np.ndarray] = {}
        if stored_needed:
            with self.metrics.stage("store"):
                arrays = await self.store.get_arrays([self._set_key(manifest.get("tenant"), manifest["id"], f"clip:{h}")
                                                      for h in stored_needed])
            for h, clip in zip(stored_needed, arrays):
                if clip is None:
                    raise Conflict(f"Support set '{manifest['id']}' lacks a stored clip needed to rebuild its "
                                   "prototypes for the current model; register the videos again.",
                                   code="reregister_required")
                stored[h] = self._fit_clip(manifest, clip)
        return [fresh[h] if h in fresh else stored[h] for h in hashes]

    def _fit_clip(self, manifest: dict[str, Any], clip: np.ndarray) -> np.ndarray:
        if clip.shape[0] != self.num_frames:
            raise Conflict(f"Support set '{manifest['id']}' was registered with {clip.shape[0]} frames per "
                           f"video; the current model uses {self.num_frames}. Register the videos again.",
                           code="reregister_required")
        if clip.shape[1:3] != (self.input_size, self.input_size):
            clip = resize_clip(clip, self.input_size)
        return clip

    async def _build_prototypes(self, manifest: dict[str, Any], batch: Batch | None,
                                fresh_clips: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Prototypes `[N, T, D]` of the set's classes (manifest order) for the current model."""
        support_feats = await self._support_features(manifest, batch, fresh_clips)
        classes = manifest["classes"]
        class_index = {label: i for i, label in enumerate(classes)}
        support_labels = np.array([class_index[v["label"]] for v in manifest["videos"]], dtype=np.int64)
        text_feats = await self.text_features(classes)
        self.metrics.backend_call("build_prototypes")
        with self.metrics.stage("match"):
            prototypes = await self.backend.build_prototypes(support_feats, support_labels, text_feats)
        return prototypes.astype(np.float32, copy=False)

    async def prototypes(self, manifest: dict[str, Any]) -> np.ndarray:
        """Cached prototypes `[N, T, D]` of a set, rebuilt (and stored) when the model changed."""
        tenant = manifest.get("tenant")
        key = self._set_key(tenant, manifest["id"], f"proto:{self.fingerprint}:{manifest['revision']}")
        with self.metrics.stage("store"):
            cached = await self.store.get_array(key)
        self.metrics.cache_result("prototypes", hit=cached is not None)
        if cached is not None:
            return cached
        log.info("rebuilding prototypes of support set %s for model %s", manifest["id"], self.fingerprint[:12])
        batch = Batch()
        prototypes = await self._build_prototypes(manifest, batch)
        batch.array(key, prototypes)
        ttl = self._remaining_ttl(manifest)
        if ttl is None or ttl > 0:
            try:
                with self.metrics.stage("store"):
                    # Only while the set still has this revision: never resurrect a deleted set's keys.
                    await self.store.write_batch(batch, ttl_s=ttl,
                                                 guard=(self._manifest_key(tenant, manifest["id"]),
                                                        manifest["revision"]))
            except StoreConflict:
                log.info("support set %s changed while its prototypes were rebuilt; not caching them",
                         manifest["id"])
        return prototypes

    async def _drop_old_prototypes(self, tenant: str | None, set_id: str, keep_revision: int) -> None:
        keys = await self.store.keys(self._set_key(tenant, set_id, "proto:*"))
        stale = [key for key in keys if not key.endswith(f":{keep_revision}")]
        if stale:
            await self.store.delete(stale)

    async def get_support_set(self, set_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        return self.describe(await self._load_manifest(set_id, tenant))

    async def list_support_sets(self, *, tenant: str | None = None) -> list[dict[str, Any]]:
        """The tenant's sets, oldest first."""
        with self.metrics.stage("store"):
            keys = await self.store.keys(f"{namespace(tenant)}set:*:manifest")
            manifests = await self.store.get_jsons(keys)
        described = [self.describe(m) for m in manifests if m is not None]
        return sorted(described, key=lambda s: s["created_at"])

    async def delete_support_set(self, set_id: str, *, tenant: str | None = None) -> None:
        await self._load_manifest(set_id, tenant)
        with self.metrics.stage("store"):
            # The manifest first: the set disappears at once, then its data.
            await self.store.delete([self._manifest_key(tenant, set_id)])
            await self.store.delete(await self.store.keys(self._set_key(tenant, set_id, "*")))

    def describe(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The public view of a set (what the API returns)."""
        shots: dict[str, int] = {}
        for video in manifest["videos"]:
            shots[video["label"]] = shots.get(video["label"], 0) + 1
        return {
            "id": manifest["id"],
            "name": manifest.get("name"),
            "classes": [{"label": label, "shots": shots[label]} for label in manifest["classes"]],
            "num_videos": len(manifest["videos"]),
            "metric": manifest.get("metric") or self.model["metric"],
            "model": self.model_ref(),
            "sampling": manifest.get("sampling"),
            "revision": manifest["revision"],
            "created_at": _iso(manifest["created_at"]),
            "updated_at": _iso(manifest.get("updated_at")),
            "expires_at": _iso(manifest.get("expires_at")),
            "videos": [{"label": v["label"], "filename": v.get("filename"), "sha256": v["sha256"]}
                       for v in manifest["videos"]],
        }

    # ------------------------------------------------------------------ classification
    async def query_features(self, upload: Upload, timings: dict[str, float],
                             tenant: str | None = None) -> tuple[np.ndarray, bool]:
        """Query features `[T, D]` (query branch), from the tenant's cache when it sent the same bytes before."""
        key = f"{namespace(tenant)}cache:query:{self.fingerprint}:{self._sampling_key(self.sampling)}:{upload.sha256}"
        with self.metrics.stage("store"):
            cached = await self.store.get_array(key)
        self.metrics.cache_result("query", hit=cached is not None)
        if cached is not None:
            return cached, True
        with _timed(timings, "decode"):
            clip = await self.decode(upload)
        with _timed(timings, "encode"):
            feats = (await self._encode_videos([clip], None, branch="query"))[0]
        with self.metrics.stage("store"):
            await self.store.set_array(key, feats, ttl_s=self.settings.query_cache_ttl_s)
        return feats, False

    async def classify(self, upload: Upload, *, support_set_id: str | None = None,
                       labels: Sequence[str] | None = None, top_k: int | None = None,
                       tenant: str | None = None) -> dict[str, Any]:
        """Label one query video (few-shot against one of the tenant's sets).

        - few-shot (`support_set_id`): the model's `classify` against the set's cached prototypes
          (with the classes' text features, so the model mixes in its own text probabilities).
        - zero-shot (`labels`): the model's `zero_shot` against "a video of {label}" texts.
        - hybrid (both): candidates are the support classes plus the text-only labels. With
          w = `hybrid_text_weight`,

              p(c) = w * p_zero_shot(c) + (1 - w) * p_few_shot(c)

          where p_zero_shot is the zero-shot softmax over ALL candidates and p_few_shot the few-shot
          softmax over the support classes (0 for text-only labels). Both sum to 1, so p does too.
          A label given in `labels` that is also a support class is one candidate, not two.

        Scores are probabilities summing to 1 over all candidates; `top_k` keeps the best k.
        """
        labels = _unique(clean_labels(labels or []))
        if len(labels) > self.settings.max_labels_per_request:
            raise PayloadTooLarge(f"{len(labels)} labels in one request; the limit is "
                                  f"{self.settings.max_labels_per_request} (max_labels_per_request).",
                                  code="too_many_labels")
        if support_set_id is None and not labels:
            raise InvalidField("Give a support_set_id (few-shot), labels (zero-shot), or both (hybrid).",
                               code="missing_target")
        if top_k is not None and top_k < 1:
            raise InvalidField("top_k must be at least 1.", code="invalid_top_k")
        if not upload.size:
            raise UnsupportedMedia(f"{upload.filename or 'upload'}: the file is empty.", code="not_a_video")
        manifest = await self._load_manifest(support_set_id, tenant) if support_set_id is not None else None

        timings = {"decode": 0.0, "encode": 0.0, "match": 0.0}
        query_feats, cache_hit = await self.query_features(upload, timings, tenant)
        query_batch = query_feats[None]  # [1, T, D]

        candidates: list[str] = []
        sources: dict[str, str] = {}
        few_probs = zero_probs = None
        if manifest is not None:
            classes = list(manifest["classes"])
            with _timed(timings, "match"):
                prototypes = await self.prototypes(manifest)
            with _timed(timings, "encode"):
                class_text = await self.text_features(classes)
            metric = self._set_metric(manifest)
            self.metrics.backend_call("classify")
            with _timed(timings, "match"), self.metrics.stage("match"):
                logits = await self.backend.classify(query_batch, prototypes, class_text, metric=metric)
            few_probs = softmax(logits)[0]  # [N]
            candidates = classes
            sources = {label: "support" for label in classes}
        if labels:
            text_only = [label for label in labels if label not in sources]
            for label in labels:
                sources[label] = "both" if label in sources else "text"
            candidates = candidates + text_only
            with _timed(timings, "encode"):
                text_feats = await self.text_features(candidates)
            self.metrics.backend_call("zero_shot")
            with _timed(timings, "match"), self.metrics.stage("match"):
                logits = await self.backend.zero_shot(query_batch, text_feats)
            zero_probs = softmax(logits)[0]  # [len(candidates)]

        if few_probs is not None and zero_probs is not None:
            mode = "hybrid"
            weight = self.settings.hybrid_text_weight
            few_padded = np.zeros(len(candidates))
            few_padded[:len(few_probs)] = few_probs  # support classes come first; text-only get 0
            probs = weight * zero_probs + (1.0 - weight) * few_padded
        elif few_probs is not None:
            mode, probs = "few-shot", few_probs
        else:
            mode, probs = "zero-shot", zero_probs

        order = np.argsort(-probs, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        predictions = [{"label": candidates[i], "score": float(probs[i]), "source": sources[candidates[i]]}
                       for i in order]
        return {
            "mode": mode,
            "predictions": predictions,
            "support_set_id": support_set_id,
            "labels": labels or None,
            "num_candidates": len(candidates),
            "model": self.fingerprint,
            "query_cache_hit": cache_hit,
            "timings_ms": {name: round(seconds * 1000.0, 3) for name, seconds in timings.items()},
        }

    # ------------------------------------------------------------------ readiness
    async def readiness(self) -> dict[str, str]:
        """`{"backend": "ok" | reason, "store": "ok" | reason}`."""
        checks = {}
        try:
            checks["backend"] = "ok" if await self.backend.ready() else "not ready"
        except Exception as err:  # readiness must answer, whatever the backend raises
            checks["backend"] = f"unavailable: {err}"
        try:
            await self.store.ping()
            checks["store"] = "ok"
        except Exception as err:
            checks["store"] = f"unavailable: {getattr(err, 'message', err)}"
        return checks


def decode_limits(settings: Settings) -> DecodeLimits:
    """The limits every upload is decoded under (size, pixels, duration, time budget)."""
    return DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                        max_duration_s=settings.max_video_seconds, time_budget_s=settings.decode_timeout_s)


def create_decode_pool(settings: Settings, metrics: Metrics | None = None) -> DecodePool:
    """The decode pool the settings ask for: `decode_concurrency` worker processes (a job over
    `hard_timeout_for(decode_timeout_s)` kills its worker) or, with decode_isolation=thread, threads."""
    if settings.decode_isolation == "thread":
        return ThreadDecodePool(settings.decode_concurrency)

    def count_restart(reason: str) -> None:
        if metrics is not None:
            metrics.decode_restarts.labels(reason=reason).inc()

    return ProcessDecodePool(settings.decode_concurrency, hard_timeout_for(settings.decode_timeout_s),
                             on_restart=count_restart)


def resize_clip(clip: np.ndarray, size: int) -> np.ndarray:
    """Square frames `[T, H, H, 3]` uint8 resized to `[T, size, size, 3]` (the decoder's own scaler)."""
    import av

    return np.stack([frame_to_square(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"),
                                     size, None) for frame in clip])
