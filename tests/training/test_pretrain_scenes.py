"""The stand-in pretraining's scene captions ("scenes-v2", training/pretrain.py): every word is one the
word head knows, each shape is described once, how far a shape is turned follows its symmetry, and
two shapes get a separation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from training.pretrain import (RADIUS_END, RADIUS_START, SCENE_SHAPES, caption_batch, caption_words, render_scene,
                               scene_words, turn_word)


def test_turn_words_follow_each_shapes_symmetry():
    a = 0.3
    assert turn_word("circle", a) == "" and turn_word("ring", a) == ""
    assert turn_word("square", a) == turn_word("square", a + math.pi / 2) == turn_word("cross", a)
    assert turn_word("bar", a) == turn_word("bar", a + math.pi)
    assert turn_word("triangle", a) == turn_word("triangle", a + 2 * math.pi / 3)
    assert turn_word("arrow", a) != turn_word("arrow", a + math.pi)
    # Eight steps over the period, in order: a turning square walks through turn0 .. turn7.
    period = math.pi / 2
    assert [turn_word("square", (k + 0.5) * period / 8) for k in range(8)] == [f"turn{k}" for k in range(8)]
    assert [turn_word("arrow", (k + 0.5) * 2 * math.pi / 8) for k in range(8)] == [f"turn{k}" for k in range(8)]


@pytest.mark.parametrize("radius_range", [RADIUS_START, RADIUS_END])
def test_scene_captions_describe_every_shape_with_known_words(radius_range):
    rng = np.random.default_rng(7)
    known = set(scene_words())
    assert caption_words("scenes-v2") == sorted(known)
    counts = []
    for _ in range(150):
        image, caption = render_scene(rng, 64, radius_range)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        words = caption.replace(",", " ").replace(";", " ").split()
        content = {w for w in words if w not in ("a", "at", "the", "and", "in", "light")}
        assert content <= known, content - known
        shapes = [w for w in words if w in SCENE_SHAPES]
        counts.append(len(shapes))
        assert len(caption.split(";")[0].split(", and ")) == len(shapes)  # one phrase a shape
        # A separation (and side / above) exactly when there are two shapes or more.
        has_relation = ";" in caption
        assert has_relation == (len(shapes) >= 2)
        if has_relation:
            relation = caption.split(";")[1].replace(",", " ").split()
            assert relation[0] in ("touching", "close", "apart", "far") and relation[1] in ("side", "above")
        # Every non-round, unstretched shape says how far it is turned, and only those.
        for phrase in caption.split(";")[0].split(", and "):
            tokens = phrase.split()
            shape = next(w for w in tokens if w in SCENE_SHAPES)
            turned = any(w.startswith("turn") for w in tokens)
            stretched = "wide" in tokens or "tall" in tokens
            assert turned == (SCENE_SHAPES[shape][0] > 0 and not stretched), phrase
    assert set(counts) == {1, 2, 3}


def test_scene_pictures_are_deterministic_and_differ():
    first = caption_batch(np.random.default_rng(3), 8, 64, RADIUS_END, "scenes-v2")
    again = caption_batch(np.random.default_rng(3), 8, 64, RADIUS_END, "scenes-v2")
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    assert len(set(first[1])) == 8
    with pytest.raises(ValueError, match="unknown captions"):
        caption_words("nope")
