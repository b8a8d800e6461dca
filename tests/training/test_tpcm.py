"""TPCM: identity at initialisation, text guidance on the support path, shape errors."""

from __future__ import annotations

import pytest
import torch

from training.model.temporal_metrics import otam_distance
from training.model.tpcm import TPCM


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))


def test_identity_at_init_with_and_without_text() -> None:
    torch.manual_seed(0)
    tpcm = TPCM(dim=64, heads=8, ffn_dim=128)
    frames = torch.randn(3, 8, 64)
    text = torch.randn(3, 64)
    assert torch.equal(tpcm(frames), frames)
    assert torch.equal(tpcm(frames, text), frames)


def test_identity_at_init_keeps_query_at_zero_distance_from_its_class() -> None:
    torch.manual_seed(1)
    tpcm = TPCM(dim=64, heads=8, ffn_dim=128)
    support = torch.randn(5, 1, 8, 64)
    prototypes = tpcm.prototypes(support, torch.randn(5, 64))  # [N, T, D]
    queries = tpcm(support[:, 0])  # the support videos themselves, as queries
    distances = otam_distance(queries, prototypes, lam=1e-3)
    own = distances.diagonal()
    assert torch.allclose(own, torch.zeros(5), atol=1e-2)
    assert (distances.argmin(dim=1) == torch.arange(5)).all()


def test_text_changes_support_output_after_training_and_query_path_runs() -> None:
    torch.manual_seed(2)
    tpcm = TPCM(dim=64, heads=8, ffn_dim=128)
    _perturb(tpcm)
    frames = torch.randn(2, 8, 64)
    text_a, text_b = torch.randn(2, 64), torch.randn(2, 64)
    out_a, out_b = tpcm(frames, text_a), tpcm(frames, text_b)
    assert out_a.shape == frames.shape
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    query_out = tpcm(frames)
    assert query_out.shape == frames.shape and torch.isfinite(query_out).all()
    assert not torch.allclose(query_out, frames, atol=1e-4)
    assert not torch.allclose(query_out, out_a, atol=1e-4)


def test_prototypes_average_shots() -> None:
    torch.manual_seed(3)
    tpcm = TPCM(dim=32, heads=4, ffn_dim=64)
    _perturb(tpcm)
    support = torch.randn(3, 2, 8, 32)
    text = torch.randn(3, 32)
    prototypes = tpcm.prototypes(support, text)
    assert prototypes.shape == (3, 8, 32)
    expected = (tpcm(support[1, :1], text[1:2]) + tpcm(support[1, 1:], text[1:2])) / 2
    assert torch.allclose(prototypes[1], expected[0], atol=1e-5)


def test_gradient_reaches_output_projections() -> None:
    tpcm = TPCM(dim=32, heads=4, ffn_dim=64)
    tpcm(torch.randn(2, 8, 32), torch.randn(2, 32)).pow(2).sum().backward()
    assert tpcm.attn.out_proj.weight.grad.abs().sum() > 0
    assert tpcm.ffn[-1].weight.grad.abs().sum() > 0


def test_bad_shapes_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="divisor"):
        TPCM(dim=60, heads=8)
    tpcm = TPCM(dim=32, heads=4, ffn_dim=64)
    with pytest.raises(ValueError, match="frame_feats"):
        tpcm(torch.randn(2, 8, 16))
    with pytest.raises(ValueError, match="text_feats"):
        tpcm(torch.randn(2, 8, 32), torch.randn(3, 32))
