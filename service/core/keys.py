"""The store layout: the only place a store key is built.

Keys are relative (the store adds its prefix); `fp` = model fingerprint, `h` = sha256 of the uploaded
bytes, `lk` = sha256 of the label (`label_key`), `s` = sampling (`sampling_key`, e.g. `t8x224` = 8
frames at 224 px); `{ns}` = the tenant's namespace, `tenant:{name}:`, or nothing when the gateway runs
without API keys:

    {ns}set:{id}:manifest              JSON: name, metric (None: the model's), classes, videos [{sha256, label,
                                       filename}], sampling, revision, tenant, created/updated/expires times
                                       (written last)
    {ns}set:{id}:clip:{h}              uint8 [T, S, S, 3] decoded frames of each support video
    {ns}set:{id}:feat:{fp}:{h}:{lk}    float32 [T, D] support features (support branch, label text)
    {ns}set:{id}:proto:{fp}:{rev}      float32 [N, T, D] prototypes of manifest revision `rev`
    {ns}cache:query:{fp}:{s}:{h}       float32 [T, D] query features             (query_cache_ttl_s)
    {ns}cache:support:{fp}:{s}:{h}:{lk} float32 [T, D] support features, shared by the tenant's sets
    cache:text:{fp}:{lk}               float32 [D] label text features, shared (query_cache_ttl_s)
    {ns}job:{id}                       JSON: one job (POST /jobs): state, revision, parameters, progress,
                                       result or error, owner replica, callback delivery (job_ttl_s)

Tenants: every support set and every cache that depends on uploaded bytes lives under its tenant's
namespace, so another tenant can neither read, classify against, list nor delete a set (404, as for a
set that does not exist), nor learn from a cache hit that someone uploaded the same file. Only label
text features are shared: they depend on the label text and the model alone.

Model changes: every feature and prototype key carries the model fingerprint, so a new model never
serves stale results. The decoded clips are kept with the set, so after a model change the
prototypes are rebuilt from them instead of asking the user to upload again.

Redis Cluster: a set's keys must live in one hash slot, because a set is written in one transaction
(MULTI/EXEC with WATCH on its manifest). On a cluster the store therefore writes every `set:` key with
the set id as its hash tag, `{ns}set:{<id>}:manifest`, `{ns}set:{<id>}:clip:{h}`, ... (`cluster_key`;
`plain_key` is the inverse). Cache keys keep their format and spread over the cluster (a batch of
cache entries is written slot by slot: each entry stands alone). A single server (and Sentinel) keeps
the layout above unchanged: existing data stays where it is, and moving a deployment between a single
server and a cluster means registering its sets again (the two layouts never mix in one Redis).

These formats are what existing Redis data is stored under: `tests/service/test_keys.py` pins them.
"""
from __future__ import annotations

import hashlib
import re
from typing import Mapping

from service.bounds import SET_ID_PATTERN

#: A tenant name (API key configuration) and thus a namespace: 1-64 of `A-Z a-z 0-9 _ . -`.
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A support-set id that can name a key of ours (ids are made as uuid4 hex).
SET_ID = re.compile(SET_ID_PATTERN)


def namespace(tenant: str | None) -> str:
    """The key prefix of a tenant's data: `tenant:{name}:`, or "" for the open (no API keys) namespace.
    Raises ValueError for a name `TENANT_NAME` does not match."""
    if tenant is None:
        return ""
    if not TENANT_NAME.fullmatch(tenant):
        raise ValueError(f"invalid tenant name {tenant!r}")
    return f"tenant:{tenant}:"


def valid_set_id(set_id: str | None) -> bool:
    """Whether `set_id` can name a support set at all (anything else is a 404 without a look-up)."""
    return bool(SET_ID.fullmatch(set_id or ""))


def label_key(label: str) -> str:
    """The key part of a label: the first 16 hex digits of its sha256."""
    return hashlib.sha256(label.encode()).hexdigest()[:16]


def sampling_key(sampling: Mapping[str, int]) -> str:
    """The key part of a sampling `{"num_frames": T, "size": S}`: `t{T}x{S}`."""
    return f"t{sampling['num_frames']}x{sampling['size']}"


# ---------------------------------------------------------------------------- one support set
def set_key(tenant: str | None, set_id: str, part: str) -> str:
    """`{ns}set:{id}:{part}`: a key (or, with `*` in `part`, a pattern) of one set."""
    return f"{namespace(tenant)}set:{set_id}:{part}"


def manifest_key(tenant: str | None, set_id: str) -> str:
    return set_key(tenant, set_id, "manifest")


def manifest_pattern(tenant: str | None) -> str:
    """The pattern matching the manifest of every set of a tenant."""
    return f"{namespace(tenant)}set:*:manifest"


def set_id_of_manifest_key(tenant: str | None, key: str) -> str | None:
    """The set id in a key `manifest_pattern(tenant)` matched, None if the key is not a manifest key
    of a valid id."""
    head, tail = f"{namespace(tenant)}set:", ":manifest"
    if not (key.startswith(head) and key.endswith(tail)):
        return None
    set_id = key[len(head):-len(tail)]
    return set_id if valid_set_id(set_id) else None


def set_pattern(tenant: str | None, set_id: str) -> str:
    """The pattern matching every key of one set."""
    return set_key(tenant, set_id, "*")


def clip_key(tenant: str | None, set_id: str, sha256: str) -> str:
    return set_key(tenant, set_id, f"clip:{sha256}")


def feature_key(tenant: str | None, set_id: str, fingerprint: str, sha256: str, label: str) -> str:
    """The set's own support features of one (video, label) for one model."""
    return set_key(tenant, set_id, f"feat:{fingerprint}:{sha256}:{label_key(label)}")


def prototype_key(tenant: str | None, set_id: str, fingerprint: str, revision: int) -> str:
    return set_key(tenant, set_id, f"proto:{fingerprint}:{revision}")


def calibration_key(tenant: str | None, set_id: str, fingerprint: str, revision: int) -> str:
    """`{ns}set:{id}:calib:{fp}:{rev}`: the set's open-set calibration (JSON) for a model and revision."""
    return set_key(tenant, set_id, f"calib:{fingerprint}:{revision}")


def prototype_pattern(tenant: str | None, set_id: str) -> str:
    """The pattern matching the set's prototypes of every model and revision."""
    return set_key(tenant, set_id, "proto:*")


def is_prototype_of_revision(key: str, revision: int) -> bool:
    """Whether a key `prototype_pattern` matched holds prototypes of manifest revision `revision`."""
    return key.endswith(f":{revision}")


# ---------------------------------------------------------------------------- caches
def query_cache_key(tenant: str | None, fingerprint: str, sampling: Mapping[str, int], sha256: str) -> str:
    return f"{namespace(tenant)}cache:query:{fingerprint}:{sampling_key(sampling)}:{sha256}"


def query_windows_cache_key(tenant: str | None, fingerprint: str, sampling: Mapping[str, int], sha256: str,
                            segment_s: float, stride_s: float, part: str) -> str:
    """`{ns}cache:query:{fp}:{s}:{h}:w{segment}-{stride}:{part}`: a long video's window features
    (`part` "feats", float32 `[W, T, D]`) and spans (`part` "spans", float64 `[W, 2]`) for one windowing."""
    return (f"{query_cache_key(tenant, fingerprint, sampling, sha256)}:w{float(segment_s):g}-{float(stride_s):g}"
            f":{part}")


def support_cache_key(tenant: str | None, fingerprint: str, sampling: Mapping[str, int], sha256: str,
                      label: str) -> str:
    return f"{namespace(tenant)}cache:support:{fingerprint}:{sampling_key(sampling)}:{sha256}:{label_key(label)}"


def text_cache_key(fingerprint: str, label: str) -> str:
    """Label text features: shared by every tenant (they depend on the text and the model only)."""
    return f"cache:text:{fingerprint}:{label_key(label)}"


# ---------------------------------------------------------------------------- Redis Cluster layout
_SET_PART = r"((?:tenant:[A-Za-z0-9_.-]{1,64}:)?set:)"
_PLAIN_SET_KEY = re.compile(_SET_PART + r"([^:{}]+)(:.*)?", re.DOTALL)
_TAGGED_SET_KEY = re.compile(_SET_PART + r"\{([^:{}]+)\}(:.*)?", re.DOTALL)


def cluster_key(key: str) -> str:
    """A key (or pattern) as a Redis Cluster stores it: a set's keys carry the set id as their hash tag
    (`set:{id}:...`) so one set lives in one slot; any other key is unchanged."""
    match = _PLAIN_SET_KEY.fullmatch(key)
    return key if match is None else f"{match[1]}{{{match[2]}}}{match[3] or ''}"


def plain_key(key: str) -> str:
    """The inverse of `cluster_key`: the layout's key of a key read back from a cluster."""
    match = _TAGGED_SET_KEY.fullmatch(key)
    return key if match is None else f"{match[1]}{match[2]}{match[3] or ''}"


# ---------------------------------------------------------------------------- jobs
#: A job id (made as uuid4 hex).
JOB_ID = re.compile(r"[0-9a-f]{32}")


def valid_job_id(job_id: str | None) -> bool:
    """Whether `job_id` can name a job at all (anything else is a 404 without a look-up)."""
    return bool(JOB_ID.fullmatch(job_id or ""))


def job_key(tenant: str | None, job_id: str) -> str:
    """`{ns}job:{id}`: one job's record."""
    return f"{namespace(tenant)}job:{job_id}"


def job_patterns() -> list[str]:
    """Patterns matching the record of every job of every tenant (start-up recovery)."""
    return ["job:*", "tenant:*:job:*"]


def job_of_key(key: str) -> tuple[str | None, str] | None:
    """`(tenant, job id)` of a key `job_patterns()` matched; None for any other key."""
    head, _, job_id = key.rpartition("job:")
    if not valid_job_id(job_id):
        return None
    if head == "":
        return None, job_id
    match = re.fullmatch(r"tenant:([^:]+):", head)
    if match is None or not TENANT_NAME.fullmatch(match.group(1)):
        return None
    return match.group(1), job_id
