"""fp64 oracle of ``ops/slerp.py``: mergekit's ``slerp`` between two whole tensors."""
from __future__ import annotations

import torch

LINEAR_ABOVE = 0.9995  # |cos θ| beyond which slerp interpolates linearly
EPS = 1e-8  # a norm at or below this counts as 1


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """fp64 ``(sin((1−t)θ)·a + sin(tθ)·b) / sin θ`` over the flattened tensors, θ their angle
    (a norm ≤ 1e-8 counts as 1), or ``(1−t)·a + t·b`` where ``|cos θ| > 0.9995``."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = (torch.where(n > EPS, n, 1.0) for n in (x.norm(), y.norm()))
    cos = (x @ y / (na * nb)).clamp(-1, 1)
    if cos.abs() > LINEAR_ABOVE:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = torch.acos(cos)
    return ((torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)).reshape(a.shape)
