"""Triton backend: the fsar models served by one or several Triton Inference Servers, reached over gRPC.

The gateway sends numpy arrays to the three models `fsar export` writes (`model_repository/README.md`)
through `tritonclient.grpc.aio`; no torch is imported here. The servers (`triton_url`: `host:port`,
several separated by commas, or `dns:///name:port`) form a `TritonPool` (`triton_pool.py`), created in
`start()` inside the running event loop (the app's lifespan) and closed in `close()`: it balances
requests over the servers in service, takes failing ones out, puts them back when they recover and
retries a request on another server after a server error.

    frames uint8 [B, T, S, S, 3]  --video_encoder (FRAMES [+ TEXT_FEATS])--> FRAME_FEATS [B, T, D]
    labels [N]                    --text_encoder (LABEL BYTES [N, 1])------> TEXT_FEATS [N, D]
    fewshot_head OP prototypes | classify | zero_shot | explain          --> PROTOTYPES [N, T, D] | LOGITS [Q, N]
                                                                          | SIMILARITY [Q, N, T, T], ALIGNMENT [Q, N, 2, T, T]

Model facts (fingerprint = checkpoint hash, backbone, adapter, metric, T, input size, D, prompt, the
full model config) come from the `fsar_*` parameters of the models' `config.pbtxt`, read with
`get_model_config` when a server is admitted, so `info()` and every cache key equal what the embedded
backend gives for the same checkpoint and the two backends share cached features. Every server must
serve the same model; one serving another is kept out (see `triton_pool.py`).

Errors: no server reachable, too slow (`triton_timeout_s` per request, retries included), a model not
loaded, or a model failing -> `BackendUnavailable` (HTTP 503). The model rejecting an input it was given
(`ValueError` / `TypeError` raised by the model code) -> `InvalidField` (HTTP 422). A server that fails
or restarts has its model facts read again before it serves again, so a Triton restarted with another
export is noticed (a new fingerprint) instead of serving stale caches.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient

from service.backends.base import Backend
from service.backends.triton_pool import (HEAD_MODEL, MODEL_NAMES, TEXT_MODEL, VIDEO_MODEL, ServerFacts,
                                          TritonPool, as_numpy)
from service.backends.triton_targets import parse_targets
from service.errors import BackendUnavailable
from service.settings import Settings
from training.calibration import recorded_temperature
from training.model.card import ModelCard

log = logging.getLogger(__name__)

#: The support-video model of the ONNX layouts, and those layouts (`fsar_layout` of the video encoder).
SUPPORT_VIDEO_MODEL = "video_encoder_support"
ONNX_LAYOUTS = ("onnx", "onnx-python")

__all__ = ["TritonBackend", "MODEL_NAMES", "TEXT_MODEL", "VIDEO_MODEL", "HEAD_MODEL"]


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _float_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    return _input(name, np.ascontiguousarray(array, dtype=np.float32), "FP32")


def _bytes_array(values: Sequence[str]) -> np.ndarray:
    return np.array([value.encode("utf-8") for value in values], dtype=object)


class TritonBackend(Backend):
    """The fsar models on the Triton servers at `settings.triton_url` (see the module docstring)."""

    name = "triton"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.triton_url
        self.timeout_s = float(settings.triton_timeout_s)
        self._pool: TritonPool | None = None
        self._info: dict[str, Any] | None = None
        self._info_facts: ServerFacts | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect and read the models' facts, waiting up to `triton_timeout_s` for a server to serve them.

        Raises:
            RuntimeError: no Triton server served the three fsar models in time (one sentence saying
                why), or they are not an fsar export, or they serve different checkpoints.
        """
        if self.settings.checkpoint:
            log.warning("backend=triton: ignoring checkpoint %s; Triton serves the checkpoint exported into its "
                        "model repository", self.settings.checkpoint)
        pool = TritonPool(parse_targets(self.url), self.timeout_s,
                          health_interval_s=self.settings.triton_health_interval_s,
                          dns_refresh_s=self.settings.triton_dns_refresh_s)
        await pool.start()
        self._pool = pool
        info = self.info()
        servers = [server["url"] for server in pool.snapshots() if server["healthy"]]
        log.info("triton backend at %s (%d in service: %s): %s %s adapters, metric %s, fingerprint %s", self.url,
                 len(servers), ", ".join(servers), info["backbone"], info["adapter"], info["metric"],
                 info["fingerprint"][:16])

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ready(self) -> bool:
        """True when at least one server serves the model (all three models ready).

        Raises:
            BackendUnavailable: no server is in service (the message gives each one's last error).
        """
        return await self._require_pool().ready()

    def server_states(self) -> list[dict[str, Any]]:
        """Each server's url, state, healthy, in_flight, last_error, fingerprint and request counts."""
        return self._pool.snapshots() if self._pool is not None else []

    @property
    def pooled(self) -> bool:
        """Whether `triton_url` names several servers or a DNS name (`/readyz` then lists them)."""
        return len(parse_targets(self.url)) > 1 or "dns:///" in self.url

    # ------------------------------------------------------------------ facts
    def info(self) -> dict[str, Any]:
        facts = self._pool.reference if self._pool is not None else None
        if facts is None:
            raise BackendUnavailable(f"The Triton backend is not connected to {self.url} yet.")
        if self._info is None or facts is not self._info_facts:
            self._info, self._info_facts = self._describe(facts.params), facts
        return self._info

    def _describe(self, params: dict[str, str]) -> dict[str, Any]:
        """`info()` from one model's `fsar_*` parameters: the model card plus where it is served."""
        card = ModelCard.from_triton_parameters(params)
        calibration = json.loads(params["fsar_calibration"]) if params.get("fsar_calibration") else None
        recorded_temperature({"calibration": calibration})  # a malformed record fails here, not in every answer
        return {
            "backend": self.name,
            **card.to_dict(),
            "metrics": [card.metric],  # the metric module is part of the exported model
            "checkpoint": None,  # the checkpoint lives on the Triton host; its hash identifies it
            "device": f"triton {self.url}",
            "demo": bool(self.settings.demo),
            "triton_url": self.url,
            # thresholds `fsar eval --open-set --record` measured for the exported checkpoint (none: the defaults)
            **({"open_set": json.loads(params["fsar_open_set"])} if params.get("fsar_open_set") else {}),
            # the temperature `fsar eval --calibrate --record` fitted for it (none: T = 1)
            **({"calibration": calibration} if calibration else {}),
        }

    # ------------------------------------------------------------------ requests
    def _require_pool(self) -> TritonPool:
        if self._pool is None:
            raise BackendUnavailable(f"The Triton backend is not connected to {self.url}.")
        return self._pool

    async def _infer(self, model: str, inputs: list[grpcclient.InferInput], outputs: Sequence[str]) -> list[np.ndarray]:
        """One inference request (balanced, retried on another server after a server error, within the
        per-request timeout); returns the named outputs. Every model call is idempotent."""
        result = await self._require_pool().infer(model, inputs, outputs)
        return as_numpy(result, model, outputs)

    def _chunks(self, model: str, rows: int) -> list[slice]:
        """Row ranges no larger than the model's `max_batch_size` (one range when it batches freely)."""
        facts = self._pool.reference if self._pool is not None else None
        size = (facts.max_batch.get(model, 0) if facts is not None else 0) or rows
        return [slice(start, start + size) for start in range(0, rows, size)]

    # ------------------------------------------------------------------ model calls
    async def encode_videos(self, frames: np.ndarray, text_feats: np.ndarray | None = None) -> np.ndarray:
        """uint8 `[B, T, S, S, 3]` (+ float32 `[B, D]` support texts) -> float32 `[B, T, D]`, frames sent as uint8."""
        info = self.info()
        expected = (info["num_frames"], info["input_size"], info["input_size"], 3)
        if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[1:] != expected or len(frames) == 0:
            raise ValueError(f"frames must be uint8 [B, {', '.join(map(str, expected))}] with B >= 1, "
                             f"got {frames.dtype} {frames.shape}")
        if text_feats is not None and text_feats.shape != (len(frames), info["embed_dim"]):
            raise ValueError(f"text_feats must be [{len(frames)}, {info['embed_dim']}], got {text_feats.shape}")
        # `fsar export --layout onnx | onnx-python` serves support videos (label texts in) from a model of
        # their own, as an ONNX graph has no optional inputs; the Python layout takes both in one model.
        facts = self._pool.reference if self._pool is not None else None
        layout = facts.params.get("fsar_layout", "python") if facts is not None else "python"
        model = SUPPORT_VIDEO_MODEL if text_feats is not None and layout in ONNX_LAYOUTS else VIDEO_MODEL
        calls = []
        for rows in self._chunks(VIDEO_MODEL, len(frames)):
            inputs = [_input("FRAMES", np.ascontiguousarray(frames[rows]), "UINT8")]
            if text_feats is not None:
                inputs.append(_float_input("TEXT_FEATS", text_feats[rows]))
            calls.append(self._infer(model, inputs, ["FRAME_FEATS"]))
        outputs = await asyncio.gather(*calls)
        return np.concatenate([output[0] for output in outputs]).astype(np.float32, copy=False)

    async def encode_texts(self, labels: list[str]) -> np.ndarray:
        """N labels -> float32 `[N, D]` (the model applies its prompt template)."""
        if not labels:
            raise ValueError("labels must be a non-empty list of strings")
        values = _bytes_array(list(labels)).reshape(-1, 1)  # [N, 1]
        calls = [self._infer(TEXT_MODEL, [_input("LABEL", values[rows], "BYTES")], ["TEXT_FEATS"])
                 for rows in self._chunks(TEXT_MODEL, len(values))]
        outputs = await asyncio.gather(*calls)
        return np.concatenate([output[0] for output in outputs]).astype(np.float32, copy=False)

    async def _head(self, op: str, output: str, **arrays: np.ndarray) -> np.ndarray:
        (result,) = await self._head_outputs(op, [output], **arrays)
        return result

    async def _head_outputs(self, op: str, outputs: Sequence[str], **arrays: np.ndarray) -> list[np.ndarray]:
        """One fewshot_head request: OP and the named arrays in, the named float32 outputs back."""
        inputs = [_input("OP", _bytes_array([op]), "BYTES")]
        for name, array in arrays.items():
            if array.dtype.kind in "iu":
                inputs.append(_input(name, np.ascontiguousarray(array, dtype=np.int64), "INT64"))
            else:
                inputs.append(_float_input(name, array))
        results = await self._infer(HEAD_MODEL, inputs, list(outputs))
        return [result.astype(np.float32, copy=False) for result in results]

    async def build_prototypes(self, support_feats: np.ndarray, support_labels: np.ndarray,
                               text_feats: np.ndarray) -> np.ndarray:
        """`[S, T, D]`, int `[S]`, `[N, D]` -> float32 `[N, T, D]`."""
        return await self._head("prototypes", "PROTOTYPES", SUPPORT_FEATS=support_feats,
                                SUPPORT_LABELS=np.asarray(support_labels, dtype=np.int64), TEXT_FEATS=text_feats)

    async def classify(self, query_feats: np.ndarray, prototypes: np.ndarray,
                       text_feats: np.ndarray | None = None, metric: str | None = None) -> np.ndarray:
        """`[Q, T, D]`, `[N, T, D]` (+ `[N, D]`) -> logits `[Q, N]`."""
        model_metric = self.info()["metric"]
        if metric is not None and metric != model_metric:
            raise ValueError(f"metric {metric!r} is not available; this model uses {model_metric!r}")
        arrays = {"QUERY_FEATS": query_feats, "PROTOTYPES": prototypes}
        if text_feats is not None:
            arrays["TEXT_FEATS"] = text_feats
        return await self._head("classify", "LOGITS", **arrays)

    async def zero_shot(self, query_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        """`[Q, T, D]`, `[N, D]` -> logits `[Q, N]`."""
        return await self._head("zero_shot", "LOGITS", QUERY_FEATS=query_feats, TEXT_FEATS=text_feats)

    async def explain(self, query_feats: np.ndarray, prototypes: np.ndarray) -> dict[str, np.ndarray]:
        """`[Q, T, D]`, `[N, T, D]` -> similarity `[Q, N, T, T]`, alignment `[Q, N, 2, T, T]`."""
        similarity, alignment = await self._head_outputs("explain", ["SIMILARITY", "ALIGNMENT"],
                                                         QUERY_FEATS=query_feats, PROTOTYPES=prototypes)
        return {"similarity": similarity, "alignment": alignment}
