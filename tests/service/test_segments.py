"""Actions located in long videos: `segment_seconds` on POST /classify.

A 60 s video is assembled from clips of three registered classes at known times with unregistered
grey filler between them; every class's event must be found (temporal IoU >= 0.5 with where it
really is) and the filler windows reported unknown. The tiny random model tells the classes apart by
colour, which is what the clips differ in.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.media import CLASS_COLOURS, class_video, frame_pattern
from tests.service.test_api import assert_error, classify, register, running, tiny_settings
from training.video.writer import video_bytes

pytestmark = pytest.mark.timeout(300)

FPS = 8
LABELS = ["open valve", "stand up", "wave hand"]
#: (class index or None for filler, seconds), in order: 60 s in all.
TIMELINE = [(None, 10), (0, 10), (None, 10), (1, 10), (None, 10), (2, 10)]


def long_video(timeline=TIMELINE) -> bytes:
    """A real H.264 mp4 (64x48, 8 fps) of the timeline: class stretches in the class's colour, filler grey;
    every frame carries a distinct index pattern (other frames than the registered clips')."""
    frames = []
    for part, (kind, seconds) in enumerate(timeline):
        colour = np.array(CLASS_COLOURS[kind] if kind is not None else (0.5, 0.5, 0.5), np.float32)[None, None]
        for i in range(seconds * FPS):
            pattern = frame_pattern(500 * (part + 1) + i, 64, 48).astype(np.float32) / 255.0
            frames.append(((0.35 * pattern + 0.65 * colour) * 255).astype(np.uint8))
    return video_bytes(frames, fps=FPS)


def truth(timeline=TIMELINE) -> dict[str, tuple[float, float]]:
    spans, start = {}, 0.0
    for kind, seconds in timeline:
        if kind is not None:
            spans[LABELS[kind]] = (start, start + seconds)
        start += seconds
    return spans


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


@pytest.fixture(scope="module")
def video() -> bytes:
    return long_video()


async def test_events_are_found_where_they_happen_and_filler_is_unknown(video: bytes) -> None:
    async with running(tiny_settings()) as (client, _service):
        items = [(class_video(c, s), LABELS[c]) for c in range(3) for s in range(2)]
        set_id = (await register(client, items))["id"]
        response = await classify(client, video, support_set_id=set_id, segment_seconds="2")
        assert response.status_code == 200, response.text
        body = response.json()
        segments, events = body["segments"], body["events"]
        assert len(segments) == 30 and segments[0]["start_s"] == 0.0 and segments[-1]["end_s"] == 60.0
        for segment in segments:
            assert sum(p["score"] for p in segment["predictions"]) == pytest.approx(1.0, abs=1e-5)
            assert 0.0 <= segment["open_set_score"] <= 1.0
        expected = truth()
        for label, span in expected.items():
            found = [e for e in events if e["label"] == label]
            assert found, f"no event for {label}: {events}"
            best = max(iou((e["start_s"], e["end_s"]), span) for e in found)
            assert best >= 0.5, (label, span, found)
        filler = [s for s in segments if not any(a <= s["start_s"] and s["end_s"] <= b for a, b in expected.values())]
        unknown = [s for s in filler if s["unknown"]]
        assert len(unknown) == len(filler), [(s["start_s"], s["open_set_score"]) for s in filler]
        inside = [s for s in segments if s not in filler]
        assert not any(s["unknown"] for s in inside), [(s["start_s"], s["open_set_score"]) for s in inside]
        assert sum(p["score"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-5)

        again = await classify(client, video, support_set_id=set_id, segment_seconds="2")
        assert again.json()["query_cache_hit"] is True and again.json()["segments"] == segments
        overlapping = (await classify(client, video, support_set_id=set_id, segment_seconds="4",
                                      stride_seconds="2", top_k="1")).json()
        assert overlapping["query_cache_hit"] is False and len(overlapping["segments"]) == 29
        assert all(len(s["predictions"]) == 1 for s in overlapping["segments"])

        zero_shot = (await classify(client, video, labels=LABELS, segment_seconds="5")).json()
        assert zero_shot["mode"] == "zero-shot" and len(zero_shot["segments"]) == 12
        assert "unknown" not in zero_shot["segments"][0]
        hybrid = (await classify(client, video, support_set_id=set_id, labels=["juggle"], segment_seconds="5")).json()
        assert hybrid["mode"] == "hybrid" and {"unknown", "open_set_score"} <= set(hybrid["segments"][0])

        whole = (await classify(client, video, support_set_id=set_id)).json()
        assert "segments" not in whole and "events" not in whole


async def test_window_bounds_and_limits(video: bytes) -> None:
    async with running(tiny_settings(max_segments=10)) as (client, _service):
        set_id = (await register(client, [(class_video(0, 0), "a")]))["id"]
        assert_error(await classify(client, video, support_set_id=set_id, segment_seconds="2"), 413,
                     "too_many_segments")
        for fields in ({"segment_seconds": "0"}, {"segment_seconds": "-1"}, {"segment_seconds": "nan"},
                       {"segment_seconds": "inf"}, {"segment_seconds": "1e9"}, {"stride_seconds": "2"},
                       {"segment_seconds": "10", "stride_seconds": "0.01"}):
            assert_error(await classify(client, video, support_set_id=set_id, **fields), 422)
        ok = await classify(client, video, support_set_id=set_id, segment_seconds="6")
        assert ok.status_code == 200 and len(ok.json()["segments"]) == 10


async def test_a_long_video_is_encoded_on_every_model_lane_with_the_same_answers(video: bytes) -> None:
    """30 windows = 4 encoder batches: with two model lanes, two batches run at once (not one after
    another), and the segments come out exactly as with one lane."""
    answers = {}
    for lanes in (1, 2):
        async with running(tiny_settings(encode_concurrency=lanes)) as (client, service):
            backend = service.backend
            real_encode, in_flight, most = backend.encode_videos, [0], [0]

            async def spy(frames, text_feats=None):  # the real backend call, counted
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
                try:
                    return await real_encode(frames, text_feats)
                finally:
                    in_flight[0] -= 1

            set_id = (await register(client, [(class_video(c, 0), LABELS[c]) for c in range(3)]))["id"]
            backend.encode_videos = spy
            response = await classify(client, video, support_set_id=set_id, segment_seconds="2")
            assert response.status_code == 200, response.text
            assert most[0] == lanes, (lanes, most[0])
            answers[lanes] = response.json()["segments"]
    assert answers[1] == answers[2]


async def test_the_next_piece_decodes_while_this_one_encodes(video: bytes, monkeypatch) -> None:
    """With pieces of one encoder batch (30 windows = 4 pieces), the decode of piece k+1 starts before
    the encode of piece k ends, and the segments are exactly those of the default piece size."""
    from service.core import features

    answers = {}
    for chunk in (features.WINDOW_CHUNK, features.ENCODE_BATCH):
        monkeypatch.setattr(features, "WINDOW_CHUNK", chunk)
        async with running(tiny_settings(encode_concurrency=1)) as (client, service):
            set_id = (await register(client, [(class_video(c, 0), LABELS[c]) for c in range(3)]))["id"]
            events: list[tuple[str, int]] = []
            real_decode, real_encode = service._decoder.decode_windows, service.backend.encode_videos

            async def decode_spy(upload, segment_s, stride_s, only):
                events.append(("decode-start", only[0]))
                return await real_decode(upload, segment_s, stride_s, only)

            async def encode_spy(frames, text_feats=None):
                try:
                    return await real_encode(frames, text_feats)
                finally:
                    events.append(("encode-end", len(frames)))

            service._decoder.decode_windows, service.backend.encode_videos = decode_spy, encode_spy
            response = await classify(client, video, support_set_id=set_id, segment_seconds="2")
            assert response.status_code == 200, response.text
            answers[chunk] = response.json()["segments"]
        if chunk == features.ENCODE_BATCH:
            starts = [i for i, (kind, _) in enumerate(events) if kind == "decode-start"]
            ends = [i for i, (kind, _) in enumerate(events) if kind == "encode-end"]
            assert [first for kind, first in events if kind == "decode-start"] == [0, 8, 16, 24], events
            assert len(ends) == 4, events
            for piece in range(1, 4):  # piece k+1 was asked for before piece k's encode returned
                assert starts[piece] < ends[piece - 1], events
    assert answers[features.ENCODE_BATCH] == answers[32]


async def test_an_encoder_failure_mid_video_stops_the_next_decode_and_the_gateway_goes_on(
        video: bytes, monkeypatch) -> None:
    """The encoder fails on the second piece: a 503 with the backend's error, the decode asked for the
    third piece is cancelled (started or not: none left running, no fourth), and the next request is
    answered."""
    from service.core import features
    from service.errors import BackendUnavailable

    monkeypatch.setattr(features, "WINDOW_CHUNK", features.ENCODE_BATCH)
    async with running(tiny_settings(encode_concurrency=1)) as (client, service):
        set_id = (await register(client, [(class_video(c, 0), LABELS[c]) for c in range(3)]))["id"]
        real_decode, real_encode = service._decoder.decode_windows, service.backend.encode_videos
        decodes, calls = {"running": 0, "started": 0}, [0]

        async def decode_spy(upload, segment_s, stride_s, only):
            decodes["running"] += 1
            decodes["started"] += 1
            try:
                return await real_decode(upload, segment_s, stride_s, only)
            finally:
                decodes["running"] -= 1

        async def failing_encode(frames, text_feats=None):
            calls[0] += 1
            if calls[0] == 2:
                raise BackendUnavailable("the encoder went away")
            return await real_encode(frames, text_feats)

        service._decoder.decode_windows, service.backend.encode_videos = decode_spy, failing_encode
        assert_error(await classify(client, video, support_set_id=set_id, segment_seconds="2"), 503)
        assert decodes["running"] == 0 and decodes["started"] in (2, 3), decodes
        service.backend.encode_videos = real_encode
        ok = await classify(client, video, support_set_id=set_id, segment_seconds="2")
        assert ok.status_code == 200 and len(ok.json()["segments"]) == 30
