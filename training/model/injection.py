"""Adapter injection: wrap open_clip's residual attention blocks at run time (the way PEFT wraps layers).

``transformer.resblocks[i]`` is replaced by an :class:`AdaptedBlock` that holds the original block
and the adapters of that block, and calls the original block's own submodules (``ln_1``, ``attention``,
``ls_1``, ``ln_2``, ``mlp``, ``ls_2``) around them; open_clip's code is never copied. open_clip 3.x
blocks are batch-first: tokens are ``[N, L, C]`` (N = B*T frames for the visual tower, L = 1 + h*w
with the class token first).

Video adapters need per-call facts the block's ``forward(q_x, k_x, v_x, attn_mask)`` signature
cannot carry: the number of frames T and, on the support branch, each video's label text. The
model sets them for the duration of one visual forward with :func:`video_context` (a
:class:`contextvars.ContextVar`, so concurrent threads and asyncio tasks each see their own).
Gradient checkpointing of the visual tower is not supported with video adapters (the recomputation
in backward would run outside the context; the block then raises instead of computing garbage).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from training.model.adapters import MaAdapter, TedAdapter, TextAdapter
from training.model.config import ModelConfig

ADAPTER_SLOTS = ("ted_before_attn", "ted_before_mlp", "ma", "text_adapter")
"""Attribute names of the adapters inside an :class:`AdaptedBlock` (they appear in parameter names)."""


@dataclass(frozen=True)
class VideoContext:
    """Per-forward facts for the video adapters.

    Attributes:
        num_frames: T; the visual batch is B*T frames with each video's frames consecutive.
        text_feats: ``[B, D]`` label text feature of each video (support branch) or None (queries).
        text_tokens: ``[B, C]`` text features already projected by a projection shared across blocks,
            or None (each block projects ``text_feats`` with its own ``MaAdapter.text_proj``).
    """

    num_frames: int
    text_feats: Optional[Tensor] = None
    text_tokens: Optional[Tensor] = None


_VIDEO_CONTEXT: ContextVar[Optional[VideoContext]] = ContextVar("fsar_video_context", default=None)


@contextlib.contextmanager
def video_context(num_frames: int, text_feats: Optional[Tensor] = None,
                  text_tokens: Optional[Tensor] = None) -> Iterator[VideoContext]:
    """Make T (and the support texts) visible to the adapted visual blocks inside the ``with``."""
    context = VideoContext(num_frames, text_feats, text_tokens)
    token = _VIDEO_CONTEXT.set(context)
    try:
        yield context
    finally:
        _VIDEO_CONTEXT.reset(token)


def current_video_context() -> VideoContext:
    context = _VIDEO_CONTEXT.get()
    if context is None:
        raise RuntimeError(
            "a video-adapted visual block ran outside training.model.injection.video_context(); encode "
            "videos with FsarModel.encode_video (the adapters need the number of frames per video)")
    return context


class AdaptedBlock(nn.Module):
    """An open_clip ``ResidualAttentionBlock`` with adapters around its frozen submodules.

    Forward order (x: ``[N, L, C]``):

    1. ``ted_before_attn``: ``x = TED(x)`` (M2-CLIP paper position).
    2. ``ma`` global temporal: the T class tokens of each video attend over time through the frozen
       MHSA; ``cls += ma.temporal(attn_t)``.
    3. Frozen spatial MHSA: ``attn = attention(ln_1(x))``; ``x = x + ls_1(attn)``, plus with ``ma``
       ``+ ma.local(attn_mm)`` where ``attn_mm`` is the frozen MHSA with the label text token appended
       to every frame's tokens (then dropped) on the support branch, and ``attn`` for queries. The
       frozen residual path stays text-free, so text enters only through the (zero-initialised)
       local adapter and the block is an exact identity at initialisation on both branches.
    4. ``text_adapter``: ``x = x + fc2(GELU(fc1(x)))`` (text tower, before the FFN).
    5. ``ted_before_mlp``: ``x = TED(x)`` (released M2-CLIP K400 position).
    6. Frozen MLP: ``x = x + ls_2(mlp(ln_2(x)))``, plus with ``ma`` ``+ s * ma.joint(ln_2(x))``.
    """

    def __init__(self, block: ResidualAttentionBlock, ted_before_attn: Optional[TedAdapter] = None,
                 ted_before_mlp: Optional[TedAdapter] = None, ma: Optional[MaAdapter] = None,
                 text_adapter: Optional[TextAdapter] = None):
        super().__init__()
        if type(block) is not ResidualAttentionBlock:
            raise TypeError(f"AdaptedBlock wraps open_clip's ResidualAttentionBlock, got {type(block).__name__}")
        self.block = block
        self.ted_before_attn = ted_before_attn
        self.ted_before_mlp = ted_before_mlp
        self.ma = ma
        self.text_adapter = text_adapter

    @property
    def needs_video_context(self) -> bool:
        return any(m is not None for m in (self.ted_before_attn, self.ted_before_mlp, self.ma))

    def get_weight_dtype(self) -> torch.dtype:
        """open_clip asks ``resblocks[0]`` for the cast dtype; answer for the wrapped block."""
        return self.block.get_weight_dtype()

    def forward(self, q_x: Tensor, k_x: Optional[Tensor] = None, v_x: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        """``q_x [N, L, C]`` -> ``[N, L, C]`` (same signature as the wrapped block; no cross-attention)."""
        if k_x is not None or v_x is not None:
            raise NotImplementedError("adapted blocks do not support cross-attention inputs (k_x, v_x)")
        block = self.block
        context = current_video_context() if self.needs_video_context else None
        x = q_x
        if self.ted_before_attn is not None:
            x = self.ted_before_attn(x, context.num_frames)
        if self.ma is not None:
            x = self._global_temporal(x, context)
        attn = block.attention(q_x=block.ln_1(x), attn_mask=attn_mask)  # [N, L, C]
        if self.ma is not None:
            x = x + block.ls_1(attn) + self.ma.local(self._multimodal_attention(x, attn, context, attn_mask))
        else:
            x = x + block.ls_1(attn)
        if self.text_adapter is not None:
            x = self.text_adapter(x)
        if self.ted_before_mlp is not None:
            x = self.ted_before_mlp(x, context.num_frames)
        mlp_in = block.ln_2(x)
        x = x + block.ls_2(block.mlp(mlp_in))
        if self.ma is not None:
            x = x + self.ma.scale * self.ma.joint(mlp_in)
        return x

    def _global_temporal(self, x: Tensor, context: VideoContext) -> Tensor:
        """Class tokens attend over the T frames of their video through the frozen MHSA, then adapter."""
        frames_total, num_tokens, width = x.shape
        num_frames = context.num_frames
        if frames_total % num_frames:
            raise ValueError(f"visual batch of {frames_total} frames is not a multiple of T={num_frames}")
        cls_tokens = x[:, 0].reshape(frames_total // num_frames, num_frames, width)  # [B, T, C]
        attn_t = self.block.attention(q_x=self.block.ln_1(cls_tokens))  # [B, T, C]
        cls_tokens = x[:, :1] + self.ma.temporal(attn_t).reshape(frames_total, 1, width)  # [B*T, 1, C]
        return torch.cat([cls_tokens, x[:, 1:]], dim=1)

    def _multimodal_attention(self, x: Tensor, attn: Tensor, context: VideoContext,
                              attn_mask: Optional[Tensor]) -> Tensor:
        """Frozen spatial MHSA over each frame's tokens plus its video's label text token (dropped after)."""
        if context.text_feats is None and context.text_tokens is None:
            return attn  # query branch: no label, the same path without the extra token
        if self.ma.text_proj is not None:
            if context.text_feats is None:
                raise RuntimeError("this MA block projects text itself but the context has no text_feats")
            text_tokens = self.ma.text_proj(context.text_feats)  # [B, C]
        elif context.text_tokens is not None:
            text_tokens = context.text_tokens  # [B, C]
        else:
            raise RuntimeError("this MA block expects shared text tokens but the context has none")
        frames_total, num_tokens, width = x.shape
        text_tokens = text_tokens.to(x.dtype).repeat_interleave(context.num_frames, dim=0)  # [B*T, C]
        if text_tokens.shape[0] != frames_total:
            raise ValueError(f"{text_tokens.shape[0] // context.num_frames} text features for "
                             f"{frames_total // context.num_frames} videos")
        with_text = torch.cat([x, text_tokens.unsqueeze(1)], dim=1)  # [B*T, L + 1, C]
        if attn_mask is not None:
            raise NotImplementedError("multimodal adaptation is for the (unmasked) visual tower")
        return self.block.attention(q_x=self.block.ln_1(with_text))[:, :num_tokens]  # [B*T, L, C]


def resolve_layers(layers: Optional[Sequence[int]], num_blocks: int, field: str) -> List[int]:
    """Block indices from a config list (None = all; negative counts from the end), checked and sorted."""
    if layers is None:
        return list(range(num_blocks))
    resolved = set()
    for index in layers:
        if not -num_blocks <= index < num_blocks:
            raise ValueError(f"{field} has block index {index}, but the tower has {num_blocks} blocks "
                             f"(valid: 0..{num_blocks - 1} or negative from the end)")
        resolved.add(index % num_blocks)
    return sorted(resolved)


def wrap_blocks(blocks: nn.ModuleList, adapters_by_index: dict) -> List[int]:
    """Replace ``blocks[i]`` by ``AdaptedBlock(blocks[i], **adapters_by_index[i])``; returns the indices."""
    for index, adapters in sorted(adapters_by_index.items()):
        if isinstance(blocks[index], AdaptedBlock):
            raise RuntimeError(f"block {index} is already adapted; build a fresh backbone instead")
        blocks[index] = AdaptedBlock(blocks[index], **adapters)
    return sorted(adapters_by_index)


def inject_adapters(clip: nn.Module, config: ModelConfig) -> Dict[str, List[int]]:
    """Wrap the blocks of an open_clip CLIP model with the adapters ``config`` asks for.

    Visual tower: TED-Adapters (``ted`` variants) at ``ted_position`` in ``ted_layers``, MA adapters
    (``ma`` variants) in ``ma_layers``. Text tower (``ted`` variants): text adapters before the FFN of
    the last ``text_adapter_layers`` blocks. ``adapter="none"`` wraps nothing.

    Returns:
        ``{"visual": [...], "text": [...]}``, the indices of the wrapped blocks.
    """
    visual = clip.visual
    width = visual.transformer.width  # C
    blocks = visual.transformer.resblocks
    adapters_by_index: Dict[int, dict] = defaultdict(dict)
    if config.uses_ted:
        bottleneck = max(1, round(width * config.ted_ratio))
        for index in resolve_layers(config.ted_layers, len(blocks), "ted_layers"):
            if config.ted_position in ("before_attn", "both"):
                adapters_by_index[index]["ted_before_attn"] = TedAdapter(width, bottleneck, visual.grid_size)
            if config.ted_position in ("before_mlp", "both"):
                adapters_by_index[index]["ted_before_mlp"] = TedAdapter(width, bottleneck, visual.grid_size)
    if config.uses_ma:
        bottleneck = max(1, round(width * config.ma_ratio))
        text_dim = visual.output_dim if config.ma_text_token == "per_block" else None  # D
        for index in resolve_layers(config.ma_layers, len(blocks), "ma_layers"):
            adapters_by_index[index]["ma"] = MaAdapter(width, bottleneck, config.ma_scale, text_dim)
    wrapped = {"visual": wrap_blocks(blocks, adapters_by_index), "text": []}

    if config.uses_ted and config.text_adapter_layers:
        text_blocks = clip.transformer.resblocks
        if config.text_adapter_layers > len(text_blocks):
            raise ValueError(f"text_adapter_layers={config.text_adapter_layers} but the text tower has "
                             f"{len(text_blocks)} blocks")
        text_width = clip.transformer.width
        bottleneck = min(config.text_adapter_width, text_width)
        last = range(len(text_blocks) - config.text_adapter_layers, len(text_blocks))
        wrapped["text"] = wrap_blocks(text_blocks, {i: {"text_adapter": TextAdapter(text_width, bottleneck)}
                                                    for i in last})
    return wrapped
