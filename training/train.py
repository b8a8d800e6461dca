"""The training loop for both regimes: few-shot episodes (MA-CLIP) and supervised multi-task (M2-CLIP).

``train`` is what ``fsar train --config CONFIG --data ROOT --out DIR [--max-steps N] [key=value ...]``
runs::

    summary = train("synthetic-tiny", "data/synth", "runs/tiny")
    summary["best_checkpoint"]        # runs/tiny/best.pt, best validation accuracy

What one optimiser step does (``grad_accum`` iterations, each one episode or one batch):

- episodic: encode the episode's label texts ``[N, D]``, the support videos (with their label
  text on MA-CLIP's multimodal branch) ``[N*K, T, D]`` and the queries ``[N*Q, T, D]``; build
  prototypes (TPCM); Q2S logits from the temporal metric, Q2T and S2T logits against the label
  texts; ``episodic_loss`` (``alpha`` or CLIP-FSAR's ``text_weight``). Accuracy is that of
  :meth:`FsarModel.classify`, the prediction serving makes.
- supervised: encode the batch ``[B, T, D]`` (+ class tokens ``[B, T, C]``) and ALL the training
  class texts ``[C, D]``; contrastive KL + CMC + VC + CMLM through ``multitask_loss``. Accuracy is
  zero-shot over the training classes (the CMC prediction).

Before anything else, ``training.preflight.check_training_data`` checks the config against the
dataset (classes and videos per class for the episode settings, missing videos, label texts, batches)
and stops with one sentence naming the key to change. Around the loop: optimiser and schedule from
the config (``training.optim``), autocast on CUDA (bf16, or fp16 with a gradient scaler; off on
CPU), gradient accumulation, a tqdm bar with loss and accuracy, ``DIR/metrics.csv`` (and
TensorBoard when installed), DDP under ``torchrun`` (process group from the environment when
``WORLD_SIZE > 1``; each rank takes its own episodes / batches; only rank 0 writes), resume from
``DIR/last.pt`` + ``DIR/last.state.pt`` (trainable weights, optimiser, scheduler, scaler, heads,
step, RNG), and periodic validation written to ``DIR/best.pt`` when it improves. Checkpoints go
through :mod:`training.checkpoint`.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from training.config import ConfigError, TrainConfig, load_config, save_config
from training.evaluate import autocast_context, encode_split, episode_accuracies, mean_ci95, zero_shot_accuracy
from training.model import FsarModel, build_model
from training.optim import build_optimizer, build_scheduler, effective_lr
from training.preflight import check_training_data, validation_mode

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
LAST_STATE = "last.state.pt"  # optimiser, scheduler, scaler, heads, RNG: the rest of a resumable run
BEST_CHECKPOINT = "best.pt"
METRICS_CSV = "metrics.csv"
CONFIG_YAML = "config.yaml"
PRETRAINED_BACKBONE = "backbone.pt"  # stand-in pretrained tiny backbone (pretrain.steps > 0)

EPISODIC_PARTS = ("q2s", "q2t", "s2t")
SUPERVISED_PARTS = ("kl", "cmc", "vc", "mlm")


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad data for the config, an incompatible run in DIR)."""


# --------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``): NCCL on GPUs, Gloo on CPU.

    ``device``: force "cpu" / "cuda"; default CUDA (this rank's ``LOCAL_RANK`` GPU) when available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# --------------------------------------------------------------------------- objectives
class EpisodicObjective(nn.Module):
    """MA-CLIP's episode loss around a model (an ``nn.Module`` so DDP can wrap it).

    ``forward(episode)`` takes the dict of ``training.data.EpisodeCollate`` and returns
    ``(total loss, {part: float}, accuracy in [0, 1])``.
    """

    def __init__(self, model: FsarModel, alpha: float, loss_scale: float = 1.0):
        super().__init__()
        self.model = model
        self.alpha = alpha
        self.loss_scale = loss_scale

    def forward(self, episode: Dict[str, Any]):
        model = self.model
        device = model.device
        support_labels = episode["support_labels"].to(device)  # [N*K]
        query_labels = episode["query_labels"].to(device)  # [N*Q]
        text_feats = model.encode_text(episode["label_texts"])  # [N, D]
        if "support_feats" in episode:  # cached frame features of a frozen image tower
            support_feats = episode["support_feats"].to(device)  # [N*K, T, D]
            query_feats = episode["query_feats"].to(device)  # [N*Q, T, D]
        else:
            support_texts = text_feats[support_labels] if model.config.uses_ma else None  # [N*K, D]
            support_feats = model.encode_video(episode["support_frames"], texts=support_texts)  # [N*K, T, D]
            query_feats = model.encode_video(episode["query_frames"])  # [N*Q, T, D]
        prototypes = model.build_prototypes(support_feats, support_labels, text_feats)  # [N, T, D]
        q2s_logits = model.q2s_logits(query_feats, prototypes)  # [N*Q, N]
        q2t_logits = model.zero_shot(query_feats, text_feats)  # [N*Q, N]
        s2t_logits = model.zero_shot(support_feats, text_feats)  # [N*K, N]
        from training.losses import episodic_loss

        parts = episodic_loss(q2s_logits.float(), q2t_logits.float(), s2t_logits.float(), query_labels,
                              support_labels, self.alpha)
        with torch.no_grad():
            logits = model.classify(query_feats.detach(), prototypes.detach(), text_feats.detach())
            accuracy = (logits.argmax(dim=-1) == query_labels).float().mean().item()
        return parts["total"] * self.loss_scale, {k: parts[k] for k in EPISODIC_PARTS}, accuracy


class MultitaskObjective(nn.Module):
    """M2-CLIP's supervised multi-task loss: contrastive KL, CMC, VC and CMLM heads around a model.

    ``forward(batch)`` takes ``dict(frames [B,T,S,S,3], labels [B])`` and returns
    ``(total loss, {part: float}, accuracy in [0, 1])``.
    """

    def __init__(self, model: FsarModel, class_texts: Sequence[str], *, weights: Optional[Dict[str, float]] = None,
                 mask_prob: float = 0.15, vc_dropout: float = 0.5, seed: int = 0):
        super().__init__()
        from training.losses import CMLMHead, VisualClassifier, build_word_vocab
        from training.model.injection import AdaptedBlock

        self.model = model
        self.class_texts = list(class_texts)
        self.weights = weights
        self.mask_prob = mask_prob
        text_block = model.clip.transformer.resblocks[-1]
        if isinstance(text_block, AdaptedBlock):
            text_block = text_block.block  # the frozen open_clip block, without our adapters
        self.vc_head = VisualClassifier(model.visual_width, len(self.class_texts), model.clip.visual.ln_post,
                                        dropout=vc_dropout)
        self.cmlm_head = CMLMHead(text_block, model.clip.token_embedding, model.clip.positional_embedding,
                                  build_word_vocab(self.class_texts),
                                  adapter_dim=min(model.config.text_adapter_width, model.embed_dim))
        self.register_buffer("class_word_ids", self.cmlm_head.encode(self.class_texts), persistent=False)  # [C, Lw]
        self.mask_generator = torch.Generator(device="cpu").manual_seed(seed)

    def head_state_dict(self) -> Dict[str, Tensor]:
        """Trainable state of the VC and CMLM heads (for resuming)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def forward(self, batch: Dict[str, Tensor]):
        from training.losses import contrastive_kl_loss, cmc_loss, multitask_loss

        model = self.model
        labels = batch["labels"].to(model.device)  # [B]
        tokens = model.encode_video_tokens(batch["frames"])
        frame_feats, cls_tokens = tokens["frame_feats"], tokens["cls_tokens"]  # [B, T, D], [B, T, C]
        video_emb = model.video_embedding(frame_feats).float()  # [B, D]
        class_text_feats = model.encode_text(self.class_texts).float()  # [C, D], re-encoded: text adapters train
        log_scale = model.clip.logit_scale
        word_ids = self.class_word_ids[labels]  # [B, Lw]
        mask_generator = self.mask_generator if word_ids.device.type == "cpu" else None
        parts = {
            "kl": contrastive_kl_loss(video_emb, class_text_feats[labels], labels, log_scale),
            "cmc": cmc_loss(video_emb, class_text_feats, labels, log_scale),
            "vc": F.cross_entropy(self.vc_head(cls_tokens).float(), labels),
            "mlm": self.cmlm_head.masked_loss(frame_feats, word_ids, self.mask_prob, mask_generator).float(),
        }
        total, log = multitask_loss(parts, self.weights)
        with torch.no_grad():
            cosine = F.normalize(video_emb, dim=-1) @ F.normalize(class_text_feats, dim=-1).t()  # [B, C]
            accuracy = (cosine.argmax(dim=-1) == labels).float().mean().item()
        return total, {k: log[k] for k in SUPERVISED_PARTS}, accuracy


# --------------------------------------------------------------------------- data
class _EpisodeStream:
    """Batch sampler over episodes ``first, first + world, ...`` of an ``EpisodeSampler`` (exact resume)."""

    def __init__(self, sampler, first: int, world_size: int, rank: int):
        self.sampler, self.first, self.world_size, self.rank = sampler, first, world_size, rank

    def __iter__(self) -> Iterator[List[int]]:
        for index in range(self.first + self.rank, self.sampler.episodes, self.world_size):
            yield self.sampler.episode(index)[0]

    def __len__(self) -> int:
        return len(range(self.first + self.rank, self.sampler.episodes, self.world_size))


class _CachedEpisodeStream:
    """Episodes ``first, first + world, ...`` on cached frame features (``episodic.feature_views``).

    Each video of an episode takes one of its ``len(views)`` encodings, drawn from ``(seed, episode)``
    so a resumed run sees the same episodes. Yields the dict ``EpisodeCollate`` gives, with
    ``support_feats [N*K, T, D]`` / ``query_feats [N*Q, T, D]`` in place of the frames.
    """

    def __init__(self, sampler, views: List[Tensor], labels: Sequence[int], label_texts: Sequence[str], way: int,
                 shot: int, first: int, world_size: int, rank: int, seed: int):
        self.sampler, self.views, self.labels, self.label_texts = sampler, views, list(labels), list(label_texts)
        self.way, self.shot, self.first, self.world_size, self.rank, self.seed = way, shot, first, world_size, rank, seed

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for index in range(self.first + self.rank, self.sampler.episodes, self.world_size):
            items, class_ids = self.sampler.episode(index)
            picks = np.random.default_rng([self.seed, index]).integers(len(self.views), size=len(items))
            feats = torch.stack([self.views[v][i] for v, i in zip(picks.tolist(), items)])  # [N*(K+Q), T, D]
            position = {c: i for i, c in enumerate(class_ids)}
            labels = torch.tensor([position[self.labels[i]] for i in items], dtype=torch.long)
            n_support = self.way * self.shot
            yield {"support_feats": feats[:n_support], "support_labels": labels[:n_support],
                   "query_feats": feats[n_support:], "query_labels": labels[n_support:],
                   "class_ids": torch.tensor(class_ids, dtype=torch.long),
                   "label_texts": [self.label_texts[c] for c in class_ids]}


def encode_views(model: FsarModel, train_set, views: int, seed: int, num_workers: int = 0,
                 progress: bool = False) -> List[Tensor]:
    """Frame features ``[V, T, D]`` of every training video, ``views`` times with train-mode frame
    sampling (view ``v`` seeded with ``seed + v``): the cache of ``episodic.feature_views``."""
    from training.evaluate import encode_split

    out = []
    for view in range(views):
        torch.manual_seed(seed + 7919 * (view + 1))
        encoded = encode_split(model, train_set, batch_size=32, num_workers=num_workers, amp="off",
                               progress=progress, desc=f"encode train (view {view + 1}/{views})")
        out.append(encoded.query_feats)
    return out


class _BatchStream:
    """Supervised batches from ``epoch`` on, skipping the first ``skip`` batches of that epoch (resume)."""

    def __init__(self, sampler, epoch: int, skip: int):
        self.sampler, self.epoch, self.skip = sampler, epoch, skip

    def __iter__(self) -> Iterator[List[int]]:
        epoch, skip = self.epoch, self.skip
        while True:
            self.sampler.set_epoch(epoch)
            for i, batch in enumerate(self.sampler):
                if i >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0


def _check_data(cfg: TrainConfig, data: Path) -> None:
    if cfg.data.preset:
        from training.data import check_dataset

        problems = check_dataset(data, cfg.data.preset)
        if problems:
            listed = "\n  - ".join(problems)
            raise TrainingError(f"dataset at {data} does not fit preset {cfg.data.preset!r}:\n  - {listed}")


# --------------------------------------------------------------------------- logging
class MetricsLog:
    """``DIR/metrics.csv`` (one row per log interval and per validation) plus TensorBoard when installed."""

    def __init__(self, out: Path, parts: Sequence[str], resume_step: int, enabled: bool):
        self.enabled = enabled
        self.fields = ["step", "samples", "lr", "loss", *[f"loss_{p}" for p in parts], "train_acc",
                       "val_acc", "val_ci95", "elapsed_s"]
        self.path = out / METRICS_CSV
        self.writer = None
        if not enabled:
            return
        kept: List[Dict[str, str]] = []
        if resume_step > 0 and self.path.is_file():  # drop rows logged after the checkpoint we resume from
            with self.path.open(newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if row.get("step") and int(row["step"]) <= resume_step]
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "samples") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- state
def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _comparable(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a config that must match to resume (stopping and logging settings may change)."""
    ignored = {"max_steps", "log_every", "save_every", "val"}
    out = {k: v for k, v in cfg_dict.items() if k not in ignored}
    out["data"] = {k: v for k, v in cfg_dict.get("data", {}).items() if k not in ("num_workers", "skip_missing")}
    return out


# --------------------------------------------------------------------------- the loop
def total_steps_for(cfg: TrainConfig, world_size: int, batches_per_epoch: int = 0) -> int:
    """Optimiser steps of the full recipe (what the schedule spans): episodes, or epochs x batches."""
    if cfg.regime == "episodic":
        needed = cfg.grad_accum * world_size
        if cfg.episodic.episodes < needed:
            raise ConfigError(f"episodic.episodes ({cfg.episodic.episodes}) is fewer than one optimiser step "
                              f"takes (grad_accum {cfg.grad_accum} x {world_size} processes); set "
                              f"episodic.episodes to {needed} or more (append episodic.episodes={needed} to the "
                              f"fsar train command).")
        return max(1, cfg.episodic.episodes // (cfg.grad_accum * world_size))  # whole steps only
    return max(1, cfg.supervised.epochs * (batches_per_epoch // cfg.grad_accum))


def train(config: Union[str, Path, Dict[str, Any], TrainConfig], data: Union[str, Path], out: Union[str, Path],
          max_steps: Optional[int] = None, overrides: Sequence[str] = (), resume: bool = True, *,
          device: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Train adapters (and heads) per ``config`` on the dataset at ``data``; write checkpoints to ``out``.

    Args:
        config: a packaged preset name (``synthetic-tiny``, ``ssv2-full``, ...), a YAML path, a dict
            or a TrainConfig.
        data: dataset root (or CSV) in a ``training.data.load_dataset`` layout.
        out: run folder: ``config.yaml``, ``metrics.csv``, ``last.pt`` (+ ``last.state.pt``), ``best.pt``.
        max_steps: stop after this many optimiser steps in total (counting resumed ones); the
            schedule still spans the config's full recipe. Overrides ``max_steps`` of the config.
        overrides: ``key=value`` config overrides (``optim.lr=1e-4``).
        resume: continue from ``out/last.pt`` when present; False starts afresh (overwrites).
        device: "cpu" / "cuda" (default: CUDA when available).
        progress: show the tqdm bar (rank 0 only).

    Returns:
        summary dict: ``out``, ``steps``, ``start_step``, ``total_steps``, ``last_checkpoint``,
        ``best_checkpoint``, ``best_val_accuracy``, ``train_loss``, ``train_accuracy``,
        ``trainable_parameters``, ``elapsed_s``, ``config`` (the resolved config dict).

    Raises:
        ConfigError: bad config / overrides, or a config the dataset cannot serve
        (``training.preflight.PreflightError``, checked before any pretraining or training).
        TrainingError: a dataset that does not fit ``data.preset``, or a run in ``out`` with another
        config. ``training.data.DatasetError``: unreadable dataset layout.
    """
    started = time.perf_counter()
    cfg = load_config(config, overrides)
    if max_steps is not None:
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"max_steps must be a positive integer, got {max_steps!r}")
        cfg.max_steps = max_steps
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, Path(data), Path(out), resume, device, progress, started)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, data: Path, out: Path, resume: bool, device: Optional[str], progress: bool,
           started: float) -> Dict[str, Any]:
    info = init_distributed(device)
    _check_data(cfg, data)
    if cfg.regime == "episodic":
        total_steps_for(cfg, info.world_size)  # an episode budget too small for one step stops here
    splits = check_training_data(cfg, data, info.world_size)  # before the pretraining and the model

    model_config = _prepare_backbone(cfg, out, info, progress)
    torch.manual_seed(cfg.seed)  # same on every rank: identical (random) backbone and adapter init
    model = build_model(model_config, device=info.device)
    size = cfg.data.size or model.image_size[0]
    from training.data import EpisodeSampler, EpisodeCollate, SupervisedBatchSampler, collate_supervised, load_dataset

    train_set = load_dataset(data, cfg.data.train_split, num_frames=model.num_frames, size=size, mode="train")
    val_set = None
    if "val" in splits:
        val_set = load_dataset(data, cfg.data.val_split, num_frames=model.num_frames, size=size, mode="test")
    elif info.is_main:
        logger.warning("no %r split in %s: no validation; best.pt will be the last model", cfg.data.val_split, data)

    if cfg.regime == "episodic":
        alpha = cfg.loss.alpha if cfg.loss.alpha is not None else model.config.alpha
        loss_scale = 1.0
        if cfg.loss.text_weight is not None:  # L_Q2S + w (L_S2T + L_Q2T) / 2
            alpha, loss_scale = cfg.loss.text_weight / (1 + cfg.loss.text_weight), 1 + cfg.loss.text_weight
        objective: nn.Module = EpisodicObjective(model, alpha, loss_scale)
        parts_names = EPISODIC_PARTS
        samples_per_iter = cfg.episodic.way * (cfg.episodic.shot + cfg.episodic.query)
        sampler = EpisodeSampler(train_set.labels, cfg.episodic.way, cfg.episodic.shot, cfg.episodic.query,
                                 cfg.episodic.episodes, seed=cfg.seed)
        batches_per_epoch = 0
        global_batch = info.world_size * cfg.grad_accum  # episodes per optimiser step
    else:
        objective = MultitaskObjective(model, train_set.label_texts, weights=cfg.loss.multitask_weights,
                                       mask_prob=cfg.loss.mlm_mask_prob, vc_dropout=cfg.loss.vc_dropout,
                                       seed=cfg.seed + info.rank).to(info.device)
        parts_names = SUPERVISED_PARTS
        samples_per_iter = cfg.supervised.batch_size
        sampler = SupervisedBatchSampler(train_set.labels, cfg.supervised.batch_size, seed=cfg.seed,
                                         rank=info.rank, world_size=info.world_size)
        batches_per_epoch = len(sampler)
        global_batch = cfg.supervised.batch_size * cfg.grad_accum * info.world_size
    total_steps = total_steps_for(cfg, info.world_size, batches_per_epoch)
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    def is_text_adapter(name: str) -> bool:
        return name.startswith("model.") and FsarModel.is_text_adapter_parameter(name)

    def is_visual_adapter(name: str) -> bool:
        return name.startswith("model.") and FsarModel.is_visual_adapter_parameter(name)

    optimizer = build_optimizer(objective.named_parameters(), cfg.optim, global_batch, is_text_adapter,
                                is_visual_adapter)
    steps_per_epoch = batches_per_epoch // cfg.grad_accum if batches_per_epoch else 0
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps, steps_per_epoch)
    amp_dtype = _amp_dtype(cfg.amp, info.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # ------------------------------------------------------------------ resume
    start_step, best_val = 0, None
    last_path, state_path, best_path = out / LAST_CHECKPOINT, out / LAST_STATE, out / BEST_CHECKPOINT
    if resume and last_path.is_file():
        start_step, best_val = _resume(last_path, state_path, cfg, model, objective, optimizer, scheduler, scaler)
        if info.is_main:
            logger.info("resuming %s from step %d", out, start_step)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / CONFIG_YAML)
        counts = model.count_parameters()
        logger.info("training %s: %s trainable of %s parameters (%s), %d optimiser steps, lr %.3g",
                    cfg.name, f"{counts['trainable']:,}", f"{counts['total']:,}", model.config.adapter,
                    stop_step - start_step, effective_lr(cfg.optim, global_batch))
    torch.manual_seed(cfg.seed + 1000 * info.rank + start_step)  # per-rank data / dropout randomness
    log = MetricsLog(out, parts_names, start_step, enabled=info.is_main)

    train_module: nn.Module = objective
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(objective, device_ids=[info.local_rank] if info.device.type == "cuda"
                                               else None, find_unused_parameters=True)

    # ------------------------------------------------------------------ data streams
    loader = None
    if cfg.regime == "episodic" and cfg.episodic.feature_views > 0:
        if model.config.adapter != "none":
            raise ConfigError(f"episodic.feature_views needs a frozen image tower (model.adapter: none), got "
                              f"model.adapter {model.config.adapter!r}; set episodic.feature_views=0")
        views = encode_views(model, train_set, cfg.episodic.feature_views, cfg.seed, cfg.data.num_workers,
                             progress and info.is_main)
        objective.train()
        batches = iter(_CachedEpisodeStream(sampler, views, train_set.labels, train_set.label_texts, cfg.episodic.way,
                                            cfg.episodic.shot, start_step * global_batch, info.world_size,
                                            info.rank, cfg.seed))
    elif cfg.regime == "episodic":
        stream = _EpisodeStream(sampler, start_step * global_batch, info.world_size, info.rank)
        collate = EpisodeCollate(train_set.label_texts, cfg.episodic.way, cfg.episodic.shot)
    else:
        done_batches = start_step * cfg.grad_accum
        stream = _BatchStream(sampler, done_batches // batches_per_epoch, done_batches % batches_per_epoch)
        collate = collate_supervised
    if not (cfg.regime == "episodic" and cfg.episodic.feature_views > 0):
        from torch.utils.data import DataLoader

        loader = DataLoader(train_set, batch_sampler=stream, collate_fn=collate, num_workers=cfg.data.num_workers,
                            pin_memory=info.device.type == "cuda", persistent_workers=False)
        batches = iter(loader)

    # ------------------------------------------------------------------ steps
    val_encoded_cache: Dict[str, Any] = {}
    window: Dict[str, List[float]] = {"loss": [], "acc": [], **{p: [] for p in parts_names}}
    last_loss = last_acc = float("nan")
    bar = tqdm(total=stop_step, initial=start_step, desc=f"train {cfg.name}", unit="step",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    objective.train()
    step = start_step
    try:
        while step < stop_step:
            optimizer.zero_grad(set_to_none=True)
            for micro in range(cfg.grad_accum):
                try:
                    batch = next(batches)
                except StopIteration as err:  # the episode budget ran out before stop_step
                    raise TrainingError(f"ran out of training episodes at step {step}") from err
                sync = nullcontext() if (micro == cfg.grad_accum - 1 or not info.distributed) \
                    else train_module.no_sync()
                with sync:
                    with autocast_context(info.device, cfg.amp):
                        loss, parts, accuracy = train_module(batch)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"loss became {loss.item()} at step {step}; lower optim.lr "
                                            f"or check the data")
                    scaler.scale(loss / cfg.grad_accum).backward()
                window["loss"].append(float(loss.detach()))
                window["acc"].append(accuracy)
                for name in parts_names:
                    window[name].append(parts[name])
            if cfg.optim.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               cfg.optim.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            last_loss, last_acc = float(np.mean(window["loss"][-cfg.grad_accum:])), float(np.mean(window["acc"]))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window['loss']):.3f}", acc=f"{100 * last_acc:.1f}%",
                            best=f"{best_val:.1f}%" if best_val is not None else "-")
            if step % cfg.log_every == 0 or step == stop_step:
                row = {"step": step, "samples": step * global_batch * samples_per_iter,
                       "lr": optimizer.param_groups[0]["lr"], "loss": float(np.mean(window["loss"])),
                       "train_acc": 100 * float(np.mean(window["acc"])),
                       "elapsed_s": round(time.perf_counter() - started, 1)}
                row.update({f"loss_{p}": float(np.mean(window[p])) for p in parts_names})
                log.write(row)
                window = {k: [] for k in window}
            validate_now = val_set is not None and (
                (cfg.val.every and step % cfg.val.every == 0) or step == stop_step)
            save_now = step % cfg.save_every == 0 or step == stop_step or validate_now
            if validate_now:
                if info.is_main:
                    val_acc, val_ci = _validate(model, val_set, cfg, val_encoded_cache)
                    log.write({"step": step, "val_acc": val_acc, "val_ci95": val_ci,
                               "elapsed_s": round(time.perf_counter() - started, 1)})
                    if best_val is None or val_acc > best_val:
                        best_val = val_acc
                        _save_model(best_path, model, cfg, step, {"val_accuracy": val_acc, "val_ci95": val_ci})
                    objective.train()
                _barrier(info)
            if save_now:
                if info.is_main:
                    _save_last(out, model, objective, cfg, step, best_val, optimizer, scheduler, scaler,
                               {"train_loss": last_loss})
                _barrier(info)
    finally:
        bar.close()
        log.close()
    if val_set is None and info.is_main and step > start_step:
        _save_model(best_path, model, cfg, step, {"train_loss": last_loss})
    calibration = None
    if info.is_main and val_set is not None and cfg.val.calibrate and best_path.is_file() \
            and validation_mode(cfg) == "episodes":
        calibration = _calibrate(best_path, data, cfg, info.device)
    summary = {
        "out": str(out), "steps": step, "start_step": start_step, "total_steps": total_steps,
        "last_checkpoint": str(last_path), "best_checkpoint": str(best_path) if best_path.is_file() else None,
        "best_val_accuracy": best_val, "train_loss": last_loss, "train_accuracy": 100 * last_acc,
        "calibration": calibration,
        "trainable_parameters": model.count_parameters()["trainable"],
        "elapsed_s": round(time.perf_counter() - started, 1), "config": cfg.to_dict(),
    }
    if info.is_main:
        logger.info("done: %d steps, best validation accuracy %s", step,
                    f"{best_val:.2f}%" if best_val is not None else "n/a")
    return summary


def _prepare_backbone(cfg: TrainConfig, out: Path, info: DistInfo, progress: bool):
    """The run's ModelConfig; with ``pretrain.steps > 0`` its weights come from ``OUT/backbone.pt``, made
    by the stand-in pretraining on rank 0 (or reused when a file made with the same settings is there)."""
    model_config = cfg.model_config()
    if cfg.pretrain.steps <= 0:
        return model_config
    import json

    weights, record = out / PRETRAINED_BACKBONE, out / (PRETRAINED_BACKBONE + ".json")
    from training.pretrain import pretrain_recipe

    # The settings and the caption generator: a backbone.pt made by an older recipe is made again.
    wanted = {"backbone": model_config.backbone, "settings": pretrain_recipe(cfg.pretrain)}
    if info.is_main:
        have = json.loads(record.read_text()) if record.is_file() and weights.is_file() else None
        if have is None or {k: have.get(k) for k in wanted} != wanted:
            from training.pretrain import pretrain_backbone, restore_backbone, shipped_visual_path

            out.mkdir(parents=True, exist_ok=True)
            shipped = shipped_visual_path(model_config.backbone)
            result = (restore_backbone(shipped, weights, cfg.pretrain, model_config.backbone)
                      if shipped.is_file() and cfg.pretrain.use_shipped else None)
            if result is not None:
                logger.info("stand-in pretrained backbone rebuilt from the shipped image tower %s", shipped)
            else:
                result = pretrain_backbone(model_config.backbone, weights, cfg.pretrain, progress=progress)
            record.write_text(json.dumps({**wanted, **{k: v for k, v in result.items() if k != "settings"}},
                                         indent=2) + "\n")
        else:
            logger.info("reusing the stand-in pretrained backbone %s", weights)
    _barrier(info)
    return model_config.replace(pretrained=str(weights.resolve()))


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda" or amp == "off":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            logger.info("amp=%s is for CUDA; training in fp32 on %s", amp, device)
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _validate(model: FsarModel, val_set, cfg: TrainConfig, cache: Dict[str, Any]) -> tuple[float, float]:
    """Validation accuracy (percent) and its 95% interval on the validation split."""
    mode = validation_mode(cfg)
    encoded = encode_split(model, val_set, batch_size=16, num_workers=cfg.data.num_workers, amp=cfg.amp,
                           progress=False, desc="encode val")
    if mode == "zero_shot":
        accuracy = zero_shot_accuracy(model, encoded)
        n = len(val_set)
        return accuracy, 1.96 * math.sqrt(max(accuracy * (100 - accuracy), 0.0) / n)
    accuracies = episode_accuracies(model, encoded, way=cfg.val.way, shot=cfg.val.shot, query=cfg.val.query,
                                    episodes=cfg.val.episodes, seed=cfg.val.seed, progress=False)
    return mean_ci95(accuracies)


def _calibrate(best_path: Path, data: Union[str, Path], cfg: TrainConfig, device: Any) -> Optional[Dict[str, Any]]:
    """Fit and record the temperatures of ``best.pt``'s few-shot probabilities on the validation split
    (``val.calibrate``; :func:`training.evaluate.calibrate_checkpoint`). A split too small to fit on is
    reported and skipped: training has already succeeded."""
    from training.evaluate import calibrate_checkpoint

    try:
        record = calibrate_checkpoint(best_path, data, cfg.data.val_split, way=cfg.val.way, query=cfg.val.query,
                                      episodes=cfg.val.episodes, seed=cfg.val.seed, num_workers=cfg.data.num_workers,
                                      device=str(device), progress=False)
    except ValueError as err:
        logger.warning("best.pt's probabilities were not calibrated (%s); set val.calibrate=false to skip this", err)
        return None
    logger.info("calibrated best.pt's probabilities on %r: temperature %s", cfg.data.val_split,
                ", ".join(f"{t:.3g} at {s} shot{'s' * (s != '1')}" for s, t in record["temperatures"].items()))
    return record


def _save_model(path: Path, model: FsarModel, cfg: TrainConfig, step: int, metrics: Dict[str, Any]) -> str:
    from training.checkpoint import save_checkpoint

    return save_checkpoint(path, model, step=step, metrics=metrics, extra={"train_config": cfg.to_dict()})


def _save_last(out: Path, model: FsarModel, objective: nn.Module, cfg: TrainConfig, step: int,
               best_val: Optional[float], optimizer, scheduler, scaler, metrics: Dict[str, Any]) -> None:
    """``last.state.pt`` first (optimiser, scheduler, scaler, heads, RNG), then ``last.pt``; both carry the step."""
    heads = objective.head_state_dict() if isinstance(objective, MultitaskObjective) else {}
    _atomic_torch_save({"step": step, "best_val": best_val, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "heads": heads,
                        "rng": _rng_state(), "train_config": cfg.to_dict()}, out / LAST_STATE)
    _save_model(out / LAST_CHECKPOINT, model, cfg, step, metrics)


def _resume(last_path: Path, state_path: Path, cfg: TrainConfig, model: FsarModel, objective: nn.Module,
            optimizer, scheduler, scaler) -> tuple[int, Optional[float]]:
    from training.checkpoint import load_checkpoint

    if not state_path.is_file():
        raise TrainingError(f"{last_path} has no {state_path.name} beside it (optimiser state); "
                            f"pass resume=False (--no-resume) to start afresh")
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    if _comparable(state["train_config"]) != _comparable(cfg.to_dict()):
        raise TrainingError(f"{last_path.parent} holds a run with a different config; use another output "
                            f"folder or resume=False to overwrite it")
    loaded, meta = load_checkpoint(last_path)
    if meta.get("step") != state["step"]:
        raise TrainingError(f"{last_path} (step {meta.get('step')}) and {state_path.name} (step {state['step']}) "
                            f"disagree; the run was interrupted while saving: pass resume=False")
    model.load_trainable_state_dict({k: v.to(model.device) for k, v in loaded.trainable_state_dict().items()})
    if state["heads"]:
        missing = objective.load_state_dict(state["heads"], strict=False)
        if missing.unexpected_keys:
            raise TrainingError(f"{state_path} has head weights this config does not build: {missing.unexpected_keys[:5]}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(state["step"]), state["best_val"]


def untrained_checkpoint(config: Union[str, Path, Dict[str, Any], TrainConfig], out: Union[str, Path],
                         overrides: Sequence[str] = (), *, progress: bool = True) -> Path:
    """The training-free model of ``config``: its backbone (stand-in pretrained when ``pretrain.steps > 0``,
    rebuilt from the shipped image tower when it matches), adapters and TPCM at their identity
    initialisation, the configured metric and scale. Saved as ``OUT/best.pt`` (step 0); returns its path.

    What `fsar demo` serves: on the synthetic data no training recipe beat this model on held-out
    classes (docs/learning.md)."""
    cfg = load_config(config, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_config = _prepare_backbone(cfg, out, DistInfo(), progress)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config, device=torch.device("cpu"))
    save_config(cfg, out / CONFIG_YAML)
    path = out / BEST_CHECKPOINT
    _save_model(path, model, cfg, 0, {"training_free": True})
    return path
