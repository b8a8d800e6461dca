"""Stand-in pretraining for tiny backbones on synthetic image-caption pairs.

The CPU demo and the "learning works" check use ``fsar-tiny``, a ViT far too small to have
pretrained weights. A randomly initialised one is useless as a frozen backbone: its class token
carries almost no information on where things are (a linear probe recovers none of an object's
position), and few-shot accuracy on held-out motion classes stays at chance whatever is trained on
top. Real use starts from OpenAI's CLIP; here about a minute of training on generated pictures
stands in for it.

Each picture is one shape (circle, square, triangle, bar, cross) of some colour, size, position and
orientation on a textured background, sometimes dimmed; its caption says what motion is made of:
"a small triangle pointing left at the top far right, in dim light". The image tower learns to
predict the caption's words (a bag-of-words captioning loss, one logistic output per word). Two
measured facts shaped this:

- CLIP's contrastive loss (both towers from scratch) did not teach position within 500 steps (linear
  probe R^2 of the x position about 0), and mixed into the word loss it stopped that from learning
  too; the text tower is therefore left as it is (random), and ``alpha`` should be 0 with it.
- A tiny ViT learns where a large shape is long before a small one; object sizes shrink from large
  to synthetic-video-like over the first 60% of the steps (a curriculum). With it, 450 steps reach a
  probe R^2 of about 0.67 for the x position of small shapes.

Nothing of the videos' motion classes is used. ``pretrain_backbone(...)`` writes an open_clip
state_dict that ``ModelConfig(pretrained=PATH)`` loads like any other weights file.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.config import PretrainConfig

logger = logging.getLogger(__name__)

COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.15), "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05),
    "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.1), "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle", "bar", "cross")
SIZES = (("tiny", 0.07), ("small", 0.11), ("large", 0.16), ("huge", 1.0))  # name, radius below
# Object radius range (fraction of the picture) at the start and at the end of the curriculum: a tiny
# ViT learns where a large shape is within a few hundred steps, where a small one is only after that.
RADIUS_START = (0.12, 0.26)
RADIUS_END = (0.035, 0.2)
COLUMNS = ("far left", "left", "centre", "right", "far right")
ROWS = ("top", "upper", "middle", "lower", "bottom")
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


def render_captioned_image(rng: np.random.Generator, size: int,
                           radius_range: Tuple[float, float] = RADIUS_END) -> Tuple[np.ndarray, str]:
    """One synthetic picture and its caption: uint8 ``[S, S, 3]`` RGB and a string. Object radii are
    drawn from ``radius_range`` (fractions of the picture size)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    canvas = _background(rng, xs, ys)
    phrases: List[str] = []
    for _ in range(1):  # one shape a picture: what a frame of most synthetic motions shows
        shape = str(rng.choice(SHAPES))
        radius = rng.uniform(*radius_range)
        size_name = next(name for name, below in SIZES if radius < below)
        colour_name = str(rng.choice(list(COLOURS)))
        cx, cy = rng.uniform(0.12, 0.88, 2)
        angle = rng.uniform(0, 2 * math.pi)
        mask = _shape_mask(shape, xs, ys, cx, cy, radius, angle)
        canvas = canvas * (1 - mask[..., None]) + np.array(COLOURS[colour_name]) * mask[..., None]
        # angle 0 points right (+x); image y grows downwards, so pi/2 points down.
        direction = DIRECTIONS[int(((angle + math.pi / 2) % (2 * math.pi)) / (math.pi / 2) + 0.5) % 4]
        pose = {"triangle": f" pointing {direction}",
                "bar": " lying flat" if direction in ("left", "right") else " standing upright"}.get(shape, "")
        # Colours are drawn but not named: the captions ask for what motion is made of (where, how
        # big, how turned), so the features learn that rather than the easier colour cue.
        phrases.append(f"a {size_name} {shape}{pose} at the {_bin(cy, ROWS)} {_bin(cx, COLUMNS)}")
    caption = ", and ".join(phrases)
    if rng.uniform() < 0.25:
        canvas = canvas * 0.35
        caption += ", in dim light"
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), caption


def caption_words() -> List[str]:
    """The content words captions use (sizes, shapes, poses, places, light): targets of the word head."""
    phrases = [name for name, _ in SIZES] + list(SHAPES) + list(DIRECTIONS) + list(ROWS) + list(COLUMNS)
    phrases += ["pointing", "lying flat", "standing upright", "dim"]
    return sorted({word for phrase in phrases for word in phrase.split()})


def caption_batch(rng: np.random.Generator, count: int, size: int,
                  radius_range: Tuple[float, float] = RADIUS_END) -> Tuple[np.ndarray, List[str]]:
    """``count`` pictures uint8 ``[count, S, S, 3]`` and their captions."""
    pairs = [render_captioned_image(rng, size, radius_range) for _ in range(count)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


# --------------------------------------------------------------------------- training
def pretrain_backbone(backbone: str, out: Union[str, Path], settings: PretrainConfig, *,
                      progress: bool = True) -> Dict[str, object]:
    """Train the image tower of a randomly initialised open_clip ``backbone`` to predict caption words of
    synthetic pictures, then save the whole model's state_dict to ``out`` (loadable with
    ``ModelConfig(pretrained=out)``).

    Returns:
        dict with ``path``, ``steps``, ``final_loss``, ``word_f1`` (word prediction F1 on a held-out batch
        of small-object pictures, percent), ``seconds``, ``settings``.
    """
    from training.model import load_backbone

    started = time.perf_counter()
    out = Path(out)
    torch.manual_seed(settings.seed)
    backbone_obj = load_backbone(backbone, None)
    clip = backbone_obj.clip
    visual = clip.visual
    visual.requires_grad_(True)
    visual.train()
    size = backbone_obj.image_size[0]
    mean = torch.tensor(backbone_obj.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone_obj.std).view(1, 3, 1, 1)
    words = caption_words()
    word_index = {word: i for i, word in enumerate(words)}
    word_head = torch.nn.Linear(visual.output_dim, len(words))  # image features -> caption words; dropped after

    def word_logits(images: np.ndarray) -> torch.Tensor:
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std  # [B, 3, S, S]
        return word_head(visual(pixels))  # [B, V]

    def word_targets(captions: List[str]) -> torch.Tensor:
        targets = torch.zeros(len(captions), len(words))  # [B, V] multi-hot
        for row, caption in enumerate(captions):
            for word in caption.replace(",", " ").split():
                if word in word_index:
                    targets[row, word_index[word]] = 1.0
        return targets

    params = [*visual.parameters(), *word_head.parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=settings.lr)
    warmup = max(1, settings.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    rng = np.random.default_rng([settings.seed, 1])
    loss_value = float("nan")
    bar = tqdm(range(settings.steps), desc=f"pretrain {backbone}", unit="step", disable=not progress, leave=False)
    for step in bar:
        shrink = min(1.0, step / max(1.0, 0.6 * settings.steps))  # object sizes shrink over 60% of the steps
        radius_range = tuple(a + (b - a) * shrink for a, b in zip(RADIUS_START, RADIUS_END))
        images, captions = caption_batch(rng, settings.batch_size, size, radius_range)
        loss = F.binary_cross_entropy_with_logits(word_logits(images), word_targets(captions))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    visual.eval()
    visual.requires_grad_(False)
    with torch.no_grad():
        images, captions = caption_batch(np.random.default_rng([settings.seed, 2]), 256, size)
        predicted = word_logits(images) > 0
        truth = word_targets(captions) > 0
        hits = float((predicted & truth).sum())
        word_f1 = 200.0 * hits / max(1.0, float(predicted.sum() + truth.sum()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(clip.state_dict(), tmp)
    os.replace(tmp, out)
    result = {"path": str(out), "steps": settings.steps, "final_loss": loss_value, "word_f1": word_f1,
              "seconds": round(time.perf_counter() - started, 1), "settings": asdict(settings)}
    logger.info("stand-in pretraining of %s: loss %.3f, caption word F1 %.1f%%, %.0f s -> %s", backbone,
                loss_value, word_f1, result["seconds"], out)
    return result


# --------------------------------------------------------------------------- shipped weights
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
"""Small deterministic artefacts of this module shipped in the repository (the stand-in pretrained
image tower of ``fsar-tiny``), so `fsar demo` and tests need not spend minutes re-making them."""


def pretrain_recipe(settings: PretrainConfig) -> Dict[str, object]:
    """The settings that determine the weights (everything but ``use_shipped``)."""
    return {k: v for k, v in asdict(settings).items() if k != "use_shipped"}


def shipped_visual_path(backbone: str) -> Path:
    """Where the shipped stand-in pretrained image tower of ``backbone`` lives (may not exist)."""
    return ASSETS_DIR / f"{backbone}-standin-visual.pt"


def export_visual(weights: Union[str, Path], out: Union[str, Path], settings: PretrainConfig,
                  backbone: str) -> Dict[str, object]:
    """Write the image tower (``visual.*``) of a ``pretrain_backbone`` state_dict to ``out`` with the
    settings that made it, and return ``{"path", "sha256"}``. The text tower is left out: pretraining
    never changes it, so :func:`restore_backbone` rebuilds it from ``settings.seed``."""
    from training.model.hashing import state_hash

    state = torch.load(weights, map_location="cpu", weights_only=True)
    visual = {k: v.clone() for k, v in state.items() if k.startswith("visual.")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"backbone": backbone, "settings": pretrain_recipe(settings), "visual": visual}, out)
    return {"path": str(out), "sha256": state_hash(visual)}


def restore_backbone(shipped: Union[str, Path], out: Union[str, Path], settings: PretrainConfig,
                     backbone: str) -> Optional[Dict[str, object]]:
    """Rebuild the full state_dict ``pretrain_backbone(backbone, out, settings)`` writes from a shipped
    image tower: the random model seeded as pretraining seeds it (so the untouched text tower is the
    same), with the shipped ``visual.*`` weights. Returns None (nothing written) when the shipped file
    was made with other settings or another backbone."""
    from training.model import load_backbone
    from training.model.hashing import state_hash

    record = torch.load(shipped, map_location="cpu", weights_only=True)
    if record.get("backbone") != backbone or record.get("settings") != pretrain_recipe(settings):
        return None
    torch.manual_seed(settings.seed)
    state = load_backbone(backbone, None).clip.state_dict()
    missing = [k for k in state if k.startswith("visual.") and k not in record["visual"]]
    if missing:
        return None
    state.update(record["visual"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return {"path": str(out), "steps": settings.steps, "shipped": str(shipped),
            "visual_sha256": state_hash(record["visual"])}
