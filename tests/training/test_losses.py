"""Losses of both regimes: episodic (MA-CLIP) and multi-task (M2-CLIP), CMLM with a real open_clip block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, TextTransformer

from training.losses import (
    DEFAULT_MULTITASK_WEIGHTS,
    IGNORE_INDEX,
    MASK_ID,
    PAD_ID,
    CMLMHead,
    VisualClassifier,
    build_word_vocab,
    cmc_loss,
    contrastive_kl_loss,
    encode_label_words,
    episodic_loss,
    mask_label_words,
    multitask_loss,
    split_label_words,
)

CLIP_LOG_SCALE = math.log(1 / 0.07)
CLASS_NAMES = [
    "playing guitar",
    "riding a bike",
    "Pushing [something] from left to right",
    "juggling",
    "playing drums",
]


# ----------------------------------------------------------------------------- episodic
def test_episodic_loss_combines_parts_with_alpha() -> None:
    generator = torch.Generator().manual_seed(0)
    q2s = torch.randn(10, 5, generator=generator, requires_grad=True)
    q2t = torch.randn(10, 5, generator=generator)
    s2t = torch.randn(5, 5, generator=generator)
    query_targets = torch.arange(5).repeat_interleave(2)
    support_targets = torch.arange(5)
    out = episodic_loss(q2s, q2t, s2t, query_targets, support_targets, alpha=0.3)
    l_q2s = F.cross_entropy(q2s, query_targets).item()
    l_q2t = F.cross_entropy(q2t, query_targets).item()
    l_s2t = F.cross_entropy(s2t, support_targets).item()
    assert out["q2s"] == pytest.approx(l_q2s) and out["q2t"] == pytest.approx(l_q2t)
    assert out["s2t"] == pytest.approx(l_s2t)
    assert out["total"].item() == pytest.approx(0.3 * (l_s2t + l_q2t) / 2 + 0.7 * l_q2s, rel=1e-6)
    out["total"].backward()
    assert q2s.grad is not None and q2s.grad.abs().sum() > 0
    # alpha = 0 leaves only the metric term, alpha = 1 only the text terms
    assert episodic_loss(q2s, q2t, s2t, query_targets, support_targets, 0.0)["total"].item() == pytest.approx(l_q2s)
    only_text = episodic_loss(q2s, q2t, s2t, query_targets, support_targets, 1.0)["total"].item()
    assert only_text == pytest.approx((l_s2t + l_q2t) / 2)


def test_episodic_loss_rejects_bad_input() -> None:
    logits = torch.randn(4, 5)
    targets = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="alpha"):
        episodic_loss(logits, logits, logits, targets, targets, alpha=1.5)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        episodic_loss(logits, logits, logits, torch.tensor([0, 1, 2, 7]), targets, alpha=0.5)
    with pytest.raises(ValueError, match="s2t_logits"):
        episodic_loss(logits, logits, torch.randn(4, 3), targets, targets, alpha=0.5)


# ----------------------------------------------------------------------------- contrastive KL
def test_contrastive_kl_ground_truth_with_repeated_labels() -> None:
    # labels [0, 0, 1]: rows of the ground truth are [.5, .5, 0], [.5, .5, 0], [0, 0, 1]
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(3, 16, generator=generator)
    text = torch.randn(3, 16, generator=generator)
    labels = torch.tensor([0, 0, 1])
    loss = contrastive_kl_loss(video, text, labels, CLIP_LOG_SCALE)

    logits = math.exp(CLIP_LOG_SCALE) * F.normalize(video, dim=1) @ F.normalize(text, dim=1).t()
    ground_truth = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])

    def kl(log_probs: torch.Tensor) -> float:
        total = 0.0
        for i in range(3):
            for j in range(3):
                if ground_truth[i, j] > 0:
                    total += ground_truth[i, j] * (math.log(ground_truth[i, j]) - log_probs[i, j])
        return float(total) / 3

    expected = (kl(F.log_softmax(logits, 1)) + kl(F.log_softmax(logits.t(), 1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_kl_lower_for_matched_than_shuffled_pairs() -> None:
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(8, 32, generator=generator)
    video = text + 0.1 * torch.randn(8, 32, generator=generator)  # each video near its label text
    labels = torch.arange(8)
    matched = contrastive_kl_loss(video, text, labels, CLIP_LOG_SCALE)
    shuffled = contrastive_kl_loss(video, text[torch.randperm(8, generator=generator)], labels, CLIP_LOG_SCALE)
    assert matched < 0.1 < shuffled
    # a learnable log-scale receives a gradient
    log_scale = torch.tensor(CLIP_LOG_SCALE, requires_grad=True)
    contrastive_kl_loss(video, text.flip(0), labels, log_scale).backward()
    assert log_scale.grad is not None and log_scale.grad != 0


def test_contrastive_kl_repeated_labels_are_not_penalised_as_negatives() -> None:
    # two videos of the same class, each exactly on one of two copies of its label text
    text = F.normalize(torch.randn(1, 16), dim=1).repeat(2, 1)
    video = text.clone()
    same = contrastive_kl_loss(video, text, torch.tensor([3, 3]), CLIP_LOG_SCALE)
    different = contrastive_kl_loss(video, text, torch.tensor([3, 4]), CLIP_LOG_SCALE)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert different.item() == pytest.approx(math.log(2), rel=1e-5)


# ----------------------------------------------------------------------------- CMC
def test_cmc_equals_cross_entropy_on_cosine_logits() -> None:
    generator = torch.Generator().manual_seed(3)
    video = torch.randn(6, 16, generator=generator)
    class_text = torch.randn(10, 16, generator=generator)
    labels = torch.tensor([0, 3, 3, 9, 5, 1])
    cosine = F.normalize(video, dim=1) @ F.normalize(class_text, dim=1).t()
    expected = F.cross_entropy(math.exp(CLIP_LOG_SCALE) * cosine, labels)
    assert cmc_loss(video, class_text, labels, CLIP_LOG_SCALE).item() == pytest.approx(expected.item(), rel=1e-6)
    # tensor log-scale gives the same value
    tensor_scale = torch.tensor(CLIP_LOG_SCALE)
    assert cmc_loss(video, class_text, labels, tensor_scale).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        cmc_loss(video, class_text, torch.tensor([0, 3, 3, 9, 5, 10]), CLIP_LOG_SCALE)


# ----------------------------------------------------------------------------- VC
def test_visual_classifier_uses_shared_ln_post() -> None:
    torch.manual_seed(4)
    ln_post = LayerNorm(24)
    ln_post.requires_grad_(False)
    classifier = VisualClassifier(24, num_classes=7, ln_post=ln_post, dropout=0.5).eval()
    cls_tokens = torch.randn(3, 8, 24)
    logits = classifier(cls_tokens)
    assert logits.shape == (3, 7)
    expected = classifier.fc(ln_post(cls_tokens.mean(1)))
    assert torch.allclose(logits, expected, atol=1e-6)
    assert classifier.ln_post is ln_post
    classifier.train()
    F.cross_entropy(classifier(cls_tokens), torch.tensor([0, 1, 2])).backward()
    assert classifier.fc.weight.grad is not None and ln_post.weight.grad is None
    with pytest.raises(ValueError, match="ln_post"):
        VisualClassifier(32, num_classes=7, ln_post=ln_post)


# ----------------------------------------------------------------------------- CMLM
def test_word_vocab_and_encoding() -> None:
    assert split_label_words("Pushing [something] from left to right") == [
        "pushing", "something", "from", "left", "to", "right"
    ]
    vocab = build_word_vocab(CLASS_NAMES)
    assert vocab[PAD_ID] == "[PAD]" and vocab[MASK_ID] == "[MASK]"
    assert len(vocab) == len(set(vocab)) and "playing" in vocab and "guitar" in vocab
    word_ids = encode_label_words(["playing guitar", "juggling"], vocab)
    assert word_ids.tolist() == [[vocab.index("playing"), vocab.index("guitar")], [vocab.index("juggling"), PAD_ID]]
    with pytest.raises(ValueError, match="outside the CMLM vocabulary"):
        encode_label_words(["playing cello"], vocab)
    with pytest.raises(ValueError, match="no words"):
        build_word_vocab(["!!"])


def test_mask_label_words_masks_at_least_one_word_per_label() -> None:
    vocab = build_word_vocab(CLASS_NAMES)
    word_ids = encode_label_words(CLASS_NAMES * 20, vocab)  # [100, 6]
    generator = torch.Generator().manual_seed(5)
    input_ids, targets = mask_label_words(word_ids, 0.15, generator)
    masked = input_ids == MASK_ID
    assert masked.any(dim=1).all()
    assert not (masked & (word_ids == PAD_ID)).any()  # padding is never masked
    assert torch.equal(targets[masked], word_ids[masked])
    assert (targets[~masked] == IGNORE_INDEX).all()
    assert torch.equal(input_ids[~masked], word_ids[~masked])
    # long labels get about 15% masked, not every word
    long_label = torch.arange(2, 402).unsqueeze(0)  # one label of 400 words
    long_masked = (mask_label_words(long_label, 0.15, torch.Generator().manual_seed(6))[0] == MASK_ID).float().mean()
    assert 0.1 < long_masked.item() < 0.2
    # the generator makes it reproducible
    again, _ = mask_label_words(word_ids, 0.15, torch.Generator().manual_seed(5))
    assert torch.equal(again, input_ids)


@pytest.fixture(scope="module")
def small_text_tower() -> TextTransformer:
    """A real open_clip text tower, tiny and random (width 64, 2 layers)."""
    torch.manual_seed(7)
    return TextTransformer(context_length=16, width=64, heads=4, layers=2, output_dim=64)


@pytest.fixture(scope="module")
def tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def _cmlm_head(tower: TextTransformer, tokenizer: SimpleTokenizer) -> CMLMHead:
    return CMLMHead(
        text_block=tower.transformer.resblocks[-1],
        token_embedding=tower.token_embedding,
        positional_embedding=tower.positional_embedding,
        vocab=build_word_vocab(CLASS_NAMES),
        tokenizer=tokenizer,
        adapter_dim=32,
    )


def test_cmlm_loss_finite_nonzero_and_trains_only_trainable_parts(
    small_text_tower: TextTransformer, tokenizer: SimpleTokenizer
) -> None:
    torch.manual_seed(8)
    head = _cmlm_head(small_text_tower, tokenizer)
    source_block = small_text_tower.transformer.resblocks[-1]
    assert not hasattr(source_block, "ln_1_kv")  # the text tower itself is untouched
    frozen_names = [n for n, p in head.decoder_block.named_parameters() if not n.startswith("ln_1_kv")]
    frozen_before = {n: p.clone() for n, p in head.decoder_block.named_parameters() if n in frozen_names}
    assert all(not p.requires_grad for n, p in head.decoder_block.named_parameters() if n in frozen_names)

    frame_feats = torch.randn(5, 8, 64)
    word_ids = head.encode(CLASS_NAMES)
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        loss = head.masked_loss(frame_feats, word_ids, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        optimizer.step()
    # after one step the zero-initialised fc2 is non-zero, so every trainable part has a gradient
    trainable = {n: p for n, p in head.named_parameters() if p.requires_grad}
    assert set(trainable) >= {"mask_embedding", "decoder_block.ln_1_kv.weight", "text_adapter.fc1.weight",
                              "text_adapter.fc2.weight", "classifier.weight", "transform.0.weight"}
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, before in frozen_before.items():
        param = dict(head.decoder_block.named_parameters())[name]
        assert param.grad is None and torch.equal(param, before), name


def test_cmlm_really_attends_to_the_video(small_text_tower: TextTransformer, tokenizer: SimpleTokenizer) -> None:
    torch.manual_seed(9)
    head = _cmlm_head(small_text_tower, tokenizer)
    input_ids, _ = mask_label_words(head.encode(CLASS_NAMES), generator=torch.Generator().manual_seed(0))
    logits_a = head(torch.randn(5, 8, 64), input_ids)
    logits_b = head(torch.randn(5, 8, 64), input_ids)
    assert logits_a.shape == (5, input_ids.shape[1], len(head.vocab))
    assert not torch.allclose(logits_a, logits_b, atol=1e-4)


def test_cmlm_learns_to_predict_words_from_video(
    small_text_tower: TextTransformer, tokenizer: SimpleTokenizer
) -> None:
    torch.manual_seed(10)
    head = _cmlm_head(small_text_tower, tokenizer)
    class_videos = torch.randn(5, 8, 64)  # one distinct "video" per class
    word_ids = head.encode(CLASS_NAMES)
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    first = head.masked_loss(class_videos, word_ids, generator=generator).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = head.masked_loss(class_videos, word_ids, generator=generator)
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 2


def test_cmlm_rejects_bad_input(small_text_tower: TextTransformer, tokenizer: SimpleTokenizer) -> None:
    head = _cmlm_head(small_text_tower, tokenizer)
    with pytest.raises(ValueError, match="frame_feats"):
        head(torch.randn(2, 8, 32), torch.tensor([[2, 3], [4, 0]]))
    with pytest.raises(TypeError, match="ResidualAttentionBlock"):
        CMLMHead(torch.nn.Linear(64, 64), small_text_tower.token_embedding,
                 small_text_tower.positional_embedding, build_word_vocab(CLASS_NAMES), tokenizer)


# ----------------------------------------------------------------------------- total
def test_multitask_default_weights_reproduce_released_total() -> None:
    kl_v, kl_t = torch.tensor(0.8), torch.tensor(1.2)
    parts = {
        "kl": (kl_v + kl_t) / 2,
        "cmc": torch.tensor(2.0, requires_grad=True),
        "vc": torch.tensor(3.0),
        "mlm": torch.tensor(5.0),
    }
    total, log = multitask_loss(parts)
    assert total.item() == pytest.approx(((0.8 + 1.2) / 2 + 2.0) / 2 + 3.0 + 5.0 / 10)
    assert log["total"] == pytest.approx(total.item()) and log["cmc"] == pytest.approx(2.0)
    total.backward()
    assert parts["cmc"].grad.item() == pytest.approx(DEFAULT_MULTITASK_WEIGHTS["cmc"])
    custom, _ = multitask_loss(parts, {"mlm": 1.0, "vc": 0.0})
    assert custom.item() == pytest.approx(((0.8 + 1.2) / 2 + 2.0) / 2 + 5.0)
    without_mlm, _ = multitask_loss({k: v for k, v in parts.items() if k != "mlm"})
    assert without_mlm.item() == pytest.approx(((0.8 + 1.2) / 2 + 2.0) / 2 + 3.0)
    with pytest.raises(ValueError, match="unknown loss part"):
        multitask_loss({"kl": parts["kl"], "typo": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="unknown loss weight"):
        multitask_loss(parts, {"mlmm": 1.0})
