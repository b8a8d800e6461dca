"""Triton Python backend shell for fsar's fewshot_head (written by `fsar export`; do not edit).

initialize loads the checkpoint beside this file through training.checkpoint; execute converts
Triton tensors to numpy and calls training.export's runtime functions. No model math here.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from training.export import fewshot_op, load_exported_model


def _error(err):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(err).__name__}: {err}"))


def _respond(name, result):
    if isinstance(result, Exception):
        return _error(result)
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(result, dtype=np.float32))])


class TritonPythonModel:
    def initialize(self, args):
        self.model = load_exported_model(args)

    _INPUTS = ("SUPPORT_FEATS", "SUPPORT_LABELS", "TEXT_FEATS", "QUERY_FEATS", "PROTOTYPES")

    def execute(self, requests):
        # One episode per request; see config.pbtxt for the inputs each OP takes.
        responses = []
        for request in requests:
            try:
                op = pb_utils.get_input_tensor_by_name(request, "OP").as_numpy().reshape(-1)[0]
                op = op.decode("utf-8") if isinstance(op, bytes) else str(op)
                inputs = {}
                for name in self._INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    inputs[name] = None if tensor is None else tensor.as_numpy()
                outputs = fewshot_op(self.model, op, inputs)
            except Exception as err:  # the message goes back to the client
                responses.append(_error(err))
                continue
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=np.float32)) for name, value in outputs.items()]))
        return responses
