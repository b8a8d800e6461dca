"""The gateway's core, independent of HTTP: support sets and classification (`FsarService`).

Modules: `keys` (the store layout), `uploads` (`Upload`), `checks` (labels, files), `model` (model
facts), `ingest` (decode pool, limits, decoding, resizing), `instrumented` (timed store, counted
backend), `features` (text / query / support caches), `manifest` (a set's stored manifest),
`support_sets`, `classify`, `timings`, and `service` (the `FsarService` facade).

Re-exported here for callers that import them from `service.core`: `FsarService`, `Upload`,
`clean_labels`, and the decode factories `decode_limits`, `create_decode_pool`, `resize_clip`
(defined in `service.core.ingest`).
"""
from service.core.checks import clean_labels
from service.core.ingest import create_decode_pool, decode_limits, resize_clip
from service.core.service import FsarService
from service.core.uploads import Upload

__all__ = ["FsarService", "Upload", "clean_labels", "create_decode_pool", "decode_limits", "resize_clip"]
