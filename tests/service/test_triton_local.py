"""The bundled Triton server runs here: Python-backend models load, batch and infer over gRPC."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient

from service.triton_local import LocalTritonServer, TritonStartError
from tests.triton_util import require_triton_platform, start_triton, write_python_model

REPO_ROOT = Path(__file__).resolve().parents[2]

# Doubles X and reports how many requests dynamic batching merged into this execute() call.
SCALE_CONFIG = """
    name: "scale"
    backend: "python"
    max_batch_size: 16
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] } ]
    output [
      { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] },
      { name: "MERGED" data_type: TYPE_INT32 dims: [ 1 ] }
    ]
    dynamic_batching { max_queue_delay_microseconds: 300000 }
    instance_group [ { kind: KIND_CPU count: 1 } ]
"""
SCALE_MODEL = """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            merged = np.full((1, 1), len(requests), dtype=np.int32)
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()  # [B, 3]
                merged_rows = np.repeat(merged, x.shape[0], axis=0)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("Y", (x * 2.0).astype(np.float32)),
                    pb_utils.Tensor("MERGED", merged_rows),
                ]))
            return responses
"""

# Imports torch, open_clip and this repository's `training` package inside the stub.
TORCH_CONFIG = """
    name: "torch_probe"
    backend: "python"
    max_batch_size: 0
    input [
      { name: "X" data_type: TYPE_FP32 dims: [ -1, -1 ] },
      { name: "LABEL" data_type: TYPE_STRING dims: [ 1 ] }
    ]
    output [
      { name: "PROBS" data_type: TYPE_FP32 dims: [ -1, -1 ] },
      { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }
    ]
    instance_group [ { kind: KIND_CPU count: 1 } ]
"""
TORCH_MODEL = """
    import json

    import numpy as np
    import open_clip
    import torch
    import training
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "X").as_numpy())
                label = pb_utils.get_input_tensor_by_name(request, "LABEL").as_numpy()[0].decode()
                probs = torch.softmax(x, dim=-1).numpy()
                info = json.dumps({
                    "numpy": np.__version__, "torch": torch.__version__,
                    "open_clip": open_clip.__version__,
                    "training": list(training.__path__)[0], "label": label.upper(),
                })
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("PROBS", probs.astype(np.float32)),
                    pb_utils.Tensor("INFO", np.array([info.encode()], dtype=object)),
                ]))
            return responses
"""


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("triton_repo")
    write_python_model(repo, "scale", SCALE_CONFIG, SCALE_MODEL)
    write_python_model(repo, "torch_probe", TORCH_CONFIG, TORCH_MODEL)
    with start_triton(repo) as server:
        yield server


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


async def test_models_ready_and_metadata(triton: LocalTritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        assert await client.is_server_ready()
        for name in ("scale", "torch_probe"):
            assert await client.is_model_ready(name)
        config = (await client.get_model_config("scale", as_json=True))["config"]
        assert int(config["max_batch_size"]) == 16
        assert config["instance_group"][0]["kind"] == "KIND_CPU"
    finally:
        await client.close()


async def test_dynamic_batching_merges_concurrent_requests(triton: LocalTritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    rows = [np.arange(3, dtype=np.float32)[None] + 10 * i for i in range(8)]  # 8 x [1, 3]
    try:
        results = await asyncio.gather(*[
            client.infer("scale", [_input("X", row, "FP32")]) for row in rows
        ])
    finally:
        await client.close()
    for row, result in zip(rows, results):
        np.testing.assert_array_equal(result.as_numpy("Y"), row * 2.0)
    merged = [int(result.as_numpy("MERGED")[0, 0]) for result in results]
    # Sent together with a 300 ms queue delay: the scheduler hands several to one execute().
    assert max(merged) > 1, merged


async def test_batched_request_keeps_rows_in_order(triton: LocalTritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    batch = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    try:
        result = await client.infer("scale", [_input("X", batch, "FP32")])
    finally:
        await client.close()
    np.testing.assert_allclose(result.as_numpy("Y"), batch * 2.0, rtol=0, atol=0)


async def test_model_importing_torch_open_clip_and_training(triton: LocalTritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    logits = np.random.default_rng(1).normal(size=(4, 7)).astype(np.float32)
    label = np.array(["opens the valve".encode()], dtype=object)
    try:
        result = await client.infer("torch_probe", [_input("X", logits, "FP32"),
                                                    _input("LABEL", label, "BYTES")])
    finally:
        await client.close()
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(result.as_numpy("PROBS"), expected, rtol=1e-5, atol=1e-6)
    info = json.loads(result.as_numpy("INFO")[0])
    assert info["label"] == "OPENS THE VALVE"
    assert int(info["numpy"].split(".")[0]) < 2  # the stub environment's NumPy, see triton_local
    assert info["torch"] and info["open_clip"]
    assert Path(info["training"]).resolve() == (REPO_ROOT / "training").resolve()


def test_broken_model_fails_start_with_log_tail(tmp_path: Path) -> None:
    require_triton_platform()
    write_python_model(tmp_path, "broken", SCALE_CONFIG.replace('"scale"', '"broken"'),
                       "import no_such_module_for_fsar\n")
    server = LocalTritonServer(tmp_path)
    with pytest.raises(TritonStartError, match="no_such_module_for_fsar"):
        server.start()
    assert not server.running


def test_stop_leaves_no_process(triton: LocalTritonServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_python_model(repo, "scale", SCALE_CONFIG, SCALE_MODEL)
    with start_triton(repo) as server:
        pid = server.pid  # the process group leader; stubs share its group
        assert server.grpc_url != triton.grpc_url
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
