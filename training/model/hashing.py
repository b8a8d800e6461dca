"""One sha256 over named tensors: the backbone weight hash, the model fingerprint and the checkpoint's
backbone-state hash all use :func:`state_hash`.

These digests are cache keys (the fingerprint keys cached features in the store): the byte stream
hashed here must never change.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import Tensor


def state_hash(state: Mapping[str, Tensor], header: bytes = b"") -> str:
    """Hex sha256 over ``header``, then every tensor's ``"key|dtype|shape"`` and raw bytes, in key order.

    Args:
        state: name -> tensor (any shape, dtype or device), e.g. a ``state_dict()``.
        header: bytes hashed before the tensors (the fingerprint puts the config and backbone hash here).
    """
    digest = hashlib.sha256(header)
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
