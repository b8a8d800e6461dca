"""The embedded backend on ONNX Runtime: runtime choice, same numbers as torch (fp32), int8's own fingerprint.

One tiny model (TED + MA adapters, so the support branch's label text matters), built the way the
backend builds it from settings; the torch runtime is the reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from service.backends import embedded as embedded_module  # noqa: E402
from service.backends.embedded import EmbeddedBackend, choose_runtime  # noqa: E402
from service.settings import Settings  # noqa: E402

LABELS = ["opening a valve", "standing up", "pouring water"]


def _settings(cache: Path, **overrides) -> Settings:
    base = dict(backbone="fsar-tiny", pretrained=None, adapter="ted+ma", num_frames=4, demo=True,
                log_level="warning", encode_concurrency=1, onnx_cache_dir=str(cache))
    return Settings(**{**base, **overrides})


def _frames(videos: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(videos, 4, 64, 64, 3), dtype=np.uint8)


def test_choose_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_runtime("auto", "cpu")[0] == "onnxruntime"
    assert choose_runtime("auto", "cuda")[0] == "torch"
    assert choose_runtime("torch", "cpu")[0] == "torch"
    assert choose_runtime("onnxruntime", "cpu")[0] == "onnxruntime"
    monkeypatch.setattr("training.onnx.onnx_available", lambda: False)
    runtime, why = choose_runtime("auto", "cpu")
    assert runtime == "torch" and "not installed" in why
    with pytest.raises(RuntimeError, match="fsar\\[onnx\\]"):
        choose_runtime("onnxruntime", "cpu")


def test_settings_reject_int8_on_torch(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="int8 needs runtime onnxruntime"):
        _settings(tmp_path, runtime="torch", precision="int8")
    assert _settings(tmp_path, runtime="ONNXRuntime", precision="INT8").precision == "int8"


async def test_onnxruntime_matches_torch_and_int8_has_its_own_fingerprint(tmp_path: Path) -> None:
    backends = {name: EmbeddedBackend(_settings(tmp_path, **kw)) for name, kw in {
        "torch": {"runtime": "torch"}, "fp32": {"runtime": "auto"}, "int8": {"runtime": "onnxruntime", "precision": "int8"}}.items()}
    try:
        for backend in backends.values():
            await backend.start()
        info = {name: backend.info() for name, backend in backends.items()}
        assert (info["torch"]["runtime"], info["fp32"]["runtime"], info["int8"]["runtime"]) == (
            "torch", "onnxruntime", "onnxruntime")
        assert (info["fp32"]["precision"], info["int8"]["precision"]) == ("fp32", "int8")
        # fp32 serves the torch model's features: same fingerprint, same caches; int8 does not.
        assert info["fp32"]["fingerprint"] == info["torch"]["fingerprint"] == info["int8"]["model_fingerprint"]
        assert info["int8"]["fingerprint"] != info["torch"]["fingerprint"]
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
            f"{info['torch']['fingerprint']}-fp32", f"{info['torch']['fingerprint']}-int8"]

        texts = {name: await b.encode_texts(LABELS) for name, b in backends.items()}
        frames, support_frames = _frames(2, 1), _frames(3, 2)
        query = {name: await b.encode_videos(frames) for name, b in backends.items()}
        support = {name: await b.encode_videos(support_frames, texts["torch"]) for name, b in backends.items()}
        for got, ref in ((texts["fp32"], texts["torch"]), (query["fp32"], query["torch"]),
                         (support["fp32"], support["torch"])):
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
        dim = query["int8"].shape[-1]
        flat, ref = query["int8"].reshape(-1, dim), query["torch"].reshape(-1, dim)
        cosine = (flat * ref).sum(-1) / (np.linalg.norm(flat, axis=-1) * np.linalg.norm(ref, axis=-1))
        assert cosine.min() > 0.99

        labels = np.arange(3)
        logits = {}
        for name in ("torch", "fp32"):
            prototypes = await backends[name].build_prototypes(support[name], labels, texts[name])
            logits[name] = await backends[name].classify(query[name], prototypes, texts[name])
        np.testing.assert_allclose(logits["fp32"], logits["torch"], rtol=1e-3, atol=1e-3)
        with pytest.raises(ValueError, match="frames must be uint8"):
            await backends["fp32"].encode_videos(_frames(1, 3)[:, :2])
    finally:
        for backend in backends.values():
            await backend.close()


async def test_auto_falls_back_to_torch_when_the_graphs_cannot_be_built(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr("training.onnx.OnnxModelRunner.build", broken)
    backend = EmbeddedBackend(_settings(tmp_path, runtime="auto"))
    try:
        await backend.start()
        assert backend.info()["runtime"] == "torch"
    finally:
        await backend.close()
    strict = EmbeddedBackend(_settings(tmp_path, runtime="onnxruntime"))
    with pytest.raises(RuntimeError, match="exploded"):
        await strict.start()
    await strict.close()
    assert embedded_module.choose_runtime("auto", "cpu")[0] == "onnxruntime"
