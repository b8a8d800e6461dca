"""ModelCard: the facts that describe one fsar model, with one set of key names.

One card, three carriers:

* a built model: :meth:`training.model.FsarModel.card`;
* a checkpoint's metadata (no model built): :meth:`ModelCard.from_checkpoint_meta`, used by export;
* the ``fsar_*`` parameters of an exported model's ``config.pbtxt``, which a gateway reads without
  torch: :meth:`ModelCard.to_triton_parameters` / :meth:`ModelCard.from_triton_parameters`.

``GET /model`` serves :meth:`ModelCard.to_dict` (through ``Backend.info()``). This module imports
no torch: the Triton gateway uses it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

#: Older spellings of card keys, read (never written) by :meth:`ModelCard.from_dict`.
LEGACY_KEYS = {"trainable_parameters": "trainable_params", "total_parameters": "total_params",
               "image_size": "input_size"}


@dataclass(frozen=True)
class ModelCard:
    """What a served model is.

    Attributes:
        backbone: open_clip model name. pretrained: the configured tag or file (None = random).
        weights_source: where the backbone weights were loaded from; backbone_hash: their sha256.
        adapter, tpcm, metric, prompt, alpha: the model config's choices.
        num_frames: T; input_size: square frame size in pixels; embed_dim: D.
        trainable_params, total_params: parameter counts (None when unknown).
        fingerprint: the cache key of the model's outputs (= the checkpoint hash of a saved model);
            None for a placeholder export.
        checkpoint_hash: hash of the checkpoint the model came from, None when built from a config.
        config: the full :class:`ModelConfig` dict.
    """

    backbone: str
    pretrained: Optional[str]
    weights_source: Optional[str]
    backbone_hash: Optional[str]
    adapter: Optional[str]
    tpcm: Optional[bool]
    metric: str
    checkpoint_hash: Optional[str]
    trainable_params: Optional[int]
    total_params: Optional[int]
    fingerprint: Optional[str]
    input_size: int
    num_frames: int
    embed_dim: int
    prompt: Optional[str]
    alpha: Optional[float]
    config: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ dict
    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict, one key per field (the keys ``GET /model`` shows)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelCard":
        """The card of :meth:`to_dict`'s output; also reads the older key spellings
        (``trainable_parameters``, ``total_parameters``, ``image_size`` as ``[H, W]``). Unknown keys
        are ignored."""
        values = dict(values)
        for old, new in LEGACY_KEYS.items():
            if old in values and new not in values:
                values[new] = values.pop(old)
        if isinstance(values.get("input_size"), (list, tuple)):
            values["input_size"] = values["input_size"][0]
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    # ------------------------------------------------------------------ checkpoint metadata
    @classmethod
    def from_checkpoint_meta(cls, meta: Mapping[str, Any], *, input_size: int, embed_dim: int) -> "ModelCard":
        """The card of a checkpoint from its metadata (``training.checkpoint.read_checkpoint_meta``).

        ``input_size`` and ``embed_dim`` come from the backbone's open_clip config (the model is not
        built). A placeholder's meta (no checkpoint) has ``checkpoint_hash`` None and no counts.
        """
        config = dict(meta["config"])
        backbone = meta.get("backbone") or {}
        counts = meta.get("parameters") or {}
        checkpoint_hash = meta.get("checkpoint_hash") or None
        return cls(
            backbone=config["backbone"],
            pretrained=config.get("pretrained"),
            weights_source=backbone.get("weights_source"),
            backbone_hash=backbone.get("weights_hash"),
            adapter=config.get("adapter"),
            tpcm=config.get("tpcm"),
            metric=config["metric"],
            checkpoint_hash=checkpoint_hash,
            trainable_params=_int_or_none(counts.get("trainable")),
            total_params=_int_or_none(counts.get("total")),
            fingerprint=checkpoint_hash,  # a saved model's fingerprint is its checkpoint hash
            input_size=int(input_size),
            num_frames=int(config["num_frames"]),
            embed_dim=int(embed_dim),
            prompt=config.get("prompt"),
            alpha=config.get("alpha"),
            config=config,
        )

    # ------------------------------------------------------------------ Triton config.pbtxt parameters
    def to_triton_parameters(self) -> Dict[str, str]:
        """The ``fsar_*`` parameters of an exported model's ``config.pbtxt`` (strings; "" = none)."""
        return {
            "fsar_checkpoint_hash": self.checkpoint_hash or "",
            "fsar_fingerprint": self.fingerprint or "",
            "fsar_placeholder": "false" if self.checkpoint_hash else "true",
            "fsar_backbone": self.backbone,
            "fsar_pretrained": self.pretrained or "",
            "fsar_weights_source": self.weights_source or "",
            "fsar_backbone_hash": self.backbone_hash or "",
            "fsar_adapter": self.adapter or "",
            "fsar_metric": self.metric,
            "fsar_num_frames": str(self.num_frames),
            "fsar_image_size": str(self.input_size),
            "fsar_embed_dim": str(self.embed_dim),
            "fsar_prompt": self.prompt or "",
            "fsar_trainable_params": "" if self.trainable_params is None else str(self.trainable_params),
            "fsar_total_params": "" if self.total_params is None else str(self.total_params),
            "fsar_model_config": json.dumps(self.config, sort_keys=True),
        }

    @classmethod
    def from_triton_parameters(cls, params: Mapping[str, str]) -> "ModelCard":
        """The card of :meth:`to_triton_parameters`' output (as read back: missing keys read as "").

        Raises:
            KeyError: a required parameter (backbone, metric, num_frames, image_size, embed_dim,
                fingerprint) is absent.
        """
        config = json.loads(params.get("fsar_model_config") or "{}")
        return cls(
            backbone=params["fsar_backbone"],
            pretrained=params.get("fsar_pretrained") or None,
            weights_source=params.get("fsar_weights_source") or None,
            backbone_hash=params.get("fsar_backbone_hash") or None,
            adapter=params.get("fsar_adapter") or None,
            tpcm=config.get("tpcm"),
            metric=params["fsar_metric"],
            checkpoint_hash=params.get("fsar_checkpoint_hash") or None,
            trainable_params=_int_or_none(params.get("fsar_trainable_params", "")),
            total_params=_int_or_none(params.get("fsar_total_params", "")),
            fingerprint=params["fsar_fingerprint"],
            input_size=int(params["fsar_image_size"]),
            num_frames=int(params["fsar_num_frames"]),
            embed_dim=int(params["fsar_embed_dim"]),
            prompt=params.get("fsar_prompt") or config.get("prompt"),
            alpha=config.get("alpha"),
            config=config,
        )


def _int_or_none(value: Any) -> Optional[int]:
    """An int from an int or a decimal string; None for None, "" or anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value if value is not None else "").strip()
    return int(text) if text.lstrip("-").isdigit() else None


__all__ = ["ModelCard", "LEGACY_KEYS"]
