"""The bounds of every numeric and string field the gateway accepts: the one table.

Request fields (`service/api/`) declare these in their OpenAPI schema (minimum, maximum, maxLength,
pattern) and the core checks them again (`service/core/checks.py`) before anything is written; the
settings that feed them (`service/settings.py`) are bounded by the same numbers, so no setting can
ask for a value a request could not carry.

| field | bound |
| --- | --- |
| `ttl_seconds`, `support_set_ttl_s`, `query_cache_ttl_s` | 1 .. `MAX_TTL_S` (10 years) |
| `name` | at most `MAX_NAME_CHARS` characters (blank = no name) |
| `metric` | at most `MAX_METRIC_CHARS` characters |
| `labels` (each) | at most `MAX_LABEL_FIELD_CHARS` as sent, `MAX_LABEL_CHARS` once cleaned |
| `labels` (count) | `MAX_LABELS` per request (and `max_files_per_request` / `max_labels_per_request`) |
| `top_k` | 1 .. `MAX_TOP_K` |
| `support_set_id` | `SET_ID_PATTERN`: 1-64 of `A-Z a-z 0-9 _ -` |
| `max_files_per_request`, `max_labels_per_request` | at most `MAX_LABELS` |
| `segment_seconds`, `stride_seconds` | `MIN_SEGMENT_S` .. `MAX_SEGMENT_S` |
| `max_segments` | 1 .. `MAX_SEGMENTS` |
"""
from __future__ import annotations

#: Longest lifetime of a support set or a cache entry: 10 years, in seconds. Far inside what Redis
#: accepts for `SET ... EX` and what a date can render (year 9999).
MAX_TTL_S = 10 * 365 * 24 * 3600
#: Longest support-set name.
MAX_NAME_CHARS = 200
#: Longest metric name (the known ones are a few letters).
MAX_METRIC_CHARS = 32
#: Longest label once cleaned (surrounding blanks and invisible characters removed).
MAX_LABEL_CHARS = 200
#: Longest label field as sent (room for blanks and invisible characters that cleaning removes).
MAX_LABEL_FIELD_CHARS = 1000
#: Most labels (and files) one request may carry, whatever the settings say.
MAX_LABELS = 4096
#: Largest `top_k`.
MAX_TOP_K = 10_000
#: Longest support-set id.
MAX_SET_ID_CHARS = 64
#: What a support-set id looks like (ids are made as uuid4 hex).
SET_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: Shortest window of a long video (`segment_seconds`, `stride_seconds`), in seconds.
MIN_SEGMENT_S = 0.1
#: Longest window or stride, in seconds (one hour).
MAX_SEGMENT_S = 3600.0
#: Most windows a setting may allow one video to be cut into.
MAX_SEGMENTS = 100_000
