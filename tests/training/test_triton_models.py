"""The Triton shells (`training/triton_models/*.py`) imported as modules and run in this process.

A small stand-in replaces `triton_python_backend_utils` (it exists only inside Triton). Each shell is
initialised the way Triton does it, from an exported version folder, and its `execute` must give
exactly what `ModelRunner` gives for the same arrays; the real-server checks are in test_export.py.
"""
from __future__ import annotations

import ast
import sys
import importlib
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch

from training.checkpoint import save_checkpoint
from training.export import MODEL_NAMES, SHELLS_DIR, export_repository
from training.model import ModelConfig, ModelRunner, build_model
from training.triton_models import common

T, SIZE, D = 4, 64, 64
LABELS = ["open valve", "stand up", "wave hand"]


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeError:
    def __init__(self, message: str) -> None:
        self.message = message


class FakeResponse:
    def __init__(self, output_tensors: Optional[List[FakeTensor]] = None, error: Optional[FakeError] = None) -> None:
        self.outputs = {tensor.name: tensor.array for tensor in output_tensors or []}
        self.error = error


class FakeRequest:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = inputs


def fake_pb_utils() -> types.SimpleNamespace:
    """The part of triton_python_backend_utils the shells use."""
    def get_input_tensor_by_name(request: FakeRequest, name: str) -> Optional[FakeTensor]:
        return FakeTensor(name, request.inputs[name]) if name in request.inputs else None

    return types.SimpleNamespace(Tensor=FakeTensor, InferenceResponse=FakeResponse, TritonError=FakeError,
                                 get_input_tensor_by_name=get_input_tensor_by_name)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """The three shells, initialised from a CPU export of a tiny perturbed checkpoint, and a runner on
    the same checkpoint's model."""
    torch.manual_seed(7)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, adapter="ted+ma", num_frames=T,
                                    tpcm_ffn=64, text_adapter_width=16, metric="otam")).eval()
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.05)
    work = tmp_path_factory.mktemp("shells")
    save_checkpoint(work / "tiny.pt", model)
    repository = work / "repo"
    export_repository(work / "tiny.pt", repository, instance_kind="cpu")
    patch = pytest.MonkeyPatch()
    shells = {}
    for name in MODEL_NAMES:
        module = importlib.import_module(f"training.triton_models.{name}")
        patch.setattr(module, "pb_utils", fake_pb_utils())
        shell = module.TritonPythonModel()
        shell.initialize({"model_repository": str(repository / name), "model_version": "1",
                          "model_instance_kind": "CPU", "model_instance_device_id": "0"})
        shells[name] = shell
    yield {"shells": shells, "runner": ModelRunner(model), "repository": repository}
    patch.undo()


def frames(videos: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(videos, T, SIZE, SIZE, 3), dtype=np.uint8)


def test_export_copies_the_shells_verbatim(served) -> None:
    for name in MODEL_NAMES:
        source = (SHELLS_DIR / f"{name}.py").read_text()
        assert (served["repository"] / name / "1" / "model.py").read_text() == source
        tree = ast.parse(source)
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        methods = {node.name for node in classes["TritonPythonModel"].body if isinstance(node, ast.FunctionDef)}
        assert methods == {"initialize", "execute"}


def test_text_and_video_shells_equal_the_runner(served) -> None:
    shells, runner = served["shells"], served["runner"]
    labels = np.array([label.encode() for label in LABELS], dtype=object).reshape(-1, 1)
    responses = shells["text_encoder"].execute([FakeRequest(LABEL=labels[:1]), FakeRequest(LABEL=labels[1:])])
    texts = np.concatenate([response.outputs["TEXT_FEATS"] for response in responses])
    assert np.array_equal(texts, runner.encode_texts(LABELS))
    video = frames(3, seed=1)
    responses = shells["video_encoder"].execute([FakeRequest(FRAMES=video[:2]),
                                                 FakeRequest(FRAMES=video, TEXT_FEATS=texts),
                                                 FakeRequest(FRAMES=video[2:])])
    assert np.array_equal(np.concatenate([responses[0].outputs["FRAME_FEATS"], responses[2].outputs["FRAME_FEATS"]]),
                          runner.encode_videos(video))
    assert np.array_equal(responses[1].outputs["FRAME_FEATS"], runner.encode_videos(video, texts))
    # A bad label fails alone; the request batched with it still gets its features.
    bad, good = shells["text_encoder"].execute([FakeRequest(LABEL=np.array([[b" "]], dtype=object)),
                                                FakeRequest(LABEL=labels[:1])])
    assert bad.error is not None and bad.error.message.startswith("ValueError: ") and "non-empty" in bad.error.message
    assert np.array_equal(good.outputs["TEXT_FEATS"], runner.encode_texts(LABELS[:1]))


def test_fewshot_shell_equals_the_runner(served) -> None:
    shell, runner = served["shells"]["fewshot_head"], served["runner"]
    texts = runner.encode_texts(LABELS)
    labels = np.array([0, 1, 1, 2], dtype=np.int64)
    support = runner.encode_videos(frames(4, seed=2), texts[labels])
    queries = runner.encode_videos(frames(2, seed=3))
    op = lambda name: np.array([name.encode()], dtype=object)  # noqa: E731
    built, hybrid, plain, zero, unknown, missing = shell.execute([
        FakeRequest(OP=op("prototypes"), SUPPORT_FEATS=support, SUPPORT_LABELS=labels, TEXT_FEATS=texts),
        FakeRequest(OP=op("classify"), QUERY_FEATS=queries, PROTOTYPES=runner.build_prototypes(support, labels, texts),
                    TEXT_FEATS=texts),
        FakeRequest(OP=op("classify"), QUERY_FEATS=queries, PROTOTYPES=runner.build_prototypes(support, labels, texts)),
        FakeRequest(OP=op("zero_shot"), QUERY_FEATS=queries, TEXT_FEATS=texts),
        FakeRequest(OP=op("train"), QUERY_FEATS=queries),
        FakeRequest(OP=op("classify"), QUERY_FEATS=queries),
    ])
    prototypes = runner.build_prototypes(support, labels, texts)
    assert np.array_equal(built.outputs["PROTOTYPES"], prototypes)
    assert np.array_equal(hybrid.outputs["LOGITS"], runner.classify(queries, prototypes, texts))
    assert np.array_equal(plain.outputs["LOGITS"], runner.classify(queries, prototypes))
    assert np.array_equal(zero.outputs["LOGITS"], runner.zero_shot(queries, texts))
    assert unknown.error.message == "ValueError: OP must be one of prototypes, classify, zero_shot, explain; got 'train'"
    assert missing.error.message == "ValueError: OP 'classify' needs input(s) PROTOTYPES"


def test_run_merged_isolates_a_failing_request() -> None:
    def double(rows: np.ndarray) -> np.ndarray:
        if (rows < 0).any():
            raise ValueError("negative")
        return rows * 2

    good, bad, other = common.run_merged(double, [(np.array([1, 2]),), (np.array([-1]),), (np.array([3]),)])
    assert good.tolist() == [2, 4] and isinstance(bad, ValueError) and other.tolist() == [6]
    assert common.run_merged(double, []) == []


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_py_of_earlier_exports_still_runs(served, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository exported before the shells moved keeps its old model.py (it imports from training.export)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    source = (Path(__file__).parent / "data" / f"old_{name}_model.py.txt").read_text()
    module = types.ModuleType(f"old_{name}")
    exec(compile(source, f"old_{name}/model.py", "exec"), module.__dict__)
    shell = module.TritonPythonModel()
    shell.initialize({"model_repository": str(served["repository"] / name), "model_version": "1",
                      "model_instance_kind": "CPU"})
    new = served["shells"][name]
    if name == "text_encoder":
        request = FakeRequest(LABEL=np.array([[b"open valve"]], dtype=object))
        key = "TEXT_FEATS"
    elif name == "video_encoder":
        request = FakeRequest(FRAMES=frames(1, seed=9))
        key = "FRAME_FEATS"
    else:
        request = FakeRequest(OP=np.array([b"zero_shot"], dtype=object), QUERY_FEATS=np.ones((1, T, D), np.float32),
                              TEXT_FEATS=np.ones((2, D), np.float32))
        key = "LOGITS"
    (old_response,), (new_response,) = shell.execute([request]), new.execute([request])
    assert np.array_equal(old_response.outputs[key], new_response.outputs[key])
