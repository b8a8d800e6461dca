"""Triton backend: the fsar models served by a Triton Inference Server, reached over gRPC.

The gateway sends numpy arrays to the three models `fsar export` writes (`model_repository/README.md`)
through `tritonclient.grpc.aio`; no torch is imported here. One client per process, created in
`start()` inside the running event loop (the app's lifespan) and closed in `close()`.

    frames uint8 [B, T, S, S, 3]  --video_encoder (FRAMES [+ TEXT_FEATS])--> FRAME_FEATS [B, T, D]
    labels [N]                    --text_encoder (LABEL BYTES [N, 1])------> TEXT_FEATS [N, D]
    fewshot_head OP prototypes | classify | zero_shot | explain          --> PROTOTYPES [N, T, D] | LOGITS [Q, N]
                                                                          | SIMILARITY [Q, N, T, T], ALIGNMENT [Q, N, 2, T, T]

Model facts (fingerprint = checkpoint hash, backbone, adapter, metric, T, input size, D, prompt, the
full model config) come from the `fsar_*` parameters of the models' `config.pbtxt`, read with
`get_model_config` at start, so `info()` and every cache key equal what the embedded backend gives
for the same checkpoint and the two backends share cached features.

Errors: Triton unreachable, too slow (`triton_timeout_s` per request), a model not loaded, or a
model failing -> `BackendUnavailable` (HTTP 503). The model rejecting an input it was given
(`ValueError` / `TypeError` raised by the model code) -> `InvalidField` (HTTP 422). After an outage,
or when Triton rejects a shape, the model facts are read again before the next request, so a Triton
restarted with another export is noticed (a new fingerprint) instead of serving stale caches.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from service.backends.base import Backend
from service.errors import BackendUnavailable, InvalidField
from service.settings import Settings
from training.model.card import ModelCard

log = logging.getLogger(__name__)

TEXT_MODEL, VIDEO_MODEL, HEAD_MODEL = "text_encoder", "video_encoder", "fewshot_head"
MODEL_NAMES = (TEXT_MODEL, VIDEO_MODEL, HEAD_MODEL)
#: Parameters every exported model must carry (written by `training.export`).
REQUIRED_PARAMETERS = ("fsar_fingerprint", "fsar_backbone", "fsar_metric", "fsar_num_frames", "fsar_image_size",
                       "fsar_embed_dim")
#: gRPC statuses that mean "Triton cannot serve this now" (retrying later may work).
UNAVAILABLE_STATUSES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                        "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.NOT_FOUND", "StatusCode.UNKNOWN",
                        "StatusCode.ABORTED"}
#: Exceptions the model code raises for inputs it rejects; the Python backend sends "Name: message".
INPUT_ERROR_PREFIXES = ("ValueError: ", "TypeError: ")
#: Reconnect quickly after Triton restarts (gRPC's default backoff grows to two minutes).
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 250, "grpc.min_reconnect_backoff_ms": 250,
                        "grpc.max_reconnect_backoff_ms": 2000}
START_RETRY_S = 0.5


def _channel_args() -> list[tuple[str, Any]]:
    """tritonclient's default channel options (message sizes, keepalive) plus a short reconnect backoff."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        *RECONNECT_BACKOFF_MS.items(),
    ]


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _float_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    return _input(name, np.ascontiguousarray(array, dtype=np.float32), "FP32")


def _bytes_array(values: Sequence[str]) -> np.ndarray:
    return np.array([value.encode("utf-8") for value in values], dtype=object)


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    """`config.pbtxt` parameters as strings (protobuf JSON drops empty strings: read them as "")."""
    return {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}


class TritonBackend(Backend):
    """The fsar models on a Triton server at `settings.triton_url` (gRPC host:port)."""

    name = "triton"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.triton_url
        self.timeout_s = float(settings.triton_timeout_s)
        self._client: grpcclient.InferenceServerClient | None = None
        self._info: dict[str, Any] | None = None
        self._max_batch: dict[str, int] = {}
        self._stale = False
        self._refresh_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect and read the models' facts, waiting up to `triton_timeout_s` for Triton to serve them.

        Raises:
            RuntimeError: Triton did not serve the three fsar models in time (one sentence saying why),
                or they are not an fsar export, or they serve different checkpoints.
        """
        if self.settings.checkpoint:
            log.warning("backend=triton: ignoring checkpoint %s; Triton serves the checkpoint exported into its "
                        "model repository", self.settings.checkpoint)
        self._client = grpcclient.InferenceServerClient(self.url, channel_args=_channel_args())
        self._refresh_lock = asyncio.Lock()
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                await self._read_metadata()
                break
            except BackendUnavailable as err:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    await self.close()
                    raise RuntimeError(
                        f"Triton at {self.url} did not serve the fsar models within {self.timeout_s:g} s "
                        f"({err.message}); start Triton with an exported model repository or point "
                        "FSAR_TRITON_URL at it.") from err
                await asyncio.sleep(min(START_RETRY_S, remaining))
            except RuntimeError:
                await self.close()
                raise
        info = self.info()
        log.info("triton backend at %s: %s %s adapters, metric %s, fingerprint %s", self.url, info["backbone"],
                 info["adapter"], info["metric"], info["fingerprint"][:16])

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def ready(self) -> bool:
        """True when the server and all three models are ready (the model facts are refreshed if stale).

        Raises:
            BackendUnavailable: Triton cannot be reached (the message says why).
        """
        client = self._require_client()
        try:
            ready = await client.is_server_ready(client_timeout=self.timeout_s)
            for name in MODEL_NAMES:
                ready = ready and await client.is_model_ready(name, client_timeout=self.timeout_s)
            if not ready:
                self._stale = True  # models (re)loading: maybe another export; re-read their facts
                return False
        except InferenceServerException as err:
            self._stale = True
            raise self._unavailable("readiness check", err) from None
        await self._refresh_if_stale()
        return True

    # ------------------------------------------------------------------ facts
    def info(self) -> dict[str, Any]:
        if self._info is None:
            raise BackendUnavailable(f"The Triton backend is not connected to {self.url} yet.")
        return self._info

    async def _read_metadata(self) -> None:
        """Read the three models' configs and set `info()`; raises `BackendUnavailable` when Triton
        or a model cannot answer, `RuntimeError` when the models are not one fsar export."""
        client = self._require_client()
        configs: dict[str, dict[str, Any]] = {}
        for name in MODEL_NAMES:
            try:
                if not await client.is_model_ready(name, client_timeout=self.timeout_s):
                    raise BackendUnavailable(f"model {name} is not ready on Triton at {self.url}")
                configs[name] = (await client.get_model_config(name, as_json=True,
                                                               client_timeout=self.timeout_s))["config"]
            except InferenceServerException as err:
                raise self._unavailable(f"reading {name}'s config", err) from None
        params = {name: _parameters(config) for name, config in configs.items()}
        for name, values in params.items():
            missing = [key for key in REQUIRED_PARAMETERS if not values.get(key)]
            if missing:
                raise RuntimeError(f"model {name} on Triton at {self.url} lacks the parameters {', '.join(missing)}: "
                                   "it was not written by `fsar export` or is a placeholder without a checkpoint")
        fingerprints = {name: values["fsar_fingerprint"] for name, values in params.items()}
        if len(set(fingerprints.values())) != 1:
            listed = ", ".join(f"{name} {fp[:12]}" for name, fp in fingerprints.items())
            raise RuntimeError(f"the models on Triton at {self.url} serve different checkpoints ({listed}); "
                               "export one checkpoint into all three")
        info = self._describe(params[VIDEO_MODEL])
        old = self._info
        self._info = info
        self._max_batch = {name: int(config.get("max_batch_size", 0) or 0) for name, config in configs.items()}
        self._stale = False
        if old is not None and old["fingerprint"] != info["fingerprint"]:
            log.warning("the model on Triton changed: fingerprint %s -> %s (%s)", old["fingerprint"][:16],
                        info["fingerprint"][:16], info["backbone"])

    def _describe(self, params: dict[str, str]) -> dict[str, Any]:
        """`info()` from one model's `fsar_*` parameters: the model card plus where it is served."""
        card = ModelCard.from_triton_parameters(params)
        return {
            "backend": self.name,
            **card.to_dict(),
            "metrics": [card.metric],  # the metric module is part of the exported model
            "checkpoint": None,  # the checkpoint lives on the Triton host; its hash identifies it
            "device": f"triton {self.url}",
            "demo": bool(self.settings.demo),
            "triton_url": self.url,
        }

    async def _refresh_if_stale(self) -> None:
        if not self._stale:
            return
        assert self._refresh_lock is not None
        async with self._refresh_lock:
            if self._stale:
                try:
                    await self._read_metadata()
                except RuntimeError as err:  # Triton now serves something that is not one fsar export
                    raise BackendUnavailable(f"Triton at {self.url} serves unusable models: {err}") from err

    # ------------------------------------------------------------------ errors
    def _require_client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            raise BackendUnavailable(f"The Triton backend is not connected to {self.url}.")
        return self._client

    def _unavailable(self, what: str, err: InferenceServerException) -> BackendUnavailable:
        status = err.status() or ""
        if status == "StatusCode.DEADLINE_EXCEEDED":
            reason = f"no answer within {self.timeout_s:g} s (triton_timeout_s)"
        elif status == "StatusCode.UNAVAILABLE":
            reason = f"not reachable ({err.message()})"
        else:
            reason = f"{status.replace('StatusCode.', '') or 'error'}: {err.message()}"
        return BackendUnavailable(f"Triton at {self.url} failed {what}: {reason}.")

    def _translate(self, model: str, err: InferenceServerException) -> Exception:
        """The gateway error for a failed inference request to `model`."""
        status, message = err.status() or "", err.message() or ""
        if status in UNAVAILABLE_STATUSES:
            self._stale = True  # Triton may come back with another export: re-read its facts first
            return self._unavailable(f"a {model} request", err)
        if status == "StatusCode.INTERNAL" and message.startswith(INPUT_ERROR_PREFIXES):
            return InvalidField(f"The model ({model}) rejected the input: {message.split(': ', 1)[1]}",
                                code="invalid_model_input")
        if status == "StatusCode.INVALID_ARGUMENT":
            # Triton checks shapes and dtypes against config.pbtxt: the served models differ from
            # what this backend read at start (a new export?). Re-read before the next request.
            self._stale = True
        return self._unavailable(f"a {model} request", err)

    async def _infer(self, model: str, inputs: list[grpcclient.InferInput], outputs: Sequence[str]) -> list[np.ndarray]:
        """One inference request with the per-request timeout; returns the named outputs."""
        await self._refresh_if_stale()
        client = self._require_client()
        try:
            result = await client.infer(model, inputs,
                                        outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
                                        client_timeout=self.timeout_s)
        except InferenceServerException as err:
            raise self._translate(model, err) from None
        arrays = [result.as_numpy(name) for name in outputs]
        if any(array is None for array in arrays):
            raise BackendUnavailable(f"Triton's {model} answered without the outputs {', '.join(outputs)}.")
        return arrays

    def _chunks(self, model: str, rows: int) -> list[slice]:
        """Row ranges no larger than the model's `max_batch_size` (one range when it batches freely)."""
        size = self._max_batch.get(model, 0) or rows
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
        calls = []
        for rows in self._chunks(VIDEO_MODEL, len(frames)):
            inputs = [_input("FRAMES", np.ascontiguousarray(frames[rows]), "UINT8")]
            if text_feats is not None:
                inputs.append(_float_input("TEXT_FEATS", text_feats[rows]))
            calls.append(self._infer(VIDEO_MODEL, inputs, ["FRAME_FEATS"]))
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
