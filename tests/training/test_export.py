"""Export to a Triton model repository, served by a REAL Triton server (CPU instances).

One tiny model with non-identity adapters and TPCM is exported once; one server runs for the
module. Every Triton output is compared with the same model run in this process.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from training.checkpoint import record_calibration, record_open_set, save_checkpoint
from training.export import (CHECKPOINT_FILE, METADATA_FILE, MODEL_NAMES, ExportError, export_repository,
                             write_placeholder_repository)
from training.model import FsarModel, ModelConfig, build_model
from training.triton_models.common import load_runner
from tests.triton_util import start_triton

REPO_ROOT = Path(__file__).resolve().parents[2]
T, SIZE = 8, 64  # fsar-tiny: 64 px input, D = 64
LABELS = ["opening a valve", "standing up", "pouring water"]
ATOL = 1e-4


def _tiny_model() -> FsarModel:
    """fsar-tiny with TED + MA adapters, TPCM and OTAM; every trainable tensor perturbed."""
    torch.manual_seed(3)
    config = ModelConfig(backbone="fsar-tiny", pretrained=None, adapter="ted+ma", num_frames=T,
                         tpcm_ffn=128, text_adapter_width=32, metric="otam")
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


OPEN_SET_RECORD = {"default_thresholds": {"distance": 0.4321, "msp": 0.5, "margin": 0.6}, "score": "distance",
                   "accept": 0.95, "split": "val", "way": 5, "shot": 1, "query": 1, "episodes": 10, "seed": 1}
CALIBRATION_RECORD = {"temperature": 7.5, "split": "val", "way": 5, "shot": 1, "episodes": 10, "seed": 1}


def _frames(videos: int, seed: int) -> np.ndarray:
    """uint8 [B, T, 64, 64, 3]: noise with a bright square moving over time."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 200, size=(videos, T, SIZE, SIZE, 3), dtype=np.uint8)
    for video in range(videos):
        for t in range(T):
            top = (5 * t + 9 * video) % (SIZE - 12)
            frames[video, t, top:top + 12, 4 * t:4 * t + 12] = 255
    return frames


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """(model, checkpoint path, checkpoint hash, repository, export summary, running server)."""
    work = tmp_path_factory.mktemp("export")
    model = _tiny_model()
    checkpoint = work / "tiny.pt"
    checkpoint_hash = save_checkpoint(checkpoint, model, step=5, metrics={"val_acc": np.float32(40.0)})
    record_open_set(checkpoint, OPEN_SET_RECORD)  # as `fsar eval --open-set --record` does
    record_calibration(checkpoint, CALIBRATION_RECORD)  # as `fsar eval --calibrate --record` does
    repository = work / "model_repository"
    summary = export_repository(checkpoint, repository, version=1, instance_kind="cpu",
                                max_batch_size=8, queue_delay_us=20000)
    with start_triton(repository) as server:
        yield {"model": model, "checkpoint": checkpoint, "hash": checkpoint_hash, "repository": repository,
               "summary": summary, "server": server}


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _bytes(values) -> np.ndarray:
    return np.array([value.encode() for value in values], dtype=object)


async def _fewshot(client: grpcclient.InferenceServerClient, op: str, **inputs: np.ndarray) -> Dict[str, np.ndarray]:
    tensors = [_input("OP", _bytes([op]), "BYTES")]
    for name, array in inputs.items():
        datatype = "INT64" if array.dtype == np.int64 else "FP32"
        tensors.append(_input(name, array, datatype))
    output = "PROTOTYPES" if op == "prototypes" else "LOGITS"
    result = await client.infer("fewshot_head", tensors, outputs=[grpcclient.InferRequestedOutput(output)])
    return {output: result.as_numpy(output)}


def test_export_writes_versioned_models_with_checkpoint_and_metadata(exported) -> None:
    repository, summary = exported["repository"], exported["summary"]
    assert summary["checkpoint_hash"] == exported["hash"]
    assert (summary["embed_dim"], summary["num_frames"], summary["image_size"]) == (64, T, SIZE)
    source_bytes = exported["checkpoint"].read_bytes()
    for name in MODEL_NAMES:
        version_dir = repository / name / "1"
        assert (version_dir / CHECKPOINT_FILE).read_bytes() == source_bytes
        record = json.loads((version_dir / METADATA_FILE).read_text())
        assert record["checkpoint_hash"] == exported["hash"] and record["model"] == name
        config = (repository / name / "config.pbtxt").read_text()
        assert "KIND_CPU" in config and exported["hash"] in config
    video_config = (repository / "video_encoder" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in video_config and "max_queue_delay_microseconds: 20000" in video_config
    assert f"dims: [ {T}, {SIZE}, {SIZE}, 3 ]" in video_config


async def test_triton_reports_model_facts_in_config_parameters(exported) -> None:
    client = grpcclient.InferenceServerClient(exported["server"].grpc_url)
    try:
        for name in MODEL_NAMES:
            assert await client.is_model_ready(name)
        config = (await client.get_model_config("video_encoder", as_json=True))["config"]
    finally:
        await client.close()
    # Protobuf JSON leaves out empty strings (e.g. fsar_pretrained of a random backbone).
    params = {key: value.get("string_value", "") for key, value in config["parameters"].items()}
    assert params["fsar_checkpoint_hash"] == exported["hash"]
    assert params["fsar_fingerprint"] == exported["model"].fingerprint()
    assert (params["fsar_backbone"], params["fsar_adapter"], params["fsar_metric"]) == ("fsar-tiny", "ted+ma", "otam")
    assert json.loads(params["fsar_model_config"]) == exported["model"].config.to_dict()
    assert json.loads(params["fsar_open_set"]) == OPEN_SET_RECORD
    assert json.loads(params["fsar_calibration"]) == CALIBRATION_RECORD


async def test_gateway_behind_triton_reads_the_recorded_open_set_thresholds_and_temperature(exported) -> None:
    from service.backends.triton import TritonBackend
    from service.settings import Settings

    backend = TritonBackend(Settings(backend="triton", triton_url=exported["server"].grpc_url, triton_timeout_s=30))
    await backend.start()
    try:
        info = backend.info()
    finally:
        await backend.close()
    assert info["fingerprint"] == exported["model"].fingerprint()
    # The same record the embedded backend reads from the checkpoint: calibration uses it, not the defaults.
    assert info["open_set"] == OPEN_SET_RECORD
    assert info["calibration"] == CALIBRATION_RECORD  # the gateway tempers few-shot answers with it


async def test_text_features_match_in_process(exported) -> None:
    client = grpcclient.InferenceServerClient(exported["server"].grpc_url)
    try:
        result = await client.infer("text_encoder", [_input("LABEL", _bytes(LABELS).reshape(-1, 1), "BYTES")])
    finally:
        await client.close()
    with torch.inference_mode():
        expected = exported["model"].encode_text(LABELS).numpy()
    np.testing.assert_allclose(result.as_numpy("TEXT_FEATS"), expected, atol=ATOL, rtol=0)


async def test_frame_features_with_and_without_support_text_match(exported) -> None:
    model = exported["model"]
    frames = _frames(4, seed=1)
    with torch.inference_mode():
        text_feats = model.encode_text(LABELS[:2] * 2)  # [4, D]
        expected_query = model.encode_video(torch.from_numpy(frames)).numpy()
        expected_support = model.encode_video(torch.from_numpy(frames), texts=text_feats).numpy()
    # The MA adapters make the support text matter; otherwise this test would prove little.
    assert np.abs(expected_support - expected_query).max() > 1e-3
    client = grpcclient.InferenceServerClient(exported["server"].grpc_url)
    try:
        # Concurrent single-video requests (batched by Triton) plus one 2-video request, both kinds.
        calls = [client.infer("video_encoder", [_input("FRAMES", frames[i:i + 1], "UINT8")]) for i in range(4)]
        calls += [client.infer("video_encoder", [_input("FRAMES", frames[i:i + 1], "UINT8"),
                                                 _input("TEXT_FEATS", text_feats[i:i + 1].numpy(), "FP32")])
                  for i in range(4)]
        calls.append(client.infer("video_encoder", [_input("FRAMES", frames[:2], "UINT8")]))
        results = await asyncio.gather(*calls)
    finally:
        await client.close()
    got = [result.as_numpy("FRAME_FEATS") for result in results]
    np.testing.assert_allclose(np.concatenate(got[:4]), expected_query, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.concatenate(got[4:8]), expected_support, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[8], expected_query[:2], atol=ATOL, rtol=0)


async def test_prototypes_and_logits_match_in_process(exported) -> None:
    model = exported["model"]
    support_labels = np.array([0, 0, 1, 2, 2], dtype=np.int64)
    with torch.inference_mode():
        text_feats = model.encode_text(LABELS)  # [3, D]
        support = model.encode_video(torch.from_numpy(_frames(5, seed=2)), texts=text_feats[support_labels])
        queries = model.encode_video(torch.from_numpy(_frames(3, seed=3)))
        prototypes = model.build_prototypes(support, torch.from_numpy(support_labels), text_feats)
        expected = {
            "prototypes": prototypes.numpy(),
            "hybrid": model.classify(queries, prototypes, text_feats).numpy(),
            "fewshot": model.classify(queries, prototypes).numpy(),
            "zero_shot": model.zero_shot(queries, text_feats).numpy(),
        }
        plain_means = torch.stack([support[support_labels == c].mean(0) for c in range(3)]).numpy()
    assert np.abs(expected["prototypes"] - plain_means).max() > 1e-3  # TPCM is not an identity here
    text, support_np, queries_np = text_feats.numpy(), support.numpy(), queries.numpy()
    client = grpcclient.InferenceServerClient(exported["server"].grpc_url)
    try:
        built = await _fewshot(client, "prototypes", SUPPORT_FEATS=support_np, SUPPORT_LABELS=support_labels,
                               TEXT_FEATS=text)
        hybrid = await _fewshot(client, "classify", QUERY_FEATS=queries_np, PROTOTYPES=built["PROTOTYPES"],
                                TEXT_FEATS=text)
        fewshot = await _fewshot(client, "classify", QUERY_FEATS=queries_np, PROTOTYPES=built["PROTOTYPES"])
        zero_shot = await _fewshot(client, "zero_shot", QUERY_FEATS=queries_np, TEXT_FEATS=text)
    finally:
        await client.close()
    np.testing.assert_allclose(built["PROTOTYPES"], expected["prototypes"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(hybrid["LOGITS"], expected["hybrid"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(fewshot["LOGITS"], expected["fewshot"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(zero_shot["LOGITS"], expected["zero_shot"], atol=ATOL, rtol=0)


async def test_bad_requests_get_clear_errors(exported) -> None:
    client = grpcclient.InferenceServerClient(exported["server"].grpc_url)
    queries = np.zeros((1, T, 64), dtype=np.float32)
    try:
        with pytest.raises(InferenceServerException, match="OP must be one of prototypes, classify, zero_shot"):
            await _fewshot(client, "train", QUERY_FEATS=queries)
        with pytest.raises(InferenceServerException, match="needs input.*PROTOTYPES"):
            await _fewshot(client, "classify", QUERY_FEATS=queries)
        with pytest.raises(InferenceServerException, match="support_labels must lie in"):
            await _fewshot(client, "prototypes", SUPPORT_FEATS=np.zeros((2, T, 64), np.float32),
                           SUPPORT_LABELS=np.array([0, 5], np.int64), TEXT_FEATS=np.zeros((2, 64), np.float32))
        # An empty label fails alone; a valid request batched with it still gets its features.
        bad = client.infer("text_encoder", [_input("LABEL", _bytes([" "]).reshape(-1, 1), "BYTES")])
        good = client.infer("text_encoder", [_input("LABEL", _bytes(LABELS[:1]).reshape(-1, 1), "BYTES")])
        bad_result, good_result = await asyncio.gather(bad, good, return_exceptions=True)
    finally:
        await client.close()
    assert isinstance(bad_result, InferenceServerException) and "non-empty" in str(bad_result)
    with torch.inference_mode():
        expected = exported["model"].encode_text(LABELS[:1]).numpy()
    np.testing.assert_allclose(good_result.as_numpy("TEXT_FEATS"), expected, atol=ATOL, rtol=0)


def test_export_rejects_bad_arguments(exported, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="instance_kind"):
        export_repository(exported["checkpoint"], tmp_path, instance_kind="tpu")
    with pytest.raises(ExportError, match="version"):
        export_repository(exported["checkpoint"], tmp_path, version=0)
    with pytest.raises(ExportError, match="max_batch_size"):
        export_repository(exported["checkpoint"], tmp_path, max_batch_size=0)


def test_placeholder_repository_matches_checked_in_and_refuses_to_load(tmp_path: Path) -> None:
    write_placeholder_repository(tmp_path)
    checked_in = REPO_ROOT / "model_repository"
    for name in MODEL_NAMES:
        for relative in ("config.pbtxt", "1/model.py"):
            assert (tmp_path / name / relative).read_text() == (checked_in / name / relative).read_text(), \
                f"model_repository/{name}/{relative} is stale: regenerate it (model_repository/README.md)"
        assert not (checked_in / name / "1" / CHECKPOINT_FILE).exists()
    args = {"model_repository": str(checked_in / "video_encoder"), "model_version": "1",
            "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    with pytest.raises(FileNotFoundError, match="fsar export --checkpoint"):
        load_runner(args)
