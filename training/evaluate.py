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
                 amp: str = "auto", progress: bool = True, desc: str = "encode") -> EncodedSplit:
    """Encode every video of ``dataset`` (a ``VideoDataset``) once; see :class:`EncodedSplit`."""
    from torch.utils.data import DataLoader

    from training.data import collate_supervised

    if len(dataset) == 0:
        raise ValueError("the split has no videos to evaluate")
    was_training = model.training
    model.eval()
    device = model.device
    text_feats = model.encode_text(dataset.label_texts).float()  # [C, D]
    uses_text = model.config.uses_ma
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_supervised)
    query_chunks, support_chunks, label_chunks = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        frames, labels = batch["frames"], batch["labels"]
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
    texts mix in Q2T when ``use_text`` and the model's ``alpha > 0``).

    Returns:
        float64 ``[episodes]`` accuracies in percent.
    """
    from training.data import EpisodeSampler

    sampler = EpisodeSampler(encoded.labels.tolist(), way, shot, query, episodes, seed)
    was_training = model.training
    model.eval()
    device = model.device
    support_all = encoded.support_feats.to(device)
    query_all = encoded.query_feats.to(device)
    text_all = encoded.text_feats.to(device)
    num_support, num_query = way * shot, way * query
    support_labels = torch.arange(way, device=device).repeat_interleave(shot)  # [N*K]
    query_labels = torch.arange(way, device=device).repeat_interleave(query)  # [N*Q]
    classify = torch.func.vmap(model.classify if use_text else (lambda q, p: model.classify(q, p, None)))
    accuracies = np.empty(episodes, dtype=np.float64)
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
        correct = (logits.argmax(dim=-1) == query_labels).float().mean(dim=1)  # [E]
        accuracies[start:start + count] = correct.cpu().numpy() * 100.0
        bar.update(count)
    bar.close()
    model.train(was_training)
    return accuracies


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
    if metric == "mean" and config.frame_centering:
        # The temporal mean of centred frames is zero: the frame-mean baseline compares raw means.
        config = config.replace(frame_centering=False)
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
