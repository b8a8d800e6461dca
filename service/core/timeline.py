"""Where in a long video each action happens: window answers turned into events.

A video classified with `segment_seconds` is cut into windows (`training.video.decode_windows`); each
window gets its own predictions and, few-shot and hybrid, its own "none of these" verdict. An event
is a maximal run of consecutive windows whose best label is the same and that are not unknown; it
spans from the first window's start to the last window's end, and its score is the mean of that
label's probability over the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Event:
    """One located action: `label` from `start_s` to `end_s` (seconds from the video's first frame)."""

    label: str
    start_s: float
    end_s: float
    score: float  # mean probability of `label` over the event's windows


def find_events(spans: np.ndarray, labels: Sequence[str | None], scores: Sequence[float]) -> list[Event]:
    """Events of a video from its windows.

    Args:
        spans: float `[W, 2]`, each window's `(start_s, end_s)`, in time order.
        labels: each window's best label, or None where the window is unknown ("none of these").
        scores: each window's probability of its best label `[W]`.
    Returns:
        The maximal runs of consecutive windows with one label (None breaks a run), in time order.
    """
    if not (len(spans) == len(labels) == len(scores)):
        raise ValueError(f"spans, labels and scores differ in length: {len(spans)}, {len(labels)}, {len(scores)}")
    events: list[Event] = []
    start = 0
    for end in range(1, len(labels) + 1):
        if end < len(labels) and labels[end] == labels[start]:
            continue
        if labels[start] is not None:
            run = scores[start:end]
            events.append(Event(label=str(labels[start]), start_s=round(float(spans[start][0]), 3),
                                end_s=round(float(spans[end - 1][1]), 3), score=float(np.mean(run))))
        start = end
    return events
