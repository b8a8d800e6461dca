"""ModelCard: one set of key names, read back from every carrier (dict, old dict spellings, Triton
parameters), and torch-free so the Triton gateway can use it."""
from __future__ import annotations

import json
import subprocess
import sys

from training.model.card import ModelCard

CONFIG = {"backbone": "fsar-tiny", "pretrained": None, "adapter": "ted", "metric": "otam", "tpcm": True,
          "num_frames": 4, "prompt": "a video of {}", "alpha": 0.5}
CARD = ModelCard(backbone="fsar-tiny", pretrained=None, weights_source="random", backbone_hash="ab" * 32,
                 adapter="ted", tpcm=True, metric="otam", checkpoint_hash="cd" * 32, trainable_params=1234,
                 total_params=98765, fingerprint="cd" * 32, input_size=64, num_frames=4, embed_dim=64,
                 prompt="a video of {}", alpha=0.5, config=CONFIG)


def test_card_round_trips_through_dict_and_triton_parameters() -> None:
    assert ModelCard.from_dict(json.loads(json.dumps(CARD.to_dict()))) == CARD
    params = CARD.to_triton_parameters()
    assert all(isinstance(value, str) for value in params.values())
    assert params["fsar_image_size"] == "64" and params["fsar_trainable_params"] == "1234"
    # Protobuf JSON drops empty strings: the gateway reads them as missing.
    read_back = {key: value for key, value in params.items() if value != ""}
    assert ModelCard.from_triton_parameters(read_back) == CARD


def test_card_reads_the_older_key_spellings() -> None:
    old = {**CARD.to_dict(), "image_size": [64, 64], "trainable_parameters": 1234, "total_parameters": 98765}
    for key in ("input_size", "trainable_params", "total_params"):
        del old[key]
    assert ModelCard.from_dict(old) == CARD


def test_card_from_checkpoint_meta_and_placeholder() -> None:
    meta = {"checkpoint_hash": "cd" * 32, "config": CONFIG, "parameters": {"trainable": 1234, "total": 98765},
            "backbone": {"name": "fsar-tiny", "pretrained": None, "weights_source": "random",
                         "weights_hash": "ab" * 32, "weights_embedded": True}}
    assert ModelCard.from_checkpoint_meta(meta, input_size=64, embed_dim=64) == CARD
    placeholder = ModelCard.from_checkpoint_meta({**meta, "checkpoint_hash": None, "parameters": {}},
                                                 input_size=64, embed_dim=64)
    params = placeholder.to_triton_parameters()
    assert (params["fsar_fingerprint"], params["fsar_placeholder"], params["fsar_trainable_params"]) == ("", "true", "")


def test_card_imports_no_torch() -> None:
    script = "import sys; import training.model.card; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
