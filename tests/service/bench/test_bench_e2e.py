"""The gateway benchmarks run end to end in their quickest mode and report what really happened.

e2e and cache start a real uvicorn gateway (fsar-tiny, random weights) on a real Redis and send real
H.264 clips; the encoder benchmark does its CPU smoke run. Timings are not asserted (they depend on
the machine); the structure, the baseline having run, and the backend counters are.
"""
from __future__ import annotations

import json

import pytest

from service.bench import cache, e2e, encoder
from service.bench.common import LABELS, retagged, scenario_clips

pytestmark = pytest.mark.timeout(180)

LEVELS = [1, 4]


def test_retagged_clip_has_other_bytes_and_the_same_frames(tmp_path) -> None:
    from training.video import decode_clip

    clip = scenario_clips(True, tmp_path / "clips", num_queries=1).queries[0]
    copy = retagged(clip, "another request")
    assert copy != clip and retagged(clip, "another request") == copy
    assert (decode_clip(copy, num_frames=8, size=64) == decode_clip(clip, num_frames=8, size=64)).all()


def test_quick_e2e_reports_gateway_and_naive_rows(tmp_path, redis_url: str) -> None:
    json_path = tmp_path / "e2e.json"
    report = e2e.run(quick=True, json_path=str(json_path), concurrency=LEVELS, workdir=str(tmp_path / "clips"),
                     redis_url=redis_url)

    assert json.loads(json_path.read_text()) == report
    assert {"platform", "cpu_model", "cpu_count", "torch", "load_avg", "date"} <= report["machine"].keys()
    assert report["settings"]["backbone"] == "fsar-tiny" and report["settings"]["store"] == "redis"
    assert report["registration"]["support_videos_encoded"] == len(LABELS)
    assert [(row["row"], row["concurrency"]) for row in report["results"]] == [
        (name, level) for level in LEVELS for name in ("gateway", "gateway (repeated query)")]
    assert [row["concurrency"] for row in report["baseline"]] == LEVELS
    baseline = {row["concurrency"]: row for row in report["baseline"]}
    for row in report["results"]:
        count = e2e.requests_per_level(row["concurrency"], quick=True)
        assert row["requests"] == count == baseline[row["concurrency"]]["requests"]
        assert row["throughput_rps"] > 0 and baseline[row["concurrency"]]["throughput_rps"] > 0
        assert row["speedup_vs_baseline"] == pytest.approx(
            row["throughput_rps"] / baseline[row["concurrency"]]["throughput_rps"], rel=0.02)
        counters = row["counters"]
        assert counters["support_videos_encoded"] == 0 and counters["build_prototypes_calls"] == 0
        assert counters["classify_calls"] == count
        if row["row"] == "gateway":  # distinct bytes: every query decoded and encoded
            assert row["query_cache_hits"] == 0 and counters["query_videos_encoded"] == count
            assert row["decode_ms"] > 0 and row["encode_ms"] > 0
        else:  # the same bytes: answered from the query cache
            assert row["query_cache_hits"] == count and counters["query_videos_encoded"] == 0
            assert row["decode_ms"] == 0 and row["encode_ms"] == 0
    assert report["support_reencoded_during_classify"] == 0
    assert report["targets"]["support_videos_encoded_during_classify"]["met"] is True
    assert 0.0 <= report["baseline_agrees_with_gateway"] <= 1.0


def test_quick_cache_compares_hits_and_registration(tmp_path, redis_url: str) -> None:
    json_path = tmp_path / "cache.json"
    report = cache.run(quick=True, json_path=str(json_path), workdir=str(tmp_path / "clips"), redis_url=redis_url)

    assert json.loads(json_path.read_text()) == report
    repeats = cache.default_repeats(quick=True)
    names = [comparison["name"] for comparison in report["comparisons"]]
    assert names == ["query feature cache", "registered set vs re-register (same bytes)",
                     "registered set vs re-register (new bytes)"]
    for comparison in report["comparisons"]:
        for role in ("ours", "baseline"):
            assert comparison[role]["requests"] == repeats and comparison[role]["p50_ms"] > 0
        assert comparison["speedup_vs_baseline"] == pytest.approx(
            comparison["baseline"]["p50_ms"] / comparison["ours"]["p50_ms"], rel=0.02)
    hit, miss = (report["comparisons"][0][role]["counters"] for role in ("ours", "baseline"))
    assert (miss["query_cache_misses"], miss["query_videos_encoded"]) == (repeats, repeats)
    assert (hit["query_cache_hits"], hit["query_videos_encoded"]) == (repeats, 0)
    registered = report["comparisons"][1]["ours"]["counters"]
    same = report["comparisons"][1]["baseline"]["counters"]
    new = report["comparisons"][2]["baseline"]["counters"]
    assert registered["support_videos_encoded"] == 0 and registered["query_videos_encoded"] == repeats
    # Re-registering the same bytes reuses the shared support-feature cache; new bytes encode all five.
    assert same["support_videos_encoded"] == 0 and same["support_cache_hits"] == len(LABELS) * repeats
    assert new["support_videos_encoded"] == len(LABELS) * repeats
    assert report["targets"]["query_cache_hit_speedup"]["value"] == report["comparisons"][0]["speedup_vs_baseline"]


def test_encoder_cpu_smoke_run(tmp_path) -> None:
    report = encoder.run(quick=True, device="cpu", batches=[1, 2], seconds_per_point=0.05,
                         json_path=str(tmp_path / "encoder.json"))

    assert report["device"] == "cpu" and report["errors"] == []
    paths = ("eager fp32", "onnxruntime fp32", "onnxruntime int8")  # torch eager is the baseline
    assert [(row["path"], row["batch"]) for row in report["results"]] == [
        (path, batch) for batch in (1, 2) for path in paths]
    for row in report["results"]:
        assert row["backbone"] == "fsar-tiny" and row["videos_per_s"] > 0
        if row["path"] == "onnxruntime fp32":  # the same features as torch
            assert row["cosine_min"] > 0.9999
        elif row["path"] == "onnxruntime int8":  # close to them
            assert row["cosine_min"] > 0.95


def test_encoder_refuses_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(encoder.EncoderBenchUnavailable, match="no CUDA device"):
        encoder.run(quick=True)
