"""Triton Python-backend model: fsar's few-shot head (TPCM + temporal metric), one episode a request.

``fsar export`` copies this file to ``<repository>/fewshot_head/<version>/model.py`` (its source is
``training/triton_models/fewshot_head.py``). OP BYTES ``[1]`` names the op; the inputs each op takes
are listed in ``training.triton_models.common.FEWSHOT_OPS`` and ``config.pbtxt``.
"""
from typing import Any, Dict, List

from training.triton_models.common import (FEWSHOT_INPUTS, decode_strings, error_response, fewshot_op,
                                           float_response, load_runner)

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # only inside Triton's Python backend; tests set a stand-in
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: Dict[str, str]) -> None:
        self.runner = load_runner(args)

    def execute(self, requests: List[Any]) -> List[Any]:
        responses = []
        for request in requests:
            try:
                op = decode_strings(pb_utils.get_input_tensor_by_name(request, "OP").as_numpy())[0]
                inputs = {}
                for name in FEWSHOT_INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    inputs[name] = None if tensor is None else tensor.as_numpy()
                outputs = fewshot_op(self.runner, op, inputs)
            except Exception as err:  # the message goes back to the client
                responses.append(error_response(pb_utils, err))
                continue
            responses.append(float_response(pb_utils, outputs))
        return responses
