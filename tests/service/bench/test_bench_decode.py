"""The decode benchmark runs end to end in quick mode and writes the documented JSON."""

from __future__ import annotations

import json

import pytest

from service.bench.decode import clip_specs, make_clip, run

ROWS = ["exact/auto", "exact/seek", "exact/sequential", "keyframes"]


def test_quick_bench_writes_one_row_per_clip_and_mode(tmp_path):
    json_path, clip_dir = tmp_path / "decode.json", tmp_path / "clips"
    rows = run(quick=True, json_path=str(json_path), workdir=str(clip_dir))

    report = json.loads(json_path.read_text())
    assert report["quick"] is True and report["num_frames"] == 8 and report["size"] == 224
    assert {"platform", "cpu_count", "av", "ffmpeg"} <= report["machine"].keys()
    assert report["results"] == rows
    clips = [spec.name for spec in clip_specs(quick=True)]
    assert clips == ["h264_gop1s", "h264_gop10s", "vp9_gop2s"]
    assert [(row["clip"], row["row"]) for row in rows] == [(clip, name) for clip in clips for name in ROWS]
    for row in rows:
        assert row["ms"] > 0 and row["baseline_ms"] > 0
        assert row["speedup_vs_baseline"] == pytest.approx(row["baseline_ms"] / row["ms"], rel=0.02)
        assert 0 < row["frames_passed"] <= row["video_frames"] == 300
        # Exact rows return the very frames the decode-everything baseline picks.
        assert row["frames_match"] is (True if row["row"].startswith("exact") else None)
    by_row = {(row["clip"], row["row"]): row for row in rows}
    # Keyframe spacing drives the plan: seeks with 1 s GOPs, one forward pass with a single keyframe.
    assert by_row["h264_gop1s", "exact/auto"]["seeks"] >= 6
    assert by_row["h264_gop10s", "exact/auto"]["seeks"] == 0
    assert by_row["h264_gop1s", "keyframes"]["frames_passed"] <= 10

    # Generated clips are cached: asking again does not rewrite them.
    written = {path.name: path.stat().st_mtime_ns for path in clip_dir.iterdir()}
    for spec in clip_specs(quick=True):
        make_clip(spec, clip_dir)
    assert {path.name: path.stat().st_mtime_ns for path in clip_dir.iterdir()} == written
