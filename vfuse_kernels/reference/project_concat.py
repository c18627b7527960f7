"""Plain-PyTorch fp64 oracle of ``project_concat`` (DESIGN.md §2.2).

``torch.cat([proj_j(cat(layers_j)[b, keep_j]) for j], dim=1)`` computed literally in fp64:
concatenate each encoder's layers along channels, gather the kept rows, Linear → GELU →
Linear, concatenate the encoders along the token axis.
"""
from __future__ import annotations

import math

import torch

GELU_ERF, GELU_TANH = 1, 2


def gelu(x: torch.Tensor, kind: int) -> torch.Tensor:
    """GELU in x's dtype: exact (``kind=GELU_ERF``) or the tanh approximation (``GELU_TANH``)."""
    if kind == GELU_ERF:
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if kind == GELU_TANH:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"unknown GELU kind {kind}")


def project_one(features, w1, b1, w2, b2, kind: int, keep=None) -> torch.Tensor:
    """fp64 [B, K, H] for one encoder; ``features`` is a tensor or a list of layer tensors."""
    layers = [features] if isinstance(features, torch.Tensor) else list(features)
    x = torch.cat([t.detach().double() for t in layers], dim=-1)
    if keep is not None:
        x = x[torch.arange(x.shape[0], device=x.device)[:, None], keep.long()]
    h = x @ w1.detach().double().t()
    if b1 is not None:
        h = h + b1.detach().double()
    h = gelu(h, kind) @ w2.detach().double().t()
    if b2 is not None:
        h = h + b2.detach().double()
    return h


def project_concat(features, weights, keep=None) -> torch.Tensor:
    """fp64 [B, ΣKⱼ, H]; ``weights[j] = (w1, b1, w2, b2, kind)`` (biases may be None)."""
    keep = keep if keep is not None else [None] * len(features)
    return torch.cat([project_one(f, *w, keep=kp) for f, w, kp in zip(features, weights, keep)], dim=1)
