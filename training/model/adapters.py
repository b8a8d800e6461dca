"""Adapter modules (M2-CLIP and MA-CLIP, docs/methods.md sections 2-3).

Each module here holds the parameters of one adapter and computes one thing; how they are placed
inside open_clip's residual attention blocks is :mod:`training.model.injection`. Every adapter's
last projection starts at zero, so each one is an exact identity (or adds exact zeros) at
initialisation and an untrained adapted model reproduces frozen CLIP.

Notation: B videos, T frames, L = 1 + h*w tokens a frame, C visual width, D joint embedding width.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def _zero_(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class TedAdapter(nn.Module):
    """M2-CLIP's TED-Adapter on visual tokens: temporal enhancement plus temporal difference.

    ``out = x + TE(x) + [0 ; Diff(x)]`` with

    * TE on all tokens: down ``C -> r``, depthwise Conv1d over time (k=3, padding 1), up ``r -> C``;
    * Diff on patch tokens only: ``delta_t = x_t - x_{t-1}`` (``delta_0 = 0``), down ``C -> r``,
      per-frame depthwise 3x3 Conv2d over the ``h x w`` grid, up ``r -> C``;

    no non-linearity; both up-projections start at zero.

    Args:
        width: visual width C.
        bottleneck: r (released configs: 384 for C = 768).
        grid: ``(h, w)`` patch grid of a frame.
    """

    def __init__(self, width: int, bottleneck: int, grid: Tuple[int, int]):
        super().__init__()
        self.width, self.bottleneck, self.grid = width, bottleneck, tuple(grid)
        self.te_down = nn.Linear(width, bottleneck)
        self.te_conv = nn.Conv1d(bottleneck, bottleneck, kernel_size=3, padding=1, groups=bottleneck)
        self.te_up = _zero_(nn.Linear(bottleneck, width))
        self.diff_down = nn.Linear(width, bottleneck)
        self.diff_conv = nn.Conv2d(bottleneck, bottleneck, kernel_size=3, padding=1, groups=bottleneck)
        self.diff_up = _zero_(nn.Linear(bottleneck, width))

    def forward(self, tokens: Tensor, num_frames: int) -> Tensor:
        """``tokens [B*T, L, C]`` (frames of a video consecutive) -> ``[B*T, L, C]``."""
        frames_total, num_tokens, width = tokens.shape
        height, grid_width = self.grid
        if num_tokens != 1 + height * grid_width or frames_total % num_frames:
            raise ValueError(
                f"TED-Adapter expects [B*T, 1 + {height}*{grid_width}, {self.width}] tokens with T={num_frames}, "
                f"got {tuple(tokens.shape)} (patch dropout and other input sizes are not supported)")
        videos = frames_total // num_frames
        r = self.bottleneck

        # Temporal enhancement: every token position convolved over time.
        te = self.te_down(tokens)  # [B*T, L, r]
        te = te.reshape(videos, num_frames, num_tokens, r).permute(0, 2, 3, 1)  # [B, L, r, T]
        te = self.te_conv(te.reshape(videos * num_tokens, r, num_frames))  # [B*L, r, T]
        te = te.reshape(videos, num_tokens, r, num_frames).permute(0, 3, 1, 2)  # [B, T, L, r]
        te = self.te_up(te.reshape(frames_total, num_tokens, r))  # [B*T, L, C]

        # Temporal difference of patch tokens, then a spatial depthwise conv per frame.
        patches = tokens[:, 1:].reshape(videos, num_frames, height * grid_width, width)  # [B, T, hw, C]
        delta = torch.cat([torch.zeros_like(patches[:, :1]), patches[:, 1:] - patches[:, :-1]], dim=1)
        diff = self.diff_down(delta.reshape(frames_total, height, grid_width, width))  # [B*T, h, w, r]
        diff = self.diff_conv(diff.permute(0, 3, 1, 2))  # [B*T, r, h, w]
        diff = self.diff_up(diff.permute(0, 2, 3, 1).reshape(frames_total, height * grid_width, r))  # [B*T, hw, C]

        diff = torch.cat([torch.zeros_like(diff[:, :1]), diff], dim=1)  # [B*T, L, C], zero for the class token
        return tokens + te + diff


class TemporalAdapter(nn.Module):
    """M2-CLIP's post-backbone temporal adapter on frame embeddings.

    ``out = x + up(dwconv1d_t(down(x)))`` with ``D -> D/2``, depthwise Conv1d over time (k=3) and
    ``D/2 -> D``; the up-projection starts at zero.
    """

    def __init__(self, dim: int):
        super().__init__()
        hidden = max(1, dim // 2)
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.up = _zero_(nn.Linear(hidden, dim))

    def forward(self, frame_feats: Tensor) -> Tensor:
        """``frame_feats [B, T, D]`` -> ``[B, T, D]``."""
        hidden = self.down(frame_feats).transpose(1, 2)  # [B, D/2, T]
        hidden = self.conv(hidden).transpose(1, 2)  # [B, T, D/2]
        return frame_feats + self.up(hidden)


class TextAdapter(nn.Module):
    """M2-CLIP's text adapter: ``x + fc2(GELU(fc1(x)))``, ``W -> bottleneck -> W``, fc2 starts at zero."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.fc1 = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.fc2 = _zero_(nn.Linear(bottleneck, width))

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens [N, L, W]`` -> ``[N, L, W]``."""
        return tokens + self.fc2(self.act(self.fc1(tokens)))


class Bottleneck(nn.Module):
    """AIM-style adapter branch without skip: ``up(GELU(down(x)))``, ``C -> r -> C``, up starts at zero."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = _zero_(nn.Linear(bottleneck, width))

    def forward(self, tokens: Tensor) -> Tensor:
        """``[..., C]`` -> ``[..., C]``."""
        return self.up(self.act(self.down(tokens)))


class MaAdapter(nn.Module):
    """MA-CLIP's adapters of one visual block (AIM style: they reuse the block's frozen MHSA).

    * ``temporal``: global temporal adaptation, applied to the output of the frozen MHSA run over
      the T class tokens of a video; added to the class tokens.
    * ``local``: local multimodal adaptation, applied to the frozen spatial MHSA output computed with
      the label text token appended (support branch) or without it (queries).
    * ``joint``: parallel to the MLP on ``ln_2(x)``, scaled by ``scale``.
    * ``text_proj``: this block's learnable ``D -> C`` projection of the label text feature
      (None when the model shares one projection across blocks).

    The order of operations lives in :class:`training.model.injection.AdaptedBlock`.
    """

    def __init__(self, width: int, bottleneck: int, scale: float, text_dim: Optional[int]):
        super().__init__()
        self.scale = scale
        self.temporal = Bottleneck(width, bottleneck)
        self.local = Bottleneck(width, bottleneck)
        self.joint = Bottleneck(width, bottleneck)
        self.text_proj = nn.Linear(text_dim, width) if text_dim is not None else None

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
