"""Stand-in CLIP pretraining for tiny backbones on synthetic image-caption pairs.

The CPU demo and the "learning works" check use ``fsar-tiny``, a ViT far too small to have
pretrained weights. A randomly initialised one is useless as a frozen backbone: its class token
is close to an average of the patch tokens, so it carries almost no information on where things
are, and adapters trained on top of it stay at chance. Real use starts from OpenAI's CLIP; here a
minute of contrastive CLIP training on generated pictures stands in for it.

Each picture is one or two shapes (circle, square, triangle, bar, cross) of some colour, size,
position and orientation on a textured background, sometimes dimmed; its caption names those
attributes ("a small red triangle pointing left at the top right, and a large blue square at the
bottom left"). Training both towers with the CLIP contrastive loss (same caption = positive) makes
the frozen image features say where objects are, how big and how they are turned, which is what
motion (how those change over time) is read from. Nothing of the videos' motion classes is used.

``pretrain_backbone(...)`` writes an open_clip state_dict that ``ModelConfig(pretrained=PATH)``
loads like any other weights file.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from training.config import PretrainConfig

logger = logging.getLogger(__name__)

COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.15), "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05),
    "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.1), "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle", "bar", "cross")
SIZES = (("tiny", 0.06, 0.09), ("small", 0.09, 0.13), ("large", 0.13, 0.19), ("huge", 0.19, 0.26))
COLUMNS = ("far left", "left", "right", "far right")
ROWS = ("top", "upper", "lower", "bottom")
DIRECTIONS = ("up", "right", "down", "left")  # what a triangle points at / a bar's tilt


# --------------------------------------------------------------------------- pictures
def _bin(value: float, names: Tuple[str, ...], low: float = 0.0, high: float = 1.0) -> str:
    index = int((value - low) / (high - low) * len(names))
    return names[min(max(index, 0), len(names) - 1)]


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, radius: float,
                angle: float) -> np.ndarray:
    """Soft coverage [S, S] in [0, 1] of a shape centred at (cx, cy), radius and angle in image units."""
    u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
    v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
    if shape == "circle":
        dist = np.sqrt(u * u + v * v) - radius
    elif shape == "square":
        dist = np.maximum(np.abs(u), np.abs(v)) - radius * 0.85
    elif shape == "bar":
        dist = np.maximum(np.abs(u) - radius * 1.2, np.abs(v) - radius * 0.35)
    elif shape == "cross":
        arm = radius * 0.3
        dist = np.minimum(np.maximum(np.abs(u) - radius, np.abs(v) - arm),
                          np.maximum(np.abs(u) - arm, np.abs(v) - radius))
    elif shape == "triangle":  # points along +u
        edges = [(-math.cos(a), -math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
        dist = np.max(np.stack([(u * ex + v * ey) - radius * 0.5 for ex, ey in edges]), axis=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    pixel = 1.0 / xs.shape[0]
    return np.clip(0.5 - dist / pixel, 0.0, 1.0)


def _background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Low-contrast textured background [S, S, 3]: solid, gradient, stripes or checker."""
    base = rng.uniform(0.0, 1.0, 3) * rng.choice([0.3, 1.0])
    other = np.clip(base + rng.uniform(-0.2, 0.2, 3), 0.0, 1.0)
    kind = rng.integers(4)
    theta = rng.uniform(0, 2 * math.pi)
    proj = xs * math.cos(theta) + ys * math.sin(theta)
    if kind == 0:
        weight = np.zeros_like(xs)
    elif kind == 1:
        weight = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif kind == 2:
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(3, 9) * proj)
    else:
        cells = rng.integers(3, 9)
        weight = (np.floor(xs * cells) + np.floor(ys * cells)) % 2
    return base * (1 - weight[..., None]) + other * weight[..., None]


def render_captioned_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, str]:
    """One synthetic picture and its caption: uint8 ``[S, S, 3]`` RGB and a string."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    canvas = _background(rng, xs, ys)
    phrases: List[str] = []
    for _ in range(1 if rng.uniform() < 0.6 else 2):
        shape = str(rng.choice(SHAPES))
        size_name, r_low, r_high = SIZES[rng.integers(len(SIZES))]
        radius = rng.uniform(r_low, r_high)
        colour_name = str(rng.choice(list(COLOURS)))
        cx, cy = rng.uniform(0.12, 0.88, 2)
        angle = rng.uniform(0, 2 * math.pi)
        mask = _shape_mask(shape, xs, ys, cx, cy, radius, angle)
        canvas = canvas * (1 - mask[..., None]) + np.array(COLOURS[colour_name]) * mask[..., None]
        # angle 0 points right (+x); image y grows downwards, so pi/2 points down.
        direction = DIRECTIONS[int(((angle + math.pi / 2) % (2 * math.pi)) / (math.pi / 2) + 0.5) % 4]
        pose = {"triangle": f" pointing {direction}",
                "bar": " lying flat" if direction in ("left", "right") else " standing upright"}.get(shape, "")
        phrases.append(f"a {size_name} {colour_name} {shape}{pose} at the {_bin(cy, ROWS)} {_bin(cx, COLUMNS)}")
    caption = ", and ".join(phrases)
    if rng.uniform() < 0.25:
        canvas = canvas * 0.35
        caption += ", in dim light"
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), caption


def caption_batch(rng: np.random.Generator, count: int, size: int) -> Tuple[np.ndarray, List[str]]:
    """``count`` pictures uint8 ``[count, S, S, 3]`` and their captions."""
    pairs = [render_captioned_image(rng, size) for _ in range(count)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


# --------------------------------------------------------------------------- training
def pretrain_backbone(backbone: str, out: Union[str, Path], settings: PretrainConfig, *,
                      progress: bool = True) -> Dict[str, object]:
    """Train a randomly initialised open_clip ``backbone`` (both towers) with the CLIP loss on synthetic
    image-caption pairs and save its state_dict to ``out`` (loadable with ``ModelConfig(pretrained=out)``).

    Returns:
        dict with ``path``, ``steps``, ``final_loss``, ``retrieval_accuracy`` (image->caption top-1 on a
        held-out batch, percent; captions that coincide count as correct), ``seconds``, ``settings``.
    """
    from training.losses import contrastive_kl_loss
    from training.model import load_backbone

    started = time.perf_counter()
    out = Path(out)
    torch.manual_seed(settings.seed)
    backbone_obj = load_backbone(backbone, None)
    clip = backbone_obj.clip
    clip.requires_grad_(True)
    clip.train()
    size = backbone_obj.image_size[0]
    mean = torch.tensor(backbone_obj.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone_obj.std).view(1, 3, 1, 1)
    tokenizer = backbone_obj.tokenizer

    def encode(images: np.ndarray, captions: List[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std  # [B, 3, S, S]
        unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        labels = torch.tensor([unique[c] for c in captions])  # same caption -> same label (several positives)
        return clip.encode_image(pixels), clip.encode_text(tokenizer(captions)), labels

    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in clip.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    warmup = max(1, settings.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, settings.steps)))))
    rng = np.random.default_rng([settings.seed, 1])
    loss_value = float("nan")
    bar = tqdm(range(settings.steps), desc=f"pretrain {backbone}", unit="step", disable=not progress, leave=False)
    for _ in bar:
        images, captions = caption_batch(rng, settings.batch_size, size)
        image_feats, text_feats, labels = encode(images, captions)
        loss = contrastive_kl_loss(image_feats, text_feats, labels, clip.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    clip.eval()
    with torch.no_grad():
        images, captions = caption_batch(np.random.default_rng([settings.seed, 2]), 128, size)
        image_feats, text_feats, labels = encode(images, captions)
        best = (image_feats / image_feats.norm(dim=-1, keepdim=True)) @ (
            text_feats / text_feats.norm(dim=-1, keepdim=True)).t()
        retrieval = float((labels[best.argmax(dim=-1)] == labels).float().mean()) * 100.0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(clip.state_dict(), tmp)
    os.replace(tmp, out)
    result = {"path": str(out), "steps": settings.steps, "final_loss": loss_value, "retrieval_accuracy": retrieval,
              "seconds": round(time.perf_counter() - started, 1), "settings": asdict(settings)}
    logger.info("stand-in pretraining of %s: loss %.3f, caption retrieval %.1f%%, %.0f s -> %s", backbone,
                loss_value, retrieval, result["seconds"], out)
    return result
