"""Triton Python-backend model: fsar's video encoder.

``fsar export`` copies this file to ``<repository>/video_encoder/<version>/model.py`` (its source is
``training/triton_models/video_encoder.py``). FRAMES UINT8 ``[B, T, H, W, 3]`` (+ TEXT_FEATS FP32
``[B, D]`` for support videos) -> FRAME_FEATS FP32 ``[B, T, D]``.
"""
from typing import Any, Dict, List

from training.triton_models.common import float_response, load_runner, run_merged

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # only inside Triton's Python backend; tests set a stand-in
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: Dict[str, str]) -> None:
        self.runner = load_runner(args)

    def execute(self, requests: List[Any]) -> List[Any]:
        # FRAMES: UINT8 [b, T, H, W, 3] (+ TEXT_FEATS: FP32 [b, D]) -> FRAME_FEATS: FP32 [b, T, D];
        # one model call for the queries of the batch, one for its support videos
        queries, supports = [], []
        for index, request in enumerate(requests):
            frames = pb_utils.get_input_tensor_by_name(request, "FRAMES").as_numpy()
            text = pb_utils.get_input_tensor_by_name(request, "TEXT_FEATS")
            if text is None:
                queries.append((index, (frames,)))
            else:
                supports.append((index, (frames, text.as_numpy())))
        results: List[Any] = [None] * len(requests)
        for group in (queries, supports):
            outputs = run_merged(self.runner.encode_videos, [parts for _, parts in group])
            for (index, _), output in zip(group, outputs):
                results[index] = output
        return [float_response(pb_utils, {"FRAME_FEATS": result}) for result in results]
