"""Stand-in pretraining for tiny backbones on synthetic image-caption pairs.

The CPU demo and the "learning works" check use ``fsar-tiny``, a ViT far too small to have
pretrained weights. A randomly initialised one is useless as a frozen backbone: its class token
carries almost no information on where things are (a linear probe recovers none of an object's
position), and few-shot accuracy on held-out motion classes stays at chance whatever is trained on
top. Real use starts from OpenAI's CLIP; here a few minutes of training on generated pictures
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

Those captions are ``captions="shapes-v1"`` (the default). Richer scene captions (``scenes-v2`` /
``scenes-v3``: one to three of nine shapes, how far every non-round shape is turned, how far apart two
shapes are) were measured and are kept for reproduction, but chosen against: on `fsar synth` val and
train classes they gave a tower worse than the same steps of ``shapes-v1`` (docs/learning.md, "A
stronger stand-in tower"); more steps of ``shapes-v1`` is what helped (1,000 -> 2,000 -> 4,000; 8,000
no better than 4,000), not continuous geometry targets beside the caption words (tried, worse);
learning-rate decay, weight decay 0.05, a larger batch and a 4-layer tower gave nothing either.
``python -m training.pretrain`` remakes the shipped image tower (one torch thread: the weights are
reproducible for a given thread count, not across them).
"""
from __future__ import annotations

import functools
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


def caption_words(captions: str = "shapes-v1") -> List[str]:
    """The content words captions use: targets of the word head (``captions`` names the generator)."""
    if captions in SCENE_VARIANTS:
        return scene_words()
    if captions != "shapes-v1":
        raise ValueError(f"unknown captions {captions!r}; use one of {CAPTION_KINDS}")
    phrases = [name for name, _ in SIZES] + list(SHAPES) + list(DIRECTIONS) + list(ROWS) + list(COLUMNS)
    phrases += ["pointing", "lying flat", "standing upright", "dim"]
    return sorted({word for phrase in phrases for word in phrase.split()})


# --------------------------------------------------------------------------- scenes (captions "scenes-v2")
# One to three shapes a picture, each described by what a motion is made of: kind, size, stretch,
# position, and for every shape that is not round how far it is turned (eight steps over the turn
# after which it looks the same again: a quarter turn for a square or a cross, a half turn for a bar,
# a third for a triangle, a full turn for an arrow, a corner, a half disc); for two shapes, how far
# apart they are and whether side by side or one above the other. A pretrained CLIP knows such
# things about the objects in a picture; nothing here knows about any motion class.
SCENE_SHAPES: Dict[str, Tuple[float, bool]] = {  # name -> (period of its symmetry in radians, 0 = round; stretchable)
    "circle": (0.0, True), "ring": (0.0, False), "square": (math.pi / 2, True),
    "triangle": (2 * math.pi / 3, False), "bar": (math.pi, False), "cross": (math.pi / 2, False),
    "arrow": (2 * math.pi, False), "corner": (2 * math.pi, False), "half": (2 * math.pi, False),
}
TURNS = tuple(f"turn{i}" for i in range(8))  # how far turned, in eighths of the shape's symmetry period
SEPARATIONS = (("touching", 0.0), ("close", 0.12), ("apart", 0.3), ("far", 0.5))  # name, gap above
SCENE_SIZES = (("tiny", 0.06), ("small", 0.1), ("medium", 0.14), ("large", 0.2), ("huge", 10.0))  # radius below


def _scene_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in radius units) of a unit shape in its own frame (+u: where it points)."""
    def box(cu, cv, hu, hv):
        return np.maximum(np.abs(u - cu) - hu, np.abs(v - cv) - hv)

    if shape == "circle":
        return np.hypot(u, v) - 1.0
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.72) - 0.28
    if shape == "square":
        return box(0, 0, 0.85, 0.85)
    if shape == "bar":
        return box(0, 0, 1.2, 0.35)
    if shape == "cross":
        return np.minimum(box(0, 0, 1.0, 0.3), box(0, 0, 0.3, 1.0))
    if shape == "triangle":  # apex along +u
        edges = [(-math.cos(a), -math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
        return np.max(np.stack([u * ex + v * ey - 0.5 for ex, ey in edges]), axis=0)
    if shape == "arrow":
        shaft = box(-0.35, 0.0, 0.55, 0.2)
        head = np.maximum(np.abs(v) - (1.0 - u) * 0.75, -(u - 0.15))
        return np.minimum(shaft, head)
    if shape == "corner":
        return np.minimum(box(0.0, -0.6, 0.9, 0.3), box(0.6, 0.0, 0.3, 0.9))
    if shape == "half":  # a half disc, its flat side facing -u
        return np.maximum(np.hypot(u, v) - 1.0, -u)
    raise ValueError(f"unknown shape {shape!r}")


def turn_word(shape: str, angle: float) -> str:
    """How far a ``scenes-v2`` shape is turned (radians, clockwise on screen), in eighths of the turn after
    which it looks the same again ("turn0" .. "turn7"); "" for round shapes."""
    period = SCENE_SHAPES[shape][0]
    if period <= 0:
        return ""
    return TURNS[int((angle % period) / period * len(TURNS)) % len(TURNS)]


def scene_words() -> List[str]:
    """Every word a ``scenes-v2`` caption can use."""
    words = list(SCENE_SHAPES) + [n for n, _ in SCENE_SIZES] + list(TURNS) + [n for n, _ in SEPARATIONS]
    words += ["wide", "tall", "dim", "side", "above"]
    words += [w for phrase in ROWS + COLUMNS for w in phrase.split()]
    return sorted(set(words))


@functools.lru_cache(maxsize=4)
def _unit_grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs) ``[S, S]`` in [0, 1] (read-only, shared)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


# Scene caption variants: how often a picture holds 1 / 2 / 3 shapes, and the smallest radius (pixels) at
# which a shape's turn is named (below it a shape is a speck whose turn no captioner could tell).
SCENE_VARIANTS: Dict[str, Dict[str, object]] = {
    "scenes-v2": {"counts": (0.45, 0.4, 0.15), "turn_min_px": 0.0},
    "scenes-v3": {"counts": (0.6, 0.3, 0.1), "turn_min_px": 4.0},
}


def render_scene(rng: np.random.Generator, size: int,
                 radius_range: Tuple[float, float] = RADIUS_END,
                 variant: str = "scenes-v2") -> Tuple[np.ndarray, str]:
    """One picture of one to three shapes and its caption (``scenes-v2``): uint8 ``[S, S, 3]`` and a string,
    e.g. "a small corner turn3 at the upper left, and a tiny wide circle at the middle right; close side"."""
    ys, xs = _unit_grid(size)
    canvas = _background(rng, xs, ys)
    options = SCENE_VARIANTS[variant]
    count = int(rng.choice([1, 2, 3], p=list(options["counts"])))
    placed: List[Tuple[float, float, float]] = []
    phrases: List[str] = []
    names = list(SCENE_SHAPES)
    for _ in range(count):
        shape = names[int(rng.integers(len(names)))]
        period, stretchable = SCENE_SHAPES[shape]
        radius = float(rng.uniform(*radius_range)) * (0.8 if count > 1 else 1.0)
        for _try in range(20):  # somewhere it does not overlap the shapes already there
            cx, cy = (float(c) for c in rng.uniform(0.1, 0.9, 2))
            if all(math.hypot(cx - x, cy - y) > 0.9 * (radius + r) for x, y, r in placed):
                break
        placed.append((cx, cy, radius))
        angle = float(rng.uniform(0, 2 * math.pi))
        stretch, rx, ry = "", radius, radius
        if stretchable and rng.uniform() < 0.35:
            factor = float(rng.uniform(1.5, 2.2))
            wide = bool(rng.uniform() < 0.5)
            stretch = "wide " if wide else "tall "
            rx, ry, angle = (radius * factor, radius / factor * 1.3, 0.0) if wide else \
                (radius / factor * 1.3, radius * factor, 0.0)
        # Only the square around the shape is drawn (the shape fits in 1.3 radii of its centre).
        reach = 1.3 * max(rx, ry) + 2.0 / size
        c0, c1 = max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 1)
        r0, r1 = max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 1)
        sx, sy = xs[r0:r1, c0:c1] - cx, ys[r0:r1, c0:c1] - cy
        u = (sx * math.cos(angle) + sy * math.sin(angle)) / rx
        v = (-sx * math.sin(angle) + sy * math.cos(angle)) / ry
        dist = _scene_sdf(shape, u, v) * min(rx, ry)
        mask = np.clip(0.5 - dist * size, 0.0, 1.0)[..., None]
        colour = np.array(COLOURS[str(rng.choice(list(COLOURS)))])
        canvas[r0:r1, c0:c1] = canvas[r0:r1, c0:c1] * (1 - mask) + colour * mask
        size_name = next(name for name, below in SCENE_SIZES if radius < below)
        turn = "" if stretch or radius * size < float(options["turn_min_px"]) else turn_word(shape, angle)
        turn = f" {turn}" if turn else ""
        phrases.append(f"a {size_name} {stretch}{shape}{turn} at the {_bin(cy, ROWS)} {_bin(cx, COLUMNS)}")
    caption = ", and ".join(phrases)
    if count >= 2:
        (x1, y1, r1), (x2, y2, r2) = placed[0], placed[1]
        gap = math.hypot(x1 - x2, y1 - y2) - r1 - r2
        separation = [name for name, above in SEPARATIONS if gap >= above][-1] if gap >= 0 else "touching"
        caption += f"; {separation} {'side' if abs(x1 - x2) >= abs(y1 - y2) else 'above'}"
    if rng.uniform() < 0.25:
        canvas = canvas * 0.35
        caption += ", in dim light"
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), caption


def caption_batch(rng: np.random.Generator, count: int, size: int,
                  radius_range: Tuple[float, float] = RADIUS_END,
                  captions: str = "shapes-v1") -> Tuple[np.ndarray, List[str]]:
    """``count`` pictures uint8 ``[count, S, S, 3]`` and their captions, from the ``captions`` generator."""
    if captions in SCENE_VARIANTS:
        pairs = [render_scene(rng, size, radius_range, captions) for _ in range(count)]
    else:
        pairs = [render_captioned_image(rng, size, radius_range) for _ in range(count)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


CAPTION_KINDS = ("shapes-v1", *SCENE_VARIANTS)
CAPTIONS = "shapes-v1"
"""The caption generator pretraining uses (part of the recipe recorded with the weights)."""


# --------------------------------------------------------------------------- training
def pretrain_backbone(backbone: str, out: Union[str, Path], settings: PretrainConfig, *,
                      progress: bool = True, captions: str = CAPTIONS) -> Dict[str, object]:
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
    words = caption_words(captions)
    word_index = {word: i for i, word in enumerate(words)}
    word_head = torch.nn.Linear(visual.output_dim, len(words))  # image features -> caption words; dropped after

    def word_logits(images: np.ndarray) -> torch.Tensor:
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std  # [B, 3, S, S]
        return word_head(visual(pixels))  # [B, V]

    def word_targets(texts: List[str]) -> torch.Tensor:
        targets = torch.zeros(len(texts), len(words))  # [B, V] multi-hot
        for row, caption in enumerate(texts):
            for word in caption.replace(",", " ").replace(";", " ").split():
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
        images, texts = caption_batch(rng, settings.batch_size, size, radius_range, captions)
        loss = F.binary_cross_entropy_with_logits(word_logits(images), word_targets(texts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    visual.eval()
    visual.requires_grad_(False)
    with torch.no_grad():
        images, texts = caption_batch(np.random.default_rng([settings.seed, 2]), 256, size, RADIUS_END, captions)
        predicted = word_logits(images) > 0
        truth = word_targets(texts) > 0
        hits = float((predicted & truth).sum())
        word_f1 = 200.0 * hits / max(1.0, float(predicted.sum() + truth.sum()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(clip.state_dict(), tmp)
    os.replace(tmp, out)
    result = {"path": str(out), "steps": settings.steps, "final_loss": loss_value, "word_f1": word_f1,
              "seconds": round(time.perf_counter() - started, 1), "settings": asdict(settings),
              "captions": captions, "threads": torch.get_num_threads()}
    logger.info("stand-in pretraining of %s: loss %.3f, caption word F1 %.1f%%, %.0f s -> %s", backbone,
                loss_value, word_f1, result["seconds"], out)
    return result


# --------------------------------------------------------------------------- shipped weights
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
"""Small deterministic artefacts of this module shipped in the repository (the stand-in pretrained
image tower of ``fsar-tiny``), so `fsar demo` and tests need not spend minutes re-making them."""


def pretrain_recipe(settings: PretrainConfig, captions: str = CAPTIONS) -> Dict[str, object]:
    """What determines the weights: the settings (all but ``use_shipped``) and the caption generator."""
    return {**{k: v for k, v in asdict(settings).items() if k != "use_shipped"}, "captions": captions}


def shipped_visual_path(backbone: str) -> Path:
    """Where the shipped stand-in pretrained image tower of ``backbone`` lives (may not exist)."""
    return ASSETS_DIR / f"{backbone}-standin-visual.pt"


def export_visual(weights: Union[str, Path], out: Union[str, Path], settings: PretrainConfig,
                  backbone: str, captions: str = CAPTIONS) -> Dict[str, object]:
    """Write the image tower (``visual.*``) of a ``pretrain_backbone`` state_dict to ``out`` with the
    settings that made it, and return ``{"path", "sha256"}``. The text tower is left out: pretraining
    never changes it, so :func:`restore_backbone` rebuilds it from ``settings.seed``."""
    from training.model.hashing import state_hash

    state = torch.load(weights, map_location="cpu", weights_only=True)
    visual = {k: v.clone() for k, v in state.items() if k.startswith("visual.")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"backbone": backbone, "settings": pretrain_recipe(settings, captions), "visual": visual}, out)
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


def rebuild_shipped(backbone: str = "fsar-tiny", preset: str = "synthetic-tiny", work: Optional[Union[str, Path]] = None,
                    progress: bool = True) -> Dict[str, object]:
    """Pretrain ``backbone`` with ``preset``'s pretrain settings on ONE torch thread (the weights are
    reproducible for a given thread count, not across them), then write its image tower to
    ``training/assets/`` with the record beside it. Returns the record."""
    import json
    import tempfile

    from training.config import load_config
    from training.model.hashing import state_hash

    settings = load_config(preset).pretrain
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        made = Path(tmp) / "backbone.pt"
        result = pretrain_backbone(backbone, made, settings, progress=progress)
        exported = export_visual(made, shipped_visual_path(backbone), settings, backbone)
        full_hash = state_hash(torch.load(made, map_location="cpu", weights_only=True))
    record = {
        "visual_sha256": exported["sha256"],
        "made_by": "python -m training.pretrain (torch.set_num_threads(1); pretrain_backbone with the "
                   f"'{preset}' preset's pretrain settings; export_visual)",
        "settings": pretrain_recipe(settings),
        "threads": 1,
        "word_f1": round(float(result["word_f1"]), 1),
        "seconds": result["seconds"],
        "full_state_dict_weights_hash": full_hash,
    }
    shipped_visual_path(backbone).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":  # python -m training.pretrain: remake the shipped stand-in image tower
    print(rebuild_shipped())
