"""What the three Triton shells share: loading, merging a dynamic batch, the head's ops, responses.

Imports no Triton module: the shells pass ``triton_python_backend_utils`` in where a response is
built, so this module (and the shells, which import that module only when Triton provides it) can
be imported and tested anywhere.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from training.model.runner import ModelRunner

#: File names inside ``<repository>/<model>/<version>/`` (written by ``training.export``).
CHECKPOINT_FILE = "checkpoint.pt"
#: Environment variable of the Triton server: a tag or local file with the checkpoint's backbone weights.
PRETRAINED_ENV = "FSAR_PRETRAINED"
#: Few-shot head ops -> the inputs each needs (see ``training/export.py`` for shapes).
FEWSHOT_OPS: Dict[str, Tuple[str, ...]] = {
    "prototypes": ("SUPPORT_FEATS", "SUPPORT_LABELS", "TEXT_FEATS"),
    "classify": ("QUERY_FEATS", "PROTOTYPES"),
    "zero_shot": ("QUERY_FEATS", "TEXT_FEATS"),
    "explain": ("QUERY_FEATS", "PROTOTYPES"),
}
#: Every optional input of the few-shot head.
FEWSHOT_INPUTS = ("SUPPORT_FEATS", "SUPPORT_LABELS", "TEXT_FEATS", "QUERY_FEATS", "PROTOTYPES")


def load_runner(args: Mapping[str, str]) -> ModelRunner:
    """The runner of one exported Triton model instance; called from each shell's ``initialize``.

    Args:
        args: the Python backend's ``initialize`` arguments (``model_repository`` is the model's
            folder, ``model_version``, ``model_instance_kind``, ``model_instance_device_id``).

    Returns:
        A :class:`ModelRunner` on the checkpoint beside the shell, loaded by
        :func:`training.checkpoint.load_checkpoint`, in eval mode on the instance's device
        (``cuda:<id>`` or CPU). Backbone weights come from ``$FSAR_PRETRAINED`` when set.

    Raises:
        FileNotFoundError: no checkpoint in the version folder (a placeholder repository).
    """
    import torch

    from training.checkpoint import load_checkpoint

    version_dir = Path(args["model_repository"]) / str(args["model_version"])
    checkpoint = version_dir / CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{version_dir} has no {CHECKPOINT_FILE}: this is a placeholder (or incomplete) model repository. "
            f"Export a checkpoint into it: fsar export --checkpoint CKPT --repository "
            f"{Path(args['model_repository']).parent} --version {args['model_version']}")
    if args.get("model_instance_kind", "CPU") == "GPU":
        if not torch.cuda.is_available():
            raise RuntimeError("this model has a KIND_GPU instance but torch sees no CUDA device; "
                               "export with --instance-kind cpu for a CPU-only server")
        device = torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
    else:
        device = torch.device("cpu")
    model, _ = load_checkpoint(checkpoint, pretrained_override=os.environ.get(PRETRAINED_ENV) or None,
                               map_location=device)
    return ModelRunner(model)


def run_merged(fn: Callable[..., np.ndarray],
               parts: Sequence[Sequence[np.ndarray]]) -> List[Union[np.ndarray, Exception]]:
    """Run ``fn`` once over several requests' rows and split the result back per request.

    Args:
        fn: takes arrays whose first axis is rows (as many arrays as each part has) and returns an
            array with one row per input row.
        parts: one tuple of arrays per request (same arity; first axis = that request's rows).

    Returns:
        Per request, its rows of ``fn``'s output, or the exception that request caused: when the
        merged call fails, each request runs alone so only the failing ones get an error.
    """
    if not parts:
        return []
    sizes = [len(part[0]) for part in parts]
    try:
        merged = [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]
        output = fn(*merged)
        return list(np.split(output, np.cumsum(sizes)[:-1]))
    except Exception as err:  # noqa: BLE001 - isolate the failing request(s)
        if len(parts) == 1:
            return [err]
    results: List[Union[np.ndarray, Exception]] = []
    for part in parts:
        try:
            results.append(fn(*part))
        except Exception as err:  # noqa: BLE001
            results.append(err)
    return results


def fewshot_op(runner: ModelRunner, op: str, inputs: Mapping[str, Optional[np.ndarray]]) -> Dict[str, np.ndarray]:
    """One ``fewshot_head`` request: ``op`` with the named inputs (None when absent) -> named outputs.

    ``prototypes``: SUPPORT_FEATS [S,T,D], SUPPORT_LABELS [S], TEXT_FEATS [N,D] -> PROTOTYPES [N,T,D].
    ``classify``: QUERY_FEATS [Q,T,D], PROTOTYPES [N,T,D], TEXT_FEATS [N,D] or None -> LOGITS [Q,N].
    ``zero_shot``: QUERY_FEATS [Q,T,D], TEXT_FEATS [N,D] -> LOGITS [Q,N].
    ``explain``: QUERY_FEATS [Q,T,D], PROTOTYPES [N,T,D] -> SIMILARITY [Q,N,T,T], ALIGNMENT [Q,N,2,T,T]
    (:func:`training.model.explain.explain_alignment`).

    Raises:
        ValueError: unknown op, or an input the op needs is missing (the model raises for bad shapes).
    """
    if op not in FEWSHOT_OPS:
        raise ValueError(f"OP must be one of {', '.join(FEWSHOT_OPS)}; got {op!r}")
    missing = [name for name in FEWSHOT_OPS[op] if inputs.get(name) is None]
    if missing:
        raise ValueError(f"OP {op!r} needs input(s) {', '.join(missing)}")
    if op == "prototypes":
        return {"PROTOTYPES": runner.build_prototypes(inputs["SUPPORT_FEATS"], inputs["SUPPORT_LABELS"],
                                                      inputs["TEXT_FEATS"])}
    if op == "classify":
        return {"LOGITS": runner.classify(inputs["QUERY_FEATS"], inputs["PROTOTYPES"], inputs.get("TEXT_FEATS"))}
    if op == "explain":
        explained = runner.explain(inputs["QUERY_FEATS"], inputs["PROTOTYPES"])
        return {"SIMILARITY": explained["similarity"], "ALIGNMENT": explained["alignment"]}
    return {"LOGITS": runner.zero_shot(inputs["QUERY_FEATS"], inputs["TEXT_FEATS"])}


def decode_strings(values: np.ndarray) -> List[str]:
    """A BYTES tensor (any shape) as a flat list of str (UTF-8)."""
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in values.reshape(-1)]


def error_response(pb_utils: Any, err: Exception) -> Any:
    """An error response whose message starts with the exception's type (``"ValueError: ..."``):
    the gateway maps ``ValueError`` / ``TypeError`` to a 422 for the client."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(err).__name__}: {err}"))


def float_response(pb_utils: Any, outputs: Mapping[str, Union[np.ndarray, Exception]]) -> Any:
    """A response of FP32 outputs by name, or the error response of the first exception among them."""
    for value in outputs.values():
        if isinstance(value, Exception):
            return error_response(pb_utils, value)
    return pb_utils.InferenceResponse(
        [pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=np.float32)) for name, value in outputs.items()])
