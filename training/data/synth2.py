"""A second, independent synthetic motion dataset ("sprites"), for checking that training transfers.

`fsar synth` (``training.data.synth``) is the data the `synthetic-tiny` recipe was developed on. A
recipe tuned there can fit that generator's quirks (its anti-aliased signed-distance shapes, its
backgrounds, its motions). This module draws videos another way so that a result measured on both
says something about motion rather than about one renderer:

- rendering: hard-edged pixel sprites (5x5 glyph bitmaps scaled by pixel repetition, no
  anti-aliasing), blocky value-noise backgrounds, a vignette, and fresh sensor noise on every frame;
- other shapes (glyphs: arrow-free letters, a heart, a star, a key, a mushroom...), other motions
  (camera pans and zooms, falling under gravity, bouncing, travelling waves, stacks being built,
  dots gathering, a stroke being drawn, a square path) and other label wording.

Every class is again one half of a reversed pair (the reverse class plays the motion backwards with
the same parameter distribution), so frame order is needed to tell the halves apart. The layout
written is the one ``training.data.load_dataset`` reads (``videos/<class>/<id>.mp4``,
``splits/{train,val,test}.txt``, ``labels.json``) plus ``sprites.json`` (settings).

Split (fixed here, classes disjoint): train 6 pairs (12 classes), val 1 pair, test 3 pairs. The test
pairs were chosen before any model was evaluated on this data and are not used for any choice of
recipe (docs/learning.md).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from training.video.writer import write_video

MANIFEST = "sprites.json"
FPS = 6

_GLYPHS: Dict[str, Tuple[str, ...]] = {
    "heart": ("01010", "11111", "11111", "01110", "00100"),
    "star": ("00100", "11111", "01110", "01010", "10001"),
    "key": ("11000", "11111", "11010", "00000", "00000"),
    "mushroom": ("01110", "11111", "11111", "00100", "01110"),
    "letter_f": ("11111", "10000", "11110", "10000", "10000"),
    "letter_p": ("11110", "10010", "11110", "10000", "10000"),
    "letter_j": ("00111", "00010", "00010", "10010", "01100"),
    "hook": ("11110", "00010", "00010", "01110", "01000"),
    "boot": ("01100", "01100", "01100", "01111", "01111"),
    "zig": ("11000", "01100", "00110", "00011", "00001"),
}
_PALETTE = np.array([[230, 57, 70], [244, 162, 97], [42, 157, 143], [233, 196, 106], [38, 70, 83],
                     [131, 56, 236], [58, 134, 255], [255, 0, 110], [251, 86, 7], [6, 214, 160],
                     [17, 138, 178], [239, 71, 111], [255, 209, 102], [7, 59, 76], [141, 153, 174]],
                    dtype=np.float32) / 255.0

Params = dict
SampleFn = Callable[[np.random.Generator, int], Params]
DrawFn = Callable[[np.random.Generator, int, float, Params], np.ndarray]  # -> canvas [S, S, 3]


class SpritesDatasetError(ValueError):
    """Bad arguments to the sprites dataset writer."""


# ------------------------------------------------------------------------------ drawing
def _sprite(rng: np.random.Generator, pixel: int) -> Tuple[np.ndarray, np.ndarray]:
    """A glyph mask [h, w] bool (pixel repetition, random 90-degree turn) and its colour [3]."""
    rows = _GLYPHS[str(rng.choice(sorted(_GLYPHS)))]
    mask = np.array([[c == "1" for c in row] for row in rows], dtype=bool)
    mask = np.rot90(mask, int(rng.integers(4)))
    mask = np.repeat(np.repeat(mask, pixel, axis=0), pixel, axis=1)
    return mask, _PALETTE[int(rng.integers(len(_PALETTE)))]


def _stamp(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, x: float, y: float) -> None:
    """Paint ``mask`` with its top-left corner at integer pixel (round(x), round(y)); clipped."""
    size_y, size_x = canvas.shape[:2]
    h, w = mask.shape
    x0, y0 = int(round(x)), int(round(y))
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, size_x), min(y0 + h, size_y)
    if xa >= xb or ya >= yb:
        return
    sub = mask[ya - y0:yb - y0, xa - x0:xb - x0]
    canvas[ya:yb, xa:xb][sub] = colour


def _blocky_texture(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise on a coarse grid, upsampled by pixel repetition: [size, size, 3] in [0, 1]."""
    base = _PALETTE[int(rng.integers(len(_PALETTE)))] * rng.uniform(0.3, 0.7)
    grid = rng.uniform(-0.12, 0.12, (cells, cells, 1)).astype(np.float32)
    rep = int(math.ceil(size / cells))
    tex = np.repeat(np.repeat(grid, rep, axis=0), rep, axis=1)[:size, :size]
    return np.clip(base[None, None, :] + tex, 0.0, 1.0).astype(np.float32)


def _finish(rng: np.random.Generator, canvas: np.ndarray, vignette: float) -> np.ndarray:
    """Vignette plus per-frame sensor noise; uint8 [S, S, 3]."""
    size = canvas.shape[0]
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    canvas = canvas * (1.0 - vignette * r2 * 2.0)[..., None]
    canvas = canvas + rng.normal(0.0, 0.025, canvas.shape).astype(np.float32)
    return np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _scene(rng: np.random.Generator, size: int) -> Params:
    return {"bg": _blocky_texture(rng, size, int(rng.integers(4, 12))), "vignette": float(rng.uniform(0.0, 0.5)),
            "pixel": int(rng.integers(2, 4))}


# ------------------------------------------------------------------------------ motions
def _s_slide(rng, size):
    p = _scene(rng, size)
    p["mask"], p["colour"] = _sprite(rng, p["pixel"])
    span = size - p["mask"].shape[0]
    dist = rng.uniform(0.4, 0.75) * span
    p["x0"] = rng.uniform(0, span - dist)
    p["y0"] = span - rng.uniform(0, span - dist)
    p["dist"] = dist
    return p


def _d_slide(rng, size, u, p):  # towards the upper right
    canvas = p["bg"].copy()
    _stamp(canvas, p["mask"], p["colour"], p["x0"] + u * p["dist"], p["y0"] - u * p["dist"])
    return canvas


def _s_fall(rng, size):
    p = _scene(rng, size)
    p["mask"], p["colour"] = _sprite(rng, p["pixel"])
    h = p["mask"].shape[0]
    p["x"] = rng.uniform(0, size - h)
    p["top"], p["floor"] = rng.uniform(0, 0.15 * size), size - h - rng.uniform(0, 0.1 * size)
    p["ground"] = _PALETTE[int(rng.integers(len(_PALETTE)))] * 0.5
    return p


def _d_fall(rng, size, u, p):  # accelerating downwards onto a floor band
    canvas = p["bg"].copy()
    floor_y = int(p["floor"] + p["mask"].shape[0])
    canvas[floor_y:] = p["ground"]
    _stamp(canvas, p["mask"], p["colour"], p["x"], p["top"] + (u * u) * (p["floor"] - p["top"]))
    return canvas


def _s_pan(rng, size):
    p = _scene(rng, size)
    p["world"] = _blocky_texture(rng, size * 2, int(rng.integers(8, 20)))
    for _ in range(int(rng.integers(3, 7))):
        mask, colour = _sprite(rng, p["pixel"])
        _stamp(p["world"], mask, colour, rng.uniform(0, 2 * size - mask.shape[1]), rng.uniform(0, size - mask.shape[0]))
    p["shift"] = rng.uniform(0.3, 0.9) * size
    p["x0"] = rng.uniform(0, size - p["shift"])
    p["y0"] = int(rng.integers(0, size // 2))
    return p


def _d_pan(rng, size, u, p):  # the camera turns left: the scene slides right in the frame
    x = int(round(p["x0"] + (1 - u) * p["shift"]))
    return p["world"][p["y0"]:p["y0"] + size, x:x + size].copy()


def _s_zoom(rng, size):
    p = _s_pan(rng, size)
    p["cx"], p["cy"] = rng.uniform(0.35, 0.65, 2) * size
    p["zoom"] = rng.uniform(1.8, 2.6)
    return p


def _d_zoom(rng, size, u, p):  # zooming in: the view narrows around (cx, cy), nearest-neighbour
    scale = 1.0 + u * (p["zoom"] - 1.0)
    coords = np.arange(size, dtype=np.float32)
    xs = np.clip((p["x0"] + p["cx"] + (coords - p["cx"]) / scale).astype(int), 0, 2 * size - 1)
    ys = np.clip((p["y0"] + p["cy"] + (coords - p["cy"]) / scale).astype(int), 0, 2 * size - 1)
    return p["world"][ys][:, xs].copy()


def _s_stroke(rng, size):
    p = _scene(rng, size)
    p["colour"] = _PALETTE[int(rng.integers(len(_PALETTE)))]
    p["width"] = int(rng.integers(3, 7))
    theta = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.45, 0.75) * size
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    p["a"] = (cx - math.cos(theta) * length / 2, cy - math.sin(theta) * length / 2)
    p["b"] = (cx + math.cos(theta) * length / 2, cy + math.sin(theta) * length / 2)
    return p


def _d_stroke(rng, size, u, p):  # a line being drawn from a to b
    canvas = p["bg"].copy()
    (ax, ay), (bx, by) = p["a"], p["b"]
    steps = max(2, int(u * 200))
    for t in np.linspace(0.0, u, steps):
        x, y = ax + t * (bx - ax), ay + t * (by - ay)
        w = p["width"]
        canvas[max(int(y) - w // 2, 0):max(int(y) - w // 2 + w, 0), max(int(x) - w // 2, 0):max(int(x) - w // 2 + w, 0)] = p["colour"]
    return canvas


def _s_bounce(rng, size):
    p = _s_slide(rng, size)
    h = p["mask"].shape[0]
    p["ground"] = size - h - rng.uniform(0, 0.1 * size)
    p["height"] = rng.uniform(0.2, 0.45) * size
    p["hops"] = int(rng.integers(2, 4))
    p["x0"] = rng.uniform(0, size - h - p["dist"])
    return p


def _d_bounce(rng, size, u, p):  # hopping towards the right
    canvas = p["bg"].copy()
    y = p["ground"] - p["height"] * abs(math.sin(math.pi * p["hops"] * u))
    _stamp(canvas, p["mask"], p["colour"], p["x0"] + u * p["dist"], y)
    return canvas


def _s_dots(rng, size):
    p = _scene(rng, size)
    n = int(rng.integers(6, 12))
    p["colour"] = _PALETTE[int(rng.integers(len(_PALETTE)))]
    p["dot"] = int(rng.integers(3, 6))
    p["centre"] = rng.uniform(0.35, 0.65, 2) * size
    p["far"] = rng.uniform(0.05, 0.95, (n, 2)) * (size - p["dot"])
    p["near"] = p["centre"] + rng.normal(0, 0.04 * size, (n, 2))
    return p


def _d_dots(rng, size, u, p):  # dots gathering into a clump
    canvas = p["bg"].copy()
    mask = np.ones((p["dot"], p["dot"]), bool)
    for (fx, fy), (nx, ny) in zip(p["far"], p["near"]):
        _stamp(canvas, mask, p["colour"], fx + u * (nx - fx), fy + u * (ny - fy))
    return canvas


def _s_square_path(rng, size):
    p = _scene(rng, size)
    p["mask"], p["colour"] = _sprite(rng, p["pixel"])
    h = p["mask"].shape[0]
    side = rng.uniform(0.4, 0.7) * (size - h)
    p["x0"], p["y0"] = rng.uniform(0, size - h - side, 2)
    p["side"], p["phase"] = side, rng.uniform(0, 4)
    p["laps"] = rng.uniform(0.6, 0.9)
    return p


def _d_square_path(rng, size, u, p):  # clockwise on screen around a square
    canvas = p["bg"].copy()
    s = (p["phase"] + 4 * p["laps"] * u) % 4
    corners = [(0, 0), (1, 0), (1, 1), (0, 1), (0, 0)]
    k, f = int(s), s - int(s)
    x = corners[k][0] + f * (corners[k + 1][0] - corners[k][0])
    y = corners[k][1] + f * (corners[k + 1][1] - corners[k][1])
    _stamp(canvas, p["mask"], p["colour"], p["x0"] + x * p["side"], p["y0"] + y * p["side"])
    return canvas


def _s_wave(rng, size):
    p = _scene(rng, size)
    p["colour"] = _PALETTE[int(rng.integers(len(_PALETTE)))]
    p["wavelength"] = rng.uniform(0.3, 0.6) * size
    p["amp"] = rng.uniform(0.08, 0.18) * size
    p["mid"] = rng.uniform(0.35, 0.65) * size
    p["thick"] = int(rng.integers(3, 6))
    p["travel"] = rng.uniform(0.5, 0.9) * p["wavelength"]
    return p


def _d_wave(rng, size, u, p):  # a sine-shaped band travelling to the right
    canvas = p["bg"].copy()
    xs = np.arange(size)
    ys = p["mid"] + p["amp"] * np.sin(2 * math.pi * (xs - u * p["travel"]) / p["wavelength"])
    rows = np.arange(size)[:, None]
    band = np.abs(rows - ys[None, :]) < p["thick"]
    canvas[band] = p["colour"]
    return canvas


def _s_stack(rng, size):
    p = _scene(rng, size)
    n = int(rng.integers(3, 6))
    p["block"] = (int(rng.uniform(0.12, 0.2) * size), int(rng.uniform(0.25, 0.45) * size))  # h, w
    p["x"] = rng.uniform(0, size - p["block"][1])
    p["base"] = size - rng.uniform(0, 0.08 * size)
    p["colours"] = [_PALETTE[int(rng.integers(len(_PALETTE)))] for _ in range(n)]
    return p


def _d_stack(rng, size, u, p):  # blocks dropping into place one on top of another
    canvas = p["bg"].copy()
    h, w = p["block"]
    n = len(p["colours"])
    placed = u * n
    mask = np.ones((h, w), bool)
    for i, colour in enumerate(p["colours"]):
        if placed <= i:
            break
        frac = min(1.0, placed - i)  # 0..1: the block slides down from above into its place
        target = p["base"] - (i + 1) * h
        _stamp(canvas, mask, colour, p["x"], target - (1 - frac) * 0.5 * target)
    return canvas


@dataclass(frozen=True)
class SpritePair:
    """Two classes: ``forward`` plays the motion, ``reverse`` plays it backwards; ``split`` for both."""

    forward: str
    reverse: str
    sample: SampleFn
    draw: DrawFn
    split: str


PAIRS: Tuple[SpritePair, ...] = (
    SpritePair("a glyph dropping onto the floor", "a glyph launched up from the floor", _s_fall, _d_fall, "train"),
    SpritePair("the camera turning to the left", "the camera turning to the right", _s_pan, _d_pan, "train"),
    SpritePair("a stroke being painted", "a stroke being wiped away", _s_stroke, _d_stroke, "train"),
    SpritePair("hopping along to the right", "hopping along to the left", _s_bounce, _d_bounce, "train"),
    SpritePair("specks clumping together", "specks spreading out", _s_dots, _d_dots, "train"),
    SpritePair("circling a square path clockwise", "circling a square path anticlockwise",
               _s_square_path, _d_square_path, "train"),
    SpritePair("the view closing in", "the view pulling back", _s_zoom, _d_zoom, "val"),
    SpritePair("gliding up and to the right", "gliding down and to the left", _s_slide, _d_slide, "test"),
    SpritePair("a ripple running to the right", "a ripple running to the left", _s_wave, _d_wave, "test"),
    SpritePair("a tower of blocks going up", "a tower of blocks coming down", _s_stack, _d_stack, "test"),
)


def _folder(label: str) -> str:
    return label.replace(" ", "_").replace("-", "_")


def sprite_classes() -> List[dict]:
    """Every class: ``{"name", "label", "split", "pair", "forward", "uid"}``."""
    out = []
    for i, pair in enumerate(PAIRS):
        for forward, label in ((True, pair.forward), (False, pair.reverse)):
            out.append({"name": _folder(label), "label": label, "split": pair.split, "pair": i,
                        "forward": forward, "uid": 2 * i + (0 if forward else 1)})
    return out


def render_sprite_clip(name: str, frames: int, size: int, seed) -> np.ndarray:
    """One clip of class ``name`` (folder name or label): uint8 ``[T, S, S, 3]``. The reverse class with
    the same seed shows the same scene played backwards (up to the per-frame sensor noise)."""
    by_name = {c["name"]: c for c in sprite_classes()}
    cls = by_name.get(name) or by_name.get(_folder(name))
    if cls is None:
        raise SpritesDatasetError(f"unknown sprites class {name!r}; known: {', '.join(sorted(by_name))}")
    pair = PAIRS[cls["pair"]]
    rng = np.random.default_rng(seed)
    params = pair.sample(rng, size)
    start, end = rng.uniform(0, 0.15), 1 - rng.uniform(0, 0.15)
    noise = np.random.default_rng(rng.integers(2 ** 32))
    clip = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        phase = t / (frames - 1)
        u = min(max((phase - start) / (end - start), 0.0), 1.0)
        u = u if cls["forward"] else 1.0 - u
        clip[t] = _finish(noise, pair.draw(rng, size, u, params), params["vignette"])
    return clip


def write_sprites_dataset(out, videos_per_class: int = 30, frames: int = 12, size: int = 80, seed: int = 0,
                          progress: bool = True) -> dict:
    """Write the sprites dataset to ``out`` (layout in the module doc); deterministic given ``seed``.

    Returns a summary dict: root, classes, videos, videos_per_class, frames, size, seed, seconds, splits.
    """
    if videos_per_class < 2 or frames < 2 or size < 16 or size % 2:
        raise SpritesDatasetError("need videos_per_class >= 2, frames >= 2 and an even size >= 16")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise SpritesDatasetError(f"{out} is not empty and holds no earlier sprites dataset; choose a new folder")
        for name in ("videos", "splits"):
            shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    classes = sprite_classes()
    ids = [f"{i:04d}" for i in range(videos_per_class)]
    jobs = [(c, i) for c in classes for i in range(videos_per_class)]
    for c in classes:
        (out / "videos" / c["name"]).mkdir(parents=True, exist_ok=True)
    for c, i in tqdm(jobs, desc="sprites videos", unit="video", disable=not progress):
        clip = render_sprite_clip(c["name"], frames, size, np.random.SeedSequence([seed, 7919, c["uid"], i]))
        write_video(out / "videos" / c["name"] / f"{ids[i]}.mp4", clip, fps=FPS, codec="libx264", container="mp4",
                    pix_fmt="yuv420p", options={"crf": "20", "preset": "veryfast"}, threads=1)
    (out / "splits").mkdir(exist_ok=True)
    splits = {s: [c["name"] for c in classes if c["split"] == s] for s in ("train", "val", "test")}
    for split, names in splits.items():
        (out / "splits" / f"{split}.txt").write_text("".join(f"{n}/{v}\n" for n in names for v in ids))
    (out / "labels.json").write_text(json.dumps({c["name"]: c["label"] for c in classes}, indent=2) + "\n")
    summary = {"root": str(out), "classes": len(classes), "videos": len(jobs), "videos_per_class": videos_per_class,
               "frames": frames, "size": size, "seed": seed, "seconds": round(time.perf_counter() - started, 2),
               "splits": splits}
    (out / MANIFEST).write_text(json.dumps({k: v for k, v in summary.items() if k not in ("root", "seconds")},
                                           indent=2) + "\n")
    return summary
