"""Embedded backend: the fsar model in this process (torch, CPU or GPU; encoders on ONNX Runtime on CPU).

Model calls go to `training.model.ModelRunner` (the numpy-facing runner the Triton models call too,
under `torch.inference_mode()`), or with `runtime` onnxruntime to `training.onnx.OnnxModelRunner` (the
same calls; the video and text encoders run ONNX graphs of the same model, fp32 or int8 by `precision`),
in a bounded thread pool (`encode_concurrency` threads), so the event loop never blocks on the model.
This is the only gateway module that imports torch.
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np
import torch

from service.backends.base import Backend
from service.errors import BackendUnavailable
from service.settings import Settings
from training.calibration import recorded_temperature

if TYPE_CHECKING:
    from training.model.runner import ModelRunner

log = logging.getLogger(__name__)
T = TypeVar("T")


#: Most model calls the automatic `encode_concurrency` runs at once on CPU.
MAX_AUTO_CPU_ENCODE_CONCURRENCY = 4


def encode_concurrency_for(settings: Settings, device_type: str, cpu_count: int | None = None) -> int:
    """Model calls the embedded backend runs at once: `settings.encode_concurrency` when set, else
    automatic. On CPU, min(4, cores): one call at a time leaves cores idle while a request waits on its
    decode (ViT-B-32, 10 s clips, 2 cores, concurrency 4: 3.96x the naive pipeline's throughput with 1,
    9.09x with 2; docs/performance.md). On a GPU one call at a time (the GPU serialises them anyway)."""
    if settings.encode_concurrency is not None:
        return settings.encode_concurrency
    if device_type != "cpu":
        return 1
    cores = cpu_count or os.cpu_count() or 1
    return max(1, min(MAX_AUTO_CPU_ENCODE_CONCURRENCY, cores))


def cpu_threads_per_model_call(settings: Settings, cpu_count: int | None = None) -> int:
    """Intra-op threads of one model call on CPU: the cores left after one per decode worker, shared by
    the concurrent model calls, at least 1. More threads than free cores makes torch's thread pool wait
    on descheduled threads: on 2 cores with 2 decode workers busy, the tiny model served 35 requests/s
    with 2 threads and 126 with 1 (tests/service/test_load.py's mix)."""
    cores = cpu_count or os.cpu_count() or 1
    calls = encode_concurrency_for(settings, "cpu", cores)
    return max(1, (cores - settings.decode_concurrency) // calls)


def choose_runtime(requested: str, device_type: str) -> tuple[str, str]:
    """`(runtime, why)` for the `runtime` setting: `torch` or `onnxruntime`. `auto` picks ONNX Runtime on
    CPU when it (and the exporter: onnx, onnxscript) is installed: about 2x torch eager fp32 for ViT-B
    encoders on 2 cores (docs/performance.md); on a GPU, torch."""
    from training.onnx import onnx_available

    if requested == "torch":
        return "torch", "runtime=torch"
    if requested == "onnxruntime":
        if not onnx_available():
            raise RuntimeError("runtime=onnxruntime needs onnxruntime, onnx and onnxscript: "
                               "pip install 'fsar[onnx]' (or set FSAR_RUNTIME=torch)")
        return "onnxruntime", "runtime=onnxruntime"
    if device_type != "cpu":
        return "torch", f"runtime=auto on {device_type}: torch"
    if not onnx_available():
        return "torch", "runtime=auto: onnxruntime is not installed (pip install 'fsar[onnx]'), using torch"
    return "onnxruntime", "runtime=auto: onnxruntime is installed"


class EmbeddedBackend(Backend):
    """Runs `training.model` in-process. Model: `settings.checkpoint` if given, else built from
    `backbone` / `pretrained` (+ `adapter`, `metric`, `num_frames` when set)."""

    name = "embedded"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runner: ModelRunner | None = None
        self.meta: dict[str, Any] = {}
        self._info: dict[str, Any] | None = None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encode_concurrency = encode_concurrency_for(settings, self.device.type)
        self._pool = ThreadPoolExecutor(max_workers=self.encode_concurrency, thread_name_prefix="fsar-model")
        # The few-shot head (prototypes, Q2S/Q2T logits, explain) takes milliseconds; on a lane of its own
        # a request's matching does not wait behind other requests' encodes (bench e2e: match 362 ms p50
        # at concurrency 4 while it queued in the model pool).
        self._head_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsar-head")
        self._threads_before: int | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.device.type == "cpu":
            self._threads_before = torch.get_num_threads()  # restored by close(): the setting is per process
            torch.set_num_threads(cpu_threads_per_model_call(self.settings))
        loop = asyncio.get_running_loop()
        self.runner, self.meta = await loop.run_in_executor(self._pool, self._load)
        recorded_temperature(self.meta)  # a malformed calibration record stops start-up, not every answer
        self.runner = await loop.run_in_executor(self._pool, self._encoder_runtime, self.runner)
        self._info = self._describe()
        log.info("embedded backend: %s on %s (%d model calls at once%s), %s trainable parameters, "
                 "fingerprint %s", self._info["backbone"], self.device, self.encode_concurrency,
                 f", {self._info['threads_per_call']} threads each" if self._info["threads_per_call"] else "",
                 self._info["trainable_params"], self._info["fingerprint"][:16])

    def _load(self) -> tuple[ModelRunner, dict[str, Any]]:
        """Build or load the model (runs in the pool; raises the model code's one-sentence errors)."""
        from training.model.runner import ModelRunner

        settings = self.settings
        if settings.checkpoint:
            from training.checkpoint import load_checkpoint

            # A local weights file in `pretrained` stands in for the backbone weights the checkpoint
            # records (same weights, e.g. on an offline host); load_checkpoint verifies their hash.
            local_weights = settings.pretrained if settings.pretrained and os.path.isfile(settings.pretrained) else None
            model, meta = load_checkpoint(settings.checkpoint, pretrained_override=local_weights)
            ignored = [name for name in ("adapter", "metric", "num_frames") if getattr(settings, name) is not None]
            if ignored:
                log.warning("checkpoint given: ignoring %s (the checkpoint's config decides)", ", ".join(ignored))
        else:
            from training.model import ModelConfig, build_model

            overrides = {name: getattr(settings, name) for name in ("adapter", "metric", "num_frames")
                         if getattr(settings, name) is not None}
            config = ModelConfig(backbone=settings.backbone, pretrained=settings.pretrained, **overrides)
            # A fixed seed makes the initial adapter/head weights (and random backbone weights) the same
            # in every replica and after restarts, so they share one fingerprint and its caches.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)
                model, meta = build_model(config), {}
        return ModelRunner(model.to(self.device).eval()), dict(meta)

    def _encoder_runtime(self, runner: ModelRunner) -> ModelRunner:
        """The runner on the chosen encoder runtime: ``runner`` itself (torch) or an
        :class:`training.onnx.OnnxModelRunner` on the same model (graphs built once per fingerprint and
        precision, then loaded from `onnx_cache_dir`). With runtime=auto a failure to build the graphs
        falls back to torch (logged); with runtime=onnxruntime it stops the start."""
        settings = self.settings
        runtime, why = choose_runtime(settings.runtime, self.device.type)
        if runtime == "torch":
            if settings.precision != "fp32":
                raise RuntimeError(f"precision={settings.precision} needs the onnxruntime runtime ({why})")
            log.info("encoder runtime: torch (%s)", why)
            return runner
        from training.onnx import OnnxModelRunner

        try:
            model = runner.model
            if model.dtype != torch.float32 or self.device.type != "cpu":
                raise RuntimeError(f"the ONNX encoders are exported from an fp32 model on the CPU; this one is "
                                   f"{model.dtype} on {self.device}")
            onnx_runner = OnnxModelRunner.build(model, settings.precision, cpu_threads_per_model_call(settings),
                                                cache_dir=settings.onnx_cache_dir)
        except Exception as err:
            if settings.runtime == "onnxruntime" or settings.precision != "fp32":
                raise
            log.warning("encoder runtime: torch (could not build the ONNX encoders: %s: %s)",
                        type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
            return runner
        log.info("encoder runtime: onnxruntime %s (%s; graphs in %s)", settings.precision, why,
                 onnx_runner.graphs["video_query"].parent)
        return onnx_runner

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._head_pool.shutdown(wait=True, cancel_futures=True)
        self.runner = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    async def ready(self) -> bool:
        return self.runner is not None

    # ------------------------------------------------------------------ facts
    def _describe(self) -> dict[str, Any]:
        card = self.runner.model.card(checkpoint_hash=self.meta.get("checkpoint_hash"))
        runtime, precision = "torch", "fp32"
        facts = card.to_dict()
        if getattr(self.runner, "precision", None) is not None:  # an OnnxModelRunner
            runtime, precision = "onnxruntime", self.runner.precision
            facts["fingerprint"] = self.runner.fingerprint  # int8 features differ: their own caches
        return {
            "backend": self.name,
            **facts,
            "model_fingerprint": card.fingerprint,
            "runtime": runtime,
            "precision": precision,
            "metrics": [card.metric],  # the metric module is part of the (trained) model
            "checkpoint": self.settings.checkpoint,
            "device": str(self.device),
            "encode_concurrency": self.encode_concurrency,
            "threads_per_call": (cpu_threads_per_model_call(self.settings) if self.device.type == "cpu"
                                 else None),
            "demo": bool(self.settings.demo),
            # thresholds `fsar eval --open-set --record` measured for this checkpoint (none: the defaults)
            **({"open_set": self.meta["open_set"]} if self.meta.get("open_set") else {}),
            # the temperature `fsar eval --calibrate --record` fitted (none: probabilities as the model gives them)
            **({"calibration": self.meta["calibration"]} if self.meta.get("calibration") else {}),
        }

    def info(self) -> dict[str, Any]:
        if self._info is None:
            raise BackendUnavailable("The embedded model is not loaded yet.")
        return self._info

    # ------------------------------------------------------------------ model calls
    async def _run(self, fn: Callable[[ModelRunner], T], *, head: bool = False) -> T:
        """`fn(runner)` in the model thread pool (`head`: on the few-shot head's own lane)."""
        runner = self.runner
        if runner is None:
            raise BackendUnavailable("The embedded model is not loaded.")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._head_pool if head else self._pool, fn, runner)

    async def encode_videos(self, frames: np.ndarray, text_feats: np.ndarray | None = None) -> np.ndarray:
        """uint8 `[B, T, H, W, 3]` (+ float32 `[B, D]` support texts) -> float32 `[B, T, D]`."""
        return await self._run(lambda runner: runner.encode_videos(frames, text_feats))

    async def encode_texts(self, labels: list[str]) -> np.ndarray:
        """N labels -> float32 `[N, D]` (prompt template applied by the model)."""
        return await self._run(lambda runner: runner.encode_texts(labels))

    async def build_prototypes(self, support_feats: np.ndarray, support_labels: np.ndarray,
                               text_feats: np.ndarray) -> np.ndarray:
        """`[S, T, D]`, int `[S]`, `[N, D]` -> float32 `[N, T, D]`."""
        return await self._run(lambda runner: runner.build_prototypes(support_feats, support_labels, text_feats),
                               head=True)

    async def classify(self, query_feats: np.ndarray, prototypes: np.ndarray,
                       text_feats: np.ndarray | None = None, metric: str | None = None) -> np.ndarray:
        """`[Q, T, D]`, `[N, T, D]` (+ `[N, D]`) -> logits `[Q, N]`."""
        return await self._run(lambda runner: runner.classify(query_feats, prototypes, text_feats, metric), head=True)

    async def zero_shot(self, query_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        """`[Q, T, D]`, `[N, D]` -> logits `[Q, N]`."""
        return await self._run(lambda runner: runner.zero_shot(query_feats, text_feats), head=True)

    async def explain(self, query_feats: np.ndarray, prototypes: np.ndarray) -> dict[str, np.ndarray]:
        """`[Q, T, D]`, `[N, T, D]` -> similarity `[Q, N, T, T]`, alignment `[Q, N, 2, T, T]`."""
        return await self._run(lambda runner: runner.explain(query_feats, prototypes), head=True)
