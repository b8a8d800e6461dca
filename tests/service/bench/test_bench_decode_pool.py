"""The decode-pool benchmark runs end to end in quick mode through the gateway's real decode pool
(worker processes), on real H.264 clips, and writes the documented JSON.

Timings are not asserted (they depend on the machine); the structure, the arithmetic between the
figures, and that the pool's jobs return the very frames ``decode_clip`` returns in this process are.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from service.bench.decode_pool import (
    BASELINE,
    MODES,
    BenchArgumentError,
    clip_sets,
    create_pool,
    decode_through_pool,
    gateway_limits,
    gateway_settings,
    load_videos,
    run,
)
from training.video import decode_clip

pytestmark = pytest.mark.timeout(180)

WORKERS = 2


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick clips, generated once for this module."""
    directory = tmp_path_factory.mktemp("decode-pool-clips")
    for clip_set in clip_sets(quick=True):
        load_videos(clip_set, directory)
    return directory


def test_quick_run_writes_one_row_per_clip_set_worker_count_and_mode(tmp_path, clip_dir) -> None:
    json_path = tmp_path / "decode-pool.json"
    report = run(quick=True, json_path=str(json_path), workdir=str(clip_dir), workers=WORKERS)

    assert json.loads(json_path.read_text()) == report
    machine_keys = {"cpu_model", "cpu_count", "usable_cores", "load_avg_at_start", "load_avg_at_end"}
    assert machine_keys <= report["machine"].keys()
    assert report["quick"] is True and report["num_frames"] == 8 and report["size"] == 224
    assert report["workers"] == [1, WORKERS] and report["rounds"] >= 1
    assert [(c["clip"], c["files"], c["keyframe_interval_s"]) for c in report["clips"]] == [
        ("h264_gop2s", 2, 2.0), ("h264_gop10s", 2, 10.0)]

    rows = report["results"]
    assert [(r["clip"], r["workers"], r["row"]) for r in rows] == [
        (clip, workers, mode) for clip in ("h264_gop2s", "h264_gop10s") for workers in (1, WORKERS) for mode in MODES]
    by_key = {(r["clip"], r["workers"], r["row"]): r for r in rows}
    for row in rows:
        base = by_key[row["clip"], row["workers"], BASELINE]
        one = by_key[row["clip"], 1, row["row"]]
        assert row["videos_per_s"] > 0 and row["cpu_ms_per_video"] > 0
        assert 0 <= row["worker_cpu_ms_per_video"] <= row["cpu_ms_per_video"]
        assert row["baseline_videos_per_s"] == base["videos_per_s"]
        assert row["baseline_cpu_ms_per_video"] == base["cpu_ms_per_video"]
        assert row["speedup_vs_baseline"] == pytest.approx(row["videos_per_s"] / base["videos_per_s"], rel=0.02)
        assert row["videos_per_s_per_worker"] == pytest.approx(row["videos_per_s"] / row["workers"], rel=0.02)
        assert row["scaling_vs_one_worker"] == pytest.approx(row["videos_per_s"] / one["videos_per_s"], rel=0.02)
        # Each worker gets several jobs a round, so none idles while one finishes a short batch.
        assert row["videos_per_round"] >= 4 * row["workers"]
        # Exact and keyframe jobs returned what decode_clip returns in-process; decode-all the exact frames.
        assert row["frames_match"] is True
    assert report["pool_restarts"] == {"timeout": 0, "crash": 0, "recycled": 0}

    encoder = report["encoder"]
    assert encoder == {"videos_per_s": 1250.0, "measured": False, "source": encoder["source"]}
    assert "not measured" in encoder["source"]
    comparison = report["encoder_comparison"]
    assert [(c["clip"], c["row"], c["workers"]) for c in comparison] == [
        (clip, mode, WORKERS) for clip in ("h264_gop2s", "h264_gop10s") for mode in ("exact", "keyframes")]
    for entry in comparison:
        decode = by_key[entry["clip"], WORKERS, entry["row"]]["videos_per_s"]
        assert entry["decode_videos_per_s"] == decode
        assert entry["bound"] == ("decode" if decode < 1250.0 else "encoder")
        assert entry["ratio"] == pytest.approx(max(decode, 1250.0) / min(decode, 1250.0), rel=0.01)
        assert entry["workers_to_match_encoder"] * decode / WORKERS >= 1250.0
        cpu_ms = by_key[entry["clip"], WORKERS, entry["row"]]["cpu_ms_per_video"]
        assert entry["decode_cpu_ms_per_video"] == cpu_ms
        assert entry["cores_to_match_encoder"] == pytest.approx(1250.0 * cpu_ms / 1000, abs=1)


def test_pool_jobs_return_the_frames_decode_clip_returns_in_process(clip_dir) -> None:
    """An independent check of what the benchmark times: every job through the real worker
    processes against decode_clip called here, and the keyframe mode visibly different where a
    clip has a single keyframe (so the comparison can fail)."""
    sets = {clip_set.name: load_videos(clip_set, clip_dir) for clip_set in clip_sets(quick=True)}
    limits = gateway_limits(gateway_settings(WORKERS))

    async def through_pool() -> dict[tuple[str, str], list[np.ndarray]]:
        pool = create_pool(WORKERS)
        try:
            return {(name, mode): await decode_through_pool(pool, mode, videos, limits)
                    for name, videos in sets.items() for mode in MODES}
        finally:
            await pool.close()

    pooled = asyncio.run(through_pool())
    for name, videos in sets.items():
        for i, video in enumerate(videos):
            exact = decode_clip(video.data, num_frames=8, size=224)
            keyframes = decode_clip(video.data, num_frames=8, size=224, fast=True)
            assert exact.shape == (8, 224, 224, 3) and exact.dtype == np.uint8
            assert np.array_equal(pooled[name, "exact"][i], exact)
            assert np.array_equal(pooled[name, "keyframes"][i], keyframes)
            assert np.array_equal(pooled[name, BASELINE][i], exact)
        # Distinct files: the same sampling shows another scene.
        assert not np.array_equal(pooled[name, "exact"][0], pooled[name, "exact"][1])
    # One keyframe in 10 s: keyframe mode returns that one frame eight times, exact mode does not.
    single_keyframe = pooled["h264_gop10s", "keyframes"][0]
    assert all(np.array_equal(frame, single_keyframe[0]) for frame in single_keyframe)
    assert not np.array_equal(single_keyframe, pooled["h264_gop10s", "exact"][0])


@pytest.mark.parametrize("kwargs, message", [
    ({"workers": 0}, "workers must be"),
    ({"encoder_videos_per_s": 0.0}, "encoder videos/s must be"),
    ({"encoder_videos_per_s": float("inf")}, "encoder videos/s must be"),
    ({"rounds": 0}, "rounds must be"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, kwargs, message) -> None:
    with pytest.raises(BenchArgumentError, match=message):
        run(quick=True, workdir=str(tmp_path / "clips"), **kwargs)
    assert not (tmp_path / "clips").exists()
