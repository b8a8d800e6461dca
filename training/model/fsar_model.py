"""FsarModel: a frozen open_clip CLIP with video adapters, TPCM and a temporal metric.

One model definition for training, the embedded backend and Triton::

    model = build_model(ModelConfig(backbone="ViT-B-16", pretrained="openai", adapter="ted"))
    text_feats = model.encode_text(["open the valve", "stand up"])        # [N, D]
    support = model.encode_video(support_frames, texts=text_feats[labels])  # [S, T, D]
    prototypes = model.build_prototypes(support, labels, text_feats)       # [N, T, D]
    query = model.encode_video(query_frames)                                # [Q, T, D]
    probs = model.classify(query, prototypes, text_feats).softmax(-1)      # [Q, N]

Methods stay differentiable (training calls them); serving wraps calls in ``torch.inference_mode``.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.model.temporal_metrics import build_metric, derived_metric_scale, expected_feature_sq_norm
from training.model.adapters import TemporalAdapter
from training.model.backbone import Backbone, load_backbone
from training.model.card import ModelCard
from training.model.config import ModelConfig
from training.model.injection import ADAPTER_SLOTS, AdaptedBlock, inject_adapters, video_context
from training.model.hashing import state_hash
from training.model.tpcm import TPCM

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SLOT_GROUPS = {"ted_before_attn": "ted_adapters", "ted_before_mlp": "ted_adapters", "ma": "ma_adapters",
                "text_adapter": "text_adapters"}
_GROUP_ORDER = ("backbone", "ted_adapters", "ma_adapters", "text_adapters", "temporal_adapter", "ma_text_proj",
                "tpcm", "metric", "metric_log_scale")


class CheckpointMismatchError(ValueError):
    """A trainable state_dict does not match the model (missing, unexpected or mis-shaped tensors)."""


class FsarModel(nn.Module):
    """Frozen CLIP + adapters (``config.adapter``) + TPCM (``config.tpcm``) + temporal metric.

    Attributes:
        config: the :class:`ModelConfig` it was built from.
        clip: the open_clip model, frozen, with adapted blocks wrapped in place.
        temporal_adapter: M2-CLIP's post-backbone temporal adapter, or None.
        ma_text_proj: the shared ``D -> C`` text-token projection (``ma_text_token="shared"``), or None.
        tpcm: the text-guided prototype construction layer, or None.
        metric: temporal metric module, ``forward(query [Q,T,D], support [N,T,D]) -> distances [Q,N]``.
        metric_log_scale: log of the scale on ``-distance`` (Q2S logits); starts at
            ``log(config.metric_scale_init)``, or derived from CLIP's logit scale when that is None.
        weights_source, backbone_hash: where the backbone weights came from and their sha256.
        wrapped_blocks: ``{"visual": [...], "text": [...]}`` indices of adapted blocks.
    """

    def __init__(self, config: ModelConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.backbone_name = backbone.name
        self.weights_source = backbone.weights_source
        self.backbone_hash = backbone.weights_hash
        self.image_size = tuple(backbone.image_size)
        self._backbone = backbone  # tokenizer access; not a module
        self.clip = backbone.clip
        visual = self.clip.visual
        self.visual_width = visual.transformer.width  # C
        self.embed_dim = visual.output_dim  # D
        self.register_buffer("pixel_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

        self.wrapped_blocks = inject_adapters(self.clip, config)
        self.ma_text_proj = (nn.Linear(self.embed_dim, self.visual_width)
                             if config.uses_ma and config.ma_text_token == "shared" else None)
        self.temporal_adapter = TemporalAdapter(self.embed_dim) if config.uses_ted and config.temporal_adapter else None
        self.tpcm = (TPCM(self.embed_dim, heads=config.tpcm_heads, ffn_dim=config.tpcm_ffn,
                          attn_dropout=config.tpcm_attn_dropout) if config.tpcm else None)
        metric_kwargs = {"lam": config.otam_lambda} if config.metric == "otam" else {}
        self.metric = build_metric(config.metric, self.embed_dim, config.num_frames, **metric_kwargs)
        metric_scale_init = config.metric_scale_init
        if metric_scale_init is None:  # Q2S in CLIP's logit units before training (docs/methods.md section 8)
            metric_scale_init = derived_metric_scale(
                self.metric, config.num_frames, float(self.clip.logit_scale.detach().double().cpu()),
                expected_feature_sq_norm(visual.ln_post.weight, visual.ln_post.bias, visual.proj))
        self.metric_log_scale = nn.Parameter(torch.tensor(math.log(metric_scale_init)),
                                             requires_grad=config.learn_metric_scale)
        self._adapter_roots = sorted(
            f"clip.{name}.{slot}" for name, module in self.clip.named_modules() if isinstance(module, AdaptedBlock)
            for slot in ADAPTER_SLOTS if getattr(module, slot) is not None)
        for name, param in self.clip.named_parameters():
            param.requires_grad_(self._is_adapter_key(f"clip.{name}"))

    # ------------------------------------------------------------------ properties
    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    @property
    def metric_scale(self) -> Tensor:
        """Scale on ``-distance`` in Q2S logits (scalar)."""
        return self.metric_log_scale.exp()

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's (frozen) temperature ``exp(logit_scale)`` used by zero-shot and Q2T logits (scalar)."""
        return self.clip.logit_scale.exp()

    # ------------------------------------------------------------------ video
    def preprocess_frames(self, frames: Union[Tensor, np.ndarray]) -> Tensor:
        """Raw frames ``uint8 [B, T, H, W, 3]`` (torch or numpy, RGB, at the model's input size) ->
        CLIP-normalised pixels ``[B*T, 3, H, W]`` in the model's dtype and device."""
        if isinstance(frames, np.ndarray):
            if frames.dtype != np.uint8:
                raise ValueError(f"frames must be uint8 RGB, got numpy dtype {frames.dtype}")
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if not isinstance(frames, Tensor):
            raise TypeError(f"frames must be a torch.Tensor or numpy array, got {type(frames).__name__}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 RGB values 0..255, got dtype {frames.dtype}")
        height, width = self.image_size
        expected = f"[B, {self.num_frames}, {height}, {width}, 3]"
        if frames.dim() != 5 or frames.shape[1:] != (self.num_frames, height, width, 3):
            raise ValueError(f"frames must be uint8 {expected} (B videos, T frames at the model's input "
                             f"size, RGB), got shape {tuple(frames.shape)}")
        if frames.shape[0] == 0:
            raise ValueError(f"frames must hold at least one video, got shape {tuple(frames.shape)}")
        pixels = frames.to(self.device).flatten(0, 1).permute(0, 3, 1, 2).float().div_(255.0)  # [B*T, 3, H, W]
        pixels = (pixels - self.pixel_mean.float()) / self.pixel_std.float()
        return pixels.to(self.dtype)

    def encode_video_tokens(self, frames: Union[Tensor, np.ndarray],
                            texts: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Per-frame features of B videos.

        Args:
            frames: ``uint8 [B, T, H, W, 3]`` raw RGB frames at the model's input size.
            texts: ``[B, D]`` label text feature of each video (support branch; used by the MA
                multimodal adapters, ignored without them), or None for queries.

        Returns:
            ``frame_feats [B, T, D]``: class token -> ln_post -> proj per frame, then the temporal
            adapter when enabled; ``cls_tokens [B, T, C]``: last-block class tokens before ln_post.
        """
        pixels = self.preprocess_frames(frames)  # [B*T, 3, H, W]
        num_videos = pixels.shape[0] // self.num_frames
        text_feats = self._check_text_feats(texts, num_videos, "texts") if texts is not None else None
        shared_tokens = None
        if text_feats is not None and self.ma_text_proj is not None:
            shared_tokens = self.ma_text_proj(text_feats)  # [B, C]
        with video_context(self.num_frames, text_feats, shared_tokens):
            out = self.clip.visual.forward_intermediates(
                pixels, indices=1, output_fmt="NLC", output_extra_tokens=True)
        cls_tokens = out["image_intermediates_prefix"][-1][:, 0]  # [B*T, C]
        cls_tokens = cls_tokens.reshape(num_videos, self.num_frames, self.visual_width)
        frame_feats = out["image_features"].reshape(num_videos, self.num_frames, self.embed_dim)
        if self.temporal_adapter is not None:
            frame_feats = self.temporal_adapter(frame_feats)
        return {"frame_feats": frame_feats, "cls_tokens": cls_tokens}

    def encode_video(self, frames: Union[Tensor, np.ndarray], texts: Optional[Tensor] = None) -> Tensor:
        """Frame features ``[B, T, D]`` of ``uint8 [B, T, H, W, 3]`` frames (see :meth:`encode_video_tokens`)."""
        return self.encode_video_tokens(frames, texts)["frame_feats"]

    @staticmethod
    def video_embedding(frame_feats: Tensor) -> Tensor:
        """Video embedding = mean over time: ``[B, T, D]`` -> ``[B, D]``."""
        if frame_feats.dim() != 3:
            raise ValueError(f"frame_feats must be [B, T, D], got {tuple(frame_feats.shape)}")
        return frame_feats.mean(dim=1)

    # ------------------------------------------------------------------ text
    def tokenize(self, labels: Sequence[str]) -> Tensor:
        """Apply the prompt template and open_clip's tokenizer: N labels -> ``LongTensor [N, context]``."""
        if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"every label must be a non-empty string, got {label!r}")
        prompts = [self.config.prompt.replace("{}", label.strip()) for label in labels]
        return self._backbone.tokenizer(prompts).to(self.device)

    def encode_text_tokens(self, token_ids: Tensor) -> Tensor:
        """Text features ``[N, D]`` of token ids ``LongTensor [N, context]`` (text adapters included)."""
        if token_ids.dim() != 2 or token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_ids must be an integer tensor [N, context], got {token_ids.dtype} "
                             f"{tuple(token_ids.shape)}")
        return self.clip.encode_text(token_ids.to(self.device))

    def encode_text(self, labels: Sequence[str]) -> Tensor:
        """Text features ``[N, D]`` of N labels, prompt template applied (unnormalised)."""
        return self.encode_text_tokens(self.tokenize(labels))

    # ------------------------------------------------------------------ few-shot head
    def build_prototypes(self, support_feats: Tensor, support_labels: Tensor,
                         text_feats: Optional[Tensor]) -> Tensor:
        """Class prototypes from support videos.

        Each support video passes TPCM with its label's text feature (when ``config.tpcm``), then the
        shots of each class are averaged (classes may have different shot counts).

        Args:
            support_feats: ``[S, T, D]`` frame features of S support videos.
            support_labels: ``LongTensor [S]``, class index 0..N-1 of each support video.
            text_feats: ``[N, D]`` label text features of the N classes (None: TPCM runs without text
                and N = max label + 1).

        Returns:
            ``[N, T, D]`` prototypes.
        """
        self._check_frame_feats(support_feats, "support_feats")
        labels = torch.as_tensor(support_labels, device=support_feats.device)
        if labels.dim() != 1 or labels.shape[0] != support_feats.shape[0] or labels.dtype in (
                torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
            raise ValueError(f"support_labels must be an integer tensor [S] with S={support_feats.shape[0]}, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
        if text_feats is not None:
            num_classes = self._check_text_feats(text_feats, None, "text_feats").shape[0]
        else:
            num_classes = int(labels.max().item()) + 1 if labels.numel() else 0
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"support_labels must lie in 0..{num_classes - 1}, got {labels.tolist()}")
        shots = torch.bincount(labels, minlength=num_classes)  # [N]
        if (shots == 0).any():
            empty = (shots == 0).nonzero().flatten().tolist()
            raise ValueError(f"classes {empty} have no support video; every class needs at least one shot")
        refined = self._centred(support_feats)
        if self.tpcm is not None:
            use_text = text_feats is not None and self.config.tpcm_text
            shot_texts = text_feats.to(support_feats.dtype)[labels] if use_text else None  # [S, D]
            refined = self.tpcm(refined, shot_texts)  # [S, T, D]
        sums = refined.new_zeros((num_classes,) + tuple(refined.shape[1:])).index_add(0, labels, refined)
        return sums / shots.to(refined.dtype).view(-1, 1, 1)  # [N, T, D]

    def _centred(self, frame_feats: Tensor) -> Tensor:
        """``[B, T, D]`` frames as the head compares them: unit length when ``config.frame_norm``, then
        minus each video's temporal mean when ``config.frame_centering`` (unchanged when both are off)."""
        if self.config.frame_norm:
            frame_feats = F.normalize(frame_feats, dim=-1)
        if self.config.frame_centering:
            frame_feats = frame_feats - frame_feats.mean(dim=1, keepdim=True)
        return frame_feats

    def q2s_logits(self, query_feats: Tensor, prototypes: Tensor) -> Tensor:
        """Query-to-support logits ``-distance * metric_scale``: ``[Q, T, D]``, ``[N, T, D]`` -> ``[Q, N]``.

        Queries pass TPCM without text (when ``config.tpcm``), then the temporal metric.
        """
        self._check_frame_feats(query_feats, "query_feats")
        self._check_frame_feats(prototypes, "prototypes")
        queries = self._centred(query_feats)
        queries = self.tpcm(queries, None) if self.tpcm is not None else queries  # [Q, T, D]
        distances = self.metric(queries, prototypes)  # [Q, N]
        return -distances * self.metric_scale

    def zero_shot(self, query_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Zero-shot / Q2T / S2T logits: ``exp(clip.logit_scale) * cos(mean_T(video), text)``.

        Args:
            query_feats: ``[Q, T, D]`` frame features.
            text_feats: ``[N, D]`` label text features.

        Returns:
            ``[Q, N]`` logits (softmax over N gives zero-shot probabilities).
        """
        self._check_frame_feats(query_feats, "query_feats")
        self._check_text_feats(text_feats, None, "text_feats")
        video = F.normalize(self.video_embedding(query_feats), dim=-1)  # [Q, D]
        text = F.normalize(text_feats.to(video.dtype), dim=-1)  # [N, D]
        return self.logit_scale * video @ text.t()

    def classify(self, query_feats: Tensor, prototypes: Tensor, text_feats: Optional[Tensor] = None) -> Tensor:
        """Few-shot logits ``[Q, N]`` of queries against class prototypes.

        Q2S logits come from :meth:`q2s_logits`. With ``text_feats`` and ``config.alpha > 0`` the
        prediction mixes in Q2T (:meth:`zero_shot` against the classes' label texts):
        ``p = alpha * softmax(Q2T) + (1 - alpha) * softmax(Q2S)`` and the method returns ``log(p)``
        (computed with logsumexp), so ``softmax(classify(...)) == p``. Otherwise it returns the Q2S
        logits themselves.

        Args:
            query_feats: ``[Q, T, D]`` query frame features (from :meth:`encode_video`, no text).
            prototypes: ``[N, T, D]`` from :meth:`build_prototypes`.
            text_feats: ``[N, D]`` label text features of the same N classes, or None.
        """
        q2s = self.q2s_logits(query_feats, prototypes)  # [Q, N]
        alpha = self.config.alpha
        if text_feats is None or alpha == 0.0:
            return q2s
        if text_feats.dim() != 2 or text_feats.shape[0] != prototypes.shape[0]:
            raise ValueError(f"text_feats must be [N, D] for the N={prototypes.shape[0]} prototypes, "
                             f"got {tuple(text_feats.shape)}")
        q2t_log_probs = F.log_softmax(self.zero_shot(query_feats, text_feats), dim=-1)
        if alpha == 1.0:
            return q2t_log_probs
        q2s_log_probs = F.log_softmax(q2s, dim=-1)
        return torch.logsumexp(torch.stack([q2t_log_probs + math.log(alpha),
                                            q2s_log_probs + math.log(1.0 - alpha)]), dim=0)

    # ------------------------------------------------------------------ parameters and state
    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters that train (adapters, TPCM, metric, metric scale); the backbone is frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    @staticmethod
    def is_text_adapter_parameter(name: str) -> bool:
        """True for a parameter name of a text adapter (M2-CLIP trains them at half the rate)."""
        return ".text_adapter." in f".{name}."

    @staticmethod
    def is_visual_adapter_parameter(name: str) -> bool:
        """True for a parameter of an adapter inside the image tower (TED, MA's global, local and joint
        adapters and its text-token projection); not the temporal adapter after it, not TPCM."""
        return ".clip.visual." in f".{name}"

    def count_parameters(self) -> Dict[str, Any]:
        """``{"trainable", "total", "frozen", "by_module": {group: count}}``.

        Groups: ``backbone`` (frozen CLIP), ``ted_adapters``, ``ma_adapters``, ``text_adapters``,
        ``temporal_adapter``, ``ma_text_proj``, ``tpcm``, ``metric``, ``metric_log_scale``.
        """
        counts: Dict[str, int] = {}
        trainable = total = 0
        for name, param in self.named_parameters():
            group = self._parameter_group(name)
            counts[group] = counts.get(group, 0) + param.numel()
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        order = [g for g in _GROUP_ORDER if g in counts] + sorted(g for g in counts if g not in _GROUP_ORDER)
        by_module = {group: counts[group] for group in order}
        return {"trainable": trainable, "total": total, "frozen": total - trainable, "by_module": by_module}

    def trainable_state_dict(self) -> Dict[str, Tensor]:
        """State of everything but the frozen backbone: adapters, TPCM, metric, scales."""
        return {k: v for k, v in self.state_dict().items() if self._is_trainable_key(k)}

    def load_trainable_state_dict(self, state_dict: Dict[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict` output; strict: every key must match in name and shape.

        Raises:
            CheckpointMismatchError: missing, unexpected or mis-shaped tensors (the message lists them).
        """
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"trainable state does not match this model ({self.config.adapter} adapters, "
                f"metric {self.config.metric}, tpcm={self.config.tpcm}): missing {_first(missing)}, "
                f"unexpected {_first(unexpected)}; was it saved from a model with another config?")
        wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if tuple(state_dict[k].shape) != tuple(v.shape)]
        if wrong:
            raise CheckpointMismatchError(f"trainable tensors with the wrong shape (checkpoint vs model): "
                                          f"{_first(wrong)}")
        result = self.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:  # cannot happen after the checks above; guard against drift
            raise CheckpointMismatchError(f"unexpected keys {_first(result.unexpected_keys)}")

    def fingerprint(self) -> str:
        """sha256 over the config, the backbone weight hash and the trainable weights (hex)."""
        header = json.dumps(self.config.to_dict(), sort_keys=True).encode() + self.backbone_hash.encode()
        return state_hash(self.trainable_state_dict(), header=header)

    def card(self, checkpoint_hash: Optional[str] = None) -> ModelCard:
        """The model card: backbone, weights, adapters, head, sizes, parameter counts, fingerprint.

        Args:
            checkpoint_hash: hash of the checkpoint the model was loaded from (None: built from a config).
        """
        counts = self.count_parameters()
        return ModelCard(
            backbone=self.backbone_name,
            pretrained=self.config.pretrained,
            weights_source=self.weights_source,
            backbone_hash=self.backbone_hash,
            adapter=self.config.adapter,
            tpcm=self.config.tpcm,
            metric=self.config.metric,
            checkpoint_hash=checkpoint_hash,
            trainable_params=int(counts["trainable"]),
            total_params=int(counts["total"]),
            fingerprint=self.fingerprint(),
            input_size=int(self.image_size[0]),
            num_frames=int(self.num_frames),
            embed_dim=int(self.embed_dim),
            prompt=self.config.prompt,
            alpha=self.config.alpha,
            config=self.config.to_dict(),
        )

    def describe(self) -> Dict[str, Any]:
        """:meth:`card` as a dict (what ``GET /model`` reports about the model)."""
        return self.card().to_dict()

    # ------------------------------------------------------------------ helpers
    def _is_adapter_key(self, key: str) -> bool:
        return any(key.startswith(root + ".") for root in self._adapter_roots)

    def _is_trainable_key(self, key: str) -> bool:
        return not key.startswith("clip.") or self._is_adapter_key(key)

    def _parameter_group(self, name: str) -> str:
        if not name.startswith("clip."):
            return name.split(".")[0]
        for part in name.split("."):
            if part in _SLOT_GROUPS:
                return _SLOT_GROUPS[part]
        return "backbone"

    def _check_frame_feats(self, feats: Tensor, name: str) -> None:
        if not isinstance(feats, Tensor) or feats.dim() != 3 or feats.shape[-1] != self.embed_dim \
                or feats.shape[1] != self.num_frames or feats.shape[0] == 0:
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(f"{name} must be [B, {self.num_frames}, {self.embed_dim}] frame features "
                             f"with B >= 1, got {shape}")

    def _check_text_feats(self, feats: Tensor, count: Optional[int], name: str) -> Tensor:
        if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[-1] != self.embed_dim \
                or feats.shape[0] == 0 or (count is not None and feats.shape[0] != count):
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            rows = count if count is not None else "N"
            raise ValueError(f"{name} must be [{rows}, {self.embed_dim}] text features, got {shape}")
        return feats.to(self.device, self.dtype)


def build_model(config: ModelConfig, device: Union[str, torch.device] = "cpu") -> FsarModel:
    """Load the backbone ``config`` names, inject its adapters and heads; cast to ``config.precision``.

    Raises:
        PretrainedWeightsError: pretrained weights cannot be had (message says what to do).
        BackboneError: unsupported backbone.
        ValueError: adapter settings that do not fit the backbone (e.g. a block index out of range).
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model takes a ModelConfig, got {type(config).__name__}")
    backbone = load_backbone(config.backbone, config.pretrained, config.quick_gelu)
    model = FsarModel(config, backbone)
    return model.to(device=device, dtype=_DTYPES[config.precision])


def _first(items: Sequence[str], limit: int = 5) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


__all__ = ["FsarModel", "build_model", "CheckpointMismatchError"]
