"""The store layout and the stored manifest JSON are pinned: existing Redis data must stay readable."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from service.core import keys
from service.core.manifest import Manifest, Video

FP = "f" * 64
H = "a" * 64
SAMPLING = {"num_frames": 8, "size": 224}
LK = hashlib.sha256(b"open valve").hexdigest()[:16]


@pytest.mark.parametrize("tenant, ns", [(None, ""), ("alice", "tenant:alice:")])
def test_every_key_format_is_pinned(tenant, ns) -> None:
    assert keys.namespace(tenant) == ns
    assert keys.label_key("open valve") == LK
    assert keys.sampling_key(SAMPLING) == "t8x224"
    assert keys.manifest_key(tenant, "s1") == f"{ns}set:s1:manifest"
    assert keys.manifest_pattern(tenant) == f"{ns}set:*:manifest"
    assert keys.set_pattern(tenant, "s1") == f"{ns}set:s1:*"
    assert keys.clip_key(tenant, "s1", H) == f"{ns}set:s1:clip:{H}"
    assert keys.feature_key(tenant, "s1", FP, H, "open valve") == f"{ns}set:s1:feat:{FP}:{H}:{LK}"
    assert keys.prototype_key(tenant, "s1", FP, 3) == f"{ns}set:s1:proto:{FP}:3"
    assert keys.prototype_pattern(tenant, "s1") == f"{ns}set:s1:proto:*"
    assert keys.query_cache_key(tenant, FP, SAMPLING, H) == f"{ns}cache:query:{FP}:t8x224:{H}"
    assert (keys.support_cache_key(tenant, FP, SAMPLING, H, "open valve")
            == f"{ns}cache:support:{FP}:t8x224:{H}:{LK}")
    assert keys.text_cache_key(FP, "open valve") == f"cache:text:{FP}:{LK}"  # shared by every tenant


def test_prototype_revision_and_names() -> None:
    key = keys.prototype_key("alice", "s1", FP, 12)
    assert keys.is_prototype_of_revision(key, 12) and not keys.is_prototype_of_revision(key, 2)
    for bad in ("", "a b", "x" * 65, "a:b", "a*"):
        with pytest.raises(ValueError):
            keys.namespace(bad)
        assert not keys.valid_set_id(bad)
    assert keys.valid_set_id("0123abcd_-") and keys.TENANT_NAME.fullmatch("team.a-1_b")


def test_the_one_place_keys_are_built() -> None:
    """No other module of the core spells a key."""
    core = Path(__file__).resolve().parents[2] / "service" / "core"
    for module in core.glob("*.py"):
        if module.name != "keys.py":
            assert not re.search(r"""f?["'](set|cache|tenant):""", module.read_text()), module.name


STORED = {  # a manifest as the gateway writes it
    "id": "abc", "tenant": "alice", "name": "floor", "metric": None, "created_at": 1.5, "updated_at": 2.5,
    "expires_at": None, "revision": 2, "sampling": {"num_frames": 8, "size": 224},
    "videos": [{"sha256": H, "label": "open valve", "filename": "a.mp4", "bytes": 10}],
    "classes": ["open valve"],
}


def test_manifest_json_round_trips_byte_for_byte() -> None:
    manifest = Manifest.from_json(json.loads(json.dumps(STORED)), "alice")
    assert json.dumps(manifest.to_json()) == json.dumps(STORED)


def test_manifest_written_before_tenants_is_read() -> None:
    old = {key: value for key, value in STORED.items() if key != "tenant"}
    manifest = Manifest.from_json(old, None)
    assert manifest.tenant is None and manifest.revision == 2 and manifest.videos[0].label == "open valve"
    manifest.add([Video("b" * 64, "stand up", "b.mp4", 20)])
    assert manifest.revision == 3 and manifest.classes == ["open valve", "stand up"]
    assert manifest.to_json()["tenant"] is None



@pytest.mark.parametrize("tenant, ns", [(None, ""), ("alice", "tenant:alice:")])
def test_cluster_layout_tags_every_key_of_a_set_and_nothing_else(tenant, ns) -> None:
    """On a Redis Cluster a set's keys carry `{id}` as their hash tag (one slot per set: its transaction
    stays on one master); caches keep the single-server format. `plain_key` reverses it exactly."""
    pinned = {
        keys.manifest_key(tenant, "s1"): f"{ns}set:{{s1}}:manifest",
        keys.manifest_pattern(tenant): f"{ns}set:{{*}}:manifest",
        keys.set_pattern(tenant, "s1"): f"{ns}set:{{s1}}:*",
        keys.clip_key(tenant, "s1", H): f"{ns}set:{{s1}}:clip:{H}",
        keys.feature_key(tenant, "s1", FP, H, "open valve"): f"{ns}set:{{s1}}:feat:{FP}:{H}:{LK}",
        keys.prototype_key(tenant, "s1", FP, 3): f"{ns}set:{{s1}}:proto:{FP}:3",
        keys.prototype_pattern(tenant, "s1"): f"{ns}set:{{s1}}:proto:*",
        keys.query_cache_key(tenant, FP, SAMPLING, H): f"{ns}cache:query:{FP}:t8x224:{H}",
        keys.support_cache_key(tenant, FP, SAMPLING, H, "open valve"): f"{ns}cache:support:{FP}:t8x224:{H}:{LK}",
        keys.text_cache_key(FP, "open valve"): f"cache:text:{FP}:{LK}",
    }
    for plain, clustered in pinned.items():
        assert keys.cluster_key(plain) == clustered
        assert keys.plain_key(clustered) == plain
    assert keys.plain_key("set:s1:manifest") == "set:s1:manifest"  # already plain: unchanged
    assert keys.cluster_key("*") == "*" and keys.cluster_key("settings") == "settings"
