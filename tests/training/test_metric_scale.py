"""The Q2S scale: derived from CLIP's logit scale by default (docs/methods.md section 8), explicit
numbers and old checkpoints unchanged."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import load_config
from training.model import ModelConfig, build_model
from training.model.config import ModelConfigError
from training.model.temporal_metrics import (
    build_metric,
    distance_units,
    frame_cost,
    otam_cumulative_cost,
)

TINY = dict(backbone="fsar-tiny", pretrained=None, num_frames=8)


def _frames(seed: int, count: int = 6, size: int = 64) -> torch.Tensor:
    """uint8 ``[count, 8, size, size, 3]``: per-video grey levels and noise, so videos differ."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.linspace(30, 220, count).view(count, 1, 1, 1, 1)
    ramp = torch.linspace(-25, 25, 8).view(1, 8, 1, 1, 1) * torch.randn(count, 1, 1, 1, 1, generator=generator)
    noise = 20 * torch.randn(count, 8, size, size, 3, generator=generator)
    return (levels + ramp + noise).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_otam_one_direction_sums_t_costs(lam: float) -> None:
    """A cheapest OTAM path takes one cell per column, so a shift c of all costs moves one direction by
    T * c; the smooth-min also counts paths that linger in the first column: up to ~7% more at 0.5."""
    cost = torch.rand(3, 4, 8, 8, dtype=torch.float64)
    shifted = otam_cumulative_cost(cost + 0.25, lam) - otam_cumulative_cost(cost, lam)
    assert (shifted >= 8 * 0.25 - 1e-9).all()
    assert torch.allclose(shifted, torch.full_like(shifted, 8 * 0.25), rtol=0.1)
    hard = otam_cumulative_cost(cost + 0.25, 1e-3) - otam_cumulative_cost(cost, 1e-3)
    assert torch.allclose(hard, torch.full_like(hard, 8 * 0.25), atol=1e-6)


@pytest.mark.parametrize("name,units", [("otam", 16.0), ("bimhm", 2.0)])
def test_parameter_free_units_match_how_the_distance_moves(name: str, units: float) -> None:
    """Pull every query frame towards a support frame: the distance falls by ``units`` x the mean cost change."""
    metric = build_metric(name, 16, 8).double()
    assert distance_units(metric, 8) == units
    support = torch.randn(1, 8, 16, dtype=torch.float64).expand(3, 8, 16).contiguous()
    query = support[:1] + 1e-3 * torch.randn(1, 8, 16, dtype=torch.float64)  # near-identical: aligned costs
    near = metric(query, support)[0, 0]
    far_query = support[:1].clone()
    far_query[0] = support[0] + 0.5 * torch.randn(8, 16, dtype=torch.float64)
    aligned_change = (torch.diagonal(frame_cost(far_query, support[:1])[0, 0]).mean()
                      - torch.diagonal(frame_cost(query, support[:1])[0, 0]).mean())
    change = metric(far_query, support)[0, 0] - near
    assert change / aligned_change == pytest.approx(units, rel=0.35)


def test_default_scale_is_derived_per_metric() -> None:
    for metric, units in [("otam", 16.0), ("bimhm", 2.0), ("mean", 1.0)]:
        model = build_model(ModelConfig(metric=metric, **TINY))
        assert model.config.metric_scale_init is None
        expected = model.logit_scale.item() / units
        assert model.metric_scale.item() == pytest.approx(expected, rel=1e-6)
    trx = build_model(ModelConfig(metric="trx", **TINY))
    assert 0.0 < trx.metric_scale.item() < trx.logit_scale.item()


def test_explicit_and_auto_values() -> None:
    assert ModelConfig(metric_scale_init="auto", **TINY).metric_scale_init is None
    assert ModelConfig(metric_scale_init=3, **TINY).metric_scale_init == 3.0
    model = build_model(ModelConfig(metric_scale_init=1.0, **TINY))
    assert model.metric_log_scale.item() == 0.0
    for bad in (0.0, -1.0, True, "big"):
        with pytest.raises(ModelConfigError, match="metric_scale_init"):
            ModelConfig(metric_scale_init=bad, **TINY)
    cfg = load_config({"name": "x", "regime": "episodic", "model": {"metric_scale_init": "auto"}})
    assert ModelConfig.from_dict({**TINY, **cfg.model}).metric_scale_init is None


@pytest.mark.parametrize("metric", ["otam", "bimhm", "mean", "trx"])
def test_untrained_q2s_spreads_like_q2t(metric: str) -> None:
    """On identical inputs, the derived scale puts the Q2S spread across classes in Q2T's range
    (within a factor of 20 either way), while the old scale of 1.0 leaves mean's far below."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(metric=metric, **TINY)).eval()
    frames = _frames(1)
    labels = torch.arange(6)
    with torch.no_grad():
        text = model.encode_text(["walk", "run", "jump", "sit", "wave", "clap"])
        support = model.encode_video(frames, texts=text)
        prototypes = model.build_prototypes(support, labels, text)
        queries = model.encode_video(_frames(1))
        q2s = model.q2s_logits(queries, prototypes)
        q2t = model.zero_shot(queries, text)
    q2s_spread = (q2s.max(-1).values - q2s.min(-1).values).mean().item()
    q2t_spread = (q2t.max(-1).values - q2t.min(-1).values).mean().item()
    assert q2t_spread / 20 < q2s_spread < q2t_spread * 20, (q2s_spread, q2t_spread)
    old_spread = q2s_spread / model.metric_scale.item()
    if metric == "mean":
        assert old_spread < q2t_spread / 5


def test_checkpoint_from_before_the_change_scores_bit_identically(tmp_path: Path) -> None:
    """A checkpoint whose config says metric_scale_init 1.0 (the old default) loads with its stored
    scale and gives exactly the logits it gave when saved."""
    old_config = {**ModelConfig(**TINY).to_dict(), "metric_scale_init": 1.0}
    torch.manual_seed(3)
    model = build_model(ModelConfig.from_dict(old_config)).eval()
    with torch.no_grad():
        model.metric_log_scale.fill_(math.log(1.7))  # a learned value, as after training
        for param in model.tpcm.parameters():
            param.add_(0.01 * torch.randn_like(param))
    frames = _frames(2, count=4)
    labels = torch.tensor([0, 1, 2, 3])

    def logits(m) -> torch.Tensor:
        with torch.no_grad():
            text = m.encode_text(["a", "b", "c", "d"])
            protos = m.build_prototypes(m.encode_video(frames, texts=text), labels, text)
            return m.classify(m.encode_video(frames), protos, text)

    before = logits(model)
    path = tmp_path / "old.pt"
    saved_hash = save_checkpoint(path, model)
    loaded, meta = load_checkpoint(path)
    loaded.eval()
    assert loaded.config.metric_scale_init == 1.0
    assert meta["checkpoint_hash"] == saved_hash == loaded.fingerprint()
    assert torch.equal(loaded.metric_log_scale.detach(), model.metric_log_scale.detach())
    assert torch.equal(logits(loaded), before)
