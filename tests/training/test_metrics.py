"""Temporal metrics: OTAM, Bi-MHM, mean prototype, TRX, build_metric."""

from __future__ import annotations

import math

import pytest
import torch

from training.model.temporal_metrics import (
    TRX,
    bimhm_distance,
    build_metric,
    frame_cost,
    mean_distance,
    otam_cumulative_cost,
    otam_distance,
)


# ---------------------------------------------------------------- plain-Python references
def reference_cosine_cost(query: list[list[float]], support: list[list[float]]) -> list[list[float]]:
    """1 - cos between every query frame and every support frame, in plain Python."""

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    return [[1.0 - cos(q, s) for s in support] for q in query]


def reference_otam_one_way(cost: list[list[float]], lam: float | None) -> float:
    """OTAM recursion written out from docs/methods.md section 5; lam=None uses the hard minimum."""

    def smin(*values: float) -> float:
        if lam is None:
            return min(values)
        return -lam * math.log(sum(math.exp(-v / lam) for v in values))

    rows = len(cost)
    padded = [[0.0] + list(row) + [0.0] for row in cost]
    width = len(padded[0])
    cum = [[0.0] * width for _ in range(rows)]
    for m in range(1, width):
        cum[0][m] = cum[0][m - 1] + padded[0][m]
    for l in range(1, rows):
        cum[l][0] = 0.0
        cum[l][1] = padded[l][1] + smin(cum[l - 1][0], cum[l - 1][1], cum[l][0])
        for m in range(2, width - 1):
            cum[l][m] = padded[l][m] + smin(cum[l - 1][m - 1], cum[l][m - 1])
        cum[l][width - 1] = padded[l][width - 1] + smin(
            cum[l - 1][width - 2], cum[l - 1][width - 1], cum[l][width - 2]
        )
    return cum[rows - 1][width - 1]


def reference_otam(cost: list[list[float]], lam: float | None) -> float:
    transposed = [list(col) for col in zip(*cost)]
    return reference_otam_one_way(cost, lam) + reference_otam_one_way(transposed, lam)


# ---------------------------------------------------------------- frame cost
def test_frame_cost_shape_range_and_values() -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 5, 16, generator=generator)
    support = torch.randn(4, 6, 16, generator=generator)
    cost = frame_cost(query, support)
    assert cost.shape == (3, 4, 5, 6)
    assert cost.min() >= -1e-6 and cost.max() <= 2 + 1e-6
    expected = reference_cosine_cost(query[1].tolist(), support[2].tolist())
    assert torch.allclose(cost[1, 2], torch.tensor(expected), atol=1e-5)
    # identical frames cost 0, opposite frames cost 2
    assert torch.allclose(frame_cost(query[:1], query[:1])[0, 0].diagonal(), torch.zeros(5), atol=1e-6)
    assert torch.allclose(frame_cost(query[:1], -query[:1])[0, 0].diagonal(), torch.full((5,), 2.0), atol=1e-6)


def test_frame_cost_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="widths differ"):
        frame_cost(torch.randn(2, 4, 8), torch.randn(3, 4, 9))
    with pytest.raises(ValueError, match=r"query must be \[Q, T, D\]"):
        frame_cost(torch.randn(4, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="prototypes"):
        mean_distance(torch.randn(2, 4, 8), torch.randn(3, 2, 4, 8))


# ---------------------------------------------------------------- OTAM
def test_otam_2x2_hand_computed_hard_limit() -> None:
    # cost [[a, b], [c, d]] = [[0.1, 0.9], [0.8, 0.2]]
    # query->support, padded rows: row0 = [0, .1, 1.0, 1.0];
    #   row1: col1 = .8 + min(0, .1, 0) = .8, col2 = .2 + min(.1, .8) = .3, col3 = min(1.0, 1.0, .3) = .3
    # support->query (transpose [[.1, .8], [.9, .2]]): row0 = [0, .1, .9, .9];
    #   row1: col1 = .9, col2 = .2 + min(.1, .9) = .3, col3 = min(.9, .9, .3) = .3
    cost = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert reference_otam(cost.tolist(), None) == pytest.approx(0.6)
    one_way = otam_cumulative_cost(cost, lam=1e-3)
    assert one_way.item() == pytest.approx(0.3, abs=5e-3)
    both = otam_cumulative_cost(cost, lam=1e-3) + otam_cumulative_cost(cost.t(), lam=1e-3)
    assert both.item() == pytest.approx(0.6, abs=1e-2)


@pytest.mark.parametrize("lam", [0.5, 0.1])
def test_otam_matches_python_recursion_on_2x3(lam: float) -> None:
    cost = [[0.3, 1.2, 0.7], [0.9, 0.1, 1.5]]
    expected_one_way = reference_otam_one_way(cost, lam)
    expected_other_way = reference_otam_one_way([list(c) for c in zip(*cost)], lam)
    cost_tensor = torch.tensor(cost, dtype=torch.float64)
    assert otam_cumulative_cost(cost_tensor, lam).item() == pytest.approx(expected_one_way, rel=1e-9)
    assert otam_cumulative_cost(cost_tensor.t(), lam).item() == pytest.approx(expected_other_way, rel=1e-9)


def test_otam_distance_sums_both_directions_against_reference() -> None:
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, 8, generator=generator, dtype=torch.float64)
    support = torch.randn(1, 4, 8, generator=generator, dtype=torch.float64)
    cost = reference_cosine_cost(query[0].tolist(), support[0].tolist())
    expected = reference_otam(cost, 0.5)
    assert otam_distance(query, support, lam=0.5).item() == pytest.approx(expected, rel=1e-9)


def test_otam_batched_equals_per_pair() -> None:
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(3, 8, 32, generator=generator)
    support = torch.randn(5, 8, 32, generator=generator)
    batched = otam_distance(query, support)
    assert batched.shape == (3, 5)
    for qi in range(3):
        for ni in range(5):
            single = otam_distance(query[qi : qi + 1], support[ni : ni + 1])
            assert torch.allclose(batched[qi, ni], single[0, 0], atol=1e-5)


def test_otam_is_order_sensitive() -> None:
    # a smooth trajectory: neighbouring frames are similar, far frames are not
    time = torch.linspace(0, math.pi, 8).unsqueeze(1)  # [T, 1]
    freqs = torch.arange(1, 17, dtype=torch.float32).unsqueeze(0)  # [1, 16]
    video = torch.cat([torch.sin(time * freqs / 4), torch.cos(time * freqs / 4)], dim=1).unsqueeze(0)
    support = torch.cat([video, video.flip(1)], dim=0)  # itself, reversed
    distances = otam_distance(video, support)
    assert distances[0, 0] < distances[0, 1] - 0.1
    # the mean prototype cannot tell the two apart
    mean = mean_distance(video, support)
    assert torch.allclose(mean[0, 0], mean[0, 1], atol=1e-6)


def test_otam_gradient_and_bad_lambda() -> None:
    query = torch.randn(2, 8, 16, requires_grad=True)
    support = torch.randn(3, 8, 16)
    otam_distance(query, support).sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="lam"):
        otam_distance(query, support, lam=0.0)


# ---------------------------------------------------------------- Bi-MHM and mean
def test_bimhm_hand_computed() -> None:
    # frames on the unit circle: query at 0 and 90 degrees, support at 0, 180 and 90 degrees
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    support = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])
    # cost rows (query frames) x cols (support frames):
    #   q0: [0, 2, 1]; q1: [1, 1, 0]
    # mean_i min_j = (0 + 0) / 2 = 0; mean_j min_i = (0 + 1 + 0) / 3 = 1/3
    assert bimhm_distance(query, support).item() == pytest.approx(1 / 3, abs=1e-6)


def test_bimhm_batched_equals_per_pair() -> None:
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 8, 16, generator=generator)
    support = torch.randn(3, 8, 16, generator=generator)
    batched = bimhm_distance(query, support)
    for qi in range(2):
        for ni in range(3):
            cost = torch.tensor(reference_cosine_cost(query[qi].tolist(), support[ni].tolist()))
            expected = cost.min(1).values.mean() + cost.min(0).values.mean()
            assert batched[qi, ni].item() == pytest.approx(expected.item(), abs=1e-5)


def test_mean_distance_values() -> None:
    query = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # mean (1, 0)
    support = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # means (.5,.5), (0,1)
    distances = mean_distance(query, support)
    assert distances.shape == (1, 2)
    assert distances[0, 0].item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert distances[0, 1].item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- TRX
def test_trx_shapes_for_prototypes_and_shots() -> None:
    torch.manual_seed(0)
    trx = TRX(dim=32, num_frames=8, tuple_dim=64)
    assert [m.tuple_frames.shape[0] for m in trx.tuple_attention] == [28, 56]
    query = torch.randn(4, 8, 32)
    assert trx(query, torch.randn(5, 8, 32)).shape == (4, 5)
    assert trx(query, torch.randn(5, 3, 8, 32)).shape == (4, 5)
    # a one-shot support given as [N, T, D] equals the same as [N, 1, T, D]
    support = torch.randn(5, 8, 32)
    assert torch.allclose(trx(query, support), trx(query, support.unsqueeze(1)))


def test_trx_batched_equals_per_query_and_per_class() -> None:
    torch.manual_seed(1)
    trx = TRX(dim=16, num_frames=6, tuple_dim=32)
    query = torch.randn(3, 6, 16)
    support = torch.randn(4, 2, 6, 16)
    batched = trx(query, support)
    assert (batched >= 0).all()
    for qi in range(3):
        for ni in range(4):
            single = trx(query[qi : qi + 1], support[ni : ni + 1])
            assert torch.allclose(batched[qi, ni], single[0, 0], atol=1e-5)


def test_trx_gradient_reaches_parameters() -> None:
    torch.manual_seed(2)
    trx = TRX(dim=16, num_frames=8, tuple_dim=32)
    distances = trx(torch.randn(2, 8, 16), torch.randn(3, 2, 8, 16))
    torch.nn.functional.cross_entropy(-distances, torch.tensor([0, 2])).backward()
    for name, param in trx.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_trx_rejects_wrong_frame_count() -> None:
    trx = TRX(dim=16, num_frames=8, tuple_dim=32)
    with pytest.raises(ValueError, match="built for"):
        trx(torch.randn(2, 6, 16), torch.randn(3, 6, 16))
    with pytest.raises(ValueError, match="cardinality"):
        TRX(dim=16, num_frames=2, cardinalities=(2, 3))


# ---------------------------------------------------------------- build_metric
@pytest.mark.parametrize("name", ["otam", "bimhm", "mean", "trx"])
def test_build_metric_returns_working_modules(name: str) -> None:
    metric = build_metric(name, dim=16, num_frames=8)
    assert isinstance(metric, torch.nn.Module)
    distances = metric(torch.randn(3, 8, 16), torch.randn(5, 8, 16))
    assert distances.shape == (3, 5) and torch.isfinite(distances).all()


def test_build_metric_options_and_errors() -> None:
    query, support = torch.randn(2, 8, 16), torch.randn(3, 8, 16)
    otam = build_metric("otam", dim=16, num_frames=8, lam=0.1)
    assert torch.allclose(otam(query, support), otam_distance(query, support, lam=0.1))
    trx = build_metric("trx", dim=16, num_frames=8, tuple_dim=24, cardinalities=(2,))
    assert len(trx.tuple_attention) == 1
    with pytest.raises(ValueError, match="otam, bimhm, mean, trx"):
        build_metric("dtw", dim=16, num_frames=8)
    with pytest.raises(ValueError, match="does not take"):
        build_metric("mean", dim=16, num_frames=8, lam=0.5)
