"""A synthetic few-shot action dataset whose classes differ only by motion.

Every class is one half of a *reversed pair*: "moving right" / "moving left", "rotating clockwise" /
"rotating counter-clockwise", "growing" / "shrinking", ... Both halves of a pair draw their video
parameters (shape, colours, background, positions, speed, timing) from the same distribution and
render the same scene; the reverse class plays the progress of the motion backwards
(``progress(t) -> progress(1 - t)``). Given the same parameters, a reverse-class video is the exact
time reversal of the forward-class video, so the SET of frames is identical and only their order
differs: a model that averages frames cannot tell a motion from its reverse, a model that looks at
temporal order can.

Appearance varies within every class (background pattern and colour, shape kind, colours, size,
position, distance or angle travelled, when the motion starts and stops, linear or eased motion,
static distractor shapes), so a class is defined by its motion alone.

Layout written (the one ``training.data.load_dataset`` reads)::

    OUT/videos/<class_name>/<video_id>.mp4     H.264, yuv420p, SIZE x SIZE, FRAMES frames
    OUT/splits/{train,val,test}.txt            "class_name/video_id" lines, classes disjoint (no val.txt
                                               when too few classes are asked for to have a val split)
    OUT/labels.json                            {"moving_right": "moving right", ...}
    OUT/synth.json                             the generation settings and summary
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from training.video.writer import write_video

__all__ = [
    "MotionClass",
    "MOTION_CLASSES",
    "SyntheticDatasetError",
    "render_clip",
    "write_mp4",
    "write_synthetic_dataset",
    "split_synthetic_classes",
]

SYNTH_MANIFEST = "synth.json"
FPS = 8

Params = dict
# Draws one video's parameters: (rng, size) -> params.
SampleFn = Callable[[np.random.Generator, int], Params]
# Renders one frame at motion progress u in [0, 1]: (canvas [S,S,3] float32, grid, u, params) -> None.
DrawFn = Callable[[np.ndarray, "_Grid", float, Params], None]


class SyntheticDatasetError(ValueError):
    """Bad arguments to the synthetic dataset writer (class count, size, frames, output folder)."""


# --------------------------------------------------------------------------------------------
# Rasterising: signed-distance shapes with anti-aliased edges, composited on float RGB canvases.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Pixel-centre coordinates of a size x size canvas: xs, ys [S, S] float32."""

    xs: np.ndarray
    ys: np.ndarray

    @staticmethod
    def make(size: int) -> "_Grid":
        coords = np.arange(size, dtype=np.float32) + 0.5
        ys, xs = np.meshgrid(coords, coords, indexing="ij")
        return _Grid(xs=xs, ys=ys)


def _box(u: np.ndarray, v: np.ndarray, cx: float, cy: float, hx: float, hy: float) -> np.ndarray:
    return np.maximum(np.abs(u - cx) - hx, np.abs(v - cy) - hy)


def _sdf_circle(u, v):
    return np.hypot(u, v) - 1.0


def _sdf_square(u, v):
    return _box(u, v, 0.0, 0.0, 0.82, 0.82)


def _sdf_diamond(u, v):
    return (np.abs(u) + np.abs(v) - 1.0) * 0.7071


def _sdf_triangle(u, v):
    return np.maximum(np.abs(u) * 0.866 + (v - 0.25) * 0.5, -(v - 0.25)) - 0.45


def _sdf_cross(u, v):
    return np.minimum(_box(u, v, 0, 0, 1.0, 0.33), _box(u, v, 0, 0, 0.33, 1.0))


def _sdf_ring(u, v):
    return np.abs(np.hypot(u, v) - 0.72) - 0.28


def _sdf_l_shape(u, v):
    return np.minimum(_box(u, v, -0.6, 0.0, 0.3, 0.9), _box(u, v, 0.0, 0.6, 0.9, 0.3))


def _sdf_arrow(u, v):
    shaft = _box(u, v, -0.35, 0.0, 0.55, 0.2)
    head = np.maximum(np.abs(v) - (1.0 - u) * 0.75, -(u - 0.15))
    return np.minimum(shaft, head)


def _sdf_pacman(u, v):
    mouth = np.maximum(np.abs(v) - u * 0.75, -u) * 0.8
    return np.maximum(_sdf_circle(u, v), -mouth)


def _sdf_lollipop(u, v):
    return np.minimum(_box(u, v, -0.3, 0.0, 0.7, 0.17), np.hypot(u - 0.55, v) - 0.45)


_SDFS = {
    "circle": _sdf_circle,
    "square": _sdf_square,
    "diamond": _sdf_diamond,
    "triangle": _sdf_triangle,
    "cross": _sdf_cross,
    "ring": _sdf_ring,
    "l_shape": _sdf_l_shape,
    "arrow": _sdf_arrow,
    "pacman": _sdf_pacman,
    "lollipop": _sdf_lollipop,
}
# Shapes with no rotational symmetry: rotating them by any angle < 360 degrees is visible.
_ASYMMETRIC_SHAPES = ("l_shape", "arrow", "pacman", "lollipop")
_ALL_SHAPES = tuple(_SDFS)


def _shape_alpha(grid: _Grid, shape: str, cx: float, cy: float, rx: float, ry: float,
                 angle: float) -> np.ndarray:
    """Anti-aliased coverage [S, S] in [0, 1] of a shape centred at (cx, cy), radii (rx, ry) pixels,
    rotated by ``angle`` radians (positive = clockwise on screen, image y points down)."""
    dx, dy = grid.xs - cx, grid.ys - cy
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    u = (dx * cos_a + dy * sin_a) / rx
    v = (-dx * sin_a + dy * cos_a) / ry
    sdf_px = _SDFS[shape](u, v) * min(rx, ry)
    return np.clip(0.5 - sdf_px, 0.0, 1.0)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """canvas [S,S,3] <- canvas * (1 - alpha) + colour * alpha, in place."""
    a = alpha[..., None]
    canvas *= 1.0 - a
    canvas += a * colour


def _draw(canvas: np.ndarray, grid: _Grid, obj: dict, cx: float, cy: float, *, scale: float = 1.0,
          rx: float | None = None, ry: float | None = None, angle: float | None = None,
          opacity: float = 1.0) -> None:
    """Paint one object (``obj``: shape, r, colour, angle) at (cx, cy)."""
    if opacity <= 0.0:
        return
    r = obj["r"] * scale
    alpha = _shape_alpha(grid, obj["shape"], cx, cy, rx if rx is not None else r,
                         ry if ry is not None else r, obj["angle"] if angle is None else angle)
    if opacity < 1.0:
        alpha = alpha * opacity
    _paint(canvas, alpha, obj["colour"])


# --------------------------------------------------------------------------------------------
# Appearance: backgrounds, colours, objects, distractors (all static within a video).
# --------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def _colour(rng: np.random.Generator, light: bool) -> np.ndarray:
    """A saturated colour, light (value 0.75-1) or dark (value 0.1-0.35)."""
    value = rng.uniform(0.75, 1.0) if light else rng.uniform(0.1, 0.35)
    return _hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 1.0), value)


def _background(rng: np.random.Generator, size: int, light: bool) -> np.ndarray:
    """A static background [S, S, 3] float32: solid, gradient, stripes, checker or smooth noise,
    all low contrast around a light or dark base colour."""
    base = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.6),
                       rng.uniform(0.7, 0.95) if light else rng.uniform(0.05, 0.3))
    other = np.clip(base + rng.uniform(-0.15, 0.15, 3).astype(np.float32), 0.0, 1.0)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    kind = rng.choice(["solid", "gradient", "stripes", "checker", "noise"])
    if kind == "solid":
        weight = np.zeros((size, size), np.float32)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        proj = xs * math.cos(theta) + ys * math.sin(theta)
        weight = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif kind == "stripes":
        theta = rng.uniform(0, math.pi)
        freq = rng.uniform(3.0, 9.0)
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xs * math.cos(theta) + ys * math.sin(theta)))
    elif kind == "checker":
        cells = int(rng.integers(3, 9))
        weight = ((np.floor(xs * cells) + np.floor(ys * cells)) % 2).astype(np.float32)
    else:
        coarse = rng.uniform(0, 1, (int(rng.integers(3, 7)),) * 2).astype(np.float32)
        idx = np.clip(coords * (coarse.shape[0] - 1), 0, coarse.shape[0] - 1)
        lo = np.floor(idx).astype(int)
        hi = np.minimum(lo + 1, coarse.shape[0] - 1)
        frac = idx - lo
        rows = coarse[lo] * (1 - frac)[:, None] + coarse[hi] * frac[:, None]
        weight = rows[:, lo] * (1 - frac)[None, :] + rows[:, hi] * frac[None, :]
    weight = weight.astype(np.float32)[..., None]
    return (base * (1 - weight) + other * weight).astype(np.float32)


def _object(rng: np.random.Generator, size: int, light: bool, r_range: tuple[float, float],
            shapes: tuple[str, ...] = _ALL_SHAPES) -> dict:
    """One foreground object: shape kind, radius in pixels, colour contrasting with the background
    (``light`` is the object's brightness), a fixed orientation."""
    return {
        "shape": str(rng.choice(shapes)),
        "r": float(rng.uniform(*r_range) * size),
        "colour": _colour(rng, light),
        "angle": float(rng.uniform(0, 2 * math.pi)),
    }


def _appearance(rng: np.random.Generator, size: int) -> dict:
    """Background and distractors shared by every motion kind; foreground objects contrast with it."""
    light_bg = bool(rng.uniform() < 0.5)
    background = _background(rng, size, light_bg)
    distractors = []
    for _ in range(int(rng.integers(0, 3))):
        obj = _object(rng, size, not light_bg, (0.04, 0.07))
        obj["colour"] = background.mean(axis=(0, 1)) * 0.5 + obj["colour"] * 0.5  # faint
        obj["cx"], obj["cy"] = (float(v) for v in rng.uniform(0.1, 0.9, 2) * size)
        distractors.append(obj)
    return {"background": background, "distractors": distractors, "fg_light": not light_bg}


def _timing(rng: np.random.Generator) -> dict:
    """When the motion runs and how it eases. The distribution is symmetric under time reversal:
    start ~ U(0, 0.2), end ~ 1 - U(0, 0.2), and both easings satisfy e(1 - x) = 1 - e(x)."""
    return {"start": float(rng.uniform(0, 0.2)), "end": float(1 - rng.uniform(0, 0.2)),
            "smooth": bool(rng.uniform() < 0.5)}


def _progress(phase: float, timing: dict) -> float:
    x = min(max((phase - timing["start"]) / (timing["end"] - timing["start"]), 0.0), 1.0)
    return x * x * (3 - 2 * x) if timing["smooth"] else x


# --------------------------------------------------------------------------------------------
# Motion kinds. Each draws parameters once per video and renders a frame at progress u in [0, 1];
# the forward class of the pair plays u from 0 to 1, the reverse class from 1 to 0.
# --------------------------------------------------------------------------------------------


def _sample_translate(dx: float, dy: float) -> SampleFn:
    def sample(rng: np.random.Generator, size: int) -> Params:
        app = _appearance(rng, size)
        obj = _object(rng, size, app["fg_light"], (0.07, 0.13))
        r = obj["r"]
        span = size - 2 * r
        dist = rng.uniform(0.35, 0.8) * span
        start = []
        for d in (dx, dy):
            if d == 0:
                start.append(rng.uniform(r, size - r))
            else:
                start.append(r + rng.uniform(0, span - dist))
        return {**app, "obj": obj, "x0": start[0], "y0": start[1], "dx": dx * dist, "dy": dy * dist}

    return sample


def _draw_translate(canvas, grid, u, p):
    _draw(canvas, grid, p["obj"], p["x0"] + u * p["dx"], p["y0"] + u * p["dy"])


def _sample_rotate(rng, size):
    app = _appearance(rng, size)
    obj = _object(rng, size, app["fg_light"], (0.17, 0.28), _ASYMMETRIC_SHAPES)
    r = obj["r"]
    cx, cy = rng.uniform(r * 1.1, size - r * 1.1, 2)
    return {**app, "obj": obj, "cx": cx, "cy": cy, "turn": rng.uniform(0.5, 1.0) * math.pi}


def _draw_rotate(canvas, grid, u, p):
    _draw(canvas, grid, p["obj"], p["cx"], p["cy"], angle=p["obj"]["angle"] + u * p["turn"])


def _sample_grow(rng, size):
    app = _appearance(rng, size)
    obj = _object(rng, size, app["fg_light"], (0.2, 0.3))
    r1 = obj["r"]
    cx, cy = rng.uniform(r1, size - r1, 2)
    return {**app, "obj": obj, "cx": cx, "cy": cy, "scale0": rng.uniform(0.2, 0.4)}


def _draw_grow(canvas, grid, u, p):
    _draw(canvas, grid, p["obj"], p["cx"], p["cy"], scale=p["scale0"] + u * (1 - p["scale0"]))


def _sample_approach(rng, size):
    app = _appearance(rng, size)
    objs = [_object(rng, size, app["fg_light"], (0.07, 0.11)) for _ in range(2)]
    r = max(o["r"] for o in objs)
    theta = rng.uniform(0, math.pi)
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    # The largest separation keeping both objects inside the frame along direction theta.
    room = min((min(c - r, size - r - c) / max(abs(d), 1e-6))
               for c, d in ((cx, math.cos(theta)), (cy, math.sin(theta))))
    far = 2 * room * rng.uniform(0.85, 1.0)
    near = objs[0]["r"] + objs[1]["r"] + rng.uniform(0.0, 0.08) * size
    return {**app, "objs": objs, "cx": cx, "cy": cy, "theta": theta, "far": far, "near": near}


def _draw_approach(canvas, grid, u, p):
    half = (p["far"] + u * (p["near"] - p["far"])) / 2
    ox, oy = half * math.cos(p["theta"]), half * math.sin(p["theta"])
    _draw(canvas, grid, p["objs"][0], p["cx"] - ox, p["cy"] - oy)
    _draw(canvas, grid, p["objs"][1], p["cx"] + ox, p["cy"] + oy)


def _sample_static_object(rng, size):
    app = _appearance(rng, size)
    obj = _object(rng, size, app["fg_light"], (0.12, 0.25))
    cx, cy = rng.uniform(obj["r"], size - obj["r"], 2)
    return {**app, "obj": obj, "cx": cx, "cy": cy}


def _draw_fade(canvas, grid, u, p):
    _draw(canvas, grid, p["obj"], p["cx"], p["cy"], opacity=u)


def _sample_orbit(rng, size):
    app = _appearance(rng, size)
    obj = _object(rng, size, app["fg_light"], (0.06, 0.1))
    radius = rng.uniform(0.18, 0.28) * size
    margin = radius + obj["r"]
    cx, cy = rng.uniform(margin, size - margin, 2)
    return {**app, "obj": obj, "cx": cx, "cy": cy, "radius": radius,
            "theta0": rng.uniform(0, 2 * math.pi), "sweep": rng.uniform(1.0, 1.6) * math.pi}


def _draw_orbit(canvas, grid, u, p):
    theta = p["theta0"] + u * p["sweep"]  # increasing angle = clockwise on screen (y down)
    _draw(canvas, grid, p["obj"], p["cx"] + p["radius"] * math.cos(theta),
          p["cy"] + p["radius"] * math.sin(theta))


def _sample_fill(rng, size):
    app = _appearance(rng, size)
    w, h = rng.uniform(0.25, 0.45) * size, rng.uniform(0.5, 0.8) * size
    x0, y0 = rng.uniform(0.05 * size, size - w - 0.05 * size), rng.uniform(0.05 * size, size - h - 0.05 * size)
    return {**app, "x0": x0, "y0": y0, "w": w, "h": h, "stroke": max(1.5, 0.025 * size),
            "wall": _colour(rng, app["fg_light"]), "liquid": _colour(rng, app["fg_light"]),
            "level0": rng.uniform(0.0, 0.12), "level1": rng.uniform(0.88, 1.0)}


def _draw_fill(canvas, grid, u, p):
    x0, y0, w, h, s = p["x0"], p["y0"], p["w"], p["h"], p["stroke"]
    inner_h = h - 2 * s
    level = (p["level0"] + u * (p["level1"] - p["level0"])) * inner_h
    if level > 0:
        top = y0 + h - s - level
        liquid = np.clip(0.5 - np.maximum(np.abs(grid.xs - (x0 + w / 2)) - (w / 2 - s),
                                          np.abs(grid.ys - (top + level / 2)) - level / 2), 0, 1)
        _paint(canvas, liquid, p["liquid"])
    outer = np.maximum(np.abs(grid.xs - (x0 + w / 2)) - w / 2, np.abs(grid.ys - (y0 + h / 2)) - h / 2)
    wall = np.clip(0.5 - np.maximum(outer, -(outer + s)), 0, 1)
    _paint(canvas, wall, p["wall"])


def _sample_aspect(rng, size):
    app = _appearance(rng, size)
    obj = _object(rng, size, app["fg_light"], (0.11, 0.16), ("circle", "square", "diamond"))
    obj["angle"] = 0.0
    ratio = rng.uniform(2.0, 3.2)  # widest rx / ry; tallest is its inverse
    extent = obj["r"] * math.sqrt(ratio)
    cx, cy = rng.uniform(extent, size - extent, 2)
    return {**app, "obj": obj, "cx": cx, "cy": cy, "log_ratio": math.log(ratio)}


def _draw_aspect(canvas, grid, u, p):
    # u = 0: tall (rx/ry = 1/ratio); u = 1: wide (rx/ry = ratio); constant area.
    k = math.exp((2 * u - 1) * p["log_ratio"])
    r = p["obj"]["r"]
    _draw(canvas, grid, p["obj"], p["cx"], p["cy"], rx=r * math.sqrt(k), ry=r / math.sqrt(k))


def _sample_brightness(rng, size):
    params = _sample_static_object(rng, size)
    params["dim"] = rng.uniform(0.1, 0.35)
    return params


def _draw_brightness(canvas, grid, u, p):
    _draw(canvas, grid, p["obj"], p["cx"], p["cy"])
    canvas *= p["dim"] + u * (1 - p["dim"])


def _sample_cover(rng, size):
    params = _sample_static_object(rng, size)
    params["side"] = str(rng.choice(["left", "right", "top", "bottom"]))
    params["panel"] = _colour(rng, not params["fg_light"]) * 0.6 + params["background"].mean((0, 1)) * 0.4
    params["margin"] = rng.uniform(0.02, 0.1) * size
    return params


def _draw_cover(canvas, grid, u, p):
    _draw(canvas, grid, p["obj"], p["cx"], p["cy"])
    r, m = p["obj"]["r"], p["margin"]
    side = p["side"]
    # The panel's leading edge moves from the frame border to just past the far side of the object.
    if side in ("left", "right"):
        coord, centre, size = grid.xs, p["cx"], grid.xs.shape[1]
    else:
        coord, centre, size = grid.ys, p["cy"], grid.ys.shape[0]
    if side in ("left", "top"):
        edge = u * (centre + r + m)
        alpha = np.clip(edge - coord + 0.5, 0, 1)
    else:
        edge = size - u * (size - (centre - r - m))
        alpha = np.clip(coord - edge + 0.5, 0, 1)
    _paint(canvas, alpha, p["panel"])


@dataclass(frozen=True)
class _MotionPair:
    forward: str
    reverse: str
    sample: SampleFn
    draw: DrawFn


_PAIRS: dict[str, _MotionPair] = {
    pair.forward: pair
    for pair in (
        _MotionPair("moving right", "moving left", _sample_translate(1, 0), _draw_translate),
        _MotionPair("moving down", "moving up", _sample_translate(0, 1), _draw_translate),
        _MotionPair("moving down and to the right", "moving up and to the left",
                    _sample_translate(1, 1), _draw_translate),
        _MotionPair("rotating clockwise", "rotating counter-clockwise", _sample_rotate, _draw_rotate),
        _MotionPair("growing", "shrinking", _sample_grow, _draw_grow),
        _MotionPair("two shapes approaching each other", "two shapes moving apart",
                    _sample_approach, _draw_approach),
        _MotionPair("appearing", "disappearing", _sample_static_object, _draw_fade),
        _MotionPair("orbiting clockwise", "orbiting counter-clockwise", _sample_orbit, _draw_orbit),
        _MotionPair("filling up", "emptying", _sample_fill, _draw_fill),
        _MotionPair("getting wider", "getting taller", _sample_aspect, _draw_aspect),
        _MotionPair("getting brighter", "getting darker", _sample_brightness, _draw_brightness),
        _MotionPair("being covered", "being uncovered", _sample_cover, _draw_cover),
    )
}


@dataclass(frozen=True)
class MotionClass:
    """One synthetic class. ``name`` is the folder name, ``label`` the label text, ``reverse`` the
    folder name of the class showing the same motion backwards, ``split`` its default split, ``uid``
    a stable id (the same video of the same class is identical whatever subset is written)."""

    name: str
    label: str
    reverse: str
    forward: bool
    split: str
    uid: int


def _folder(label: str) -> str:
    return label.replace(" ", "_")


# Default split of the pairs: the test and val splits each hold three whole pairs (6 classes), so
# 5-way evaluation on held-out classes always contains a motion and its reverse.
_SPLIT_OF_PAIR = {
    "moving right": "test", "rotating clockwise": "test", "two shapes approaching each other": "test",
    "growing": "val", "appearing": "val", "being covered": "val",
    "moving down": "train", "moving down and to the right": "train", "orbiting clockwise": "train",
    "filling up": "train", "getting wider": "train", "getting brighter": "train",
}


def _motion_classes() -> list[MotionClass]:
    classes = []
    for uid_pair, pair in enumerate(_PAIRS.values()):
        split = _SPLIT_OF_PAIR[pair.forward]
        classes.append(MotionClass(_folder(pair.forward), pair.forward, _folder(pair.reverse), True,
                                   split, 2 * uid_pair))
        classes.append(MotionClass(_folder(pair.reverse), pair.reverse, _folder(pair.forward), False,
                                   split, 2 * uid_pair + 1))
    return classes


MOTION_CLASSES: list[MotionClass] = _motion_classes()
_CLASS_BY_NAME = {c.name: c for c in MOTION_CLASSES}


def _pair_of(motion: MotionClass) -> _MotionPair:
    return _PAIRS[motion.label if motion.forward else _CLASS_BY_NAME[motion.reverse].label]


def _lookup(name: str) -> MotionClass:
    motion = _CLASS_BY_NAME.get(name) or _CLASS_BY_NAME.get(_folder(name))
    if motion is None:
        raise SyntheticDatasetError(
            f"unknown synthetic motion class {name!r}; known: {', '.join(sorted(_CLASS_BY_NAME))}")
    return motion


def render_clip(name: str, frames: int, size: int,
                seed: int | np.random.SeedSequence | np.random.Generator) -> np.ndarray:
    """Render one synthetic video of motion class ``name`` (folder name or label text).

    The parameters are drawn from ``seed`` with the sampler the class shares with its reverse, so
    ``render_clip(reverse, f, s, seed)`` is exactly ``render_clip(name, f, s, seed)[::-1]``.

    Returns frames uint8 [T, S, S, 3] (T = frames, S = size), RGB.
    """
    if frames < 2:
        raise SyntheticDatasetError(f"frames must be at least 2 to show a motion, got {frames}")
    if size < 16:
        raise SyntheticDatasetError(f"size must be at least 16 pixels, got {size}")
    motion = _lookup(name)
    pair = _pair_of(motion)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    params = pair.sample(rng, size)
    timing = _timing(rng)
    grid = _Grid.make(size)
    background, distractors = params["background"], params["distractors"]
    clip = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        phase = t / (frames - 1)
        u = _progress(phase if motion.forward else 1.0 - phase, timing)
        canvas = background.copy()
        for obj in distractors:
            _draw(canvas, grid, obj, obj["cx"], obj["cy"])
        pair.draw(canvas, grid, u, params)
        clip[t] = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return clip


# --------------------------------------------------------------------------------------------
# Writing the dataset.
# --------------------------------------------------------------------------------------------


def split_synthetic_classes(classes: int | None = None) -> dict[str, list[MotionClass]]:
    """Choose which motion classes go to which split when ``classes`` caps their number.

    All 24 classes: train 12, val 6, test 6 (three reversed pairs each in val and test). Fewer:
    test keeps 6 classes (5 when only 10 are asked for), train keeps at least 5 (a 5-way training
    episode), val gets what is left if that is at least 5 classes, else those classes go to train.
    Below 10 classes: half (rounded down) test, the rest train, no val (5-way evaluation is then
    impossible). Pairs stay together as long as the cap allows.
    """
    total = len(MOTION_CLASSES)
    n = total if classes is None else int(classes)
    if not 4 <= n <= total:
        raise SyntheticDatasetError(
            f"classes must be between 4 and {total} (the defined motion classes), got {classes}")
    by_split = {s: [c for c in MOTION_CLASSES if c.split == s] for s in ("train", "val", "test")}
    if n < 10:
        n_test, n_val = n // 2, 0
    else:
        n_test = 6 if n >= 11 else 5
        rest = n - n_test
        n_train = min(len(by_split["train"]), max(5, rest - 6))
        n_val = rest - n_train
        if n_val < 5:
            n_val = 0
    n_train = n - n_test - n_val
    train_pool = by_split["train"] + (by_split["val"] if n_val == 0 else [])
    return {"train": train_pool[:n_train], "val": by_split["val"][:n_val], "test": by_split["test"][:n_test]}


def write_mp4(path: str | Path, clip: np.ndarray, fps: int = FPS) -> None:
    """Write RGB frames uint8 [T, H, W, 3] (H, W even) as an H.264 mp4: yuv420p, CRF 18, encoded on
    one thread so the bytes are deterministic."""
    write_video(path, clip, fps=fps, codec="libx264", container="mp4", pix_fmt="yuv420p",
                options={"crf": "18", "preset": "veryfast"}, threads=1)


def _prepare_out(out: Path) -> None:
    """Refuse to write into a folder holding anything but an earlier synthetic dataset, which is
    replaced."""
    if out.exists() and not out.is_dir():
        raise SyntheticDatasetError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / SYNTH_MANIFEST).is_file():
            raise SyntheticDatasetError(
                f"{out} is not empty and holds no earlier synthetic dataset ({SYNTH_MANIFEST}); "
                "choose an empty or new folder")
        for name in ("videos", "splits"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("labels.json", SYNTH_MANIFEST):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_synthetic_dataset(out: str | Path, classes: int | None = None, videos_per_class: int = 60,
                            frames: int = 16, size: int = 96, seed: int = 0,
                            progress: bool = True) -> dict:
    """Write the synthetic motion dataset to ``out`` as real H.264 mp4 files (see the module doc for
    the layout). Deterministic given ``seed``: video ``i`` of a class depends only on
    (seed, class, i), and the mp4 bytes are reproducible.

    Args:
        out: output folder; must be empty, new, or hold an earlier synthetic dataset (replaced).
        classes: use this many of the 24 motion classes (None: all); see ``split_synthetic_classes``.
        videos_per_class: videos written per class (at least 2).
        frames: frames per video (at least 2).
        size: frame width and height in pixels (even, at least 16).
        seed: random seed.
        progress: show a tqdm progress bar.

    Returns:
        summary dict: root, classes, videos, videos_per_class, frames, size, fps, seed, seconds,
        splits {split: [class names]}, pairs [[forward, reverse], ...] (pairs present in the data).
    """
    if videos_per_class < 2:
        raise SyntheticDatasetError(f"videos_per_class must be at least 2, got {videos_per_class}")
    if frames < 2:
        raise SyntheticDatasetError(f"frames must be at least 2 to show a motion, got {frames}")
    if size < 16 or size % 2:
        raise SyntheticDatasetError(f"size must be an even number of pixels >= 16 (H.264 yuv420p), got {size}")
    splits = split_synthetic_classes(classes)
    out = Path(out)
    _prepare_out(out)
    started = time.perf_counter()
    chosen = [c for s in ("train", "val", "test") for c in splits[s]]
    video_ids = [f"{i:04d}" for i in range(videos_per_class)]
    for motion in chosen:
        (out / "videos" / motion.name).mkdir(parents=True, exist_ok=True)
    jobs = [(motion, i) for motion in chosen for i in range(videos_per_class)]
    for motion, i in tqdm(jobs, desc="synth videos", unit="video", disable=not progress):
        clip = render_clip(motion.name, frames, size, np.random.SeedSequence([seed, motion.uid, i]))
        write_mp4(out / "videos" / motion.name / f"{video_ids[i]}.mp4", clip)
    (out / "splits").mkdir(exist_ok=True)
    for split, members in splits.items():
        if not members:
            continue  # no val split with few classes: no file rather than an empty one
        lines = [f"{m.name}/{vid}" for m in members for vid in video_ids]
        (out / "splits" / f"{split}.txt").write_text("".join(line + "\n" for line in lines))
    (out / "labels.json").write_text(json.dumps({m.name: m.label for m in chosen}, indent=2) + "\n")
    names = {m.name for m in chosen}
    summary = {
        "root": str(out),
        "classes": len(chosen),
        "videos": len(jobs),
        "videos_per_class": videos_per_class,
        "frames": frames,
        "size": size,
        "fps": FPS,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
        "splits": {s: [m.name for m in members] for s, members in splits.items()},
        "pairs": [[m.name, m.reverse] for m in chosen if m.forward and m.reverse in names],
    }
    manifest = {k: v for k, v in summary.items() if k not in ("root", "seconds")}
    (out / SYNTH_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return summary
