"""Triton Python-backend model: one fsar encoder graph (``model.onnx`` beside this file) on ONNX Runtime.

``fsar export --layout onnx-python`` copies this file to ``<repository>/<model>/<version>/model.py`` for
``video_encoder``, ``video_encoder_support`` and ``text_tokens_encoder``: the same graphs and tensors as
the ``onnxruntime_onnx`` models of ``--layout onnx``, for a Triton server that has only the Python
backend. The inputs named in the model's config are fed by name; the rows of a dynamic batch run as
one ONNX Runtime call.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List

from training.triton_models.common import float_response, run_merged

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # only inside Triton's Python backend; tests set a stand-in
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: Dict[str, str]) -> None:
        from training.onnx.runner import make_session

        config = json.loads(args["model_config"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.output = config["output"][0]["name"]
        graph = Path(args["model_repository"]) / str(args["model_version"]) / "model.onnx"
        threads = int(os.environ.get("FSAR_ONNX_THREADS", "0") or 0) or (os.cpu_count() or 1)
        self.session = make_session(graph, threads)

    def execute(self, requests: List[Any]) -> List[Any]:
        # the config's inputs, [b, ...] each -> the config's one output [b, ...]; one call for the batch
        parts = [tuple(pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs)
                 for request in requests]
        results = run_merged(lambda *arrays: self.session.run([self.output], dict(zip(self.inputs, arrays)))[0],
                             parts)
        return [float_response(pb_utils, {self.output: result}) for result in results]
