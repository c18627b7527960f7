"""What users would otherwise run, written out as plain PyTorch op sequences.

``eager_merge``: the direct fp32 formula with no sparsification tricks (task arithmetic,
linear). ``mergekit_merge``: the op sequence of mergekit 0.1.5's generalized task
arithmetic in the tensors' own dtype — per-model ``sparsify`` (argsort top-k for
magnitude, ``torch.bernoulli`` for random), weighted deltas stacked, ``get_mask`` sign
election, masked sum and divisor. When mergekit is installed its own ``sparsify`` is used.
"""
from __future__ import annotations

import torch

try:  # mergekit.sparsify only needs torch; the rest of mergekit is not imported
    from mergekit.sparsify import RescaleNorm as _RescaleNorm
    from mergekit.sparsify import SparsificationMethod as _Method
    from mergekit.sparsify import sparsify as _mergekit_sparsify
except ImportError:  # pragma: no cover - optional
    _mergekit_sparsify = None


def eager_merge(base, tuned, weights, normalize: bool):
    """base + Σ wᵢ(θᵢ − base) [/ Σ wᵢ] in fp32, rounded to base's dtype."""
    b = base.float()
    merged = sum(w * (t.float() - b) for w, t in zip(weights, tuned))
    if normalize:
        merged = merged / sum(weights)
    return (b + merged).to(base.dtype)


def _magnitude(delta, density):
    k = max(1, int(density * delta.numel()))
    top = torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[top] = 1
    return delta * mask.reshape(delta.shape)


def _bernoulli(delta, density):
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=torch.float32)).to(delta.dtype)
    return delta * mask / density


def uses_mergekit() -> bool:
    return _mergekit_sparsify is not None


def mergekit_merge(base, tuned, weights, *, method: str, density: float, normalize: bool):
    """mergekit's generalized-task-arithmetic op sequence (ties, dare_linear, dare_ties)."""
    deltas = []
    for t in tuned:
        delta = t - base
        if _mergekit_sparsify is not None:
            kind = _Method.magnitude if method == "ties" else _Method.random
            rescale = None if method == "ties" else _RescaleNorm.l1
            delta = _mergekit_sparsify(delta, density=density, method=kind, rescale_norm=rescale)
        else:
            delta = _magnitude(delta, density) if method == "ties" else _bernoulli(delta, density)
        deltas.append(delta)
    deltas = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    if method in ("ties", "dare_ties"):
        majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
        mask = weighted.sign() == majority
        merged = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
    if normalize:
        merged = merged / divisor
    return (base + merged).to(base.dtype)
