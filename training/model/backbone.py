"""Frozen open_clip backbone: model configs, weights from a tag, a file or nothing, and a weight hash.

One function, :func:`load_backbone`, turns ``(name, pretrained)`` into a frozen open_clip CLIP model
plus what callers need to know about it (input size, normalisation, where the weights came from,
a hash of the weights). Pretrained tags are looked up in the local caches first; when a tag is not
cached and the host is offline the load stops with :class:`PretrainedWeightsError`, one actionable
sentence, instead of hanging on network retries or falling back to random weights.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from training.model.hashing import state_hash

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""open_clip model configs shipped with the package (``fsar-tiny``: a tiny ViT for tests and demos)."""

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
_PROBE_TIMEOUT_S = 3.0


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights cannot be had (not cached and offline, unknown tag, missing or bad file)."""


class BackboneError(ValueError):
    """The requested open_clip model cannot serve as a backbone (unknown name, not a plain ViT)."""


@dataclass
class Backbone:
    """A loaded, frozen open_clip model and facts about it.

    Attributes:
        clip: the open_clip ``CLIP`` model (every parameter frozen).
        name: open_clip model name.
        weights_source: ``"tag:<tag> (<file>)"``, ``"file:<path>"`` or ``"random"``.
        weights_hash: sha256 over the backbone's state_dict tensors (names, dtypes, shapes, bytes).
        image_size: ``(H, W)`` the visual tower takes.
        mean, std: per-channel RGB normalisation of the pretrained weights.
    """

    clip: nn.Module
    name: str
    weights_source: str
    weights_hash: str
    image_size: Tuple[int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    _tokenizer: Optional[Callable] = field(default=None, repr=False)

    @property
    def tokenizer(self) -> Callable:
        """open_clip's tokenizer for this model (``list[str] -> LongTensor [N, context_length]``)."""
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.name)
        return self._tokenizer

    @property
    def is_random(self) -> bool:
        return self.weights_source == "random"


def register_model_configs() -> None:
    """Make the package's own model configs (``training/model/configs/*.json``) known to open_clip."""
    if CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(CONFIG_DIR)


def weights_hash(module: nn.Module) -> str:
    """sha256 over a module's state_dict: every key, dtype, shape and the raw tensor bytes, in key order."""
    return state_hash(module.state_dict())


def load_backbone(name: str, pretrained: Optional[str] = "openai", quick_gelu: Optional[bool] = None) -> Backbone:
    """Create a frozen open_clip model with weights from a pretrained tag, a local file, or random.

    Args:
        name: open_clip model name (``ViT-B-16``, ``ViT-B-32``, ``ViT-L-14``, ``fsar-tiny``...).
        pretrained: a pretrained tag (looked up in the Hugging Face / open_clip caches, downloaded when
            the host is online), a path to an open_clip state_dict, or None for random weights
            (logged as a warning and recorded as ``weights_source="random"``).
        quick_gelu: force QuickGELU; None uses what the pretrained tag was trained with.

    Raises:
        BackboneError: unknown model name, or not a ViT with standard residual attention blocks.
        PretrainedWeightsError: the weights cannot be had; the message says what to do.
    """
    _check_model_config(name)
    if pretrained is None:
        logger.warning(
            "Backbone %s is built with RANDOM weights (pretrained=None): features are meaningless "
            "until trained; use this only for tests and demos.", name)
        clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=bool(quick_gelu))
        source = "random"
    elif _looks_like_path(pretrained):
        path = _existing_weights_file(name, pretrained)
        clip = _create_from_file(name, str(path), bool(quick_gelu), {})
        source = f"file:{path.resolve()}"
    else:
        clip, source = _create_from_tag(name, pretrained, quick_gelu)
    _check_supported(name, clip)
    for param in clip.parameters():
        param.requires_grad_(False)
    clip.eval()
    preprocess = clip.visual.preprocess_cfg
    return Backbone(
        clip=clip,
        name=name,
        weights_source=source,
        weights_hash=weights_hash(clip),
        image_size=tuple(clip.visual.image_size),
        mean=tuple(float(v) for v in preprocess["mean"]),
        std=tuple(float(v) for v in preprocess["std"]),
    )


def check_pretrained_available(name: str, pretrained: Optional[str]) -> None:
    """Fail fast, without building the model, when ``pretrained`` cannot be had on this host.

    Cheap pre-flight for servers: raises the same one-sentence ``PretrainedWeightsError`` (or
    ``BackboneError``) that :func:`load_backbone` would, before any process spends time starting.
    """
    _check_model_config(name)
    if pretrained is None:
        return
    if _looks_like_path(pretrained):
        _existing_weights_file(name, pretrained)
        return
    tag_cfg = _tag_config(name, pretrained)
    if _cached_weights_file(tag_cfg) is None and _offline(_download_host(tag_cfg)):
        raise PretrainedWeightsError(_offline_message(name, pretrained))


def _offline_message(name: str, tag: str) -> str:
    return (f"Pretrained weights {tag!r} for {name} are not cached and cannot be downloaded (offline). "
            f"Download them on a connected host (they land in ~/.cache/huggingface) or pass "
            f"--pretrained /path/to/weights.pt (an open_clip state_dict).")


# ---------------------------------------------------------------------- weights sources
def _existing_weights_file(name: str, pretrained: str) -> Path:
    """``pretrained`` as a path to an existing file, or the one-sentence error."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(f"Pretrained weights file {str(path)!r} for {name} does not exist.")
    return path


def _tag_config(name: str, tag: str) -> Dict[str, Any]:
    """open_clip's config of a pretrained tag, or the one-sentence error listing the known tags."""
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise PretrainedWeightsError(
            f"Pretrained value {tag!r} is neither a weights file nor a known tag for {name} "
            f"(known tags: {', '.join(tags) if tags else 'none'}).")
    return tag_cfg


def _looks_like_path(pretrained: str) -> bool:
    return (os.sep in pretrained or pretrained.startswith(".") or pretrained.startswith("~")
            or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or os.path.isfile(pretrained))


def _create_from_file(name: str, path: str, quick_gelu: bool, preprocess: Dict[str, Any]) -> nn.Module:
    try:
        return open_clip.create_model(name, pretrained=path, force_quick_gelu=quick_gelu,
                                      force_preprocess_cfg=preprocess or None)
    except Exception as err:  # any failure to read or fit the user's file (torch.load raises many kinds)
        raise PretrainedWeightsError(
            f"Could not load {path!r} as open_clip weights for {name} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300] if str(err) else 'no detail'}); pass a state_dict saved "
            f"from open_clip.create_model({name!r}).") from err


def _create_from_tag(name: str, tag: str, quick_gelu: Optional[bool]) -> Tuple[nn.Module, str]:
    tag_cfg = _tag_config(name, tag)
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    preprocess = {k: tag_cfg[k] for k in _PREPROCESS_KEYS if k in tag_cfg}
    cached = _cached_weights_file(tag_cfg)
    if cached is not None:
        # Loading the cached file by path never touches the network.
        return _create_from_file(name, cached, quick_gelu, preprocess), f"tag:{tag} ({cached})"
    host = _download_host(tag_cfg)
    if _offline(host):
        raise PretrainedWeightsError(_offline_message(name, tag))
    try:
        clip = open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu)
    except RuntimeError as err:
        raise PretrainedWeightsError(
            f"Pretrained weights {tag!r} for {name} could not be downloaded from {host} "
            f"({str(err).splitlines()[0][:300]}); download them on a connected host or pass "
            f"--pretrained /path/to/weights.pt (an open_clip state_dict).") from err
    cached = _cached_weights_file(tag_cfg)
    return clip, f"tag:{tag} ({cached})" if cached else f"tag:{tag}"


def _cached_weights_file(tag_cfg: Dict[str, Any]) -> Optional[str]:
    """Where open_clip would find this tag's weights locally, or None (mirrors download_pretrained)."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hf_hub = tag_cfg.get("hf_hub", "")
    if hf_hub and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
        candidates = list(open_clip.pretrained._get_safe_alternatives(filename)) + [filename]
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id=repo_id, filename=candidate)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = tag_cfg.get("url", "")
    if url:
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return target if os.path.isfile(target) else None
    return None


def _download_host(tag_cfg: Dict[str, Any]) -> str:
    if tag_cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(tag_cfg.get("url", "")).hostname or "huggingface.co"


def _offline(host: str) -> bool:
    """True when downloads are switched off (HF_HUB_OFFLINE) or ``host`` cannot be reached quickly."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        with socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S):
            return False
    except OSError:
        return True


def _check_model_config(name: str) -> None:
    """Reject unknown or non-ViT models before building (or downloading) anything."""
    register_model_configs()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise BackboneError(
            f"unknown open_clip model {name!r}; available ViTs include ViT-B-32, ViT-B-16, ViT-L-14 "
            f"and fsar-tiny (see open_clip.list_models())")
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if (isinstance(vision_cfg.get("layers"), (list, tuple)) or "timm_model_name" in vision_cfg
            or "hf_model_name" in text_cfg or "multimodal_cfg" in model_cfg or model_cfg.get("custom_text")):
        raise BackboneError(f"{name} is not a plain open_clip CLIP ViT (ResNet, timm, HF-text or CoCa "
                            f"towers are not supported); use ViT-B-32, ViT-B-16, ViT-L-14 or another plain ViT")


def _check_supported(name: str, clip: nn.Module) -> None:
    visual = getattr(clip, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise BackboneError(f"{name} is not an open_clip ViT (its visual tower is {type(visual).__name__}); "
                            f"use ViT-B-32, ViT-B-16, ViT-L-14 or another plain ViT")
    towers = {"visual": visual.transformer.resblocks, "text": getattr(getattr(clip, "transformer", None),
                                                                        "resblocks", None)}
    for tower, blocks in towers.items():
        if blocks is None or not all(type(b) is ResidualAttentionBlock for b in blocks):
            raise BackboneError(f"{name}'s {tower} tower does not use open_clip's ResidualAttentionBlock, "
                                f"which the adapters wrap; use a plain CLIP ViT")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise BackboneError(f"{name} does not pool the class token (pool_type={visual.pool_type!r}); "
                            f"per-frame features need a class-token ViT")
