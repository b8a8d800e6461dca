"""The `fsar` command line as a user meets it: help, and one-line errors instead of tracebacks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FSAR = [sys.executable, "-m", "service.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run_fsar(*args: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([*FSAR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_subcommands():
    result = run_fsar("--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "train", "eval", "export", "synth", "bench", "model-info", "demo"):
        assert command in result.stdout, f"`fsar --help` does not list {command}"


def test_serve_without_cached_weights_stops_with_one_actionable_sentence():
    result = run_fsar("serve", "--port", "1", "--backbone", "ViT-B-32", "--pretrained", "openai")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "not cached" in error_lines[0] and "--pretrained /path/to/weights.pt" in error_lines[0]


def test_serve_with_a_missing_weights_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    result = run_fsar("serve", "--port", "1", "--pretrained", str(missing))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    result = run_fsar("export", "--checkpoint", str(tmp_path / "none.pt"), "--repository", str(tmp_path / "repo"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_bench_decode_pool_refuses_zero_workers_in_one_line(tmp_path):
    result = run_fsar("bench", "decode-pool", "--quick", "--workers", "0", "--workdir", str(tmp_path / "clips"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: workers must be a whole number >= 1, got 0"
    assert not (tmp_path / "clips").exists()
