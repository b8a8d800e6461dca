"""`text_weight` on POST /classify: the text share of one request.

Few-shot: p = w * softmax(Q2T) + (1 - w) * softmax(Q2S), with w replacing the model's alpha; hybrid:
w replaces hybrid_text_weight. Checked against the model's own pieces over HTTP: w = 0 gives the
Q2S softmax alone, w = alpha gives the default answer, w = 1 the label texts alone.
"""
from __future__ import annotations

import numpy as np
import pytest

from service.backends.base import softmax
from service.core.keys import prototype_key
from tests.service.test_api import LABELS, assert_error, classify, register, running, tiny_settings, videos  # noqa: F401
from training.video import decode_clip

pytestmark = pytest.mark.timeout(120)


def scores(response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {p["label"]: p["score"] for p in response.json()["predictions"]}


async def test_text_weight_sets_the_text_share_of_few_shot_and_hybrid(videos) -> None:
    async with running(tiny_settings()) as (client, service):
        items = [(videos[c, s], LABELS[c]) for c in range(3) for s in range(2)]
        created = await register(client, items)
        set_id, query = created["id"], videos[1, 2]
        classes = LABELS[:3]

        # The model's pieces, straight from the backend.
        backend = service.backend
        info = backend.info()
        frames = decode_clip(query, info["num_frames"], info["input_size"])[None]  # [1, T, S, S, 3]
        query_feats = await backend.encode_videos(frames)  # [1, T, D]
        class_text = await backend.encode_texts(classes)  # [N, D]
        manifest = await service.get_support_set(set_id)
        assert [c["label"] for c in manifest["classes"]] == classes
        prototypes = await service.store.get_array(prototype_key(None, set_id, service.fingerprint, 1))
        q2s = softmax(await backend.classify(query_feats, prototypes, None))[0]
        q2t = softmax(await backend.zero_shot(query_feats, class_text))[0]
        alpha = info["alpha"]

        default = scores(await classify(client, query, support_set_id=set_id))
        for weight, expected in ((0.0, q2s), (1.0, q2t), (0.25, 0.25 * q2t + 0.75 * q2s),
                                 (alpha, alpha * q2t + (1 - alpha) * q2s)):
            got = scores(await classify(client, query, support_set_id=set_id, text_weight=str(weight)))
            np.testing.assert_allclose([got[c] for c in classes], expected, atol=1e-5)
        np.testing.assert_allclose([default[c] for c in classes], alpha * q2t + (1 - alpha) * q2s, atol=1e-5)

        # Hybrid: text_weight replaces hybrid_text_weight (0.5 by default).
        hybrid = dict(support_set_id=set_id, labels=["somebody falls"])
        same = scores(await classify(client, query, **hybrid, text_weight=str(service.settings.hybrid_text_weight)))
        assert same == pytest.approx(scores(await classify(client, query, **hybrid)), abs=1e-9)
        texts_only = scores(await classify(client, query, **hybrid, text_weight="1"))
        zero_shot = scores(await classify(client, query, labels=classes + ["somebody falls"]))
        assert texts_only == pytest.approx(zero_shot, abs=1e-6)
        examples_only = scores(await classify(client, query, **hybrid, text_weight="0"))
        assert examples_only["somebody falls"] == 0.0
        assert {c: examples_only[c] for c in classes} == pytest.approx(default, abs=1e-6)

        for bad in ("-0.01", "1.01", "nan", "inf", "1e309", "heavy"):
            assert_error(await classify(client, query, support_set_id=set_id, text_weight=bad), 422)

