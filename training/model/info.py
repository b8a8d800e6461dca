"""Parameter counts of a model configuration, built with random weights so it works offline.

    info = model_info("ViT-B-16", "ted", tpcm=False)
    print(format_model_info(info))
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from training.model.config import ModelConfig
from training.model.fsar_model import build_model

_GROUP_NOTES = {
    "backbone": "frozen open_clip CLIP (visual + text towers)",
    "ted_adapters": "M2-CLIP TED-Adapters in visual blocks",
    "ma_adapters": "MA-CLIP temporal/local/joint adapters (+ per-block text projections)",
    "text_adapters": "M2-CLIP text adapters before the FFN",
    "temporal_adapter": "M2-CLIP post-backbone temporal adapter",
    "ma_text_proj": "MA-CLIP shared text-token projection",
    "tpcm": "text-guided prototype construction (1 layer)",
    "metric": "temporal metric (TRX has weights)",
    "metric_log_scale": "learnable scale of -distance",
}


def model_info(backbone: str, adapter: str, pretrained: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
    """Build the model described by the arguments and count its parameters.

    Args:
        backbone: open_clip model name.
        adapter: ``none`` | ``ted`` | ``ma`` | ``ted+ma``.
        pretrained: weights to load (None = random, which is enough to count and works offline).
        **overrides: any other :class:`ModelConfig` field.

    Returns:
        ``{"config", "weights_source", "trainable", "total", "frozen", "trainable_percent",
        "by_module": {group: count}, "wrapped_blocks"}``.
    """
    config = ModelConfig(backbone=backbone, adapter=adapter, pretrained=pretrained, **overrides)
    with torch.no_grad():
        model = build_model(config)
    counts = model.count_parameters()
    return {
        "config": config.to_dict(),
        "weights_source": model.weights_source,
        "trainable": counts["trainable"],
        "total": counts["total"],
        "frozen": counts["frozen"],
        "trainable_percent": 100.0 * counts["trainable"] / counts["total"],
        "by_module": counts["by_module"],
        "wrapped_blocks": model.wrapped_blocks,
    }


def format_model_info(info: Dict[str, Any]) -> str:
    """A readable table of :func:`model_info`'s result."""
    config = info["config"]
    adapter = config["adapter"]
    details = []
    if "ted" in adapter:
        details.append(f"TED {config['ted_position']} in visual blocks {info['wrapped_blocks']['visual']}")
        details.append(f"text adapters in text blocks {info['wrapped_blocks']['text'] or 'none'}")
    elif adapter == "ma":
        details.append(f"MA in visual blocks {info['wrapped_blocks']['visual']}")
    lines = [
        f"backbone {config['backbone']} ({info['weights_source']}), adapter {adapter}, metric {config['metric']}, "
        f"tpcm {'on' if config['tpcm'] else 'off'}, T={config['num_frames']}",
    ]
    if details:
        lines.append("  " + "; ".join(details))
    name_width = max(len(name) for name in list(info["by_module"]) + ["trainable"]) + 2
    lines.append(f"{'module':<{name_width}}{'parameters':>14}  {'trains':<7}what")
    for name, count in info["by_module"].items():
        trains = "no" if name == "backbone" else "yes"
        lines.append(f"{name:<{name_width}}{count:>14,}  {trains:<7}{_GROUP_NOTES.get(name, '')}")
    lines.append(f"{'trainable':<{name_width}}{info['trainable']:>14,}  ({info['trainable_percent']:.2f}% of total)")
    lines.append(f"{'total':<{name_width}}{info['total']:>14,}")
    return "\n".join(lines)
