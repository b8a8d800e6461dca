"""Triton Python backend shell for fsar's text_encoder (written by `fsar export`; do not edit).

initialize loads the checkpoint beside this file through training.checkpoint; execute converts
Triton tensors to numpy and calls training.export's runtime functions. No model math here.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from training.export import encode_texts, load_exported_model, run_merged


def _error(err):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(err).__name__}: {err}"))


def _respond(name, result):
    if isinstance(result, Exception):
        return _error(result)
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(result, dtype=np.float32))])


class TritonPythonModel:
    def initialize(self, args):
        self.model = load_exported_model(args)

    def execute(self, requests):
        # LABEL: BYTES [b, 1] per request -> TEXT_FEATS: FP32 [b, D]
        labels = [(pb_utils.get_input_tensor_by_name(request, "LABEL").as_numpy(),) for request in requests]
        results = run_merged(lambda batch: encode_texts(self.model, batch), labels)
        return [_respond("TEXT_FEATS", result) for result in results]
