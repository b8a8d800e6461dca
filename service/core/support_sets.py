"""Support sets: register, read, list, add videos to, delete; and their class prototypes.

Lifetimes: every key of a set gets the set's remaining TTL (None: forever); adding videos keeps the
original expiry. Writes of a set go in one transaction with the manifest last and a revision check, so
a failed or concurrent registration never leaves a half-written set visible.

Model changes: the decoded clips are kept with the set, so after a model change the prototypes are
rebuilt from them (re-encoding the support videos once for the new model). Only a change of frame
count needs a new registration (409).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Sequence

import numpy as np

from service.core import keys
from service.core.checks import check_files, clean_labels
from service.core.features import Features
from service.core.ingest import Decoder
from service.core.instrumented import CountedBackend, TimedStore
from service.core.manifest import Manifest, Video, now
from service.core.model import ModelFacts
from service.core.uploads import Upload
from service.errors import InvalidField, SupportSetNotFound
from service.settings import Settings
from service.store.base import Batch, StoreConflict
from service.telemetry import Metrics

log = logging.getLogger(__name__)

#: Attempts of an update that keeps meeting concurrent updates of the same set.
CONFLICT_RETRIES = 3


class SupportSets:
    """The support sets of every tenant, each in its tenant's namespace."""

    def __init__(self, settings: Settings, store: TimedStore, backend: CountedBackend, model: ModelFacts,
                 decoder: Decoder, features: Features, metrics: Metrics) -> None:
        self._settings = settings
        self._store = store
        self._backend = backend
        self._model = model
        self._decoder = decoder
        self._features = features
        self._metrics = metrics

    def describe(self, manifest: Manifest) -> dict[str, Any]:
        """The public view of a set (what the API returns)."""
        return manifest.describe(self._model.ref(), self._model.metric)

    # ------------------------------------------------------------------ reading
    async def load(self, set_id: str, tenant: str | None) -> Manifest:
        """The set's manifest in the tenant's namespace; 404 when absent there (whoever else owns it)."""
        if not keys.valid_set_id(set_id):
            raise SupportSetNotFound(set_id)
        data = await self._store.get_json(keys.manifest_key(tenant, set_id))
        if data is None:
            raise SupportSetNotFound(set_id)
        return Manifest.from_json(data, tenant)

    async def get(self, set_id: str, tenant: str | None) -> dict[str, Any]:
        return self.describe(await self.load(set_id, tenant))

    async def list(self, tenant: str | None) -> list[dict[str, Any]]:
        """The tenant's sets, oldest first."""
        found = await self._store.get_jsons(await self._store.keys(keys.manifest_pattern(tenant)))
        described = [self.describe(Manifest.from_json(data, tenant)) for data in found if data is not None]
        return sorted(described, key=lambda s: s["created_at"])

    # ------------------------------------------------------------------ writing
    async def create(self, uploads: Sequence[Upload], labels: Sequence[str], *, name: str | None,
                     metric: str | None, ttl_seconds: int | None, tenant: str | None) -> dict[str, Any]:
        """Register a support set in the tenant's namespace: one label per video. Returns the public
        description (201 body)."""
        keys.namespace(tenant)  # a bad tenant name fails before any work
        labels = clean_labels(labels)
        check_files(uploads, labels, self._settings.max_files_per_request)
        metric = self._model.check_metric(metric)
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise InvalidField("ttl_seconds must be a positive number of seconds.", code="invalid_ttl")
        ttl = ttl_seconds if ttl_seconds is not None else self._settings.support_set_ttl_s
        created = now()
        manifest = Manifest(id=uuid.uuid4().hex, tenant=tenant, name=(name or "").strip() or None, metric=metric,
                            created_at=created, updated_at=created,
                            expires_at=None if ttl is None else created + ttl, revision=0,
                            sampling=self._model.sampling)
        return await self._add(manifest, list(uploads), labels, new=True)

    async def add_videos(self, set_id: str, uploads: Sequence[Upload], labels: Sequence[str], *,
                         tenant: str | None) -> dict[str, Any]:
        """Add shots or new classes to a set; prototypes are rebuilt. Returns the updated description."""
        labels = clean_labels(labels)
        check_files(uploads, labels, self._settings.max_files_per_request)
        for attempt in range(1, CONFLICT_RETRIES + 1):
            manifest = await self.load(set_id, tenant)
            try:
                return await self._add(manifest, list(uploads), labels, new=False)
            except StoreConflict:
                # Another request updated the set meanwhile: redo on top of its revision (the
                # features it needs are cached by now, so a retry costs little).
                if attempt == CONFLICT_RETRIES:
                    raise
                log.info("support set %s changed during an update; retrying (%d)", set_id, attempt)
        raise AssertionError("unreachable")

    async def delete(self, set_id: str, tenant: str | None) -> None:
        await self.load(set_id, tenant)
        # The manifest first: the set disappears at once, then its data.
        await self._store.delete([keys.manifest_key(tenant, set_id)])
        await self._store.delete(await self._store.keys(keys.set_pattern(tenant, set_id)))

    async def _add(self, manifest: Manifest, uploads: list[Upload], labels: list[str], *,
                   new: bool) -> dict[str, Any]:
        """Decode what is new, add the videos as the next revision, rebuild the prototypes and write it
        all in one guarded transaction (`StoreConflict` if the set changed meanwhile)."""
        set_id, tenant = manifest.id, manifest.tenant
        old_revision = None if new else manifest.revision
        ttl = manifest.remaining_ttl()
        if ttl is not None and ttl <= 0:
            raise SupportSetNotFound(set_id)
        batch = Batch()

        # Decode each distinct upload once (unless the set already holds its clip).
        by_hash = {upload.sha256: upload for upload in uploads}
        known_hashes = {video.sha256 for video in manifest.videos}
        new_clips = await self._decoder.decode_many({h: u for h, u in by_hash.items() if h not in known_hashes})
        for h, clip in new_clips.items():
            batch.array(keys.clip_key(tenant, set_id, h), clip)

        manifest.add([Video(upload.sha256, label, upload.filename, upload.size)
                      for upload, label in zip(uploads, labels)])
        prototypes = await self._build_prototypes(manifest, batch, fresh_clips=new_clips)
        batch.array(keys.prototype_key(tenant, set_id, self._model.fingerprint, manifest.revision), prototypes)
        batch.json(keys.manifest_key(tenant, set_id), manifest.to_json())  # last: the set appears complete
        await self._store.write_batch(batch, ttl_s=ttl, guard=(keys.manifest_key(tenant, set_id), old_revision))
        if not new:
            await self._drop_old_prototypes(tenant, set_id, keep_revision=manifest.revision)
        return self.describe(manifest)

    # ------------------------------------------------------------------ prototypes
    async def prototypes(self, manifest: Manifest) -> np.ndarray:
        """Cached prototypes `[N, T, D]` of a set, rebuilt (and stored) when the model changed."""
        fp = self._model.fingerprint
        key = keys.prototype_key(manifest.tenant, manifest.id, fp, manifest.revision)
        cached = await self._store.get_array(key)
        self._metrics.cache_result("prototypes", hit=cached is not None)
        if cached is not None:
            return cached
        log.info("rebuilding prototypes of support set %s for model %s", manifest.id, fp[:12])
        batch = Batch()
        prototypes = await self._build_prototypes(manifest, batch)
        batch.array(key, prototypes)
        ttl = manifest.remaining_ttl()
        if ttl is None or ttl > 0:
            try:
                # Only while the set still has this revision: never resurrect a deleted set's keys.
                await self._store.write_batch(batch, ttl_s=ttl, guard=(keys.manifest_key(manifest.tenant, manifest.id),
                                                                       manifest.revision))
            except StoreConflict:
                log.info("support set %s changed while its prototypes were rebuilt; not caching them", manifest.id)
        return prototypes

    async def _build_prototypes(self, manifest: Manifest, batch: Batch | None,
                                fresh_clips: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Prototypes `[N, T, D]` of the set's classes (manifest order) for the current model."""
        support_feats = await self._features.support(manifest, batch, fresh_clips)  # [S, T, D]
        class_index = {label: i for i, label in enumerate(manifest.classes)}
        support_labels = np.array([class_index[v.label] for v in manifest.videos], dtype=np.int64)  # [S]
        text_feats = await self._features.text(manifest.classes)  # [N, D]
        prototypes = await self._backend.build_prototypes(support_feats, support_labels, text_feats)
        return prototypes.astype(np.float32, copy=False)

    async def _drop_old_prototypes(self, tenant: str | None, set_id: str, keep_revision: int) -> None:
        found = await self._store.keys(keys.prototype_pattern(tenant, set_id))
        stale = [key for key in found if not keys.is_prototype_of_revision(key, keep_revision)]
        if stale:
            await self._store.delete(stale)
