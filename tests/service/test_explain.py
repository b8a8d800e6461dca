"""`explain=true` on POST /classify: the model's alignment functions, the gateway's payload and its bound,
and the same explanation from the embedded backend and a real Triton server (the `exported` fixture)."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from service.core.timings import Timings
from service.core.uploads import Upload
from service.core.explain import EXPLAIN_TOP_CLASSES, EXPLANATION_MAX_BYTES, _bounded, json_size
from tests.service.test_api import LABELS, class_video, classify, register, running, tiny_settings
from tests.service.test_triton_backend import (ATOL, embedded_settings, exported, triton_settings,  # noqa: F401
                                               videos)
from training.model import ModelConfig, build_model
from training.model.explain import alignment_masks, explain_alignment, otam_hard_path
from training.model.temporal_metrics import frame_cost, otam_cumulative_cost

pytestmark = pytest.mark.timeout(240)


# ---------------------------------------------------------------------- the model side
@pytest.mark.parametrize("shape", [(4, 4), (8, 8), (5, 7), (1, 3)])
def test_otam_hard_path_is_the_hard_min_of_the_same_padded_dp(shape) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.uniform(0, 2, size=shape)
        path = otam_hard_path(cost)
        rows, cols = zip(*path)
        assert list(rows) == sorted(rows) and list(cols) == sorted(cols)  # in order, both ways
        assert len(set(path)) == len(path)
        # Soft-min at a tiny temperature approaches the hard minimum the path attains.
        soft = float(otam_cumulative_cost(torch.tensor(cost)[None], lam=1e-4)[0])
        assert sum(cost[i, j] for i, j in path) == pytest.approx(soft, abs=1e-2)


def test_bimhm_masks_are_nearest_frames_both_ways() -> None:
    cost = np.array([[0.1, 0.5, 0.9], [0.8, 0.2, 0.4], [0.3, 0.7, 0.6]])
    masks = alignment_masks(cost, "bimhm")
    assert np.argwhere(masks[0]).tolist() == [[0, 0], [1, 1], [2, 0]]
    assert sorted(np.argwhere(masks[1]).tolist()) == [[0, 0], [1, 1], [1, 2]]
    assert not alignment_masks(cost, "mean").any() and not alignment_masks(cost, "trx").any()


@pytest.mark.parametrize("metric", ["otam", "bimhm", "mean", "trx"])
def test_similarity_is_the_metrics_own_frame_cosine_after_tpcm(metric: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, num_frames=4, metric=metric,
                                    tpcm_ffn=64)).eval()
    with torch.no_grad():
        for param in model.tpcm.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # TPCM away from its identity
        query, protos = torch.randn(2, 4, model.embed_dim), torch.randn(3, 4, model.embed_dim)
        out = explain_alignment(model, query, protos)
        expected = 1.0 - frame_cost(model.tpcm(query, None), protos)
    assert out["similarity"].shape == (2, 3, 4, 4) and out["alignment"].shape == (2, 3, 2, 4, 4)
    np.testing.assert_allclose(out["similarity"], expected.numpy(), atol=1e-6)
    assert np.abs(out["similarity"] - (1.0 - frame_cost(query, protos).numpy())).max() > 1e-4  # TPCM matters
    if metric in ("otam", "bimhm"):
        assert out["alignment"].sum() > 0
    else:
        assert out["alignment"].sum() == 0


# ---------------------------------------------------------------------- the gateway
async def test_explain_payload_absent_without_the_flag_and_bounded_with_it() -> None:
    items = [(class_video(c, s), LABELS[c]) for c in range(4) for s in range(2)]
    async with running(tiny_settings(decode_isolation="thread")) as (client, service):
        set_id = (await register(client, items))["id"]
        plain = await classify(client, class_video(1, 5), support_set_id=set_id)
        assert plain.status_code == 200 and "explanation" not in plain.json()

        response = await classify(client, class_video(1, 5), support_set_id=set_id, explain="true", top_k=1)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["predictions"]) == 1
        explanation = body["explanation"]
        assert json_size(explanation) <= EXPLANATION_MAX_BYTES == explanation["max_bytes"]
        assert explanation["metric"] == "otam" and explanation["alignment"] == "otam_path"
        assert explanation["num_frames"] == 4 and not explanation["truncated"]
        thumbnails = [base64.b64decode(t) for t in explanation["query_thumbnails"]]
        assert len(thumbnails) == 4 and all(t[:2] == b"\xff\xd8" and t[-2:] == b"\xff\xd9" for t in thumbnails)
        classes = explanation["classes"]
        assert len(classes) == EXPLAIN_TOP_CLASSES
        assert classes[0]["label"] == body["predictions"][0]["label"]
        assert [c["score"] for c in classes] == sorted((c["score"] for c in classes), reverse=True)
        for entry in classes:
            similarity = np.array(entry["similarity"])
            assert similarity.shape == (4, 4) and np.all(np.abs(similarity) <= 1.0 + 1e-6)
            assert entry["query_to_prototype"] and entry["prototype_to_query"]
            assert all(0 <= i < 4 and 0 <= j < 4 for i, j in entry["query_to_prototype"])

        # The similarities are the model's own: the query's cached features against the set's prototypes.
        manifest = await service._support_sets.load(set_id, None)
        prototypes = await service._support_sets.prototypes(manifest)
        query, _ = await service._features.query(Upload("q", class_video(1, 5)), None, Timings())
        direct = await service.backend.explain(query[None], prototypes)
        top = list(manifest.classes).index(classes[0]["label"])
        np.testing.assert_allclose(classes[0]["similarity"], direct["similarity"][0, top], atol=1e-4)

        zero = (await classify(client, class_video(1, 5), labels=["wave", "sit"], explain="true")).json()
        assert zero["explanation"]["classes"] == [] and len(zero["explanation"]["query_thumbnails"]) == 4
        bad = await classify(client, class_video(1, 5), support_set_id=set_id, explain="maybe")
        assert bad.status_code == 422


def test_explanation_never_exceeds_its_bound() -> None:
    big = {"metric": "otam", "num_frames": 64, "alignment": "otam_path", "thumbnail_size": 64,
           "query_thumbnails": ["A" * 3000] * 64, "truncated": False, "max_bytes": EXPLANATION_MAX_BYTES,
           "classes": [{"label": "x" * 200, "score": 0.5, "source": "support",
                        "similarity": [[0.12345] * 64] * 64, "query_to_prototype": [[i, i] for i in range(64)],
                        "prototype_to_query": [[i, i] for i in range(64)]}] * 3}
    bounded = _bounded(json.loads(json.dumps(big)), ["B" * 500] * 64)
    assert json_size(bounded) <= EXPLANATION_MAX_BYTES and bounded["truncated"]
    assert bounded["classes"]


# ---------------------------------------------------------------------- embedded == Triton
async def test_triton_explains_like_the_embedded_backend(exported, videos) -> None:  # noqa: F811
    """The same explanation through the HTTP API of an embedded and a Triton gateway on one checkpoint."""
    items = [(videos[c, s], LABELS[c]) for c in range(3) for s in range(2)]
    bodies = {}
    for name, settings in {"embedded": embedded_settings(exported, decode_isolation="thread"),
                           "triton": triton_settings(exported["server"].grpc_url, decode_isolation="thread")}.items():
        async with running(settings) as (client, service):
            assert service.backend.name == name
            set_id = (await register(client, items))["id"]
            response = await classify(client, videos[2, 2], support_set_id=set_id, explain="true")
            assert response.status_code == 200, response.text
            bodies[name] = response.json()["explanation"]
    embedded, triton = bodies["embedded"], bodies["triton"]
    assert triton["query_thumbnails"] == embedded["query_thumbnails"]
    assert [c["label"] for c in triton["classes"]] == [c["label"] for c in embedded["classes"]]
    worst = 0.0
    for got, expected in zip(triton["classes"], embedded["classes"]):
        worst = max(worst, float(np.abs(np.array(got["similarity"]) - np.array(expected["similarity"])).max()))
        assert got["query_to_prototype"] == expected["query_to_prototype"]
        assert got["prototype_to_query"] == expected["prototype_to_query"]
    print(f"explanation similarities: max |triton - embedded| = {worst:.2e}")
    assert worst <= ATOL
