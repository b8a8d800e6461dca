"""ONNX graphs of the encoders against the torch model they are exported from.

For every adapter type (none, ted, ma, ted+ma) a tiny model with perturbed adapters (a training state,
not the identity of initialisation) is exported and run by ONNX Runtime: video features (query and
support branch, batches of 1 and 3) and text features must match torch within 1e-4 relative; once for
ViT-B-32 with random weights (one small batch). int8 graphs: close (cosine), their own fingerprint,
built once per fingerprint and then read from the cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from training.model import FsarModel, ModelConfig, build_model  # noqa: E402
from training.model.runner import ModelRunner  # noqa: E402
from training.onnx import OnnxModelRunner, ensure_graphs, serving_fingerprint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RTOL = 1e-4
LABELS = ["opening a valve", "standing up", "pouring water"]


def _model(adapter: str, backbone: str = "fsar-tiny", seed: int = 3) -> FsarModel:
    """A model with random weights whose trainable tensors are perturbed (a mid-training state)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone=backbone, pretrained=None, adapter=adapter, num_frames=8)).eval()
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _frames(model: FsarModel, videos: int, seed: int) -> np.ndarray:
    height, width = model.image_size
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(videos, model.num_frames, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One graph cache for the module: tests on the same model reuse its graphs, as a restart would."""
    return tmp_path_factory.mktemp("onnx-cache")


def _relative(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _cosine_min(out: np.ndarray, ref: np.ndarray) -> float:
    a, b = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


@pytest.mark.parametrize("adapter", ["none", "ted", "ma", "ted+ma"])
def test_fp32_graphs_match_torch(adapter: str, cache: Path) -> None:
    model = _model(adapter)
    torch_runner = ModelRunner(model)
    onnx_runner = OnnxModelRunner.build(model, "fp32", threads=1, cache_dir=cache)
    assert onnx_runner.fingerprint == model.fingerprint()  # fp32 features are the model's own
    texts = torch_runner.encode_texts(LABELS)
    np.testing.assert_array_less(_relative(onnx_runner.encode_texts(LABELS), texts), RTOL)
    for videos, seed in ((1, 1), (3, 2)):
        frames = _frames(model, videos, seed)
        query = torch_runner.encode_videos(frames)
        assert _relative(onnx_runner.encode_videos(frames), query) < RTOL
        support_texts = texts[np.arange(videos) % len(LABELS)]
        support = torch_runner.encode_videos(frames, support_texts)
        got = onnx_runner.encode_videos(frames, support_texts)
        assert got.shape == (videos, model.num_frames, model.embed_dim) and got.dtype == np.float32
        assert _relative(got, support) < RTOL
        if "ma" in adapter:  # the label text reaches the features through the MA adapters
            assert np.abs(support - query).max() > 1e-3


def test_int8_graphs_are_close_have_their_own_fingerprint_and_are_cached(cache: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("ted+ma")
    runner = OnnxModelRunner.build(model, "int8", threads=1, cache_dir=cache)
    fingerprint = model.fingerprint()
    assert runner.fingerprint == serving_fingerprint(fingerprint, "int8") != fingerprint
    assert sorted(p.name for p in (cache / f"{fingerprint}-int8").glob("*.onnx")) == [
        "text.onnx", "video_query.onnx", "video_support.onnx"]
    frames = _frames(model, 2, 4)
    reference = ModelRunner(model).encode_videos(frames)
    assert _cosine_min(runner.encode_videos(frames), reference) > 0.99
    # A second build (another process, a restart) reuses the files: nothing is exported again.
    monkeypatch.setattr("training.onnx.cache.export_graph", lambda *a, **k: pytest.fail("re-exported"))
    monkeypatch.setattr("training.onnx.cache.quantize_int8", lambda *a, **k: pytest.fail("re-quantised"))
    again = ensure_graphs(model, "int8", cache)
    assert again == runner.graphs


def test_bad_inputs_are_value_errors(cache: Path) -> None:
    model = _model("ma")
    runner = OnnxModelRunner.build(model, "fp32", threads=1, cache_dir=cache)
    with pytest.raises(ValueError, match="frames must be uint8"):
        runner.encode_videos(_frames(model, 1, 0)[:, :4])
    with pytest.raises(ValueError, match="frames must be uint8"):
        runner.encode_videos(_frames(model, 1, 0).astype(np.float32))
    with pytest.raises(ValueError, match="texts must be"):
        runner.encode_videos(_frames(model, 2, 0), np.zeros((1, model.embed_dim), np.float32))
    with pytest.raises(ValueError, match="precision"):
        ensure_graphs(model, "fp16", cache)


@pytest.mark.slow
def test_vit_b32_fp32_graph_matches_torch(tmp_path: Path) -> None:
    model = _model("ted", backbone="ViT-B-32")
    graph = ensure_graphs(model, "fp32", tmp_path, graphs=["video_query"])
    runner = OnnxModelRunner(model, graph, "fp32", threads=2)
    frames = _frames(model, 1, 7)
    assert _relative(runner.encode_videos(frames), ModelRunner(model).encode_videos(frames)) < RTOL


# ---------------------------------------------------------------------- Triton layouts
def _export(tmp_path: Path, layout: str, **kwargs):
    from training.checkpoint import save_checkpoint
    from training.export import export_repository

    model = _model("ted+ma")
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, model)
    repository = tmp_path / f"repo-{layout}"
    summary = export_repository(checkpoint, repository, layout=layout, max_batch_size=8, queue_delay_us=1000,
                                **kwargs)
    return model, repository, summary


def test_onnx_layout_configs_run_without_python(tmp_path: Path) -> None:
    from training.export import ExportError, export_repository

    model, repository, summary = _export(tmp_path, "onnx", instance_kind="gpu", tensorrt_fp16=True)
    assert summary["layout"] == "onnx"
    for name in ("video_encoder", "video_encoder_support", "text_tokens_encoder"):
        config = (repository / name / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in config and 'backend: "python"' not in config
        assert "dynamic_batching { max_queue_delay_microseconds: 1000 }" in config and "max_batch_size: 8" in config
        assert 'name: "tensorrt"' in config and '"precision_mode" value: "FP16"' in config
        assert '"fsar_layout" value: { string_value: "onnx" }' in config
        assert (repository / name / "1" / "model.onnx").is_file()
        assert not (repository / name / "1" / "model.py").exists()
    assert 'name: "TEXT_FEATS" data_type: TYPE_FP32 dims: [ 64 ]' in (
        repository / "video_encoder_support" / "config.pbtxt").read_text()
    assert 'name: "TOKENS" data_type: TYPE_INT64 dims: [ 77 ]' in (
        repository / "text_tokens_encoder" / "config.pbtxt").read_text()
    for name in ("text_encoder", "fewshot_head"):
        config = (repository / name / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and '"fsar_layout"' in config
    with pytest.raises(ExportError, match="tensorrt_fp16"):
        export_repository(tmp_path / "tiny.pt", tmp_path / "x", layout="onnx-python", tensorrt_fp16=True)
    with pytest.raises(ExportError, match="layout"):
        export_repository(tmp_path / "tiny.pt", tmp_path / "x", layout="tensorrt")


async def test_onnx_python_layout_on_a_real_triton_server_matches_torch(tmp_path: Path) -> None:
    import tritonclient.grpc.aio as grpcclient

    from tests.triton_util import start_triton

    model, repository, _ = _export(tmp_path, "onnx-python", instance_kind="cpu")
    config = (repository / "video_encoder" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and '"fsar_layout" value: { string_value: "onnx-python" }' in config
    runner = ModelRunner(model)
    frames = _frames(model, 3, 5)
    texts = runner.encode_texts(LABELS)
    tokens = model.tokenize(LABELS).numpy().astype(np.int64)
    expected = {"video_encoder": runner.encode_videos(frames),
                "video_encoder_support": runner.encode_videos(frames, texts), "text_tokens_encoder": texts}

    def tensor(name: str, array: np.ndarray, datatype: str):
        item = grpcclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        return item

    from service.backends.triton import TritonBackend
    from service.settings import Settings

    with start_triton(repository) as server:  # the whole repository, as the gateway serves it
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:  # each ONNX-in-Python model on its own, over raw gRPC
            calls = {
                "video_encoder": ([tensor("FRAMES", frames, "UINT8")], "FRAME_FEATS"),
                "video_encoder_support": ([tensor("FRAMES", frames, "UINT8"), tensor("TEXT_FEATS", texts, "FP32")],
                                          "FRAME_FEATS"),
                "text_tokens_encoder": ([tensor("TOKENS", tokens, "INT64")], "TEXT_FEATS"),
            }
            for name, (inputs, output) in calls.items():
                result = await client.infer(name, inputs, outputs=[grpcclient.InferRequestedOutput(output)])
                assert _relative(result.as_numpy(output), expected[name]) < RTOL, name
        finally:
            await client.close()

        # The gateway's Triton backend on the same server: support videos go to video_encoder_support.
        backend = TritonBackend(Settings(backend="triton", triton_url=server.grpc_url, triton_timeout_s=60.0))
        await backend.start()
        try:
            assert _relative(await backend.encode_videos(frames, texts), expected["video_encoder_support"]) < RTOL
            assert _relative(await backend.encode_videos(frames), expected["video_encoder"]) < RTOL
        finally:
            await backend.close()
