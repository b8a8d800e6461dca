"""Features, from the caches where possible: label texts, query videos and support videos.

Caches (key formats: `service/core/keys.py`): label text features are shared by every tenant; query
and support features are kept per tenant and keyed by the sha256 of the uploaded bytes. Every
look-up counts a hit or a miss (`fsar_cache_requests_total{cache}`).
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import numpy as np

from service.core import keys
from service.core.checks import unique
from service.core.ingest import Decoder, resize_clip
from service.core.instrumented import CountedBackend, TimedStore
from service.core.manifest import Manifest
from service.core.model import ModelFacts
from service.core.timings import Timings
from service.core.uploads import Upload
from service.errors import Conflict
from service.store.base import Batch
from training.video import Windows
from service.telemetry import Metrics

#: Videos per backend `encode_videos` call.
ENCODE_BATCH = 8

#: Calls of one request in flight at once behind a backend that does not say how many model calls it
#: runs together (Triton: its dynamic batcher merges them on the GPU).
REMOTE_ENCODE_LANES = 4


#: Windows of a long video decoded and encoded together (about 38 MB of frames at 8 x 224 px).
WINDOW_CHUNK = 32


class Features:
    """Text, query and support features for the current model (`ModelFacts`)."""

    def __init__(self, store: TimedStore, backend: CountedBackend, model: ModelFacts, decoder: Decoder,
                 metrics: Metrics, cache_ttl_s: float | None) -> None:
        self._store = store
        self._backend = backend
        self._model = model
        self._decoder = decoder
        self._metrics = metrics
        self._cache_ttl_s = cache_ttl_s

    def encode_lanes(self) -> int:
        """How many `encode_videos` calls of one request may be in flight at once: the embedded
        backend's `encode_concurrency` (its model calls run side by side, each on its share of the
        cores), else `REMOTE_ENCODE_LANES`. More would only queue a long request's batches ahead of
        other requests' in the model pool."""
        lanes = self._model.info.get("encode_concurrency")
        return max(1, int(lanes)) if isinstance(lanes, int) else REMOTE_ENCODE_LANES

    async def encode_videos(self, clips: list[np.ndarray], text_feats: np.ndarray | None) -> np.ndarray:
        """Features `[B, T, D]` of B clips `[T, S, S, 3]`, in batches of `ENCODE_BATCH` (up to
        `encode_lanes()` batches in flight, so a long video or a large set uses every model lane, not
        one); `text_feats` `[B, D]` (the clips' label texts) for the support branch, None for queries."""
        starts = range(0, len(clips), ENCODE_BATCH)
        lanes = asyncio.Semaphore(self.encode_lanes())

        async def batch(start: int) -> np.ndarray:
            async with lanes:
                frames = np.stack(clips[start:start + ENCODE_BATCH])
                texts = None if text_feats is None else text_feats[start:start + ENCODE_BATCH]
                return await self._backend.encode_videos(frames, texts)

        if len(starts) == 1:
            outputs = [await batch(0)]
        else:
            tasks = [asyncio.ensure_future(batch(start)) for start in starts]
            try:
                outputs = await asyncio.gather(*tasks)
            except BaseException:  # one batch failed or the request was cancelled: stop the others
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return np.concatenate(outputs).astype(np.float32, copy=False)

    async def text(self, labels: list[str]) -> np.ndarray:
        """Text features `[N, D]` of labels, from the shared cache where possible."""
        fp = self._model.fingerprint
        cache_keys = [keys.text_cache_key(fp, label) for label in labels]
        cached = await self._store.get_arrays(cache_keys)
        missing = [i for i, feat in enumerate(cached) if feat is None]
        for i in range(len(labels)):
            self._metrics.cache_result("text", hit=i not in missing)
        if missing:
            fresh = await self._backend.encode_texts([labels[i] for i in missing])
            batch = Batch()
            for row, i in enumerate(missing):
                cached[i] = fresh[row].astype(np.float32, copy=False)
                batch.array(cache_keys[i], cached[i])
            await self._store.write_batch(batch, ttl_s=self._cache_ttl_s)
        return np.stack(cached).astype(np.float32, copy=False)

    async def query(self, upload: Upload, tenant: str | None, timings: Timings) -> tuple[np.ndarray, bool]:
        """Query features `[T, D]` (query branch) and whether they came from the tenant's cache (it sent
        the same bytes before); decoding and encoding time go to `timings`."""
        key = keys.query_cache_key(tenant, self._model.fingerprint, self._model.sampling, upload.sha256)
        cached = await self._store.get_array(key)
        self._metrics.cache_result("query", hit=cached is not None)
        if cached is not None:
            return cached, True
        with timings.measure("decode"):
            clip = await self._decoder.decode(upload)
        with timings.measure("encode"):
            feats = (await self.encode_videos([clip], None))[0]
        await self._store.set_array(key, feats, ttl_s=self._cache_ttl_s)
        return feats, False

    async def query_windows(self, upload: Upload, tenant: str | None, segment_s: float, stride_s: float,
                            timings: Timings, progress: Callable[[float, float], Awaitable[None]] | None = None,
                            ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Query features of every window of a long video: `[W, T, D]` (query branch), the windows'
        `(start_s, end_s)` `[W, 2]`, and whether they came from the tenant's cache.

        The video is taken in pieces of `WINDOW_CHUNK` windows (bounded memory however long it is):
        each piece is one decoding plan over its stretch of the file in a decode worker, then encoded in
        batches, and the next piece decodes while one encodes (so `timings`' decode and encode overlap).
        `await progress(done_s, total_s)`, if given, follows each piece."""
        model = self._model
        feats_key, spans_key = (keys.query_windows_cache_key(tenant, model.fingerprint, model.sampling, upload.sha256,
                                                             segment_s, stride_s, part) for part in ("feats", "spans"))
        cached_feats, cached_spans = await self._store.get_arrays([feats_key, spans_key])
        hit = cached_feats is not None and cached_spans is not None
        self._metrics.cache_result("query", hit=hit)
        if hit:
            return cached_feats, cached_spans, True
        feats: list[np.ndarray] = []
        spans: list[np.ndarray] = []

        async def decode_piece(first: int) -> Windows:
            with timings.measure("decode"):
                return await self._decoder.decode_windows(upload, segment_s, stride_s, (first, first + WINDOW_CHUNK))

        # The next piece decodes (in a decode worker) while this one encodes: the stages overlap, so a
        # long video costs about max(decode, encode) rather than their sum, and two pieces at most are
        # held in memory.
        pending: asyncio.Future[Windows] | None = asyncio.ensure_future(decode_piece(0))
        try:
            while pending is not None:
                piece = await pending
                pending = None
                if not len(piece):
                    break
                done = int(piece.first) + len(piece)
                if done < piece.total:
                    pending = asyncio.ensure_future(decode_piece(done))
                with timings.measure("encode"):
                    feats.append(await self.encode_videos(list(piece.frames), None))  # [w, T, D]
                spans.append(piece.spans)
                if progress is not None:
                    await progress(float(piece.spans[-1, 1]), float(piece.duration_s))
        finally:
            if pending is not None:  # an encode failed or the request was cancelled: stop the next decode
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
        all_feats = np.concatenate(feats).astype(np.float32, copy=False)  # [W, T, D]
        all_spans = np.concatenate(spans).astype(np.float64, copy=False)  # [W, 2]
        batch = Batch()
        batch.array(feats_key, all_feats)
        batch.array(spans_key, all_spans)
        await self._store.write_batch(batch, ttl_s=self._cache_ttl_s)
        return all_feats, all_spans, False

    async def support(self, manifest: Manifest, batch: Batch | None,
                      fresh_clips: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Support features `[S, T, D]` of every video of the set, in manifest order.

        Order of look-up per (video, label): the set's own features for this model, the tenant's
        support cache, else encode (from a fresh clip or the set's stored clip). New features go into
        `batch` (written with the set) and into the support cache."""
        tenant, set_id, fp, sampling = manifest.tenant, manifest.id, self._model.fingerprint, self._model.sampling
        pairs = list(dict.fromkeys((v.sha256, v.label) for v in manifest.videos))  # (sha256, label)
        set_keys = {(h, label): keys.feature_key(tenant, set_id, fp, h, label) for h, label in pairs}
        cache_keys = {(h, label): keys.support_cache_key(tenant, fp, sampling, h, label) for h, label in pairs}
        found = dict(zip(pairs, await self._store.get_arrays([set_keys[p] for p in pairs])))
        missing = [p for p in pairs if found[p] is None]
        from_cache = await self._store.get_arrays([cache_keys[p] for p in missing])
        to_encode = []
        for pair, feat in zip(missing, from_cache):
            self._metrics.cache_result("support", hit=feat is not None)
            if feat is None:
                to_encode.append(pair)
            else:
                found[pair] = feat
                if batch is not None:
                    batch.array(set_keys[pair], feat)
        if to_encode:
            clips = await self._clips(manifest, [h for h, _ in to_encode], fresh_clips or {})
            text_feats = await self.text([label for _, label in to_encode])  # [B, D]
            feats = await self.encode_videos(clips, text_feats)  # [B, T, D]
            cache_batch = Batch()
            for pair, feat in zip(to_encode, feats):
                found[pair] = feat
                cache_batch.array(cache_keys[pair], feat)
                if batch is not None:
                    batch.array(set_keys[pair], feat)
            await self._store.write_batch(cache_batch, ttl_s=self._cache_ttl_s)
        return np.stack([found[v.sha256, v.label] for v in manifest.videos])

    async def _clips(self, manifest: Manifest, hashes: list[str], fresh: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Clips `[T, S, S, 3]` for the given hashes: freshly decoded, or the set's stored ones
        (resized when the model's input size changed since registration)."""
        stored_needed = unique(h for h in hashes if h not in fresh)
        stored: dict[str, np.ndarray] = {}
        if stored_needed:
            arrays = await self._store.get_arrays([keys.clip_key(manifest.tenant, manifest.id, h)
                                                   for h in stored_needed])
            for h, clip in zip(stored_needed, arrays):
                if clip is None:
                    raise Conflict(f"Support set '{manifest.id}' lacks a stored clip needed to rebuild its "
                                   "prototypes for the current model; register the videos again.",
                                   code="reregister_required")
                stored[h] = self._fit(manifest, clip)
        return [fresh[h] if h in fresh else stored[h] for h in hashes]

    def _fit(self, manifest: Manifest, clip: np.ndarray) -> np.ndarray:
        """A stored clip `[T, H, H, 3]` at the current model's input size; 409 if T differs."""
        num_frames, size = self._model.num_frames, self._model.input_size
        if clip.shape[0] != num_frames:
            raise Conflict(f"Support set '{manifest.id}' was registered with {clip.shape[0]} frames per "
                           f"video; the current model uses {num_frames}. Register the videos again.",
                           code="reregister_required")
        if clip.shape[1:3] != (size, size):
            clip = resize_clip(clip, size)
        return clip
