"""`FsarService`: the gateway's one object (`app.state.service`), composing the core's parts.

It decodes uploads (`ingest`), gets features from the caches or the backend (`features`), keeps
support sets in the store (`support_sets`) and answers classification requests (`classify`); it also
gives the model card and readiness. The API layer (`service/api/`) only parses requests and renders
what it returns.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence

from service.backends.base import Backend
from service.core.classify import Classification, Classifier
from service.core.explain import Explainer
from service.core.features import Features
from service.core.ingest import Decoder
from service.core.ingest import decode_limits
from service.core.instrumented import CountedBackend, TimedStore
from service.core.model import ModelFacts
from service.core.support_sets import SupportSets
from service.core.uploads import Upload
from service.decode_pool import DecodePool
from service.errors import from_decode_error
from service.probe import probe_seconds
from service.settings import Settings
from service.store.base import Store
from service.telemetry import Metrics
from training.video.errors import VideoDecodeError


class FsarService:
    """Support-set registration and classification on top of a backend and a store.

    `store` and `backend` are the ones given (the core reaches them through `TimedStore` and
    `CountedBackend`, which time and count every call)."""

    def __init__(self, settings: Settings, store: Store, backend: Backend, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.metrics = metrics
        self.model_facts = ModelFacts(backend)
        timed_store, counted_backend = TimedStore(store, metrics), CountedBackend(backend, metrics)
        self._decoder = Decoder(settings, self.model_facts, metrics)
        self._features = Features(timed_store, counted_backend, self.model_facts, self._decoder, metrics,
                                  settings.query_cache_ttl_s)
        self._support_sets = SupportSets(settings, timed_store, counted_backend, self.model_facts, self._decoder,
                                         self._features, metrics)
        self.explainer = Explainer(backend, self._decoder, self.model_facts, metrics)
        self._classifier = Classifier(settings, counted_backend, self.model_facts, self._features,
                                      self._support_sets, self.explainer)

    async def close(self) -> None:
        await self._decoder.close()

    @property
    def decode_pool(self) -> DecodePool:
        return self._decoder.pool

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model being served."""
        return self.model_facts.fingerprint

    # ------------------------------------------------------------------ support sets
    async def create_support_set(self, uploads: Sequence[Upload], labels: Sequence[str], *,
                                 name: str | None = None, metric: str | None = None,
                                 ttl_seconds: int | None = None, tenant: str | None = None) -> dict[str, Any]:
        """Register a support set (one label per video); returns its description (the 201 body)."""
        return await self._support_sets.create(uploads, labels, name=name, metric=metric,
                                               ttl_seconds=ttl_seconds, tenant=tenant)

    async def add_videos(self, set_id: str, uploads: Sequence[Upload], labels: Sequence[str], *,
                         tenant: str | None = None) -> dict[str, Any]:
        """Add shots or classes to a set; returns its updated description."""
        return await self._support_sets.add_videos(set_id, uploads, labels, tenant=tenant)

    async def get_support_set(self, set_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        return await self._support_sets.get(set_id, tenant)

    async def list_support_sets(self, *, tenant: str | None = None) -> list[dict[str, Any]]:
        """The tenant's sets, oldest first."""
        return await self._support_sets.list(tenant)

    async def delete_support_set(self, set_id: str, *, tenant: str | None = None) -> None:
        await self._support_sets.delete(set_id, tenant)

    # ------------------------------------------------------------------ classification
    async def classify(self, upload: Upload, *, support_set_id: str | None = None,
                       labels: Sequence[str] | None = None, top_k: int | None = None,
                       tenant: str | None = None, text_weight: float | None = None,
                       explain: bool = False, segment_seconds: float | None = None,
                       stride_seconds: float | None = None, unknown_threshold: float | None = None,
                       progress: Callable[[float, float], Awaitable[None]] | None = None) -> Classification:
        """Label one query video: few-shot, zero-shot or hybrid, whole or window by window
        (`Classifier.classify`)."""
        return await self._classifier.classify(upload, support_set_id=support_set_id, labels=labels,
                                               top_k=top_k, tenant=tenant, text_weight=text_weight,
                                               explain=explain, segment_seconds=segment_seconds,
                                               stride_seconds=stride_seconds,
                                               unknown_threshold=unknown_threshold, progress=progress)

    async def video_seconds(self, upload: Upload) -> float:
        """How long an upload on disk lasts, in seconds, measured in the decode pool (a job's progress
        total). Raises PayloadTooLarge (413) or UnsupportedMedia (415) as a classification would."""
        try:
            return await self.decode_pool.run(probe_seconds, upload.path, decode_limits(self.settings))
        except VideoDecodeError as err:
            raise from_decode_error(err, upload.filename) from err

    # ------------------------------------------------------------------ operations
    def model_card(self) -> dict[str, Any]:
        """`GET /model`: the backend's info, the store, and a one-line description."""
        card = dict(self.model_facts.info)
        card["demo"] = bool(self.settings.demo or card.get("demo"))
        summary = (f"{card.get('backbone')} with {card.get('adapter')} adapters, metric {card.get('metric')}, "
                   f"weights: {card.get('weights_source')}")
        card["description"] = (f"demo model ({summary}): for trying the API, not for real predictions"
                               if card["demo"] else summary)
        card["store"] = self.store.describe()
        return card

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
