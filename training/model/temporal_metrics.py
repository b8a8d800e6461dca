"""Temporal alignment metrics between query videos and class prototypes (docs/methods.md section 5).

Every metric takes query frame features ``[Q, T, D]`` and class prototypes ``[N, T, D]`` and
returns distances ``[Q, N]`` (lower = closer; logits are ``-distance``). All of them are
batched over queries and classes: no Python loop runs over queries, classes or episodes.

- :func:`frame_cost`: frame-to-frame cost ``1 - cos(q_i, s_j)``, ``[Q, N, T, T]``.
- :func:`mean_distance`: ProtoNet, ``1 - cos`` of the temporal means.
- :func:`otam_distance`: OTAM as CLIP-FSAR implements it (padded, smooth-min), both directions.
- :func:`bimhm_distance`: HyRSM's bidirectional mean Hausdorff metric.
- :class:`TRX`: trainable temporal-relational cross-transformer over frame pairs and triples.
- :func:`build_metric`: the one way to build a metric module from its name.
- :func:`distance_units` / :func:`derived_metric_scale`: the scale that puts an untrained model's
  ``-distance`` in CLIP's logit units (docs/methods.md section 8).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METRIC_NAMES = ("otam", "bimhm", "mean", "trx")


def _check_pair(query: Tensor, support: Tensor) -> None:
    """Validate query ``[Q, T, D]`` against support ``[N, T', D]``; raise ValueError otherwise."""
    if query.dim() != 3:
        raise ValueError(f"query must be [Q, T, D], got shape {tuple(query.shape)}")
    if support.dim() != 3:
        hint = " (average the K shots into prototypes [N, T, D] first)" if support.dim() == 4 else ""
        raise ValueError(f"support must be [N, T, D]{hint}, got shape {tuple(support.shape)}")
    if query.shape[-1] != support.shape[-1]:
        raise ValueError(
            f"query and support feature widths differ: {query.shape[-1]} vs {support.shape[-1]}"
        )
    if query.shape[1] == 0 or support.shape[1] == 0:
        raise ValueError("query and support need at least one frame")


def frame_cost(query: Tensor, support: Tensor) -> Tensor:
    """Frame-to-frame cosine cost ``d(i, j) = 1 - cos(q_i, s_j)``.

    Args:
        query: ``[Q, Tq, D]`` query frame features.
        support: ``[N, Ts, D]`` support / prototype frame features.

    Returns:
        ``[Q, N, Tq, Ts]`` costs in ``[0, 2]``.
    """
    _check_pair(query, support)
    query_unit = F.normalize(query, dim=-1)
    support_unit = F.normalize(support, dim=-1)
    cosine = torch.einsum("qid,njd->qnij", query_unit, support_unit)
    return 1.0 - cosine


def mean_distance(query: Tensor, support: Tensor) -> Tensor:
    """ProtoNet distance: ``1 - cos`` of the temporal means.

    Args:
        query: ``[Q, T, D]``; support: ``[N, T, D]``.

    Returns:
        ``[Q, N]`` distances in ``[0, 2]``.
    """
    _check_pair(query, support)
    query_mean = F.normalize(query.mean(dim=1), dim=-1)  # [Q, D]
    support_mean = F.normalize(support.mean(dim=1), dim=-1)  # [N, D]
    return 1.0 - query_mean @ support_mean.t()


def bimhm_distance(query: Tensor, support: Tensor) -> Tensor:
    """Bi-MHM (HyRSM): ``mean_i min_j d(i, j) + mean_j min_i d(i, j)`` on :func:`frame_cost`.

    Args:
        query: ``[Q, T, D]``; support: ``[N, T, D]``.

    Returns:
        ``[Q, N]`` distances.
    """
    cost = frame_cost(query, support)  # [Q, N, Tq, Ts]
    query_to_support = cost.min(dim=-1).values.mean(dim=-1)  # each query frame's nearest support frame
    support_to_query = cost.min(dim=-2).values.mean(dim=-1)  # each support frame's nearest query frame
    return query_to_support + support_to_query


def _softmin(values: Sequence[Tensor], lam: float) -> Tensor:
    """Smooth minimum ``-lam * log(sum_k exp(-x_k / lam))`` of same-shaped tensors (stable form)."""
    stacked = torch.stack(list(values), dim=0)
    return -lam * torch.logsumexp(-stacked / lam, dim=0)


def otam_cumulative_cost(cost: Tensor, lam: float = 0.5) -> Tensor:
    """One direction of OTAM: the padded soft-DTW cumulative cost of each cost matrix.

    Follows CLIP-FSAR's ``OTAM_cum_dist_v2``: the cost matrix gets a zero column on both ends of
    its second (support) axis so a path may start and end anywhere; the left padding column keeps
    a cumulative cost of 0 in every row; row 0 is a plain cumulative sum; for rows ``l >= 1`` the
    first real column takes the soft-min over ``(l-1, 0), (l-1, 1), (l, 0)``, middle columns over
    ``(l-1, m-1), (l, m-1)`` and the last (padding) column over ``(l-1, M-2), (l-1, M-1), (l, M-2)``.
    The loop runs over rows and columns only; each step is batched over all leading dimensions.

    Args:
        cost: ``[..., L, M]`` frame costs (rows: the frames walked in order).
        lam: soft-min temperature (> 0); smaller approaches the hard minimum.

    Returns:
        ``[...]`` the bottom-right cumulative cost.
    """
    if lam <= 0:
        raise ValueError(f"OTAM lam must be > 0, got {lam}")
    padded = F.pad(cost, (1, 1))  # [..., L, M + 2]
    num_rows, width = padded.shape[-2], padded.shape[-1]
    # Columns of the previous row, kept as a list so that no tensor is written in place.
    prev_row = list(torch.cumsum(padded[..., 0, :], dim=-1).unbind(dim=-1))
    for row_idx in range(1, num_rows):
        row_cost = padded[..., row_idx, :]
        cur_row = [torch.zeros_like(prev_row[0])]
        cur_row.append(row_cost[..., 1] + _softmin((prev_row[0], prev_row[1], cur_row[0]), lam))
        for col in range(2, width - 1):
            cur_row.append(row_cost[..., col] + _softmin((prev_row[col - 1], cur_row[col - 1]), lam))
        cur_row.append(
            row_cost[..., width - 1]
            + _softmin((prev_row[width - 2], prev_row[width - 1], cur_row[width - 2]), lam)
        )
        prev_row = cur_row
    return prev_row[-1]


def otam_distance(query: Tensor, support: Tensor, lam: float = 0.5) -> Tensor:
    """OTAM distance (CLIP-FSAR's padded smooth-min version), summed over both directions.

    Args:
        query: ``[Q, T, D]``; support: ``[N, T, D]``.
        lam: soft-min temperature (CLIP-FSAR 0.5, OTAM's own code 0.1).

    Returns:
        ``[Q, N]``: cumulative cost walking query frames against support frames plus walking
        support frames against query frames.
    """
    cost = frame_cost(query, support)  # [Q, N, Tq, Ts]
    return otam_cumulative_cost(cost, lam) + otam_cumulative_cost(cost.transpose(-1, -2), lam)


def sinusoidal_position_encoding(num_positions: int, dim: int, scale: float = 1.0) -> Tensor:
    """Transformer sinusoidal position encoding (sin on even, cos on odd channels) times ``scale``.

    Returns:
        ``[num_positions, dim]``.
    """
    position = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)  # [P, 1]
    even_dim = dim + dim % 2
    div_term = torch.exp(torch.arange(0, even_dim, 2, dtype=torch.float32) * (-math.log(10000.0) / even_dim))
    encoding = torch.zeros(num_positions, even_dim)
    encoding[:, 0::2] = torch.sin(position * div_term)
    encoding[:, 1::2] = torch.cos(position * div_term)
    return encoding[:, :dim] * scale


class _TupleCrossAttention(nn.Module):
    """TRX cross-transformer for one tuple cardinality (pairs or triples).

    Each query tuple attends over every support tuple of a class (all shots together) to form a
    query-specific prototype; the distance is the squared L2 between the query's value tuples and
    that prototype, divided by the number of tuples.
    """

    def __init__(self, dim: int, num_frames: int, cardinality: int, tuple_dim: int):
        super().__init__()
        tuples = list(combinations(range(num_frames), cardinality))
        self.register_buffer("tuple_frames", torch.tensor(tuples, dtype=torch.long), persistent=False)
        self.tuple_dim = tuple_dim
        self.key_proj = nn.Linear(dim * cardinality, tuple_dim)
        self.value_proj = nn.Linear(dim * cardinality, tuple_dim)
        self.key_norm = nn.LayerNorm(tuple_dim)

    def _tuples(self, frame_feats: Tensor) -> Tensor:
        """``[..., T, D]`` -> concatenated tuple features ``[..., P, c * D]``."""
        gathered = frame_feats[..., self.tuple_frames, :]  # [..., P, c, D]
        return gathered.flatten(start_dim=-2)

    def forward(self, query: Tensor, support: Tensor) -> Tensor:
        """query ``[Q, T, D]`` (position-encoded), support ``[N, K, T, D]`` -> distances ``[Q, N]``."""
        num_classes, num_shots = support.shape[:2]
        query_tuples = self._tuples(query)  # [Q, P, cD]
        support_tuples = self._tuples(support)  # [N, K, P, cD]
        num_tuples = query_tuples.shape[1]

        query_keys = self.key_norm(self.key_proj(query_tuples))  # [Q, P, E]
        query_values = self.value_proj(query_tuples)  # [Q, P, E]
        support_keys = self.key_norm(self.key_proj(support_tuples)).reshape(
            num_classes, num_shots * num_tuples, self.tuple_dim
        )  # [N, K*P, E]
        support_values = self.value_proj(support_tuples).reshape(
            num_classes, num_shots * num_tuples, self.tuple_dim
        )  # [N, K*P, E]

        scores = torch.einsum("qpe,nse->qnps", query_keys, support_keys) / math.sqrt(self.tuple_dim)
        attention = scores.softmax(dim=-1)  # over every support tuple of the class, all shots
        prototypes = torch.einsum("qnps,nse->qnpe", attention, support_values)  # [Q, N, P, E]
        diff = query_values.unsqueeze(1) - prototypes
        return diff.pow(2).sum(dim=(-2, -1)) / num_tuples


class TRX(nn.Module):
    """TRX temporal-relational cross-transformer (Perrett et al. 2021), trainable.

    For each cardinality (default pairs and triples: 28 + 56 tuples for T = 8) the frame features,
    plus a sinusoidal position encoding scaled by ``pe_scale``, are concatenated per tuple and
    linearly mapped to ``tuple_dim`` keys (LayerNorm) and values. Distances of the cardinalities
    are averaged. Dropout of the original code is not used.

    Args:
        dim: frame feature width D.
        num_frames: T, fixed because the tuples are enumerated once.
        tuple_dim: key/value width (1152 in TRX).
        cardinalities: tuple sizes, each in ``[1, num_frames]``.
        pe_scale: position-encoding scale (0.1 in TRX).
    """

    def __init__(
        self,
        dim: int,
        num_frames: int,
        tuple_dim: int = 1152,
        cardinalities: Sequence[int] = (2, 3),
        pe_scale: float = 0.1,
    ):
        super().__init__()
        if not cardinalities:
            raise ValueError("TRX needs at least one tuple cardinality")
        for cardinality in cardinalities:
            if not 1 <= cardinality <= num_frames:
                raise ValueError(
                    f"TRX cardinality {cardinality} must be between 1 and num_frames={num_frames}"
                )
        self.dim = dim
        self.num_frames = num_frames
        self.cardinalities = tuple(cardinalities)
        self.register_buffer(
            "position_encoding", sinusoidal_position_encoding(num_frames, dim, pe_scale), persistent=False
        )
        self.tuple_attention = nn.ModuleList(
            _TupleCrossAttention(dim, num_frames, cardinality, tuple_dim) for cardinality in self.cardinalities
        )

    def forward(self, query: Tensor, support: Tensor) -> Tensor:
        """Distances of queries to classes.

        Args:
            query: ``[Q, T, D]`` query frame features.
            support: ``[N, T, D]`` (one video or prototype per class) or ``[N, K, T, D]`` (K shots).

        Returns:
            ``[Q, N]`` distances (mean over cardinalities of squared L2 / number of tuples).
        """
        if support.dim() == 3:
            support = support.unsqueeze(1)
        if query.dim() != 3 or support.dim() != 4:
            raise ValueError(
                f"TRX expects query [Q, T, D] and support [N, T, D] or [N, K, T, D], got "
                f"{tuple(query.shape)} and {tuple(support.shape)}"
            )
        expected = (self.num_frames, self.dim)
        if tuple(query.shape[-2:]) != expected or tuple(support.shape[-2:]) != expected:
            raise ValueError(
                f"TRX was built for [T, D] = {list(expected)}, got query {tuple(query.shape)} "
                f"and support {tuple(support.shape)}"
            )
        encoding = self.position_encoding.to(query.dtype)
        query = query + encoding
        support = support + encoding
        distances = [module(query, support) for module in self.tuple_attention]
        return torch.stack(distances, dim=0).mean(dim=0)


class OTAM(nn.Module):
    """Module form of :func:`otam_distance` (``lam``: soft-min temperature)."""

    def __init__(self, lam: float = 0.5):
        super().__init__()
        if lam <= 0:
            raise ValueError(f"OTAM lam must be > 0, got {lam}")
        self.lam = lam

    def forward(self, query: Tensor, support: Tensor) -> Tensor:
        """query ``[Q, T, D]``, support ``[N, T, D]`` -> distances ``[Q, N]``."""
        return otam_distance(query, support, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


class BiMHM(nn.Module):
    """Module form of :func:`bimhm_distance`."""

    def forward(self, query: Tensor, support: Tensor) -> Tensor:
        """query ``[Q, T, D]``, support ``[N, T, D]`` -> distances ``[Q, N]``."""
        return bimhm_distance(query, support)


class MeanDistance(nn.Module):
    """Module form of :func:`mean_distance` (ProtoNet)."""

    def forward(self, query: Tensor, support: Tensor) -> Tensor:
        """query ``[Q, T, D]``, support ``[N, T, D]`` -> distances ``[Q, N]``."""
        return mean_distance(query, support)


# Keyword options each metric takes (besides dim / num_frames).
_METRIC_OPTIONS: dict[str, tuple[str, ...]] = {
    "otam": ("lam",),
    "bimhm": (),
    "mean": (),
    "trx": ("tuple_dim", "cardinalities", "pe_scale"),
}


def build_metric(name: str, dim: int, num_frames: int, **kw: Any) -> nn.Module:
    """Build a temporal metric module by name.

    Args:
        name: one of ``"otam"``, ``"bimhm"``, ``"mean"``, ``"trx"``.
        dim: frame feature width D (used by ``trx``).
        num_frames: T (used by ``trx``).
        **kw: metric options: ``otam``: ``lam``; ``trx``: ``tuple_dim``, ``cardinalities``,
            ``pe_scale``; ``bimhm`` and ``mean`` take none.

    Returns:
        A module whose ``forward(query [Q, T, D], support [N, T, D])`` returns distances ``[Q, N]``.

    Raises:
        ValueError: unknown name, or an option the metric does not take.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _METRIC_OPTIONS:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRIC_NAMES)}")
    accepted = _METRIC_OPTIONS[key]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(
            f"metric {key!r} does not take option(s) {unknown}; it accepts {list(accepted) or 'no options'}"
        )
    if key == "trx":
        return TRX(dim, num_frames, **kw)
    if key == "otam":
        return OTAM(**kw)
    if key == "bimhm":
        return BiMHM()
    return MeanDistance()


# ---------------------------------------------------------------------------- Q2S scale
def expected_feature_sq_norm(ln_weight: Tensor, ln_bias: Tensor, proj: Tensor) -> float:
    """Expected squared norm of a frame feature ``ln_post(x) @ proj``, from the weights alone.

    A LayerNorm output is ``weight * x_hat + bias`` with ``x_hat`` of zero mean and unit variance
    over its C channels; taking those channels as uncorrelated gives
    ``E||f||^2 = sum_k weight_k^2 ||proj_k||^2 + ||bias @ proj||^2``. Computed in float64 on CPU, so
    every host gets the same number (the value is part of the model's fingerprint).

    Args:
        ln_weight, ln_bias: ``[C]`` the final LayerNorm's affine parameters.
        proj: ``[C, D]`` the projection to the joint embedding.
    """
    weight = ln_weight.detach().to("cpu", torch.float64)
    bias = ln_bias.detach().to("cpu", torch.float64)
    matrix = proj.detach().to("cpu", torch.float64)
    return float(weight.pow(2) @ matrix.pow(2).sum(dim=1) + (bias @ matrix).pow(2).sum())


def distance_units(metric: nn.Module, num_frames: int, feature_sq_norm: float | None = None) -> float:
    """How many frame costs ``1 - cos`` an untrained metric's distance adds up to.

    Shifting every frame cost by ``c`` shifts the distance by ``units * c``, so ``-distance / units``
    moves like one cosine (docs/methods.md section 8):

    - ``mean``: ``1 - cos`` of the temporal means: 1.
    - ``bimhm``: two means of per-frame minima: 2.
    - ``otam``: a cheapest alignment path visits one cell per column of the padded cost matrix, so
      each direction sums T costs: ``T + T``. The smooth-min also weighs paths that run down the
      first column (weight ``exp(-extra cost / lam)``): a few percent more at ``lam = 0.5``.
    - ``trx``: for a difference ``delta`` spread evenly over its channels, a value map ``W`` gives
      ``E||W delta||^2 = ||W||_F^2 / fan_in * ||delta||^2``; a tuple of c frames of squared norm
      ``r^2`` differs by ``c * 2 r^2 (1 - cos)``; with ``fan_in = c * D`` the distance per tuple is
      ``2 r^2 ||W_c||_F^2 / D`` costs, averaged over cardinalities.

    Args:
        metric: a module from :func:`build_metric` (untrained, for ``trx``).
        num_frames: T.
        feature_sq_norm: ``r^2``, the squared norm of the frame features (``trx`` only; see
            :func:`expected_feature_sq_norm`).
    """
    if isinstance(metric, MeanDistance):
        return 1.0
    if isinstance(metric, BiMHM):
        return 2.0
    if isinstance(metric, OTAM):
        return 2.0 * num_frames
    if isinstance(metric, TRX):
        if feature_sq_norm is None or feature_sq_norm <= 0:
            raise ValueError("TRX's distance units need the frame features' squared norm (feature_sq_norm > 0)")
        weights = [float(m.value_proj.weight.detach().to("cpu", torch.float64).pow(2).sum())
                   for m in metric.tuple_attention]
        return 2.0 * feature_sq_norm * (sum(weights) / len(weights)) / metric.dim
    raise ValueError(f"no distance units known for metric module {type(metric).__name__}")


def derived_metric_scale(metric: nn.Module, num_frames: int, clip_logit_scale: float,
                         feature_sq_norm: float | None = None) -> float:
    """``exp(clip_logit_scale) / distance_units(...)``: Q2S logits in CLIP's units before training.

    Args:
        metric: the metric module (see :func:`distance_units`).
        num_frames: T.
        clip_logit_scale: the backbone's ``logit_scale`` parameter (a log; about log(100) for
            OpenAI CLIP, log(1 / 0.07) for random open_clip weights).
        feature_sq_norm: squared norm of the frame features (``trx`` only).
    """
    return math.exp(clip_logit_scale) / distance_units(metric, num_frames, feature_sq_norm)
