"""The segments benchmark runs end to end in quick mode (a short video) and writes the documented JSON."""

from __future__ import annotations

import json

import pytest

from service.bench.segments import clip_spec, run


def test_quick_bench_reports_both_paths_with_the_same_frames_and_predictions(tmp_path):
    json_path = tmp_path / "segments.json"
    report = run(quick=True, json_path=str(json_path), workdir=str(tmp_path / "clips"), seconds=8, batch=3,
                 runtime="torch")

    assert json.loads(json_path.read_text()) == report
    assert report["quick"] is True
    assert {"platform", "cpu_count", "av", "torch", "load_avg_at_end"} <= report["machine"].keys()
    assert report["settings"] == {"backbone": "fsar-tiny", "num_frames": 8, "size": report["settings"]["size"],
                                  "segment_s": 2.0, "stride_s": 2.0, "batch": 3,
                                  "labels": report["settings"]["labels"], "runtime": "torch",
                                  "runtime_why": "runtime=torch", "precision": "fp32",
                                  "threads": report["settings"]["threads"]}
    assert report["clip"]["duration_s"] == 8 and report["clip"]["resolution"] == "640x360"
    ours, naive = report["results"]
    assert (ours["path"], naive["path"]) == ("ours (torch eager fp32)", "naive (torch eager fp32)")
    for row in (ours, naive):
        assert row["windows"] == 4 and row["video_frames"] == 240
        assert row["wall_s"] >= row["decode_s"] > 0 and row["encode_s"] > 0
        assert row["video_s_per_s"] == pytest.approx(8 / row["wall_s"], rel=0.02)
    assert ours["speedup_vs_baseline"] == pytest.approx(naive["wall_s"] / ours["wall_s"], rel=0.02)
    assert naive["speedup_vs_baseline"] == 1.0
    assert ours["distinct_frames"] == 4 * 8
    # Both paths fed the model the very same frames and predicted the same label for every window.
    assert report["frames_match"] is True
    assert report["predictions_agree"] == 1.0
    target = report["targets"]["speedup_vs_baseline"]
    assert target["target"] == 3.0 and target["met"] == (target["value"] >= 3.0)


def test_our_path_on_onnx_runtime_answers_as_the_torch_baseline(tmp_path):
    pytest.importorskip("onnxruntime")
    report = run(quick=True, workdir=str(tmp_path / "clips"), seconds=4, batch=2, runtime="onnxruntime",
                 onnx_cache_dir=str(tmp_path / "onnx"))
    ours, naive = report["results"]
    assert (ours["path"], naive["path"]) == ("ours (onnxruntime fp32)", "naive (torch eager fp32)")
    assert report["settings"]["runtime"] == "onnxruntime" and report["settings"]["precision"] == "fp32"
    assert report["frames_match"] is True
    assert report["predictions_agree"] == 1.0  # fp32 graphs answer as torch eager does
    assert any((tmp_path / "onnx").iterdir())  # the graphs were built into the cache asked for


def test_bad_runtime_or_precision_is_refused_before_any_work(tmp_path):
    from service.bench.decode_pool import BenchArgumentError

    with pytest.raises(BenchArgumentError, match="runtime must be auto, torch or onnxruntime"):
        run(quick=True, workdir=str(tmp_path / "clips"), runtime="tensorrt")
    with pytest.raises(BenchArgumentError, match="precision must be fp32 or int8"):
        run(quick=True, workdir=str(tmp_path / "clips"), precision="fp16")
    with pytest.raises(BenchArgumentError, match="precision=int8 needs the onnxruntime runtime"):
        run(quick=True, workdir=str(tmp_path / "clips"), seconds=2, runtime="torch", precision="int8")
    assert not (tmp_path / "clips").exists()  # refused before the video was generated


def test_full_and_quick_videos():
    assert (clip_spec(False).seconds, clip_spec(True).seconds, clip_spec(True, 5).seconds) == (600, 60, 5)
    assert clip_spec(False).keyframe_s == 2.0 and (clip_spec(False).width, clip_spec(False).height) == (640, 360)


def test_cli_lists_the_bench_and_refuses_a_bad_batch_in_one_line(tmp_path):
    from tests.test_cli import run_fsar

    assert "segments" in run_fsar("bench", "--help").stdout
    result = run_fsar("bench", "segments", "--quick", "--batch", "0", "--workdir", str(tmp_path / "clips"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: batch must be >= 1, got 0"
    assert not (tmp_path / "clips").exists()


def test_long_videos_repeat_a_piece_by_remuxing(tmp_path, monkeypatch):
    from service.bench import segments
    from service.bench.decode import ClipSpec
    from training.video import probe

    monkeypatch.setattr(segments, "PIECE_S", 2.0)
    spec = ClipSpec("long", "libx264", ".mp4", 5, 96, 54, 10, 1.0, preset="veryfast")
    info = probe(segments.make_long_clip(spec, tmp_path))
    # Three 2 s pieces, the last cut at its keyframe at 5 s.
    assert (info.duration_s, info.num_frames, info.num_keyframes, info.keyframe_interval_s) == (5.0, 50, 5, 1.0)
    assert segments.make_long_clip(spec, tmp_path).stat().st_mtime_ns == (tmp_path / spec.file_name).stat().st_mtime_ns
