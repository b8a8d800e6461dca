"""'None of these' over HTTP: few-shot and hybrid answers say whether a clip looks like any class.

Support sets are calibrated when registered or changed (leave-one-out over their shots; the
model-level default with one shot per class), the calibration is in the set's description, and
`unknown_threshold` overrides it per request. Clips of the registered classes come back known, a
clip of an unregistered colour unknown; the ranked predictions are the same either way.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.media import class_video
from tests.service.test_api import assert_error, classify, register, running, tiny_settings
from training.open_set import DEFAULT_THRESHOLDS
from training.video.writer import video_bytes

pytestmark = pytest.mark.timeout(180)

LABELS = ["open valve", "stand up", "wave hand"]


def grey_clip() -> bytes:
    """A clip of none of the classes: grey frames with a moving bright square."""
    frames = []
    for i in range(12):
        frame = np.full((48, 64, 3), 128, np.uint8)
        frame[10:20, 4 * i:4 * i + 10] = 230
        frames.append(frame)
    return video_bytes(frames, fps=8)


async def test_known_and_unknown_clips_and_the_calibration_in_the_description() -> None:
    async with running(tiny_settings()) as (client, _service):
        created = await register(client, [(class_video(c, s), LABELS[c]) for c in range(3) for s in range(2)])
        calibration = created["open_set"]
        assert calibration["source"] == "leave-one-out" and calibration["heldout"] == 6
        assert 0.0 < calibration["threshold"] < 1.0 and calibration["accept"] == 0.95
        listed = (await client.get("/support-sets")).json()["support_sets"]
        assert listed[0]["open_set"] == calibration
        assert (await client.get(f"/support-sets/{created['id']}")).json()["open_set"] == calibration

        for c in range(3):  # shots never registered
            body = (await classify(client, class_video(c, 2), support_set_id=created["id"])).json()
            assert body["predictions"][0]["label"] == LABELS[c]
            assert body["unknown"] is False and body["open_set_score"] <= calibration["threshold"]
        other = (await classify(client, grey_clip(), support_set_id=created["id"])).json()
        assert other["unknown"] is True and other["open_set_score"] > calibration["threshold"]
        hybrid = (await classify(client, grey_clip(), support_set_id=created["id"], labels=["juggle"])).json()
        assert hybrid["mode"] == "hybrid" and "unknown" in hybrid and "open_set_score" in hybrid

        # The request's own threshold; the ranking does not move.
        strict = (await classify(client, class_video(0, 2), support_set_id=created["id"],
                                 unknown_threshold="0")).json()
        lenient = (await classify(client, grey_clip(), support_set_id=created["id"], unknown_threshold="1")).json()
        assert strict["unknown"] is True and lenient["unknown"] is False
        assert lenient["predictions"] == other["predictions"]
        for bad in ("-0.1", "1.5", "nan", "inf"):
            assert_error(await classify(client, grey_clip(), support_set_id=created["id"], unknown_threshold=bad), 422)

        zero_shot = (await classify(client, grey_clip(), labels=LABELS)).json()
        assert "unknown" not in zero_shot and "open_set_score" not in zero_shot


async def test_one_shot_sets_use_the_model_level_default_and_additions_recalibrate() -> None:
    async with running(tiny_settings()) as (client, _service):
        created = await register(client, [(class_video(c, 0), LABELS[c]) for c in range(3)])
        assert created["open_set"] == {"threshold": DEFAULT_THRESHOLDS["distance"], "source": "default",
                                       "heldout": 0, "accept": 0.95}
        files = [("videos", ("more.mp4", class_video(0, 1), "video/mp4"))]
        added = await client.post(f"/support-sets/{created['id']}/videos", files=files, data={"labels": [LABELS[0]]})
        assert added.status_code == 200, added.text
        assert added.json()["open_set"]["source"] == "leave-one-out" and added.json()["open_set"]["heldout"] == 2
