"""Why a query got its few-shot scores: frame-to-frame similarities and each metric's alignment.

For one query and the prototypes of a few classes, :func:`explain_alignment` returns

- ``similarity`` ``[Q, N, T, T]``: ``cos(q_i, p_j)`` of the query's frames *after TPCM's query path*
  (what :meth:`FsarModel.q2s_logits` feeds the metric) and the prototype's frames, i.e.
  ``1 - frame_cost``;
- ``alignment`` ``[Q, N, 2, T, T]``: two 0/1 masks over the same (query frame, prototype frame)
  grid, one per direction of the metric:

  * ``otam``: the hard-min backtrace of OTAM's padded DP (:func:`otam_hard_path`), direction 0
    walking query frames over prototype frames (the cost as given), direction 1 walking prototype
    frames over query frames (the transposed cost), both drawn in (query, prototype) coordinates;
  * ``bimhm``: direction 0 marks each query frame's nearest prototype frame, direction 1 each
    prototype frame's nearest query frame (the two terms of Bi-MHM);
  * ``mean`` and ``trx``: no frame alignment (all zeros): ``mean`` compares temporal means, and TRX
    compares learned projections of frame tuples, so only the similarity matrix is shown.

Everything is deterministic given the features, so the embedded and the Triton backend, which
both call this through :class:`training.model.runner.ModelRunner`, return the same explanation.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from training.model.temporal_metrics import frame_cost

#: Metrics whose alignment is a path or nearest-frame matches; the others give the matrix only.
ALIGNED_METRICS = ("otam", "bimhm")


def otam_hard_path(cost: np.ndarray) -> List[Tuple[int, int]]:
    """The hard-min backtrace of OTAM's padded DP (:func:`otam_cumulative_cost` with ``min``).

    The cost gets a zero column on both ends of its second axis; the left padding column is 0 in
    every row; row 0 is a cumulative sum; for rows ``l >= 1`` the first real column comes from
    ``(l-1, 0), (l-1, 1), (l, 0)``, middle columns from ``(l-1, m-1), (l, m-1)`` and the right
    padding column from ``(l-1, M-2), (l-1, M-1), (l, M-2)`` (ties: the first listed). The path is
    followed back from the bottom-right cell; padding cells are dropped.

    Args:
        cost: ``[L, M]`` frame costs (rows: the frames walked in order).

    Returns:
        The path's real cells ``(row, column)`` in order, rows and columns non-decreasing.
    """
    num_rows, num_cols = cost.shape
    padded = np.pad(np.asarray(cost, dtype=np.float64), ((0, 0), (1, 1)))  # [L, M + 2]
    width = num_cols + 2
    total = np.zeros((num_rows, width))
    back: Dict[Tuple[int, int], Tuple[int, int] | None] = {}
    total[0] = np.cumsum(padded[0])
    back[(0, 0)] = None
    for col in range(1, width):
        back[(0, col)] = (0, col - 1)
    for row in range(1, num_rows):
        back[(row, 0)] = None  # a path may start on any row of the left padding column
        candidates_by_col = {1: [(row - 1, 0), (row - 1, 1), (row, 0)]}
        for col in range(1, width):
            if col == 1:
                candidates = candidates_by_col[1]
            elif col < width - 1:
                candidates = [(row - 1, col - 1), (row, col - 1)]
            else:
                candidates = [(row - 1, width - 2), (row - 1, width - 1), (row, width - 2)]
            values = [total[cell] for cell in candidates]
            best = int(np.argmin(values))
            total[row, col] = padded[row, col] + values[best]
            back[(row, col)] = candidates[best]
    path: List[Tuple[int, int]] = []
    cell: Tuple[int, int] | None = (num_rows - 1, width - 1)
    while cell is not None:
        row, col = cell
        if 1 <= col <= num_cols:
            path.append((row, col - 1))
        cell = back[cell]
    return path[::-1]


def alignment_masks(cost: np.ndarray, metric: str) -> np.ndarray:
    """The two alignment masks ``[2, Tq, Ts]`` (float32 0/1) of one cost matrix ``[Tq, Ts]``."""
    masks = np.zeros((2,) + cost.shape, dtype=np.float32)
    if metric == "otam":
        for row, col in otam_hard_path(cost):
            masks[0, row, col] = 1.0
        for row, col in otam_hard_path(cost.T):  # rows: prototype frames
            masks[1, col, row] = 1.0
    elif metric == "bimhm":
        masks[0, np.arange(cost.shape[0]), cost.argmin(axis=1)] = 1.0
        masks[1, cost.argmin(axis=0), np.arange(cost.shape[1])] = 1.0
    return masks


def explain_alignment(model: torch.nn.Module, query_feats: Tensor, prototypes: Tensor) -> Dict[str, np.ndarray]:
    """Similarities and alignments of queries against prototypes (see the module docstring).

    Args:
        model: an :class:`FsarModel` (its ``tpcm`` and ``config.metric`` are used).
        query_feats: ``[Q, T, D]`` query frame features (from ``encode_video``, no text).
        prototypes: ``[N, T, D]`` class prototypes.

    Returns:
        ``{"similarity": float32 [Q, N, T, T], "alignment": float32 [Q, N, 2, T, T]}``.
    """
    model._check_frame_feats(query_feats, "query_feats")  # the same checks as q2s_logits
    model._check_frame_feats(prototypes, "prototypes")
    queries = model._centred(query_feats)  # frame_centering (a no-op when off)
    queries = model.tpcm(queries, None) if model.tpcm is not None else queries  # [Q, T, D]
    cost = frame_cost(queries, prototypes).detach().float().cpu().numpy().astype(np.float64)  # [Q, N, T, T]
    metric = model.config.metric
    alignment = np.zeros(cost.shape[:2] + (2,) + cost.shape[2:], dtype=np.float32)
    if metric in ALIGNED_METRICS:
        for q in range(cost.shape[0]):
            for n in range(cost.shape[1]):
                alignment[q, n] = alignment_masks(cost[q, n], metric)
    return {"similarity": (1.0 - cost).astype(np.float32), "alignment": alignment}


def mask_pairs(mask: np.ndarray) -> List[List[int]]:
    """The cells ``[[i, j], ...]`` of a 0/1 mask ``[Tq, Ts]``, row-major (a path's order)."""
    rows, cols = np.nonzero(mask > 0.5)
    return [[int(i), int(j)] for i, j in zip(rows, cols)]


__all__ = ["ALIGNED_METRICS", "alignment_masks", "explain_alignment", "mask_pairs", "otam_hard_path"]
