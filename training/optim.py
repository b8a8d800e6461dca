"""Optimiser and learning-rate schedule built from a TrainConfig's ``optim`` / ``schedule`` sections."""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Tuple

import torch
from torch import nn

from training.config import OptimConfig, ScheduleConfig


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The base learning rate actually used: ``lr``, or ``lr * global_batch / lr_reference_batch``."""
    if cfg.lr_reference_batch:
        return cfg.lr * global_batch / cfg.lr_reference_batch
    return cfg.lr


def param_groups(named_params: Iterable[Tuple[str, nn.Parameter]], cfg: OptimConfig, base_lr: float,
                 is_text_adapter: Callable[[str], bool],
                 is_visual_adapter: Callable[[str], bool] = lambda name: False) -> List[Dict]:
    """Split trainable parameters into optimiser groups.

    Groups differ by weight decay (none on biases and 1-D normalisation weights when
    ``cfg.no_decay_bias``) and by learning rate: text-adapter parameters, picked by
    ``is_text_adapter(name)``, get ``base_lr * cfg.text_adapter_lr_scale``; adapters inside the
    visual backbone, picked by ``is_visual_adapter(name)``, get ``base_lr * cfg.visual_adapter_lr_scale``;
    the rest (TPCM, temporal adapter, heads) ``base_lr``. Frozen parameters are skipped. Each group
    carries its ``name`` for logging.
    """
    scales = {"main": 1.0, "text_adapter": cfg.text_adapter_lr_scale,
              "visual_adapter": cfg.visual_adapter_lr_scale}
    groups: Dict[Tuple[bool, str], Dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        no_decay = cfg.no_decay_bias and (param.ndim <= 1 or name.endswith(".bias"))
        kind = "text_adapter" if is_text_adapter(name) else "visual_adapter" if is_visual_adapter(name) else "main"
        group = groups.setdefault((no_decay, kind), {
            "name": kind + ("_no_decay" if no_decay else ""),
            "params": [],
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr": base_lr * scales[kind],
        })
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (adapter='none' without TPCM or a trainable metric?)")
    return list(groups.values())


def build_optimizer(named_params: Iterable[Tuple[str, nn.Parameter]], cfg: OptimConfig, global_batch: int,
                    is_text_adapter: Callable[[str], bool] = lambda name: False,
                    is_visual_adapter: Callable[[str], bool] = lambda name: False) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the trainable parameters, with the groups of :func:`param_groups`."""
    base_lr = effective_lr(cfg, global_batch)
    groups = param_groups(named_params, cfg, base_lr, is_text_adapter, is_visual_adapter)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=base_lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimiser {cfg.name!r}; use adam, adamw or sgd")


def lr_multiplier(step: int, cfg: ScheduleConfig, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base rate at optimiser step ``step`` (0-based): linear warm-up from 0 over
    ``warmup_steps``, then constant, cosine or linear decay to ``cfg.min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if cfg.name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.name == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}; use constant, cosine or linear")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int,
                    steps_per_epoch: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimiser step; warm-up = ``warmup_steps + warmup_epochs * steps_per_epoch``."""
    warmup = cfg.warmup_steps + int(round(cfg.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(0, total_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, total_steps, warmup))
