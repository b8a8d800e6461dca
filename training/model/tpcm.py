"""Text-guided prototype construction (TPCM, MA-CLIP; docs/methods.md section 4).

One pre-LayerNorm transformer layer. A support video's frames attend over its own frames plus
its label's text token (appended as one extra key/value); a query video runs the same layer as
self-attention without text, so queries and prototypes live in one space. The attention-output
and FFN-output projections start at zero, so at initialisation the layer is an exact identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TPCM(nn.Module):
    """Text-guided prototype construction module.

    Args:
        dim: feature width D (frame and text features share it).
        heads: attention heads; must divide ``dim``.
        ffn_dim: hidden width of the FFN ``D -> ffn_dim -> D`` (GELU).
        attn_dropout: dropout on the attention weights (CLIP-FSAR uses 0.2).
    """

    def __init__(self, dim: int, heads: int = 8, ffn_dim: int = 2048, attn_dropout: float = 0.0):
        super().__init__()
        if heads <= 0 or dim % heads != 0:
            raise ValueError(f"TPCM heads ({heads}) must be a positive divisor of dim ({dim})")
        self.dim = dim
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=attn_dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        # Zero-initialised output projections: the layer starts as an exact identity.
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        nn.init.zeros_(self.ffn[-1].weight)
        nn.init.zeros_(self.ffn[-1].bias)

    def forward(self, frame_feats: Tensor, text_feats: Tensor | None = None) -> Tensor:
        """Refine frame features, optionally guided by the label text.

        Args:
            frame_feats: ``[B, T, D]`` frame features of B videos.
            text_feats: ``[B, D]`` label text feature of each (support) video, or None for queries.

        Returns:
            ``[B, T, D]`` refined frame features.
        """
        if frame_feats.dim() != 3 or frame_feats.shape[-1] != self.dim:
            raise ValueError(f"TPCM expects frame_feats [B, T, {self.dim}], got {tuple(frame_feats.shape)}")
        frames_normed = self.attn_norm(frame_feats)  # [B, T, D]
        if text_feats is None:
            keys_values = frames_normed
        else:
            if text_feats.shape != (frame_feats.shape[0], self.dim):
                raise ValueError(
                    f"TPCM expects text_feats [B, D] = [{frame_feats.shape[0]}, {self.dim}], "
                    f"got {tuple(text_feats.shape)}"
                )
            text_normed = self.attn_norm(text_feats).unsqueeze(1)  # [B, 1, D]
            keys_values = torch.cat([frames_normed, text_normed], dim=1)  # [B, T + 1, D]
        attended = self.attn(frames_normed, keys_values, keys_values, need_weights=False)[0]
        hidden = frame_feats + attended
        return hidden + self.ffn(self.ffn_norm(hidden))

    def prototypes(self, support_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Class prototypes: TPCM on every shot with its class text, then the mean over shots.

        Args:
            support_feats: ``[N, K, T, D]`` support frame features (N classes, K shots).
            text_feats: ``[N, D]`` label text feature of each class.

        Returns:
            ``[N, T, D]`` prototypes.
        """
        if support_feats.dim() != 4:
            raise ValueError(f"support_feats must be [N, K, T, D], got {tuple(support_feats.shape)}")
        num_classes, num_shots, num_frames, dim = support_feats.shape
        if text_feats.shape != (num_classes, dim):
            raise ValueError(f"text_feats must be [N, D] = [{num_classes}, {dim}], got {tuple(text_feats.shape)}")
        shot_texts = text_feats.unsqueeze(1).expand(num_classes, num_shots, dim).reshape(-1, dim)  # [N*K, D]
        refined = self(support_feats.reshape(-1, num_frames, dim), shot_texts)  # [N*K, T, D]
        return refined.reshape(num_classes, num_shots, num_frames, dim).mean(dim=1)
