"""Calibrated few-shot probabilities over HTTP: the temperature a checkpoint records reaches every answer.

The same model is served twice, from a checkpoint without a calibration record and from a copy with one
(`fsar eval --calibrate --record` writes it): the answers rank the classes alike, the calibrated scores are
`softmax(log p / T)` of the uncalibrated ones, and `GET /model` shows the record.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.media import class_video
from tests.service.test_api import classify, register, running, tiny_settings
from training.calibration import temper, temperature_for_shots

pytestmark = pytest.mark.timeout(180)

LABELS = ["open valve", "stand up", "wave hand"]
RECORD = {"temperature": 4.0, "temperatures": {"1": 4.0, "5": 2.0}, "split": "val", "way": 3, "episodes": 10}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch

    from training.checkpoint import record_calibration, save_checkpoint
    from training.model import ModelConfig, build_model

    work = tmp_path_factory.mktemp("calibration")
    torch.manual_seed(7)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, num_frames=4, metric="otam"))
    plain = work / "plain.pt"
    save_checkpoint(plain, model)
    calibrated = work / "calibrated.pt"
    shutil.copyfile(plain, calibrated)
    record_calibration(calibrated, RECORD)
    return plain, calibrated


async def _answers(checkpoint) -> tuple[dict, list[dict]]:
    """The model card and the few-shot and hybrid answers for the same clips and support set."""
    async with running(tiny_settings(checkpoint=str(checkpoint), num_frames=None)) as (client, _service):
        card = (await client.get("/model")).json()
        set_id = (await register(client, [(class_video(c, 0), LABELS[c]) for c in range(3)]))["id"]
        answers = []
        for c in range(3):
            answers.append((await classify(client, class_video(c, 1), support_set_id=set_id)).json())
            answers.append((await classify(client, class_video(c, 1), support_set_id=set_id, text_weight="0")).json())
        answers.append((await classify(client, class_video(0, 1), support_set_id=set_id, labels=["juggle"])).json())
        two_shots = (await register(client, [(class_video(c, s), LABELS[c]) for c in range(3) for s in (0, 2)]))["id"]
        answers.append((await classify(client, class_video(1, 1), support_set_id=two_shots)).json())
        return card, answers


def _scores(answer: dict, order: list[str]) -> np.ndarray:
    by_label = {p["label"]: p["score"] for p in answer["predictions"]}
    return np.array([by_label[label] for label in order])


async def test_the_recorded_temperature_scales_every_few_shot_answer_and_keeps_the_ranking(checkpoints) -> None:
    plain, calibrated = checkpoints
    plain_card, plain_answers = await _answers(plain)
    card, answers = await _answers(calibrated)
    assert plain_card["calibration"] is None and card["calibration"] == RECORD
    assert card["fingerprint"] == plain_card["fingerprint"]  # the same model; only its probabilities differ

    one_shot_t = RECORD["temperatures"]["1"]
    for before, after in zip(plain_answers[:6], answers[:6]):  # few-shot, with and without text_weight
        assert [p["label"] for p in after["predictions"]] == [p["label"] for p in before["predictions"]]
        np.testing.assert_allclose(_scores(after, LABELS), temper(_scores(before, LABELS), one_shot_t),
                                   rtol=1e-6, atol=1e-9)
        assert after["predictions"][0]["score"] <= before["predictions"][0]["score"]  # T > 1: less sure
        assert after["open_set_score"] == before["open_set_score"]  # "none of these" is scale-free
    # A set with two clips a class: the temperature between those fitted at 1 and 5 shots.
    two_t = temperature_for_shots({1: 4.0, 5: 2.0}, 2)
    assert 2.0 < two_t < 4.0
    np.testing.assert_allclose(_scores(answers[7], LABELS), temper(_scores(plain_answers[7], LABELS), two_t),
                               rtol=1e-6, atol=1e-9)
    # Hybrid: the few-shot part is calibrated, then mixed with the zero-shot part as before.
    hybrid_before, hybrid_after = plain_answers[6], answers[6]
    assert hybrid_after["mode"] == "hybrid" and sum(p["score"] for p in hybrid_after["predictions"]) == pytest.approx(1)
    assert not np.allclose(_scores(hybrid_after, LABELS), _scores(hybrid_before, LABELS))
