"""Model configuration: one plain dataclass, serialisable to and from a dict (like open_clip's JSONs).

Every choice docs/methods.md names (adapter placement, widths, metric, TPCM, prediction mix) is a field
here, so a checkpoint's config says exactly what was built:

    cfg = ModelConfig(backbone="ViT-B-16", pretrained="openai", adapter="ted", metric="otam")
    cfg == ModelConfig.from_dict(cfg.to_dict())
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Mapping, Optional, Union

ADAPTERS = ("none", "ted", "ma", "ted+ma")
METRICS = ("otam", "bimhm", "mean", "trx")
TED_POSITIONS = ("before_mlp", "before_attn", "both")
MA_TEXT_TOKENS = ("per_block", "shared")
PRECISIONS = ("fp32", "fp16", "bf16")


class ModelConfigError(ValueError):
    """A model config (a field name or value) is invalid; the message names the field and says why."""


# Fields added after checkpoints existed, and their defaults: ``to_dict`` omits them at the default.
NEW_FIELD_DEFAULTS: Dict[str, Any] = {"tpcm_text": True, "frame_centering": False, "frame_norm": False}


@dataclass
class ModelConfig:
    """What :func:`training.model.build_model` builds.

    Backbone (docs/methods.md section 1):
        backbone: open_clip model name (``ViT-B-16``, ``ViT-B-32``, ``ViT-L-14``, ``fsar-tiny``...).
        pretrained: an open_clip pretrained tag (``"openai"``), a local open_clip state_dict file, or
            None for random weights (tests and demos; logged loudly and recorded on the model).
        quick_gelu: force QuickGELU activations; None = what the pretrained tag was trained with
            (OpenAI weights use QuickGELU). For a weights *file* of OpenAI weights set it to True
            (or use the ``-quickgelu`` model name).
        precision: dtype of the whole model (``fp32``; ``fp16`` / ``bf16`` for GPU inference).

    Adapters (docs/methods.md sections 2-3):
        adapter: ``none`` (frozen CLIP), ``ted`` (M2-CLIP), ``ma`` (MA-CLIP) or ``ted+ma``.
        num_frames: T, frames sampled per video.
        ted_position: where the TED-Adapter sits in a visual block: ``before_mlp`` (released
            M2-CLIP K400 config), ``before_attn`` (the paper), or ``both`` (two adapters a block).
        ted_ratio: TED bottleneck width as a fraction of the visual width C (0.5: 384 for C=768).
        ted_layers: visual block indices that get a TED-Adapter; None = all blocks.
        temporal_adapter: M2-CLIP's post-backbone temporal adapter on frame embeddings
            (D -> D/2 -> depthwise Conv1d over time -> D, residual). Part of the ``ted`` variants.
        text_adapter_layers: M2-CLIP text adapters before the FFN of the last k text blocks
            (0 disables). Part of the ``ted`` variants.
        text_adapter_width: text adapter bottleneck; min(text_adapter_width, text width) is used.
        ma_ratio: MA-CLIP bottleneck width as a fraction of C (0.25).
        ma_scale: scale s of the joint adapter parallel to the MLP (0.5).
        ma_layers: visual block indices that get MA adapters; None = all blocks.
        ma_text_token: the learnable D -> C projection of the label text token: one per adapted
            block (``per_block``) or one shared by all blocks (``shared``).

    Few-shot head (docs/methods.md sections 4-6 and 8):
        tpcm: text-guided prototype construction module (one transformer layer) on both branches.
        tpcm_heads, tpcm_ffn, tpcm_attn_dropout: its heads, FFN width and attention dropout.
        tpcm_text: support videos attend to their label's text feature in TPCM (MA-CLIP). False: TPCM
            sees frames only on both branches (for text towers that carry no meaning, whose label
            features would be class codes the module can memorise; docs/learning.md).
        frame_centering: subtract each video's temporal mean frame feature before TPCM and the
            metric (support and query alike; zero-shot is unchanged): the metric then compares how
            videos change rather than what they show (docs/methods.md section 5).
        frame_norm: scale each frame feature to unit length first (before centering, TPCM and the
            metric), so every frame counts the same in a video's mean and a change is measured in
            direction, not in feature length (docs/learning.md, "Unit frames and a sharper OTAM").
        metric: temporal alignment metric ``otam`` | ``bimhm`` | ``mean`` | ``trx``.
        otam_lambda: OTAM smooth-min temperature (0.5 as in CLIP-FSAR).
        metric_scale_init: initial value of the learnable scale on ``-distance`` (Q2S logits). None
            (or ``"auto"``, stored as None) derives it when the model is built: CLIP's
            ``exp(logit_scale)`` divided by the number of frame costs the metric's distance adds up
            to (``2T`` for otam, 2 for bimhm, 1 for mean; trx from its value maps and the features'
            norm), so an untrained model's Q2S logits are in the same units as its Q2T logits. A
            number is used as given (checkpoints store the learned scale either way).
        learn_metric_scale: whether that scale trains.
        alpha: weight of Q2T (text) probabilities in few-shot prediction and loss.
        prompt: template for label texts; ``{}`` is replaced by the label.
    """

    backbone: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    quick_gelu: Optional[bool] = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    adapter: Literal["none", "ted", "ma", "ted+ma"] = "ted"
    num_frames: int = 8
    # M2-CLIP (TED-Adapter, temporal adapter, text adapters)
    ted_position: Literal["before_mlp", "before_attn", "both"] = "before_mlp"
    ted_ratio: float = 0.5
    ted_layers: Optional[List[int]] = None
    temporal_adapter: bool = True
    text_adapter_layers: int = 2
    text_adapter_width: int = 384
    # MA-CLIP (AIM-style global temporal, local multimodal and joint adapters)
    ma_ratio: float = 0.25
    ma_scale: float = 0.5
    ma_layers: Optional[List[int]] = None
    ma_text_token: Literal["per_block", "shared"] = "per_block"
    # few-shot head
    tpcm: bool = True
    tpcm_heads: int = 8
    tpcm_ffn: int = 2048
    tpcm_attn_dropout: float = 0.0
    tpcm_text: bool = True
    frame_centering: bool = False
    frame_norm: bool = False
    metric: Literal["otam", "bimhm", "mean", "trx"] = "otam"
    otam_lambda: float = 0.5
    metric_scale_init: Optional[Union[float, Literal["auto"]]] = None
    learn_metric_scale: bool = True
    alpha: float = 0.5
    prompt: str = "a video of {}"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming the first invalid field."""
        _choice("adapter", self.adapter, ADAPTERS)
        _choice("metric", self.metric, METRICS)
        _choice("ted_position", self.ted_position, TED_POSITIONS)
        _choice("ma_text_token", self.ma_text_token, MA_TEXT_TOKENS)
        _choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ModelConfigError(f"backbone must be an open_clip model name, got {self.backbone!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ModelConfigError(
                f"pretrained must be a tag, a weights file path or None, got {self.pretrained!r}")
        _positive_int("num_frames", self.num_frames)
        _fraction("ted_ratio", self.ted_ratio)
        _fraction("ma_ratio", self.ma_ratio)
        _non_negative_int("text_adapter_layers", self.text_adapter_layers)
        _positive_int("text_adapter_width", self.text_adapter_width)
        _positive_int("tpcm_heads", self.tpcm_heads)
        _positive_int("tpcm_ffn", self.tpcm_ffn)
        for name in ("ted_layers", "ma_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise ModelConfigError(f"{name} must be None (all blocks) or a list of block indices, got {value!r}")
            setattr(self, name, list(value))
        if isinstance(self.metric_scale_init, str) and self.metric_scale_init.lower() == "auto":
            self.metric_scale_init = None
        if self.metric_scale_init is not None:
            if isinstance(self.metric_scale_init, bool) or not isinstance(self.metric_scale_init, (int, float)):
                raise ModelConfigError(f"metric_scale_init must be a positive number, or None / 'auto' to derive it "
                                       f"from CLIP's logit scale, got {self.metric_scale_init!r}")
            self.metric_scale_init = float(self.metric_scale_init)
            if not self.metric_scale_init > 0.0:
                raise ModelConfigError(f"metric_scale_init must be positive, got {self.metric_scale_init}")
        for name in ("ma_scale", "tpcm_attn_dropout", "otam_lambda", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ModelConfigError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if not 0.0 <= self.alpha <= 1.0:
            raise ModelConfigError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0.0 <= self.tpcm_attn_dropout < 1.0:
            raise ModelConfigError(f"tpcm_attn_dropout must lie in [0, 1), got {self.tpcm_attn_dropout}")
        if self.otam_lambda <= 0.0:
            raise ModelConfigError(f"otam_lambda must be positive, got {self.otam_lambda}")
        for name in ("temporal_adapter", "tpcm", "learn_metric_scale", "tpcm_text", "frame_centering",
                     "frame_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.quick_gelu is not None and not isinstance(self.quick_gelu, bool):
            raise ModelConfigError(f"quick_gelu must be true, false or None, got {self.quick_gelu!r}")
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise ModelConfigError(f"prompt must contain exactly one '{{}}' for the label, got {self.prompt!r}")

    # ------------------------------------------------------------------ derived
    @property
    def uses_ted(self) -> bool:
        """True for the M2-CLIP variants (``ted``, ``ted+ma``)."""
        return "ted" in self.adapter

    @property
    def uses_ma(self) -> bool:
        """True for the MA-CLIP variants (``ma``, ``ted+ma``)."""
        return "ma" in self.adapter.split("+")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        """A plain, JSON-serialisable dict of every field. Fields added after checkpoints were first
        written (``NEW_FIELD_DEFAULTS``) are left out at their default, so those checkpoints keep
        their fingerprint."""
        data = dataclasses.asdict(self)
        for name, default in NEW_FIELD_DEFAULTS.items():
            if data.get(name) == default:
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build a config from a dict; unknown keys raise :class:`ModelConfigError`."""
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"a model config must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ModelConfigError(
                f"unknown model config key(s) {unknown}.{hint} Valid keys: {', '.join(names)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated; unknown names raise)."""
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ModelConfigError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelConfigError(f"{name} must be a non-negative integer, got {value!r}")


def _fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ModelConfigError(f"{name} must be a fraction in (0, 1], got {value!r}")
