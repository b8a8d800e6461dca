"""Support sets: register, read, list, add videos to, delete; and their class prototypes.

Lifetimes: every key of a set gets the set's remaining TTL (None: forever); adding videos keeps the
original expiry. Writes of a set go in one transaction with the manifest last and a revision check, so
a failed or concurrent registration never leaves a half-written set visible. Every field is checked,
and the response rendered, before that transaction: a request that fails leaves nothing behind.

Concurrent additions: the expensive part of an addition (decoding the uploads, encoding their
features into the tenant's support cache) runs once, outside any lock or transaction. Only the cheap
part is serialised and retried: re-read the manifest, merge the new videos, rebuild the prototypes
from cached features, write with the revision guard. Additions to one set in one process take turns
(a lock per set); additions from other processes or replicas retry the cheap write, with a short
random pause, up to `UPDATE_WRITE_ATTEMPTS` times before answering 409 `conflict`.

Reading: a stored manifest this gateway cannot read (`ManifestError`, or not JSON) is logged and
skipped in listings, and reading it answers 409 `support_set_unreadable`; it can still be deleted.

Model changes: the decoded clips are kept with the set, so after a model change the prototypes are
rebuilt from them (re-encoding the support videos once for the new model). Only a change of frame
count needs a new registration (409).
"""
from __future__ import annotations

import asyncio
import logging
import random
import uuid
import weakref
from typing import Any, Sequence

import numpy as np

from service.core import keys
from service.core.checks import (check_files, check_metric_name, check_ttl, clean_labels, clean_name)
from service.core.features import Features
from service.core.ingest import Decoder
from service.core.instrumented import CountedBackend, TimedStore
from service.core.manifest import Manifest, ManifestError, Video, now
from service.core.model import ModelFacts
from service.core.uploads import Upload
from service.errors import SupportSetNotFound, SupportSetUnreadable
from service.settings import Settings
from service.store.base import Batch, StoreConflict, StoreDataError
from service.telemetry import Metrics
from training import open_set
from training.open_set import SetCalibration

log = logging.getLogger(__name__)

#: Attempts of the final (cheap) write of an addition while other processes keep updating the same
#: set first; past them the addition answers 409 `conflict`.
UPDATE_WRITE_ATTEMPTS = 30
#: Longest random pause, in seconds, between two such attempts.
UPDATE_RETRY_PAUSE_S = 0.05


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
        self._set_locks: weakref.WeakValueDictionary[tuple[str | None, str], asyncio.Lock] = \
            weakref.WeakValueDictionary()

    def describe(self, manifest: Manifest, calibration: SetCalibration | None = None) -> dict[str, Any]:
        """The public view of a set (what the API returns), with its open-set calibration when known."""
        described = manifest.describe(self._model.ref(), self._model.metric)
        if calibration is not None:
            described["open_set"] = {"threshold": round(calibration.threshold, 6), "source": calibration.source,
                                     "heldout": calibration.heldout, "accept": calibration.accept}
        return described

    async def _calibrations(self, manifests: list[Manifest]) -> list[SetCalibration | None]:
        """The stored calibrations of sets for the current model (None where not built yet)."""
        fp = self._model.fingerprint
        found = []
        for manifest in manifests:
            raw = await self._json_or_none(keys.calibration_key(manifest.tenant, manifest.id, fp, manifest.revision))
            found.append(_calibration_or_none(raw))
        return found

    # ------------------------------------------------------------------ reading
    async def load(self, set_id: str, tenant: str | None) -> Manifest:
        """The set's manifest in the tenant's namespace; 404 when absent there (whoever else owns it),
        409 `support_set_unreadable` when what is stored there is not a manifest this gateway reads."""
        if not keys.valid_set_id(set_id):
            raise SupportSetNotFound(set_id)
        key = keys.manifest_key(tenant, set_id)
        try:
            data = await self._store.get_json(key)
        except StoreDataError as err:
            log.warning("support set %s: the stored manifest is not JSON (%s)", set_id, err)
            raise SupportSetUnreadable(set_id) from err
        if data is None:
            raise SupportSetNotFound(set_id)
        try:
            return self._parse(data, tenant, set_id)
        except ManifestError as err:
            log.warning("support set %s: the stored manifest cannot be read (%s)", set_id, err)
            raise SupportSetUnreadable(set_id) from err

    @staticmethod
    def _parse(data: Any, tenant: str | None, set_id: str) -> Manifest:
        manifest = Manifest.from_json(data, tenant)
        if manifest.id != set_id:
            raise ManifestError(f"the manifest names set {str(manifest.id)[:64]!r}")
        return manifest

    async def get(self, set_id: str, tenant: str | None) -> dict[str, Any]:
        manifest = await self.load(set_id, tenant)
        return self.describe(manifest, (await self._calibrations([manifest]))[0])

    async def list(self, tenant: str | None) -> list[dict[str, Any]]:
        """The tenant's sets, oldest first; a manifest that cannot be read is logged and left out."""
        found = await self._store.keys(keys.manifest_pattern(tenant))
        try:
            documents = await self._store.get_jsons(found)
        except StoreDataError:  # one of them is not JSON: read them one by one
            documents = [await self._json_or_none(key) for key in found]
        manifests = []
        for key, data in zip(found, documents):
            if data is None:
                continue
            set_id = keys.set_id_of_manifest_key(tenant, key)
            try:
                if set_id is None:
                    raise ManifestError("the key does not name a valid set id")
                manifests.append(self._parse(data, tenant, set_id))
            except ManifestError as err:
                log.warning("skipping the unreadable manifest %s in a listing: %s", key, err)
        manifests.sort(key=lambda manifest: manifest.created_at)
        return [self.describe(manifest, calibration)
                for manifest, calibration in zip(manifests, await self._calibrations(manifests))]

    async def _json_or_none(self, key: str) -> Any | None:
        try:
            return await self._store.get_json(key)
        except StoreDataError as err:
            log.warning("skipping the unreadable manifest %s in a listing: %s", key, err)
            return None

    # ------------------------------------------------------------------ writing
    async def create(self, uploads: Sequence[Upload], labels: Sequence[str], *, name: str | None,
                     metric: str | None, ttl_seconds: int | None, tenant: str | None) -> dict[str, Any]:
        """Register a support set in the tenant's namespace: one label per video. Returns the public
        description (201 body)."""
        keys.namespace(tenant)  # a bad tenant name fails before any work
        labels = clean_labels(labels)
        check_files(uploads, labels, self._settings.max_files_per_request)
        check_metric_name(metric)
        metric = self._model.check_metric(metric)
        check_ttl(ttl_seconds)
        name = clean_name(name)
        ttl = ttl_seconds if ttl_seconds is not None else self._settings.support_set_ttl_s
        check_ttl(ttl)
        created = now()
        manifest = Manifest(id=uuid.uuid4().hex, tenant=tenant, name=name, metric=metric,
                            created_at=created, updated_at=created,
                            expires_at=None if ttl is None else created + ttl, revision=0,
                            sampling=self._model.sampling)
        videos = self._videos(uploads, labels)
        clips = await self._decoder.decode_many({upload.sha256: upload for upload in uploads})
        return await self._commit(manifest, videos, clips, new=True)

    async def add_videos(self, set_id: str, uploads: Sequence[Upload], labels: Sequence[str], *,
                         tenant: str | None) -> dict[str, Any]:
        """Add shots or new classes to a set; prototypes are rebuilt. Returns the updated description.

        Decoding and encoding happen once; only the final write is serialised and retried (see the
        module's docstring)."""
        labels = clean_labels(labels)
        check_files(uploads, labels, self._settings.max_files_per_request)
        manifest = await self.load(set_id, tenant)
        self._check_alive(manifest)
        videos = self._videos(uploads, labels)
        known = {video.sha256 for video in manifest.videos}
        clips = await self._decoder.decode_many({u.sha256: u for u in uploads if u.sha256 not in known})
        # Encode the new (video, label) pairs now, into the tenant's support cache, so that each write
        # attempt below only reads features.
        staged = Manifest(id=manifest.id, tenant=tenant, created_at=manifest.created_at,
                          revision=manifest.revision, videos=list(videos))
        await self._features.support(staged, None, fresh_clips=clips)

        for attempt in range(1, UPDATE_WRITE_ATTEMPTS + 1):
            async with self._set_lock(tenant, set_id):
                current = await self.load(set_id, tenant)
                try:
                    return await self._commit(current, videos, clips, new=False)
                except StoreConflict:
                    if attempt == UPDATE_WRITE_ATTEMPTS:
                        log.warning("support set %s kept changing during an update; giving up after %d "
                                    "attempts", set_id, attempt)
                        raise
            await asyncio.sleep(random.uniform(0, UPDATE_RETRY_PAUSE_S))
        raise AssertionError("unreachable")

    async def delete(self, set_id: str, tenant: str | None) -> None:
        """Delete a set (an unreadable one too); 404 when absent."""
        try:
            await self.load(set_id, tenant)
        except SupportSetUnreadable:
            log.info("deleting the unreadable support set %s", set_id)
        # The manifest first: the set disappears at once, then its data.
        await self._store.delete([keys.manifest_key(tenant, set_id)])
        await self._store.delete(await self._store.keys(keys.set_pattern(tenant, set_id)))

    def _set_lock(self, tenant: str | None, set_id: str) -> asyncio.Lock:
        """The lock additions to one set take turns on in this process."""
        lock = self._set_locks.get((tenant, set_id))
        if lock is None:
            lock = self._set_locks[(tenant, set_id)] = asyncio.Lock()
        return lock

    @staticmethod
    def _videos(uploads: Sequence[Upload], labels: Sequence[str]) -> list[Video]:
        return [Video(upload.sha256, label, upload.filename, upload.size) for upload, label in zip(uploads, labels)]

    @staticmethod
    def _check_alive(manifest: Manifest) -> None:
        ttl = manifest.remaining_ttl()
        if ttl is not None and ttl <= 0:
            raise SupportSetNotFound(manifest.id)

    async def _commit(self, manifest: Manifest, videos: list[Video], clips: dict[str, np.ndarray], *,
                      new: bool) -> dict[str, Any]:
        """Add `videos` to `manifest` as its next revision, rebuild the prototypes (from cached features
        where possible) and write it all in one guarded transaction (`StoreConflict` if the set changed
        since `manifest` was read). The response is rendered before the write."""
        set_id, tenant = manifest.id, manifest.tenant
        old_revision = None if new else manifest.revision
        self._check_alive(manifest)
        batch = Batch()
        known = {video.sha256 for video in manifest.videos}
        for h, clip in clips.items():
            if h not in known:
                batch.array(keys.clip_key(tenant, set_id, h), clip)
        manifest.add(list(videos))
        prototypes, calibration = await self._build_prototypes(manifest, batch, fresh_clips=clips)
        batch.json(keys.calibration_key(tenant, set_id, self._model.fingerprint, manifest.revision),
                   calibration.to_dict())
        if new:  # a new set's lifetime starts when it is written, however long decoding and encoding took
            lifetime = None if manifest.expires_at is None else manifest.expires_at - manifest.created_at
            manifest.created_at = manifest.updated_at = now()
            manifest.expires_at = None if lifetime is None else manifest.created_at + lifetime
        self._check_alive(manifest)
        ttl = manifest.remaining_ttl()
        batch.array(keys.prototype_key(tenant, set_id, self._model.fingerprint, manifest.revision), prototypes)
        batch.json(keys.manifest_key(tenant, set_id), manifest.to_json())  # last: the set appears complete
        described = self.describe(manifest, calibration)  # rendered before anything is written
        await self._store.write_batch(batch, ttl_s=ttl, guard=(keys.manifest_key(tenant, set_id), old_revision))
        if not new:
            await self._drop_old_prototypes(tenant, set_id, keep_revision=manifest.revision)
        return described

    # ------------------------------------------------------------------ prototypes
    async def _build_prototypes(self, manifest: Manifest, batch: Batch | None,
                                fresh_clips: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, SetCalibration]:
        """Prototypes `[N, T, D]` of the set's classes (manifest order) for the current model, and the
        set's open-set calibration (`training.open_set`: leave-one-out over its own shots, or the
        model-level default threshold when no class has two)."""
        support_feats = await self._features.support(manifest, batch, fresh_clips)  # [S, T, D]
        class_index = {label: i for i, label in enumerate(manifest.classes)}
        support_labels = np.array([class_index[v.label] for v in manifest.videos], dtype=np.int64)  # [S]
        text_feats = await self._features.text(manifest.classes)  # [N, D]
        prototypes = (await self._backend.build_prototypes(support_feats, support_labels, text_feats)
                      ).astype(np.float32, copy=False)
        metric = self._model.metric_for_set(manifest.id, manifest.metric)
        plan = open_set.plan_calibration(support_labels)
        q2s_support = await self._backend.classify(support_feats, prototypes, None, metric=metric,
                                                   op="open_set")  # [S, N]
        q2s_own = np.zeros(0)
        if plan.num_jobs:
            loo_prototypes = await self._backend.build_prototypes(
                support_feats[plan.loo_support], plan.loo_labels, text_feats[plan.loo_classes], op="open_set")
            q2s_own = plan.own_logits(await self._backend.classify(support_feats[plan.heldout], loo_prototypes, None,
                                                                   metric=metric, op="open_set"))  # [J]
        calibration = open_set.calibrate(plan, q2s_support, q2s_own,
                                         default_threshold=open_set.default_threshold(self._model.open_set_meta))
        return prototypes, calibration

    async def prepared(self, manifest: Manifest) -> tuple[np.ndarray, SetCalibration]:
        """The set's prototypes `[N, T, D]` and open-set calibration for the current model, from the
        store, or rebuilt (and stored) when the model changed since they were."""
        fp = self._model.fingerprint
        proto_key = keys.prototype_key(manifest.tenant, manifest.id, fp, manifest.revision)
        calib_key = keys.calibration_key(manifest.tenant, manifest.id, fp, manifest.revision)
        cached = await self._store.get_array(proto_key)
        calibration = _calibration_or_none(await self._json_or_none(calib_key)) if cached is not None else None
        self._metrics.cache_result("prototypes", hit=cached is not None and calibration is not None)
        if cached is not None and calibration is not None:
            return cached, calibration
        log.info("rebuilding prototypes of support set %s for model %s", manifest.id, fp[:12])
        batch = Batch()
        prototypes, calibration = await self._build_prototypes(manifest, batch)
        batch.array(proto_key, prototypes)
        batch.json(calib_key, calibration.to_dict())
        ttl = manifest.remaining_ttl()
        if ttl is None or ttl > 0:
            try:
                # Only while the set still has this revision: never resurrect a deleted set's keys.
                await self._store.write_batch(batch, ttl_s=ttl, guard=(keys.manifest_key(manifest.tenant, manifest.id),
                                                                       manifest.revision))
            except StoreConflict:
                log.info("support set %s changed while its prototypes were rebuilt; not caching them", manifest.id)
        return prototypes, calibration

    async def prototypes(self, manifest: Manifest) -> np.ndarray:
        """The set's prototypes `[N, T, D]` for the current model (see `prepared`)."""
        return (await self.prepared(manifest))[0]

    async def _drop_old_prototypes(self, tenant: str | None, set_id: str, keep_revision: int) -> None:
        found = await self._store.keys(keys.prototype_pattern(tenant, set_id))
        stale = [key for key in found if not keys.is_prototype_of_revision(key, keep_revision)]
        if stale:
            await self._store.delete(stale)


def _calibration_or_none(raw: Any) -> SetCalibration | None:
    """A stored calibration, or None when absent or unreadable (it is then rebuilt)."""
    if not isinstance(raw, dict):
        return None
    try:
        return SetCalibration.from_dict(raw)
    except (TypeError, KeyError, ValueError):
        return None
