"""FsarModel on the tiny backbone: identity at initialisation, gradients, adapters' behaviour, head, state."""
from __future__ import annotations

import json
from typing import Tuple

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from training.model import CheckpointMismatchError, FsarModel, ModelConfig, ModelConfigError, build_model
from training.model.adapters import TedAdapter
from training.model.backbone import load_backbone, register_model_configs
from training.model.info import format_model_info, model_info
from training.model.injection import AdaptedBlock

TINY = "fsar-tiny"
T = 8
SIZE = 64
LABELS = ["jumping jacks", "opening a valve", "standing up", "waving", "pouring water"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Tuple[str, torch.nn.Module]:
    """A random tiny open_clip model saved as a state_dict file, and the frozen reference model itself."""
    register_model_configs()
    torch.manual_seed(1234)
    reference = open_clip.create_model(TINY).eval()
    path = tmp_path_factory.mktemp("weights") / "fsar-tiny-random.pt"
    torch.save(reference.state_dict(), path)
    return str(path), reference


def _build(tiny_weights, adapter: str = "ted", **overrides) -> FsarModel:
    torch.manual_seed(7)
    return build_model(ModelConfig(backbone=TINY, pretrained=tiny_weights[0], adapter=adapter, num_frames=T,
                                   **overrides))


def _frames(videos: int, seed: int = 0) -> torch.Tensor:
    """uint8 [B, T, 64, 64, 3]: random textures with a bright square moving over time (real motion)."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 200, (videos, T, SIZE, SIZE, 3), generator=generator, dtype=torch.uint8)
    for video in range(videos):
        for t in range(T):
            top = (5 * t + 7 * video) % (SIZE - 12)
            frames[video, t, top:top + 12, 4 * t:4 * t + 12] = 255
    return frames


def _reference_frame_feats(reference: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Frozen open_clip per-frame image features [B, T, D] (unnormalised), computed independently."""
    pixels = frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = reference.encode_image((pixels - mean) / std)
    return feats.reshape(frames.shape[0], T, -1)


def _perturb_zero_layers(model: FsarModel, std: float = 0.05, seed: int = 0) -> None:
    """Make every adapter non-identity: fill the zero-initialised (all-zero) trainable tensors with noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            if param.dim() > 0 and not param.any():
                param.add_(torch.randn(param.shape, generator=generator) * std)


ADAPTER_CASES = [
    ("none", {}),
    ("ted", {"ted_position": "before_mlp"}),
    ("ted", {"ted_position": "before_attn"}),
    ("ted", {"ted_position": "both", "ted_layers": [0, -1]}),
    ("ma", {}),
    ("ma", {"ma_text_token": "shared"}),
    ("ted+ma", {"ted_position": "both"}),
]


@pytest.mark.parametrize("adapter,overrides", ADAPTER_CASES,
                         ids=[f"{a}-{'-'.join(f'{v}' for v in o.values()) or 'default'}" for a, o in ADAPTER_CASES])
def test_untrained_adapted_model_reproduces_frozen_clip(tiny_weights, adapter: str, overrides: dict) -> None:
    model = _build(tiny_weights, adapter, **overrides)
    reference = tiny_weights[1]
    frames = _frames(2)
    expected = _reference_frame_feats(reference, frames)
    with torch.no_grad():
        text_feats = model.encode_text(LABELS[:2])
        query_out = model.encode_video_tokens(frames)
        support_feats = model.encode_video(frames, texts=text_feats)
        expected_text = reference.encode_text(open_clip.get_tokenizer(TINY)([f"a video of {x}" for x in LABELS[:2]]))
    assert query_out["frame_feats"].shape == (2, T, 64)
    assert query_out["cls_tokens"].shape == (2, T, 64)
    assert (query_out["frame_feats"] - expected).abs().max().item() <= 1e-5
    assert (support_feats - expected).abs().max().item() <= 1e-5  # support branch, with label texts
    assert (text_feats - expected_text).abs().max().item() <= 1e-5
    # class tokens are taken before ln_post/proj: projecting them gives the frame features back
    projected = model.clip.visual.ln_post(query_out["cls_tokens"]) @ model.clip.visual.proj
    assert (projected - expected).abs().max().item() <= 1e-5
    wrapped = [b for b in model.clip.visual.transformer.resblocks if isinstance(b, AdaptedBlock)]
    assert (len(wrapped) > 0) == (adapter != "none")


def test_numpy_frames_are_accepted_and_bad_frames_rejected(tiny_weights) -> None:
    model = _build(tiny_weights, "none", tpcm=False)
    frames = _frames(1)
    with torch.no_grad():
        assert torch.equal(model.encode_video(frames.numpy()), model.encode_video(frames))
    with pytest.raises(ValueError, match="uint8"):
        model.encode_video(frames.float())
    with pytest.raises(ValueError, match=r"\[B, 8, 64, 64, 3\]"):
        model.encode_video(frames[:, :4])
    with pytest.raises(ValueError, match=r"\[B, 8, 64, 64, 3\]"):
        model.encode_video(frames[0])
    with pytest.raises(ValueError, match="text features"):
        model.encode_video(frames, texts=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="non-empty"):
        model.encode_text([])
    with pytest.raises(ValueError, match="non-empty string"):
        model.encode_text(["ok", "  "])


@pytest.mark.parametrize("overrides", [
    {"adapter": "ted+ma", "ted_position": "both", "metric": "trx"},
    {"adapter": "ma", "ma_text_token": "shared", "metric": "otam"},
], ids=["ted+ma-trx", "ma-shared-otam"])
def test_only_adapters_and_heads_train_and_all_get_gradients(tiny_weights, overrides: dict) -> None:
    model = _build(tiny_weights, **overrides)
    for name, param in model.named_parameters():
        is_backbone = name.startswith("clip.") and model._parameter_group(name) == "backbone"
        assert param.requires_grad == (not is_backbone), name
    # Zero-initialised up-projections block the gradient of everything before them, so make every
    # adapter non-identity first (small random values in the all-zero tensors).
    _perturb_zero_layers(model)
    support_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    text_feats = model.encode_text(LABELS[:3])  # [3, D], through the text adapters
    support = model.encode_video(_frames(6, seed=1), texts=text_feats[support_labels])  # MA text branch
    prototypes = model.build_prototypes(support, support_labels, text_feats)  # TPCM with text
    query_out = model.encode_video_tokens(_frames(3, seed=2))
    logits = model.classify(query_out["frame_feats"], prototypes, text_feats)  # Q2S and Q2T
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2])) + query_out["cls_tokens"].pow(2).mean()
    loss.backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable, "the model has trainable parameters"
    last = len(model.clip.visual.transformer.resblocks) - 1
    # In the last block a TED placed before the MLP changes patch tokens only through its difference
    # branch, and nothing reads the last block's patch tokens: that branch's gradient is exactly zero.
    dead = f"clip.visual.transformer.resblocks.{last}.ted_before_mlp.diff_"
    for name, param in trainable.items():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        if not name.startswith(dead):
            assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_multimodal_adapter_uses_the_support_text(tiny_weights) -> None:
    model = _build(tiny_weights, "ma")
    _perturb_zero_layers(model, std=0.2)
    frames = _frames(2)
    with torch.no_grad():
        texts = model.encode_text(LABELS[:4])
        query = model.encode_video(frames)  # query branch: no text
        support_a = model.encode_video(frames, texts=texts[:2])
        support_b = model.encode_video(frames, texts=texts[2:4])
        support_swapped = model.encode_video(frames, texts=texts[[1, 0]])
    assert torch.isfinite(query).all()
    assert (support_a - support_b).abs().max() > 1e-3  # different label texts -> different features
    assert (support_a - query).abs().max() > 1e-3  # the text token changes the support features
    # each video sees its own text: swapping texts changes both videos' features
    assert (support_swapped[0] - support_a[0]).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.allclose(model.encode_video(frames, texts=texts[:2]), support_a)  # deterministic


def test_ted_difference_uses_temporal_order(tiny_weights) -> None:
    frozen = _build(tiny_weights, "none", tpcm=False)
    model = _build(tiny_weights, "ted", temporal_adapter=False, text_adapter_layers=0)
    # Only the temporal-difference branch is made non-identity (te_up stays zero).
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TedAdapter):
                module.diff_up.weight.normal_(0, 0.2)
    frames = _frames(1)
    perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    with torch.no_grad():
        # a frame-wise model is permutation-equivariant: shuffling frames shuffles features exactly
        assert torch.allclose(frozen.encode_video(frames[:, perm]), frozen.encode_video(frames)[:, perm], atol=1e-6)
        shuffled = model.encode_video(frames[:, perm])
        ordered = model.encode_video(frames)[:, perm]
    assert (shuffled - ordered).abs().max() > 1e-3

    # delta_0 = 0: the first frame's difference branch sees zeros whatever the frames are.
    adapter = TedAdapter(width=16, bottleneck=8, grid=(2, 2))
    with torch.no_grad():
        adapter.diff_up.weight.normal_(0, 0.5)
        tokens_a = torch.randn(2 * 4, 5, 16)  # B=2 videos, T=4, L=1+2*2
        tokens_b = torch.randn(2 * 4, 5, 16)
        out_a = (adapter(tokens_a, 4) - tokens_a).reshape(2, 4, 5, 16)
        out_b = (adapter(tokens_b, 4) - tokens_b).reshape(2, 4, 5, 16)
    assert torch.allclose(out_a[:, 0], out_b[:, 0], atol=1e-6)  # first frame: constant (bias-only) output
    assert (out_a[:, 1] - out_b[:, 1]).abs().max() > 1e-3  # later frames: the difference matters
    assert torch.count_nonzero(out_a[:, :, 0]) == 0  # the class token gets no difference term


def _coloured_frames(videos: int, seed: int = 0) -> torch.Tensor:
    """uint8 [B, T, 64, 64, 3]: each video a distinct colour with noise and a moving bright square."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 60, (videos, T, SIZE, SIZE, 3), generator=generator, dtype=torch.uint8)
    for video in range(videos):
        frames[video] += torch.randint(0, 196, (3,), generator=generator, dtype=torch.uint8)
        for t in range(T):
            top = (5 * t + 7 * video) % (SIZE - 12)
            frames[video, t, top:top + 12, 4 * t:4 * t + 12] = 255
    return frames


def test_untrained_model_with_tpcm_ranks_a_query_identical_to_a_support_first(tiny_weights) -> None:
    model = _build(tiny_weights, "ma", tpcm=True, metric="otam", alpha=0.5)
    frames = _coloured_frames(5, seed=3)
    labels = torch.arange(5)
    with torch.no_grad():
        text_feats = model.encode_text(LABELS)
        support = model.encode_video(frames, texts=text_feats)
        prototypes = model.build_prototypes(support, labels, text_feats)
        queries = model.encode_video(frames)  # the same videos, as queries (no text)
        q2s = model.classify(queries, prototypes)  # [Q, N]
        mixed = model.classify(queries, prototypes, text_feats)
        zero_shot = model.zero_shot(queries, text_feats)
    assert prototypes.shape == (5, T, 64)
    assert torch.allclose(prototypes, queries, atol=1e-5)  # TPCM and MA text branch are identities at init
    assert q2s.argmax(dim=1).tolist() == labels.tolist()
    probs = mixed.softmax(dim=-1)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(5), atol=1e-6)
    expected = 0.5 * zero_shot.softmax(-1) + 0.5 * q2s.softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert zero_shot.shape == (5, 5)
    assert torch.allclose(zero_shot, model.logit_scale * F.normalize(queries.mean(1), dim=-1)
                          @ F.normalize(text_feats, dim=-1).t(), atol=1e-5)


@pytest.mark.parametrize("metric", ["otam", "bimhm", "mean"])
def test_head_ranks_identical_query_first_for_every_metric(tiny_weights, metric: str) -> None:
    """Head only, on well-separated features (a random tiny backbone maps all videos close together)."""
    model = _build(tiny_weights, "none", tpcm=True, metric=metric)
    generator = torch.Generator().manual_seed(5)
    support = torch.randn(10, T, 64, generator=generator)
    labels = torch.arange(10) % 5  # 5-way 2-shot
    text_feats = torch.randn(5, 64, generator=generator)
    with torch.no_grad():
        prototypes = model.build_prototypes(support, labels, text_feats)
        logits = model.classify(prototypes, prototypes)  # queries identical to the class prototypes
    assert logits.argmax(dim=1).tolist() == list(range(5))


def test_prototypes_average_shots_and_reject_bad_labels(tiny_weights) -> None:
    model = _build(tiny_weights, "none", tpcm=False, metric="mean")
    feats = torch.randn(5, T, 64)
    labels = torch.tensor([1, 0, 1, 2, 1])
    prototypes = model.build_prototypes(feats, labels, torch.randn(3, 64))
    assert torch.allclose(prototypes[1], feats[[0, 2, 4]].mean(0))
    assert torch.allclose(prototypes[0], feats[1])
    with pytest.raises(ValueError, match="no support video"):
        model.build_prototypes(feats, torch.tensor([0, 0, 2, 2, 0]), torch.randn(3, 64))
    with pytest.raises(ValueError, match="0..2"):
        model.build_prototypes(feats, torch.tensor([0, 1, 2, 3, 0]), torch.randn(3, 64))
    with pytest.raises(ValueError, match="integer tensor"):
        model.build_prototypes(feats, torch.zeros(5), torch.randn(3, 64))
    with pytest.raises(ValueError, match=r"text_feats must be \[N, D\] for the N=3 prototypes"):
        model.classify(feats, prototypes, torch.randn(2, 64))


def test_model_config_round_trip_and_errors() -> None:
    config = ModelConfig(backbone="ViT-B-32", adapter="ted+ma", ted_layers=(0, 5, -1), metric="trx", alpha=0.3)
    assert config.ted_layers == [0, 5, -1]
    data = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(data) == config
    assert ModelConfig() == ModelConfig.from_dict(ModelConfig().to_dict())
    assert ModelConfig().ted_ratio == 0.5 and ModelConfig().ma_ratio == 0.25 and ModelConfig().prompt == "a video of {}"
    with pytest.raises(ModelConfigError, match="unknown model config key.*Did you mean 'metric'"):
        ModelConfig.from_dict({"metrc": "otam"})
    with pytest.raises(ModelConfigError, match="adapter must be one of"):
        ModelConfig(adapter="lora")
    with pytest.raises(ModelConfigError, match="alpha"):
        ModelConfig(alpha=1.5)
    with pytest.raises(ModelConfigError, match="prompt"):
        ModelConfig(prompt="no placeholder")
    with pytest.raises(ValueError, match="ted_layers has block index 9"):
        build_model(ModelConfig(backbone=TINY, pretrained=None, adapter="ted", ted_layers=[9]))


def test_fingerprint_and_trainable_state(tiny_weights) -> None:
    model = _build(tiny_weights, "ted+ma")
    same = _build(tiny_weights, "ted+ma")
    first = model.fingerprint()
    assert first == same.fingerprint()
    with torch.no_grad():
        model.tpcm.ffn[-1].bias[0] += 0.01  # a trainable weight changes
    assert model.fingerprint() != first
    assert _build(tiny_weights, "ted+ma", alpha=0.2).fingerprint() != first  # config changes
    torch.manual_seed(7)  # same adapter init as _build, other backbone weights
    other_backbone = FsarModel(ModelConfig(backbone=TINY, pretrained=tiny_weights[0], adapter="ted+ma", num_frames=T),
                               load_backbone(TINY, None))
    assert other_backbone.backbone_hash != model.backbone_hash
    assert other_backbone.fingerprint() != same.fingerprint()  # backbone weights change

    state = model.trainable_state_dict()
    assert not any(k.startswith("clip.") and ".block." in k for k in state)  # no frozen backbone tensors
    assert all(p.requires_grad for n, p in model.named_parameters() if n in state and n != "metric_log_scale")
    assert sum(v.numel() for k, v in state.items() if k in dict(model.named_parameters())) \
        == model.count_parameters()["trainable"]
    same.load_trainable_state_dict(state)
    assert same.fingerprint() == model.fingerprint()
    with pytest.raises(CheckpointMismatchError, match="missing"):
        _build(tiny_weights, "ted").load_trainable_state_dict(state)
    broken = dict(state)
    broken["metric_log_scale"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        same.load_trainable_state_dict(broken)


def test_parameter_counts_by_module(tiny_weights) -> None:
    model = _build(tiny_weights, "ted+ma")
    counts = model.count_parameters()
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert counts["trainable"] == trainable
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    assert counts["by_module"]["backbone"] == counts["frozen"] == sum(p.numel() for p in tiny_weights[1].parameters())
    for group in ("ted_adapters", "ma_adapters", "text_adapters", "temporal_adapter", "tpcm"):
        assert counts["by_module"][group] > 0, group
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(model.is_text_adapter_parameter(n) for n in names)
    assert sum(p.numel() for n, p in model.named_parameters() if model.is_text_adapter_parameter(n)) \
        == counts["by_module"]["text_adapters"]
    visual = sum(p.numel() for n, p in model.named_parameters()
                 if p.requires_grad and model.is_visual_adapter_parameter(n))
    assert visual == counts["by_module"]["ted_adapters"] + counts["by_module"]["ma_adapters"]
    assert not any(model.is_visual_adapter_parameter(n) for n in names if n.startswith(("tpcm.", "temporal_adapter.")))


def test_model_info_counts_and_table() -> None:
    info = model_info(TINY, "ted", tpcm=False, text_adapter_layers=1)
    # fsar-tiny: C = D = text width = 64, 2 visual blocks -> TED width 32; temporal adapter 64 -> 32 -> 64
    ted_per_block = 2 * (64 * 32 + 32) + (32 * 3 + 32) + (32 * 9 + 32) + 2 * (32 * 64 + 64)
    assert info["by_module"]["ted_adapters"] == 2 * ted_per_block
    assert info["by_module"]["temporal_adapter"] == (64 * 32 + 32) + (32 * 3 + 32) + (32 * 64 + 64)
    assert info["by_module"]["text_adapters"] == (64 * 64 + 64) + (64 * 64 + 64)  # one block, width min(384, 64)
    assert info["trainable"] == sum(v for k, v in info["by_module"].items() if k != "backbone")
    assert info["weights_source"] == "random" and info["wrapped_blocks"] == {"visual": [0, 1], "text": [1]}
    table = format_model_info(info)
    assert table.splitlines()[0].startswith("backbone fsar-tiny (random), adapter ted")
    assert f"{info['trainable']:,}" in table and "ted_adapters" in table
