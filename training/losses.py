"""Losses and training heads for both regimes (docs/methods.md section 9).

Few-shot episodes (MA-CLIP):
- :func:`episodic_loss`: ``alpha * (L_S2T + L_Q2T) / 2 + (1 - alpha) * L_Q2S``.

Supervised multi-task training (M2-CLIP):
- :func:`contrastive_kl_loss`: video-text KL contrastive loss over the batch's label texts.
- :func:`cmc_loss`: cross-modal classification against all class texts.
- :class:`VisualClassifier`: linear classifier on the mean class token (VC).
- :class:`CMLMHead`: cross-modal masked language modelling over label words (CMLM).
- :func:`multitask_loss`: weighted sum of the parts, released weights by default.

``logit_scale`` arguments are always CLIP's *log* scale (the ``logit_scale`` parameter of an
open_clip model, ``log(1 / 0.07)`` at CLIP's initialisation); logits are multiplied by
``exp(logit_scale)``.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from training.model.adapters import TextAdapter

IGNORE_INDEX = -100


def _scale(logit_scale: Tensor | float) -> Tensor | float:
    """``exp(logit_scale)`` for a tensor or a float log-scale."""
    if isinstance(logit_scale, Tensor):
        return logit_scale.exp()
    return math.exp(float(logit_scale))


def _check_labels(labels: Tensor, batch: int, num_classes: int | None = None) -> None:
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must be [B] = [{batch}], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if num_classes is not None and batch > 0 and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {labels.min()} max {labels.max()}")


# ----------------------------------------------------------------------------- episodic (MA-CLIP)
def episodic_loss(
    q2s_logits: Tensor,
    q2t_logits: Tensor,
    s2t_logits: Tensor,
    query_targets: Tensor,
    support_targets: Tensor,
    alpha: float,
) -> dict[str, Tensor | float]:
    """MA-CLIP episode loss ``alpha * (L_S2T + L_Q2T) / 2 + (1 - alpha) * L_Q2S`` (all cross-entropy).

    Args:
        q2s_logits: ``[Q, N]`` query-to-prototype logits (``-distance``, possibly scaled).
        q2t_logits: ``[Q, N]`` query video embedding against the N class label texts.
        s2t_logits: ``[S, N]`` support video embeddings against the N class label texts.
        query_targets: ``[Q]`` class index in ``[0, N)`` of each query.
        support_targets: ``[S]`` class index of each support video.
        alpha: weight of the text terms, in ``[0, 1]``.

    Returns:
        ``{"total": Tensor, "q2s": float, "q2t": float, "s2t": float}``; the parts are detached
        floats for logging, ``total`` is the differentiable scalar.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if q2s_logits.shape != q2t_logits.shape or q2s_logits.dim() != 2:
        raise ValueError(
            f"q2s_logits and q2t_logits must both be [Q, N], got {tuple(q2s_logits.shape)} "
            f"and {tuple(q2t_logits.shape)}"
        )
    num_classes = q2s_logits.shape[1]
    if s2t_logits.dim() != 2 or s2t_logits.shape[1] != num_classes:
        raise ValueError(f"s2t_logits must be [S, {num_classes}], got {tuple(s2t_logits.shape)}")
    _check_labels(query_targets, q2s_logits.shape[0], num_classes)
    _check_labels(support_targets, s2t_logits.shape[0], num_classes)
    loss_q2s = F.cross_entropy(q2s_logits, query_targets)
    loss_q2t = F.cross_entropy(q2t_logits, query_targets)
    loss_s2t = F.cross_entropy(s2t_logits, support_targets)
    total = alpha * (loss_s2t + loss_q2t) / 2 + (1 - alpha) * loss_q2s
    return {"total": total, "q2s": loss_q2s.item(), "q2t": loss_q2t.item(), "s2t": loss_s2t.item()}


# ----------------------------------------------------------------------------- M2-CLIP multi-task
def contrastive_kl_loss(video_emb: Tensor, text_emb: Tensor, labels: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Video-text contrastive loss as a KL divergence to the same-label ground truth.

    Text ``j`` is the label text of video ``j`` (one per video in the batch, repeats allowed).
    ``logits = exp(logit_scale) * v_hat @ t_hat^T``; the ground truth ``G[i, j] = 1`` when videos
    ``i`` and ``j`` share a label, each row normalised to sum to 1 (several positives per row when
    labels repeat). The loss is ``KL(G || softmax(logits))`` averaged over rows ('batchmean'),
    computed video->text and text->video and averaged: ``(KL_v + KL_t) / 2``.

    Args:
        video_emb: ``[B, D]`` video embeddings (normalised inside).
        text_emb: ``[B, D]`` label-text embeddings, row ``j`` for video ``j`` (normalised inside).
        labels: ``[B]`` class ids of the videos.
        logit_scale: CLIP's log-scale (a tensor to learn it, or a float).

    Returns:
        Scalar tensor ``(KL_v + KL_t) / 2``.
    """
    if video_emb.dim() != 2 or video_emb.shape != text_emb.shape:
        raise ValueError(
            f"video_emb and text_emb must both be [B, D], got {tuple(video_emb.shape)} and {tuple(text_emb.shape)}"
        )
    _check_labels(labels, video_emb.shape[0])
    logits = _scale(logit_scale) * F.normalize(video_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()  # [B, B]
    same_label = (labels.unsqueeze(0) == labels.unsqueeze(1)).to(logits.dtype)  # [B, B], symmetric
    ground_truth = same_label / same_label.sum(dim=1, keepdim=True)
    kl_video = F.kl_div(F.log_softmax(logits, dim=1), ground_truth, reduction="batchmean")
    kl_text = F.kl_div(F.log_softmax(logits.t(), dim=1), ground_truth, reduction="batchmean")
    return (kl_video + kl_text) / 2


def cmc_loss(video_emb: Tensor, class_text_emb: Tensor, labels: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Cross-modal classification: each video against ALL class texts, cross-entropy on logits.

    The released M2-CLIP code applies cross-entropy to already-softmaxed probabilities; that bug
    is deliberately not reproduced: ``F.cross_entropy`` receives the scaled cosine logits.

    Args:
        video_emb: ``[B, D]`` video embeddings.
        class_text_emb: ``[C, D]`` text embeddings of every class (re-encoded each step so the
            text adapter trains).
        labels: ``[B]`` class ids in ``[0, C)``.
        logit_scale: CLIP's log-scale.

    Returns:
        Scalar tensor.
    """
    if video_emb.dim() != 2 or class_text_emb.dim() != 2 or video_emb.shape[1] != class_text_emb.shape[1]:
        raise ValueError(
            f"video_emb must be [B, D] and class_text_emb [C, D], got {tuple(video_emb.shape)} "
            f"and {tuple(class_text_emb.shape)}"
        )
    _check_labels(labels, video_emb.shape[0], class_text_emb.shape[0])
    logits = _scale(logit_scale) * F.normalize(video_emb, dim=-1) @ F.normalize(class_text_emb, dim=-1).t()
    return F.cross_entropy(logits, labels)


class VisualClassifier(nn.Module):
    """VC head: ``Linear(dropout(ln_post(mean_T(cls_tokens))))``.

    Args:
        width: visual width C (class tokens before the projection).
        num_classes: number of training classes.
        ln_post: the backbone's (frozen) ``visual.ln_post``; shared, not copied, so it stays
            whatever the backbone makes it.
        dropout: dropout probability before the linear layer (0.5 in M2-CLIP).
    """

    def __init__(self, width: int, num_classes: int, ln_post: nn.LayerNorm, dropout: float = 0.5):
        super().__init__()
        if tuple(ln_post.normalized_shape) != (width,):
            raise ValueError(f"ln_post normalises {tuple(ln_post.normalized_shape)}, expected ({width},)")
        self.width = width
        self.ln_post = ln_post
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, cls_tokens: Tensor) -> Tensor:
        """``cls_tokens [B, T, C]`` (class token of every frame, before proj) -> logits ``[B, num_classes]``."""
        if cls_tokens.dim() != 3 or cls_tokens.shape[-1] != self.width:
            raise ValueError(f"cls_tokens must be [B, T, {self.width}], got {tuple(cls_tokens.shape)}")
        return self.fc(self.dropout(self.ln_post(cls_tokens.mean(dim=1))))


# ----------------------------------------------------------------------------- CMLM
PAD_WORD = "[PAD]"
MASK_WORD = "[MASK]"
PAD_ID = 0
MASK_ID = 1


def split_label_words(class_name: str) -> list[str]:
    """Lower-cased words of a label: runs of letters/digits, keeping an apostrophe suffix.

    ``"Pushing [something] from left to right"`` -> ``["pushing", "something", "from", "left", "to", "right"]``.
    """
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", class_name.lower())


def build_word_vocab(class_names: Sequence[str]) -> list[str]:
    """Word vocabulary of the training class names.

    Returns:
        ``[PAD_WORD, MASK_WORD, *sorted unique words]``: index ``PAD_ID`` (0) pads label word
        sequences, index ``MASK_ID`` (1) replaces masked words; words start at index 2.
    """
    words: set[str] = set()
    for name in class_names:
        name_words = split_label_words(name)
        if not name_words:
            raise ValueError(f"class name {name!r} has no words")
        words.update(name_words)
    return [PAD_WORD, MASK_WORD, *sorted(words)]


def encode_label_words(class_names: Sequence[str], vocab: Sequence[str]) -> Tensor:
    """Word ids of each label, right-padded with ``PAD_ID``.

    Args:
        class_names: B label strings.
        vocab: from :func:`build_word_vocab`.

    Returns:
        ``[B, Lw]`` long tensor, ``Lw`` the longest label's word count.
    """
    index = {word: i for i, word in enumerate(vocab)}
    rows: list[list[int]] = []
    for name in class_names:
        words = split_label_words(name)
        if not words:
            raise ValueError(f"class name {name!r} has no words")
        unknown = [word for word in words if word not in index]
        if unknown:
            raise ValueError(f"label {name!r} has words outside the CMLM vocabulary: {unknown}")
        rows.append([index[word] for word in words])
    if not rows:
        raise ValueError("no class names given")
    width = max(len(row) for row in rows)
    return torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows], dtype=torch.long)


def mask_label_words(
    word_ids: Tensor, mask_prob: float = 0.15, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Mask label words: each word with probability ``mask_prob``, and at least one per label.

    Masked positions are replaced by ``MASK_ID`` (no BERT 80/10/10 replacement: labels are short).

    Args:
        word_ids: ``[B, Lw]`` from :func:`encode_label_words` (``PAD_ID`` padding).
        mask_prob: masking probability per word.
        generator: torch Generator for reproducible masks (on ``word_ids``' device).

    Returns:
        ``(input_ids [B, Lw], targets [B, Lw])``: inputs with masked words replaced by ``MASK_ID``;
        targets hold the original id at masked positions and ``IGNORE_INDEX`` (-100) elsewhere.
    """
    if word_ids.dim() != 2:
        raise ValueError(f"word_ids must be [B, Lw], got {tuple(word_ids.shape)}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    is_word = word_ids != PAD_ID  # [B, Lw]
    if not is_word.any(dim=1).all():
        raise ValueError("every label needs at least one word to mask")
    scores = torch.rand(word_ids.shape, generator=generator, device=word_ids.device)
    masked = (scores < mask_prob) & is_word
    # Labels where nothing was drawn: mask the word with the lowest score.
    forced = torch.where(is_word, scores, torch.full_like(scores, 2.0)).argmin(dim=1)  # [B]
    needs_one = ~masked.any(dim=1)
    masked[needs_one, forced[needs_one]] = True
    input_ids = word_ids.masked_fill(masked, MASK_ID)
    targets = word_ids.masked_fill(~masked, IGNORE_INDEX)
    return input_ids, targets


class WordTokenizer(Protocol):
    """Anything with open_clip ``SimpleTokenizer``'s ``encode(text) -> list[int]`` (BPE ids)."""

    def encode(self, text: str) -> list[int]: ...


class CMLMHead(nn.Module):
    """Cross-modal masked language modelling head (M2-CLIP's CMLM, with masking that runs).

    Word tokenisation (kept simple): each label word is one token position; its input embedding
    is the CLIP token embedding of the word's first BPE sub-token plus CLIP's positional
    embedding of position ``1 + word index`` (position 0 is CLIP's start token). A masked word
    uses a learned mask embedding instead of its token embedding.

    Decoding: the word embeddings are the queries, the per-frame visual features the keys and
    values of a cross-attention block that starts as a frozen deep copy of the text tower's
    last ``ResidualAttentionBlock``. open_clip's block only attends to ``k_x``/``v_x`` when it
    has an ``ln_1_kv`` LayerNorm (blocks built with ``is_cross_attention=True``); a text block
    lacks it, so one is added here, initialised from the copy's ``ln_1`` and trainable (it is
    new: it normalises visual features, not text). Then a trainable text adapter
    ``x + fc2(GELU(fc1(x)))`` (fc2 zero-initialised) on the block output, a LayerNorm, a
    BERT-style prediction transform (Linear, GELU, LayerNorm) and a linear layer over the word
    vocabulary.

    Trainable: ``mask_embedding``, ``decoder_block.ln_1_kv``, ``text_adapter``, ``norm``,
    ``transform``, ``classifier``. Frozen: every weight copied from the text block. The word and
    positional embeddings are stored as buffers copied from the (frozen) text tower.

    Args:
        text_block: the text tower's last block (an open_clip ``ResidualAttentionBlock``, batch
            first), e.g. ``model.transformer.resblocks[-1]``; pass it before any adapter is
            injected into it.
        token_embedding: the text tower's ``token_embedding`` ``[vocab, W]``.
        positional_embedding: the text tower's ``positional_embedding`` ``[context, W]``.
        vocab: word vocabulary from :func:`build_word_vocab`.
        tokenizer: BPE tokenizer for the words (default: open_clip's ``SimpleTokenizer``).
        adapter_dim: hidden width of the text adapter (384 in M2-CLIP).
    """

    def __init__(
        self,
        text_block: ResidualAttentionBlock,
        token_embedding: nn.Embedding,
        positional_embedding: Tensor,
        vocab: Sequence[str],
        tokenizer: WordTokenizer | None = None,
        adapter_dim: int = 384,
    ):
        super().__init__()
        if not isinstance(text_block, ResidualAttentionBlock):
            raise TypeError(
                f"text_block must be an open_clip ResidualAttentionBlock, got {type(text_block).__name__}"
            )
        if not getattr(text_block.attn, "batch_first", False):
            raise ValueError("text_block must be batch-first (open_clip >= 2.24 builds it so)")
        if len(vocab) < 3 or vocab[PAD_ID] != PAD_WORD or vocab[MASK_ID] != MASK_WORD:
            raise ValueError("vocab must come from build_word_vocab (PAD, MASK, then at least one word)")
        width = text_block.ln_1.normalized_shape[0]
        if token_embedding.embedding_dim != width or positional_embedding.shape[-1] != width:
            raise ValueError(
                f"token/positional embeddings (width {token_embedding.embedding_dim}, "
                f"{positional_embedding.shape[-1]}) do not match the text block width {width}"
            )
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer()

        self.width = width
        self.vocab = list(vocab)
        self.word_index = {word: i for i, word in enumerate(self.vocab)}

        # Frozen copy of the text block, made cross-attending by open_clip's own ln_1_kv hook.
        self.decoder_block = copy.deepcopy(text_block)
        self.decoder_block.requires_grad_(False)
        ln_1 = self.decoder_block.ln_1
        ln_1_kv = type(ln_1)(width, eps=ln_1.eps)
        ln_1_kv.load_state_dict(ln_1.state_dict())
        self.decoder_block.ln_1_kv = ln_1_kv.requires_grad_(True)

        first_subtokens = [0, 0] + [tokenizer.encode(word)[0] for word in self.vocab[2:]]
        with torch.no_grad():
            word_embeddings = token_embedding.weight[torch.tensor(first_subtokens)].detach().clone()
            word_embeddings[PAD_ID] = 0.0
            word_embeddings[MASK_ID] = 0.0
        self.register_buffer("word_embeddings", word_embeddings)  # [V, W]
        self.register_buffer("position_embeddings", positional_embedding.detach()[1:].clone())  # [ctx-1, W]
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(width))

        self.text_adapter = TextAdapter(width, adapter_dim)
        self.norm = nn.LayerNorm(width)
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.classifier = nn.Linear(width, len(self.vocab))

    def encode(self, class_names: Sequence[str]) -> Tensor:
        """Word ids ``[B, Lw]`` of labels (see :func:`encode_label_words`), on this head's device."""
        return encode_label_words(class_names, self.vocab).to(self.word_embeddings.device)

    def forward(self, frame_feats: Tensor, input_ids: Tensor) -> Tensor:
        """Predict label words from the video.

        Args:
            frame_feats: ``[B, T, W]`` per-frame visual features (W = text width, D for CLIP ViTs).
            input_ids: ``[B, Lw]`` word ids with masked positions set to ``MASK_ID``.

        Returns:
            ``[B, Lw, V]`` logits over the word vocabulary.
        """
        if frame_feats.dim() != 3 or frame_feats.shape[-1] != self.width:
            raise ValueError(f"frame_feats must be [B, T, {self.width}], got {tuple(frame_feats.shape)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != frame_feats.shape[0]:
            raise ValueError(f"input_ids must be [B, Lw] with B={frame_feats.shape[0]}, got {tuple(input_ids.shape)}")
        num_words = input_ids.shape[1]
        if num_words > self.position_embeddings.shape[0]:
            raise ValueError(f"labels have {num_words} words, more than the text context allows")
        word_tokens = self.word_embeddings[input_ids]  # [B, Lw, W]
        is_masked = (input_ids == MASK_ID).unsqueeze(-1)
        word_tokens = torch.where(is_masked, self.mask_embedding.to(word_tokens.dtype), word_tokens)
        word_tokens = word_tokens + self.position_embeddings[:num_words]
        visual = frame_feats.to(word_tokens.dtype)
        decoded = self.decoder_block(word_tokens, k_x=visual, v_x=visual)  # [B, Lw, W]
        decoded = self.text_adapter(decoded)
        return self.classifier(self.transform(self.norm(decoded)))  # [B, Lw, V]

    def masked_loss(
        self,
        frame_feats: Tensor,
        word_ids: Tensor,
        mask_prob: float = 0.15,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Mask the labels' words, decode them from the video, cross-entropy on masked words.

        Args:
            frame_feats: ``[B, T, W]`` per-frame visual features.
            word_ids: ``[B, Lw]`` unmasked label word ids (:meth:`encode`).
            mask_prob: masking probability per word (at least one word per label is masked).
            generator: seeds the mask.

        Returns:
            Scalar cross-entropy over masked positions (``ignore_index=-100`` elsewhere).
        """
        input_ids, targets = mask_label_words(word_ids, mask_prob, generator)
        logits = self(frame_feats, input_ids)  # [B, Lw, V]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------- total
# Released M2-CLIP total: ((KL_v + KL_t) / 2 + CMC) / 2 + VC + MLM / 10, where the "kl" part is
# already (KL_v + KL_t) / 2 as returned by contrastive_kl_loss.
DEFAULT_MULTITASK_WEIGHTS: dict[str, float] = {"kl": 0.5, "cmc": 0.5, "vc": 1.0, "mlm": 0.1}


def multitask_loss(
    parts: dict[str, Tensor], weights: dict[str, float] | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the M2-CLIP loss parts.

    Args:
        parts: scalar losses by name, a subset of ``"kl"`` (:func:`contrastive_kl_loss`),
            ``"cmc"``, ``"vc"``, ``"mlm"``; parts left out (a disabled head) contribute nothing.
        weights: overrides of :data:`DEFAULT_MULTITASK_WEIGHTS` (the released weights, which give
            ``((KL_v + KL_t)/2 + CMC)/2 + VC + MLM/10``).

    Returns:
        ``(total, log)``: the differentiable total and detached floats of every part and ``"total"``.
    """
    merged = dict(DEFAULT_MULTITASK_WEIGHTS)
    if weights:
        unknown_weights = sorted(set(weights) - set(DEFAULT_MULTITASK_WEIGHTS))
        if unknown_weights:
            raise ValueError(f"unknown loss weight(s) {unknown_weights}; valid: {sorted(DEFAULT_MULTITASK_WEIGHTS)}")
        merged.update(weights)
    if not parts:
        raise ValueError("multitask_loss needs at least one part")
    unknown_parts = sorted(set(parts) - set(merged))
    if unknown_parts:
        raise ValueError(f"unknown loss part(s) {unknown_parts}; valid: {sorted(DEFAULT_MULTITASK_WEIGHTS)}")
    total = sum(merged[name] * value for name, value in parts.items())
    log = {name: float(value.detach()) for name, value in parts.items()}
    log["total"] = float(total.detach())
    return total, log
