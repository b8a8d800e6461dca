"""The fsar encoders as ONNX graphs: export, int8 quantisation, an on-disk cache, an ONNX Runtime runner.

:mod:`training.onnx.graphs` exports; :mod:`training.onnx.cache` builds graphs once per model fingerprint
and precision; :class:`OnnxModelRunner` is the :class:`training.model.ModelRunner` whose encoders run
on ONNX Runtime. Importing this package does not import onnx or onnxruntime.
"""
from training.onnx.cache import PRECISIONS, default_cache_dir, ensure_graphs, serving_fingerprint
from training.onnx.graphs import GRAPHS, OPSET, export_graph, quantize_int8
from training.onnx.runner import OnnxModelRunner, make_session


def onnx_available() -> bool:
    """Whether ONNX Runtime and the exporter's dependencies (onnx, onnxscript) are importable."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


__all__ = ["GRAPHS", "OPSET", "PRECISIONS", "OnnxModelRunner", "default_cache_dir", "ensure_graphs", "export_graph",
           "make_session", "onnx_available", "quantize_int8", "serving_fingerprint"]
