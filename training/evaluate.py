"""Few-shot and zero-shot evaluation on seeded episodes, on features encoded once per video.

``evaluate`` is what ``fsar eval`` runs::

    result = evaluate("runs/tiny/best.pt", "data/synth", split="test", way=5, shot=1, episodes=10000)
    result["accuracy"], result["ci95"]            # percent, 95% interval = 1.96 * std / sqrt(episodes)

How it stays fast: every video of the split is encoded ONCE on the query path (no text) and, for
models whose adapters read the label text (MA-CLIP's multimodal adapter), once more on the support
path with its own class's label text (fixed per class, so once per video). Episodes then run on
the cached features only, many at a time: the prototypes of a chunk of episodes are built in one
call (TPCM is per video, the mean per class), and :meth:`FsarModel.classify` is vectorised over
the chunk with ``torch.func.vmap``, which gives exactly the per-episode result.

Accuracies are in percent. The same seed gives the same episodes (``EpisodeSampler``), so two
checkpoints evaluated with one seed see identical tasks.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from training.model import FsarModel, ModelConfig, build_model

logger = logging.getLogger(__name__)

DEFAULT_EVAL_SEED = 1234
EPISODES_PER_CHUNK = 64


@dataclass
class EncodedSplit:
    """Per-video features of one split, computed once.

    Attributes:
        query_feats: ``[V, T, D]`` frame features on the query path (no text).
        support_feats: ``[V, T, D]`` frame features on the support path (each video with its own
            class's label text); the same tensor as ``query_feats`` when the adapters ignore text.
        labels: ``LongTensor [V]`` class index of each video.
        text_feats: ``[C, D]`` label text features of the split's C classes.
        label_texts: the C label texts.
    """

    query_feats: Tensor
    support_feats: Tensor
    labels: Tensor
    text_feats: Tensor
    label_texts: list


def autocast_context(device: torch.device, amp: str = "auto"):
    """Autocast for CUDA (``auto``: bf16 where supported, else fp16; ``bf16`` / ``fp16``); off on CPU or with ``off``."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    if amp == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def encode_split(model: FsarModel, dataset, *, batch_size: int = 16, num_workers: int = 0,
                 amp: str = "auto", progress: bool = True, desc: str = "encode", runner: Any = None) -> EncodedSplit:
    """Encode every video of ``dataset`` (a ``VideoDataset``) once; see :class:`EncodedSplit`.

    ``runner``: encode with this :class:`training.model.runner.ModelRunner` instead of the model's torch
    encoders (e.g. a :class:`training.onnx.OnnxModelRunner`: ONNX Runtime fp32 or int8), numpy in and out.
    """
    from torch.utils.data import DataLoader

    from training.data import collate_supervised

    if len(dataset) == 0:
        raise ValueError("the split has no videos to evaluate")
    was_training = model.training
    model.eval()
    device = model.device
    if runner is not None:
        text_feats = torch.from_numpy(np.asarray(runner.encode_texts(list(dataset.label_texts)), dtype=np.float32))
    else:
        text_feats = model.encode_text(dataset.label_texts).float()  # [C, D]
    uses_text = model.config.uses_ma
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_supervised)
    query_chunks, support_chunks, label_chunks = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        frames, labels = batch["frames"], batch["labels"]
        if runner is not None:
            pixels = frames.numpy()
            query_chunks.append(torch.from_numpy(runner.encode_videos(pixels)))  # [B, T, D]
            if uses_text:
                support_chunks.append(torch.from_numpy(runner.encode_videos(pixels, text_feats[labels].numpy())))
            label_chunks.append(labels)
            continue
        with autocast_context(device, amp):
            query_chunks.append(model.encode_video(frames).float().cpu())  # [B, T, D]
            if uses_text:
                shot_texts = text_feats[labels.to(device)]  # [B, D]
                support_chunks.append(model.encode_video(frames, texts=shot_texts).float().cpu())
        label_chunks.append(labels)
    model.train(was_training)
    query_feats = torch.cat(query_chunks)
    return EncodedSplit(query_feats=query_feats,
                        support_feats=torch.cat(support_chunks) if uses_text else query_feats,
                        labels=torch.cat(label_chunks).long(), text_feats=text_feats.cpu(),
                        label_texts=list(dataset.label_texts))


@torch.no_grad()
def episode_accuracies(model: FsarModel, encoded: EncodedSplit, *, way: int = 5, shot: int = 1, query: int = 1,
                       episodes: int = 10000, seed: int = DEFAULT_EVAL_SEED, use_text: bool = True,
                       chunk: int = EPISODES_PER_CHUNK, progress: bool = True) -> np.ndarray:
    """Accuracy (percent) of each of ``episodes`` seeded N-way K-shot episodes on cached features.

    Episodes come from ``EpisodeSampler(labels, way, shot, query, episodes, seed)``; each is
    classified with :meth:`FsarModel.classify` (prototypes from :meth:`build_prototypes`; the label
    texts mix in Q2T when ``use_text`` and the model's ``alpha > 0``); see :func:`episode_logits`.

    Returns:
        float64 ``[episodes]`` accuracies in percent.
    """
    logits = episode_logits(model, encoded, way=way, shot=shot, query=query, episodes=episodes, seed=seed,
                            use_text=use_text, chunk=chunk, progress=progress)  # [E, N*Q, N]
    query_labels = np.repeat(np.arange(way), query)  # [N*Q]
    return (logits.argmax(axis=-1) == query_labels).mean(axis=1) * 100.0


@torch.no_grad()
def episode_logits(model: FsarModel, encoded: EncodedSplit, *, way: int = 5, shot: int = 1, query: int = 1,
                   episodes: int = 10000, seed: int = DEFAULT_EVAL_SEED, use_text: bool = True,
                   chunk: int = EPISODES_PER_CHUNK, progress: bool = True) -> np.ndarray:
    """The model's few-shot logits of every query of ``episodes`` seeded N-way K-shot episodes.

    What :meth:`FsarModel.classify` returns (Q2S logits, or the log of the Q2S / Q2T mixture when
    ``use_text`` and the model's ``alpha > 0``), against prototypes from :meth:`build_prototypes`. The
    queries of episode e are ordered by class: query ``i`` belongs to class ``i // query``.

    Returns:
        float64 ``[episodes, way * query, way]``.
    """
    from training.data import EpisodeSampler

    sampler = EpisodeSampler(encoded.labels.tolist(), way, shot, query, episodes, seed)
    was_training = model.training
    model.eval()
    device = model.device
    support_all = encoded.support_feats.to(device)
    query_all = encoded.query_feats.to(device)
    text_all = encoded.text_feats.to(device)
    num_support = way * shot
    support_labels = torch.arange(way, device=device).repeat_interleave(shot)  # [N*K]
    classify = torch.func.vmap(model.classify if use_text else (lambda q, p: model.classify(q, p, None)))
    all_logits = np.empty((episodes, way * query, way), dtype=np.float64)
    bar = tqdm(total=episodes, desc=f"{way}-way {shot}-shot episodes", unit="ep", disable=not progress, leave=False)
    for start in range(0, episodes, chunk):
        count = min(chunk, episodes - start)
        picks = [sampler.episode(i) for i in range(start, start + count)]
        indices = torch.tensor([p[0] for p in picks], device=device)  # [E, N*K + N*Q]
        class_ids = torch.tensor([p[1] for p in picks], device=device)  # [E, N]
        support_feats = support_all[indices[:, :num_support]]  # [E, N*K, T, D]
        query_feats = query_all[indices[:, num_support:]]  # [E, N*Q, T, D]
        text_feats = text_all[class_ids]  # [E, N, D]
        # One prototype call for the whole chunk: episode e's classes are e*N .. e*N + N-1.
        offsets = (torch.arange(count, device=device) * way).view(-1, 1)  # [E, 1]
        chunk_labels = (support_labels.view(1, -1) + offsets).reshape(-1)  # [E*N*K]
        prototypes = model.build_prototypes(support_feats.flatten(0, 1), chunk_labels,
                                            text_feats.flatten(0, 1))  # [E*N, T, D]
        prototypes = prototypes.view(count, way, *prototypes.shape[1:])  # [E, N, T, D]
        with warnings.catch_warnings():
            # vmap falls back to a loop for the fused attention kernel of TPCM; results are exact.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            if use_text:
                logits = classify(query_feats, prototypes, text_feats)  # [E, N*Q, N]
            else:
                logits = classify(query_feats, prototypes)
        all_logits[start:start + count] = logits.double().cpu().numpy()
        bar.update(count)
    bar.close()
    model.train(was_training)
    return all_logits


@torch.no_grad()
def zero_shot_accuracy(model: FsarModel, encoded: EncodedSplit) -> float:
    """Zero-shot accuracy (percent) of every video of the split against all the split's label texts."""
    logits = model.zero_shot(encoded.query_feats.to(model.device), encoded.text_feats.to(model.device))  # [V, C]
    return float((logits.argmax(dim=-1).cpu() == encoded.labels).float().mean()) * 100.0


def mean_ci95(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean and 95% interval half-width ``1.96 * std / sqrt(n)`` of per-episode accuracies."""
    values = np.asarray(accuracies, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no episodes")
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(values.size))


def swap_metric(model: FsarModel, metric: str) -> None:
    """Replace the model's temporal metric (plug-and-play, docs/methods.md section 5) for evaluation.

    Parameter-free metrics (otam, bimhm, mean) swap freely; swapping TO trx gives an untrained TRX
    (a warning says so)."""
    from training.model.temporal_metrics import build_metric

    config = model.config.replace(metric=metric)
    if metric == "mean" and (config.frame_centering or config.frame_norm):
        # The temporal mean of centred frames is zero: the frame-mean baseline compares raw means
        # (of frames as the tower gives them, not scaled to unit length either).
        config = config.replace(frame_centering=False, frame_norm=False)
    if metric == model.config.metric:
        model.config = config
        return
    kwargs = {"lam": config.otam_lambda} if metric == "otam" else {}
    new_metric = build_metric(metric, model.embed_dim, model.num_frames, **kwargs).to(model.device)
    if any(True for _ in new_metric.parameters()):
        logger.warning("metric %r has parameters this checkpoint did not train; they are random", metric)
    model.metric = new_metric
    model.config = config


def load_for_eval(checkpoint: Optional[Union[str, Path]], model_config: Optional[Union[ModelConfig, dict]] = None,
                  device: Optional[Union[str, torch.device]] = None) -> tuple[FsarModel, Dict[str, Any]]:
    """The model to evaluate: a checkpoint's, or an untrained one built from ``model_config``.

    Returns ``(model, info)``; ``info`` holds ``checkpoint`` (path or None) and ``checkpoint_hash``.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if checkpoint is not None:
        if model_config is not None:
            raise ValueError("give a checkpoint or a model_config (an untrained baseline), not both")
        from training.checkpoint import load_checkpoint

        model, meta = load_checkpoint(checkpoint)
        return model.to(device), {"checkpoint": str(checkpoint), "checkpoint_hash": meta.get("checkpoint_hash")}
    if model_config is None:
        raise ValueError("evaluate needs a checkpoint or a model_config (for an untrained baseline)")
    if isinstance(model_config, dict):
        model_config = ModelConfig.from_dict(model_config)
    return build_model(model_config, device=device), {"checkpoint": None, "checkpoint_hash": None}


def evaluate(checkpoint: Optional[Union[str, Path]], data: Union[str, Path], split: str = "test", way: int = 5,
             shot: int = 1, query: int = 1, episodes: int = 10000, seed: int = DEFAULT_EVAL_SEED,
             json_path: Optional[Union[str, Path]] = None, batch_size: int = 16, num_workers: int = 2,
             zero_shot: bool = True, *, model_config: Optional[Union[ModelConfig, dict]] = None,
             metric: Optional[str] = None, use_text: bool = True, device: Optional[str] = None,
             amp: str = "auto", progress: bool = True) -> Dict[str, Any]:
    """Evaluate a checkpoint (or an untrained model) on seeded few-shot episodes of one split.

    Args:
        checkpoint: a ``.pt`` from training (``best.pt`` / ``last.pt``), or None with ``model_config``.
        data: dataset root or CSV (``training.data.load_dataset`` layouts).
        split: the split whose classes are evaluated (``test``; ``val`` during training).
        way, shot, query: N-way K-shot, Q queries per class (1: the published protocols' default).
        episodes: number of episodes (10,000 in the papers).
        seed: episode seed; the same seed gives the same episodes.
        json_path: also write the result dict there as JSON.
        batch_size, num_workers: video batches and DataLoader workers for the one encoding pass.
        zero_shot: also report zero-shot accuracy over all the split's classes.
        model_config: with ``checkpoint=None``, evaluate an untrained model of this config.
        metric: evaluate with another temporal metric (e.g. "mean" for a frame-mean baseline).
        use_text: mix the label texts' Q2T probabilities into the prediction (alpha); False = Q2S only.
        device: "cuda" / "cpu" (default: CUDA when available).
        amp: autocast on CUDA: auto | off | bf16 | fp16.

    Returns:
        dict with ``accuracy`` and ``ci95`` (percent), ``zero_shot_accuracy``, ``way``, ``shot``,
        ``query``, ``episodes``, ``seed``, ``split``, ``metric``, ``checkpoint``, ``checkpoint_hash``,
        ``fingerprint``, ``num_videos``, ``num_classes``.
    """
    from training.data import load_dataset

    for name, value in (("way", way), ("shot", shot), ("query", query), ("episodes", episodes),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    model, info = load_for_eval(checkpoint, model_config, device)
    if metric is not None:
        swap_metric(model, metric)
    model.eval()
    dataset = load_dataset(data, split, num_frames=model.num_frames, size=model.image_size[0], mode="test")
    if len(dataset.classes) < way:
        raise ValueError(f"split {split!r} has {len(dataset.classes)} classes; a {way}-way episode needs {way}")
    encoded = encode_split(model, dataset, batch_size=batch_size, num_workers=num_workers, amp=amp,
                           progress=progress, desc=f"encode {split}")
    accuracies = episode_accuracies(model, encoded, way=way, shot=shot, query=query, episodes=episodes, seed=seed,
                                    use_text=use_text, progress=progress)
    accuracy, ci95 = mean_ci95(accuracies)
    result: Dict[str, Any] = {
        "accuracy": accuracy,
        "ci95": ci95,
        "zero_shot_accuracy": zero_shot_accuracy(model, encoded) if zero_shot else None,
        "way": way, "shot": shot, "query": query, "episodes": episodes, "seed": seed, "split": split,
        "metric": model.config.metric, "use_text": use_text, "adapter": model.config.adapter,
        **info,
        "fingerprint": model.fingerprint(),
        "num_videos": len(dataset), "num_classes": len(dataset.classes),
    }
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    logger.info("%s %d-way %d-shot: %.2f +- %.2f %% over %d episodes", split, way, shot, accuracy, ci95, episodes)
    return result


def untrained_like(model: FsarModel) -> FsarModel:
    """The same architecture and frozen backbone weights as ``model`` with freshly initialised (identity)
    adapters and TPCM: what ``model`` was before training. Works for any backbone source (tag, file,
    or random weights carried by a checkpoint)."""
    torch.manual_seed(0)
    fresh = build_model(model.config.replace(pretrained=None), device=model.device)
    trainable = set(fresh.trainable_state_dict())
    frozen = {k: v for k, v in model.state_dict().items() if k not in trainable}
    fresh.load_state_dict({**fresh.state_dict(), **frozen})
    fresh.backbone_hash, fresh.weights_source = model.backbone_hash, model.weights_source
    fresh.config = model.config
    return fresh.eval()


def baseline_table(checkpoint: Union[str, Path], data: Union[str, Path], split: str = "test", way: int = 5,
                   shot: int = 1, query: int = 1, episodes: int = 1000, seed: int = DEFAULT_EVAL_SEED,
                   json_path: Optional[Union[str, Path]] = None, batch_size: int = 16, num_workers: int = 2,
                   device: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Does training help? A trained checkpoint against baselines on the same seeded episodes.

    Rows (accuracy in percent +- 95% interval): the trained model with its metric (the served
    prediction); the untrained model (same frozen backbone, identity adapters and TPCM) with the same
    metric; both with the frame-mean metric (ProtoNet on temporal means, blind to frame order).

    Returns:
        ``{"rows": [{"method", "accuracy", "ci95", "zero_shot_accuracy"}], "table": markdown str, "way", "shot",
        "query", "episodes", "seed", "split", "checkpoint", "checkpoint_hash"}``; also written to ``json_path``.
    """
    from training.data import load_dataset

    trained, info = load_for_eval(checkpoint, None, device)
    trained.eval()
    untrained = untrained_like(trained)
    metric = trained.config.metric
    dataset = load_dataset(data, split, num_frames=trained.num_frames, size=trained.image_size[0], mode="test")
    rows = []
    for label, model in (("trained", trained), ("untrained", untrained)):
        encoded = encode_split(model, dataset, batch_size=batch_size, num_workers=num_workers, progress=progress,
                               desc=f"encode {split} ({label})")
        zero_shot = zero_shot_accuracy(model, encoded)
        own_metric, own_config = model.metric, model.config
        for metric_name in (metric, "mean"):
            swap_metric(model, metric_name)
            accuracy, ci95 = mean_ci95(episode_accuracies(model, encoded, way=way, shot=shot, query=query,
                                                          episodes=episodes, seed=seed, progress=progress))
            name = f"{label} adapters + {'frame-mean' if metric_name == 'mean' else metric_name.upper()}"
            rows.append({"method": name, "accuracy": accuracy, "ci95": ci95, "zero_shot_accuracy": zero_shot})
        model.metric, model.config = own_metric, own_config  # a trained TRX keeps its weights
    lines = [f"| method ({split}, {way}-way {shot}-shot, {episodes} episodes) | accuracy % | zero-shot % |",
             "| --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['accuracy']:.2f} ± {r['ci95']:.2f} | {r['zero_shot_accuracy']:.1f} |"
              for r in rows]
    result = {"rows": rows, "table": "\n".join(lines), "way": way, "shot": shot, "query": query,
              "episodes": episodes, "seed": seed, "split": split, **info}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- precision
def _cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of each row of ``a`` with the same row of ``b`` (last dimension = features)."""
    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]).double(),
                                                 b.reshape(-1, b.shape[-1]).double(), dim=-1)


def precision_table(checkpoint: Optional[Union[str, Path]], data: Union[str, Path], split: str = "test",
                    way: int = 5, shot: int = 1, query: int = 1, episodes: int = 2000,
                    seed: int = DEFAULT_EVAL_SEED, json_path: Optional[Union[str, Path]] = None,
                    batch_size: int = 16, num_workers: int = 2, *,
                    model_config: Optional[Union[ModelConfig, dict]] = None, threads: Optional[int] = None,
                    onnx_cache_dir: Optional[Union[str, Path]] = None, progress: bool = True) -> Dict[str, Any]:
    """What the serving precision costs: the model's encoders on torch fp32, ONNX Runtime fp32 and ONNX
    Runtime int8 (dynamic quantisation, the embedded backend's ``precision=int8``), on the same seeded
    episodes of ``split``, on the CPU.

    Each variant encodes the split once (:func:`encode_split` with its runner); the few-shot head (TPCM and
    the metric) is the model's, in torch, for all three. Per row: accuracy +- 95% interval, the paired
    difference to ONNX Runtime fp32 on the same episodes (mean +- 95% interval of the per-episode
    differences), zero-shot accuracy, and the cosine of its features with ONNX Runtime fp32's: per
    frame feature (query path: min and mean) and per label text (min).

    Returns:
        ``{"rows": [{"runtime", "precision", "accuracy", "ci95", "delta_vs_fp32", "delta_ci95",
        "zero_shot_accuracy", "frame_cosine_min", "frame_cosine_mean", "text_cosine_min"}], "table":
        markdown, "way", "shot", "query", "episodes", "seed", "split", "checkpoint", "checkpoint_hash",
        "fingerprint"}``; also written to ``json_path``.
    """
    import os

    from training.data import load_dataset
    from training.onnx import OnnxModelRunner, onnx_available

    if not onnx_available():
        raise RuntimeError("comparing precisions needs onnxruntime, onnx and onnxscript: pip install 'fsar[onnx]'")
    for name, value in (("way", way), ("shot", shot), ("query", query), ("episodes", episodes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    model, info = load_for_eval(checkpoint, model_config, "cpu")  # the ONNX graphs are CPU fp32 exports
    model = model.float().eval()
    dataset = load_dataset(data, split, num_frames=model.num_frames, size=model.image_size[0], mode="test")
    if len(dataset.classes) < way:
        raise ValueError(f"split {split!r} has {len(dataset.classes)} classes; a {way}-way episode needs {way}")
    threads = threads or max(1, os.cpu_count() or 1)
    variants: Dict[str, tuple] = {}
    for runtime, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")):
        runner = None if runtime == "torch" else OnnxModelRunner.build(model, precision, threads, cache_dir=onnx_cache_dir)
        encoded = encode_split(model, dataset, batch_size=batch_size, num_workers=num_workers, progress=progress,
                               desc=f"encode {split} ({runtime} {precision})", runner=runner)
        accuracies = episode_accuracies(model, encoded, way=way, shot=shot, query=query, episodes=episodes,
                                        seed=seed, progress=progress)
        variants[f"{runtime} {precision}"] = (runtime, precision, encoded, accuracies)
    _, _, reference, reference_acc = variants["onnxruntime fp32"]
    rows = []
    for name, (runtime, precision, encoded, accuracies) in variants.items():
        accuracy, ci95 = mean_ci95(accuracies)
        delta, delta_ci = mean_ci95(accuracies - reference_acc)
        frames = _cosines(encoded.query_feats, reference.query_feats)
        rows.append({"runtime": runtime, "precision": precision, "accuracy": accuracy, "ci95": ci95,
                     "delta_vs_fp32": delta, "delta_ci95": delta_ci,
                     "zero_shot_accuracy": zero_shot_accuracy(model, encoded),
                     "frame_cosine_min": float(frames.min()), "frame_cosine_mean": float(frames.mean()),
                     "text_cosine_min": float(_cosines(encoded.text_feats, reference.text_feats).min())})
    lines = [f"| encoder ({split}, {way}-way {shot}-shot, {episodes} episodes) | accuracy % | vs ONNX Runtime fp32 "
             f"(same episodes) | zero-shot % | frame cosine to fp32: min / mean | text cosine min |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['runtime']} {r['precision']} | {r['accuracy']:.2f} ± {r['ci95']:.2f} | "
              f"{r['delta_vs_fp32']:+.2f} ± {r['delta_ci95']:.2f} | {r['zero_shot_accuracy']:.1f} | "
              f"{r['frame_cosine_min']:.5f} / {r['frame_cosine_mean']:.5f} | {r['text_cosine_min']:.5f} |"
              for r in rows]
    result = {"rows": rows, "table": "\n".join(lines), "way": way, "shot": shot, "query": query,
              "episodes": episodes, "seed": seed, "split": split, **info, "fingerprint": model.fingerprint()}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- open set
OPEN_SET_STREAM = 7001  # seeds the unknown queries of open-set episode i as default_rng([seed, 7001, i])
OPEN_SET_FIELDS = ("auroc", "accuracy", "known_accuracy", "unknown_rejection", "known_accepted")
_SCORE_TITLES = {"distance": "open_set_score (normalised nearest distance)", "msp": "MSP baseline (1 - max p)",
                 "margin": "margin (1 - top-2 gap)"}


@torch.no_grad()
def open_set_episodes(model: FsarModel, encoded: EncodedSplit, *, way: int = 5, shot: int = 1, query: int = 1,
                      episodes: int = 2000, seed: int = DEFAULT_EVAL_SEED,
                      default_thresholds: Optional[Dict[str, float]] = None, accept: Optional[float] = None,
                      use_text: bool = True, progress: bool = True) -> Dict[str, Dict[str, np.ndarray]]:
    """Open-set episodes on cached features: N-way K-shot known classes plus as many unknown queries.

    Episode i's support and known queries are ``EpisodeSampler(labels, way, shot, query, episodes, seed)``'s
    episode i (the very episodes of :func:`episode_accuracies`); its ``way * query`` unknown queries are
    drawn without replacement from the split's videos of the classes outside the episode
    (``default_rng([seed, OPEN_SET_STREAM, i])``). Each support set is calibrated as the gateway does
    (:func:`training.open_set.calibrate_support_set`: leave-one-out when a class has >= 2 shots, else
    ``default_thresholds``), and every score of :data:`training.open_set.SCORE_NAMES` is measured on the
    same queries.

    Returns:
        ``{score: {field: float64 [episodes]}}`` with fields (percent) ``auroc`` (unknown vs known by the
        score), ``accuracy`` (a query is right when known, correctly labelled and accepted, or unknown
        and rejected), ``known_accuracy`` (known queries correctly labelled and accepted),
        ``unknown_rejection`` (unknown queries rejected), ``known_accepted`` (known queries accepted);
        plus ``known_scores`` ``[episodes * way * query]``, the known queries' scores (pooled).
    """
    from training.data import EpisodeSampler
    from training.open_set import (DEFAULT_ACCEPT, SCORE_NAMES, auroc, calibrate, calibration_logits,
                                   default_threshold, mix_probabilities, score_by_name)

    accept = DEFAULT_ACCEPT if accept is None else accept
    thresholds = {name: default_threshold(None, name) for name in SCORE_NAMES}
    thresholds.update(default_thresholds or {})
    sampler = EpisodeSampler(encoded.labels.tolist(), way, shot, query, episodes, seed)
    labels_all = encoded.labels.numpy()
    was_training = model.training
    model.eval()
    device = model.device
    alpha = model.config.alpha if use_text else 0.0

    def floats(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)

    def build(feats: np.ndarray, labels: np.ndarray, texts: Optional[np.ndarray]) -> np.ndarray:
        return model.build_prototypes(floats(feats), torch.from_numpy(labels).to(device),
                                      None if texts is None else floats(texts)).float().cpu().numpy()

    def q2s(queries: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
        return model.q2s_logits(floats(queries), floats(prototypes)).double().cpu().numpy()

    def q2t(queries: np.ndarray, texts: np.ndarray) -> Optional[np.ndarray]:
        return model.zero_shot(floats(queries), floats(texts)).double().cpu().numpy() if alpha > 0 else None

    support_all = encoded.support_feats.numpy()
    query_all = encoded.query_feats.numpy()
    text_all = encoded.text_feats.numpy()
    num_support, num_known = way * shot, way * query
    support_labels = np.repeat(np.arange(way), shot)
    query_labels = np.repeat(np.arange(way), query)
    is_unknown = np.concatenate([np.zeros(num_known, bool), np.ones(num_known, bool)])
    results = {name: {field: np.empty(episodes) for field in OPEN_SET_FIELDS} for name in SCORE_NAMES}
    known_scores: Dict[str, list] = {name: [] for name in SCORE_NAMES}
    for index in tqdm(range(episodes), desc=f"open-set {way}-way {shot}-shot", unit="ep", disable=not progress,
                      leave=False):
        indices, class_ids = sampler.episode(index)
        pool = np.flatnonzero(~np.isin(labels_all, class_ids))
        if pool.size < num_known:
            raise ValueError(f"open-set episodes need {num_known} videos outside the {way} episode classes; "
                             f"the split has {pool.size}")
        unknown = np.random.default_rng([seed, OPEN_SET_STREAM, index]).choice(pool, num_known, replace=False)
        support = support_all[indices[:num_support]]
        texts = text_all[class_ids] if use_text else None
        queries = np.concatenate([query_all[indices[num_support:]], query_all[unknown]])  # [2 N Q, T, D]
        prototypes = build(support, support_labels, texts)
        plan, q2s_support, q2s_own = calibration_logits(support, support_labels, texts, build, q2s,
                                                        prototypes=prototypes)
        q2t_support = q2t(support, texts) if texts is not None else None
        query_q2s = q2s(queries, prototypes)
        query_probs = mix_probabilities(query_q2s, q2t(queries, texts) if texts is not None else None, alpha)
        predicted_right = np.concatenate([query_probs[:num_known].argmax(axis=1) == query_labels,
                                          np.zeros(num_known, bool)])
        for name in SCORE_NAMES:
            calibration = calibrate(plan, q2s_support, q2s_own, default_threshold=thresholds[name],
                                    q2t_support=q2t_support, alpha=alpha, accept=accept, score=name)
            scores = score_by_name(name, query_q2s, query_probs, calibration.reference)
            rejected = scores > calibration.threshold
            right = np.where(is_unknown, rejected, predicted_right & ~rejected)
            row = results[name]
            row["auroc"][index] = 100.0 * auroc(scores[~is_unknown], scores[is_unknown])
            row["accuracy"][index] = 100.0 * right.mean()
            row["known_accuracy"][index] = 100.0 * right[~is_unknown].mean()
            row["unknown_rejection"][index] = 100.0 * right[is_unknown].mean()
            row["known_accepted"][index] = 100.0 * (~rejected[~is_unknown]).mean()
            known_scores[name].append(scores[~is_unknown])
    model.train(was_training)
    for name in SCORE_NAMES:
        results[name]["known_scores"] = np.concatenate(known_scores[name])
    return results


def open_set_table(checkpoint: Optional[Union[str, Path]], data: Union[str, Path], split: str = "test",
                   way: int = 5, shot: int = 1, query: int = 1, episodes: int = 2000,
                   seed: int = DEFAULT_EVAL_SEED, accept: Optional[float] = None, record: bool = False,
                   record_split: str = "val", json_path: Optional[Union[str, Path]] = None,
                   batch_size: int = 16, num_workers: int = 2, *,
                   model_config: Optional[Union[ModelConfig, dict]] = None, use_text: bool = True,
                   device: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Open-set ("none of these") evaluation: each score against the MSP baseline on the same episodes.

    See :func:`open_set_episodes` for the episodes and fields. One-shot sets use the model-level default
    thresholds: those the checkpoint records, else :data:`training.open_set.DEFAULT_THRESHOLDS`. With
    ``record``, they are first measured on ``record_split`` (way-way 1-shot episodes of the same count and
    seed; the ``accept`` quantile of the known queries' scores) and written into the checkpoint
    (:func:`training.checkpoint.record_open_set`), then used.

    Returns:
        ``{"rows": [{"score", "method", field: mean, field + "_ci95": half-width, ...}], "table": markdown,
        "default_thresholds", "threshold_source", "accept", "way", "shot", "query", "episodes", "seed",
        "split", "checkpoint", "checkpoint_hash"}``; also written to ``json_path``.
    """
    from training.data import load_dataset
    from training.open_set import DEFAULT_ACCEPT, SCORE_NAMES, accept_threshold, default_threshold

    accept = DEFAULT_ACCEPT if accept is None else accept
    for name, value in (("way", way), ("shot", shot), ("query", query), ("episodes", episodes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if record and checkpoint is None:
        raise ValueError("--record writes the thresholds into a checkpoint; give --checkpoint")
    model, info = load_for_eval(checkpoint, model_config, device)
    model.eval()

    def encoded_split(name: str) -> EncodedSplit:
        dataset = load_dataset(data, name, num_frames=model.num_frames, size=model.image_size[0], mode="test")
        if len(dataset.classes) <= way:
            raise ValueError(f"split {name!r} has {len(dataset.classes)} classes; open-set {way}-way episodes "
                             f"need more than {way} (the others give the unknown queries)")
        return encode_split(model, dataset, batch_size=batch_size, num_workers=num_workers, progress=progress,
                            desc=f"encode {name}")

    meta: Dict[str, Any] = {}
    if checkpoint is not None:
        from training.checkpoint import read_checkpoint_meta

        meta = read_checkpoint_meta(checkpoint)
    source = "checkpoint" if meta.get("open_set") else "DEFAULT_THRESHOLDS"
    thresholds = {name: default_threshold(meta, name) for name in SCORE_NAMES}
    if record:
        measured = open_set_episodes(model, encoded_split(record_split), way=way, shot=1, query=query,
                                     episodes=episodes, seed=seed, accept=accept, use_text=use_text,
                                     progress=progress)
        thresholds = {name: accept_threshold(measured[name]["known_scores"], accept) for name in SCORE_NAMES}
        from training.checkpoint import record_open_set

        record_open_set(checkpoint, {"default_thresholds": thresholds, "score": "distance", "accept": accept,
                                     "split": record_split, "way": way, "shot": 1, "query": query,
                                     "episodes": episodes, "seed": seed, "use_text": use_text})
        source = f"measured on {record_split} and recorded"
    results = open_set_episodes(model, encoded_split(split), way=way, shot=shot, query=query, episodes=episodes,
                                seed=seed, default_thresholds=thresholds, accept=accept, use_text=use_text,
                                progress=progress)
    rows = []
    for name in SCORE_NAMES:
        row: Dict[str, Any] = {"score": name, "method": _SCORE_TITLES[name]}
        for field in OPEN_SET_FIELDS:
            row[field], row[field + "_ci95"] = mean_ci95(results[name][field])
        rows.append(row)
    threshold_note = ("leave-one-out per set" if shot > 1 else
                      f"1-shot default ({source})")
    lines = [f"| score ({split}, {way}-way {shot}-shot + {way * query} unknown queries, {episodes} episodes; "
             f"threshold: {threshold_note}, accept {accept:.0%}) | AUROC % | accuracy % | known acc. % "
             f"| unknown rejected % | known accepted % |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + r["method"] + " | " + " | ".join(f"{r[f]:.2f} ± {r[f + '_ci95']:.2f}" for f in OPEN_SET_FIELDS)
              + " |" for r in rows]
    result = {"rows": rows, "table": "\n".join(lines), "default_thresholds": thresholds,
              "threshold_source": source, "accept": accept, "way": way, "shot": shot, "query": query,
              "episodes": episodes, "seed": seed, "split": split, "use_text": use_text, **info}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


CALIBRATION_FIELDS = ("accuracy", "confidence", "ece", "nll", "brier")
_CALIBRATION_BOOTSTRAP = 200


def _calibration_row(name: str, probs: np.ndarray, labels: np.ndarray, temperature: float,
                     seed: int) -> Dict[str, Any]:
    """One row of :func:`calibration_table`: the summary of ``probs [E, M, N]`` over all queries, each
    field with a 95% interval (ECE: from a bootstrap over episodes; the others over episodes)."""
    from training.calibration import calibration_summary, expected_calibration_error

    flat_probs, flat_labels = probs.reshape(-1, probs.shape[-1]), labels.reshape(-1)
    row: Dict[str, Any] = {"probabilities": name, "temperature": temperature,
                           **calibration_summary(flat_probs, flat_labels)}
    per_episode = [calibration_summary(p, y) for p, y in zip(probs, labels)]
    for field in ("accuracy", "confidence", "nll", "brier"):
        row[field + "_ci95"] = mean_ci95(np.array([s[field] for s in per_episode]))[1]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(_CALIBRATION_BOOTSTRAP):  # episodes drawn with replacement
        pick = rng.integers(0, len(probs), len(probs))
        draws.append(expected_calibration_error(probs[pick].reshape(-1, probs.shape[-1]), labels[pick].reshape(-1)))
    row["ece_ci95"] = 1.96 * float(np.std(draws))
    return row


def _encoded_split(model: FsarModel, data: Union[str, Path], name: str, *, way: int, batch_size: int,
                   num_workers: int, progress: bool) -> EncodedSplit:
    """Split ``name`` encoded once, refused when it has fewer than ``way`` classes."""
    from training.data import load_dataset

    dataset = load_dataset(data, name, num_frames=model.num_frames, size=model.image_size[0], mode="test")
    if len(dataset.classes) < way:
        raise ValueError(f"split {name!r} has {len(dataset.classes)} classes; a {way}-way episode needs {way}")
    return encode_split(model, dataset, batch_size=batch_size, num_workers=num_workers, progress=progress,
                        desc=f"encode {name}")


def _fit_calibration(model: FsarModel, data: Union[str, Path], fit_split: str, *, way: int, query: int,
                     episodes: int, seed: int, use_text: bool, batch_size: int, num_workers: int,
                     progress: bool) -> Dict[str, Any]:
    """Temperatures fitted on ``fit_split``'s episodes at each shot count of
    :data:`training.calibration.FIT_SHOTS` the split has clips for (``shots + query`` a class), and how:
    ``{"temperature": T at the fewest shots, "temperatures": {"1": T, ...}, "nll": {"1": [before, after],
    ...}, "split", "way", "query", "episodes", "seed", "use_text"}`` (what
    :func:`training.checkpoint.record_calibration` stores)."""
    from training.calibration import FIT_SHOTS, fit_temperature, nll

    for name, value in (("way", way), ("query", query), ("episodes", episodes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if way < 2:
        raise ValueError("calibration needs at least 2 classes an episode (way >= 2)")
    encoded = _encoded_split(model, data, fit_split, way=way, batch_size=batch_size, num_workers=num_workers,
                             progress=progress)
    counts = np.bincount(encoded.labels.numpy())
    fewest = int(np.sort(counts[counts > 0])[-way])  # the way-th largest class: episodes need `way` such classes
    temperatures: Dict[str, float] = {}
    losses: Dict[str, list] = {}
    for shots in (s for s in FIT_SHOTS if s + query <= fewest):
        logits = episode_logits(model, encoded, way=way, shot=shots, query=query, episodes=episodes, seed=seed,
                                use_text=use_text, progress=progress).reshape(-1, way)
        labels = np.tile(np.repeat(np.arange(way), query), episodes)
        temperatures[str(shots)] = fit_temperature(logits, labels)
        losses[str(shots)] = [nll(logits, labels), nll(logits, labels, temperatures[str(shots)])]
    if not temperatures:
        raise ValueError(f"split {fit_split!r} has too few clips a class for a {way}-way 1-shot episode with "
                         f"{query} quer{'y' if query == 1 else 'ies'} a class")
    first = next(iter(temperatures))
    return {"temperature": temperatures[first], "temperatures": temperatures, "nll": losses, "split": fit_split,
            "way": way, "query": query, "episodes": episodes, "seed": seed, "use_text": use_text}


def calibrate_checkpoint(checkpoint: Union[str, Path], data: Union[str, Path], fit_split: str = "val", way: int = 5,
                         query: int = 1, episodes: int = 2000, seed: int = DEFAULT_EVAL_SEED, *,
                         use_text: bool = True, batch_size: int = 16, num_workers: int = 2,
                         device: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Fit the temperatures of a checkpoint's few-shot probabilities on ``fit_split`` (one per shot count of
    :data:`training.calibration.FIT_SHOTS` the split allows) and record them in the checkpoint
    (``meta["calibration"]``; what ``fsar eval --calibrate --record`` does without the test table).
    Returns the record."""
    from training.checkpoint import record_calibration

    model, _ = load_for_eval(checkpoint, None, device)
    model.eval()
    fit = _fit_calibration(model, data, fit_split, way=way, query=query, episodes=episodes, seed=seed,
                           use_text=use_text, batch_size=batch_size, num_workers=num_workers, progress=progress)
    record_calibration(checkpoint, fit)
    return fit


def calibration_table(checkpoint: Union[str, Path], data: Union[str, Path], split: str = "test", way: int = 5,
                      shot: int = 1, query: int = 1, episodes: int = 2000, seed: int = DEFAULT_EVAL_SEED,
                      record: bool = False, fit_split: str = "val", json_path: Optional[Union[str, Path]] = None,
                      batch_size: int = 16, num_workers: int = 2, *, use_text: bool = True,
                      device: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Do the model's few-shot probabilities mean what they say? Temperature scaling, fitted and checked.

    Fits temperatures (:func:`training.calibration.fit_temperature`) on ``fit_split``'s seeded ``way``-way
    episodes (classes the evaluation does not use), one per shot count of
    :data:`training.calibration.FIT_SHOTS` the split has clips for; then on ``split``'s ``shot``-shot
    episodes (the same count and seed) compares the probabilities as the model gives them, as served with
    the temperature the checkpoint records for ``shot`` (when it records one), and with the fitted one for
    ``shot`` (:func:`training.calibration.recorded_temperature`, as the gateway picks it): accuracy (the
    same in every row: temperature keeps the ranking), mean confidence, ECE, NLL and Brier score. With
    ``record`` the fitted temperatures are written into the checkpoint (``meta["calibration"]``), which the
    gateway then applies to every few-shot answer.

    Returns:
        ``{"rows": [...], "table": markdown, "temperature", "fit": {...}, "recorded_before", "way", "shot",
        "query", "episodes", "seed", "split", "checkpoint", "checkpoint_hash"}``; also written to ``json_path``.
    """
    from training.calibration import _log_softmax, recorded_temperature, temper
    from training.checkpoint import read_checkpoint_meta, record_calibration

    model, info = load_for_eval(checkpoint, None, device)
    model.eval()
    before = recorded_temperature(read_checkpoint_meta(checkpoint), shot)
    common = dict(way=way, batch_size=batch_size, num_workers=num_workers, progress=progress)
    fit = _fit_calibration(model, data, fit_split, query=query, episodes=episodes, seed=seed, use_text=use_text,
                           **common)
    temperature = recorded_temperature({"calibration": fit}, shot)  # for sets of `shot` clips a class
    if record:
        record_calibration(checkpoint, fit)
    test_logits = episode_logits(model, _encoded_split(model, data, split, **common), way=way, shot=shot,
                                 query=query, episodes=episodes, seed=seed, use_text=use_text,
                                 progress=progress)  # [E, N*Q, N]
    labels = np.broadcast_to(np.repeat(np.arange(way), query), test_logits.shape[:2])
    probs = np.exp(_log_softmax(test_logits))  # [E, M, N] as the model gives them

    candidates = [("as the model gives them", 1.0)]
    if before != 1.0:
        candidates.append(("recorded before this run", before))
    candidates.append((f"fitted on {fit_split}" + (" (now recorded)" if record else ""), temperature))
    rows = [_calibration_row(name, temper(probs, t), labels, t, seed) for name, t in candidates]
    lines = [f"| probabilities ({split}, {way}-way {shot}-shot, {episodes} episodes) | T | accuracy % | "
             f"confidence % | ECE % | NLL | Brier |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['probabilities']} | {r['temperature']:.3g} | "
                     + " | ".join(f"{r[f]:.2f} ± {r[f + '_ci95']:.2f}" if f in ("accuracy", "confidence", "ece")
                                  else f"{r[f]:.3f} ± {r[f + '_ci95']:.3f}" for f in CALIBRATION_FIELDS) + " |")
    result = {"rows": rows, "table": "\n".join(lines), "temperature": temperature, "fit": fit,
              "recorded_before": before if before != 1.0 else None, "recorded": record, "way": way, "shot": shot,
              "query": query, "episodes": episodes, "seed": seed, "split": split, "use_text": use_text, **info}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
