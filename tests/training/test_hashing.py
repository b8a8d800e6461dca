"""The three tensor hashes (backbone weights, model fingerprint, checkpoint backbone state) share
`training.model.hashing.state_hash` and give the digests the earlier, separate formulas gave:
fingerprints key cached features, so a changed digest would orphan every cache."""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from training.checkpoint import read_checkpoint_meta, save_checkpoint
from training.model import ModelConfig, build_model
from training.model.backbone import load_backbone, weights_hash
from training.model.hashing import state_hash


def _old_weights_hash(module: nn.Module) -> str:
    """The formula of `backbone.weights_hash` before `state_hash` existed."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _old_fingerprint(model) -> str:
    """The formula of `FsarModel.fingerprint` before `state_hash` existed."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    digest.update(model.backbone_hash.encode())
    trainable = model.trainable_state_dict()
    for key in sorted(trainable):
        tensor = trainable[key].detach()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _old_state_hash(state) -> str:
    """The formula of `checkpoint._state_hash` before `state_hash` existed."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def test_state_hash_is_pinned_on_a_small_module() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    module.register_buffer("steps", torch.tensor(7))  # 0-d integer tensor
    module.register_buffer("empty", torch.zeros(0, 4))  # no bytes, but key, dtype and shape count
    module[0].weight.data = module[0].weight.data.t().contiguous().t()  # a non-contiguous view
    state = module.state_dict()
    assert state_hash(state) == _old_state_hash(state) == _old_weights_hash(module) == weights_hash(module)
    half = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    assert state_hash(half) == _old_state_hash(half) != state_hash(state)
    before = weights_hash(module)
    with torch.no_grad():
        module[0].bias[0] += 1e-3
    assert weights_hash(module) != before
    # A known digest: the byte stream must never change.
    fixed = {"b": torch.arange(4, dtype=torch.float32).view(2, 2), "a": torch.tensor([1, 2], dtype=torch.int64)}
    assert state_hash(fixed) == _old_state_hash(fixed)
    assert state_hash(fixed) == "4e8fc5e67397dddfaff1f35f1d23f295776da74d000013c4794824ca7fa60749"


def test_model_fingerprint_backbone_hash_and_checkpoint_hash_agree_with_the_old_formulas(tmp_path) -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, adapter="ted", num_frames=4,
                                    tpcm_ffn=64, text_adapter_width=16))
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.05)
    assert model.fingerprint() == _old_fingerprint(model)
    backbone = load_backbone("fsar-tiny", None)
    assert backbone.weights_hash == _old_weights_hash(backbone.clip) == weights_hash(backbone.clip)
    checkpoint_hash = save_checkpoint(tmp_path / "tiny.pt", model)
    assert checkpoint_hash == _old_fingerprint(model)
    meta = read_checkpoint_meta(tmp_path / "tiny.pt")
    payload = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert meta["backbone_state_hash"] == _old_state_hash(payload["backbone_state"])
