"""Triton Python backend shell for fsar's video_encoder (written by `fsar export`; do not edit).

initialize loads the checkpoint beside this file through training.checkpoint; execute converts
Triton tensors to numpy and calls training.export's runtime functions. No model math here.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from training.export import encode_videos, load_exported_model, run_merged


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
        # FRAMES: UINT8 [b, T, H, W, 3] (+ TEXT_FEATS: FP32 [b, D] for support videos) -> FRAME_FEATS: FP32 [b, T, D]
        queries, supports = [], []
        for index, request in enumerate(requests):
            frames = pb_utils.get_input_tensor_by_name(request, "FRAMES").as_numpy()
            text = pb_utils.get_input_tensor_by_name(request, "TEXT_FEATS")
            if text is None:
                queries.append((index, (frames,)))
            else:
                supports.append((index, (frames, text.as_numpy())))
        results = [None] * len(requests)
        for group in (queries, supports):
            outputs = run_merged(lambda *batch: encode_videos(self.model, *batch), [parts for _, parts in group])
            for (index, _), output in zip(group, outputs):
                results[index] = output
        return [_respond("FRAME_FEATS", result) for result in results]
