"""Triton Python-backend model: fsar's text encoder.

``fsar export`` copies this file to ``<repository>/text_encoder/<version>/model.py`` (its source is
``training/triton_models/text_encoder.py``). LABEL BYTES ``[B, 1]`` -> TEXT_FEATS FP32 ``[B, D]``.
"""
from typing import Any, Dict, List

from training.triton_models.common import decode_strings, float_response, load_runner, run_merged

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # only inside Triton's Python backend; tests set a stand-in
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: Dict[str, str]) -> None:
        self.runner = load_runner(args)

    def execute(self, requests: List[Any]) -> List[Any]:
        # LABEL: BYTES [b, 1] per request -> TEXT_FEATS: FP32 [b, D]; one model call for the batch
        labels = [(pb_utils.get_input_tensor_by_name(request, "LABEL").as_numpy(),) for request in requests]
        results = run_merged(lambda batch: self.runner.encode_texts(decode_strings(batch)), labels)
        return [float_response(pb_utils, {"TEXT_FEATS": result}) for result in results]
