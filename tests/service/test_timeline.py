"""Events from window answers: maximal runs of one confident label."""
from __future__ import annotations

import numpy as np
import pytest

from service.core.timeline import Event, find_events


def spans(count: int, segment: float = 2.0, stride: float | None = None) -> np.ndarray:
    stride = stride or segment
    starts = np.arange(count) * stride
    return np.stack([starts, starts + segment], axis=1)


def test_runs_of_one_label_become_events_and_unknown_windows_break_them() -> None:
    labels = ["a", "a", None, "b", "b", "b", "a", None, None]
    scores = [0.9, 0.7, 0.3, 0.6, 0.8, 1.0, 0.5, 0.2, 0.1]
    assert find_events(spans(9), labels, scores) == [
        Event("a", 0.0, 4.0, pytest.approx(0.8)),
        Event("b", 6.0, 12.0, pytest.approx(0.8)),
        Event("a", 12.0, 14.0, 0.5),
    ]


def test_overlapping_windows_span_from_the_first_start_to_the_last_end() -> None:
    assert find_events(spans(3, 4.0, 1.5), ["x", "x", "x"], [1.0, 1.0, 1.0]) == [Event("x", 0.0, 7.0, 1.0)]


def test_no_windows_or_all_unknown_give_no_event() -> None:
    assert find_events(np.zeros((0, 2)), [], []) == []
    assert find_events(spans(3), [None, None, None], [0.2, 0.3, 0.1]) == []


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError):
        find_events(spans(2), ["a"], [0.5, 0.5])
