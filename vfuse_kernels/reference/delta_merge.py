"""Plain-PyTorch oracle of ``delta_merge`` and ``magnitude_threshold`` (DESIGN.md §2.1).

Sparsification and sign election follow the fp32 operations every backend performs
(δ = θ − base in fp32, uᵢ = δ̃ᵢ · coefᵢ in fp32, the vote summed over models in order),
so the discrete decisions are identical; the final combination is accumulated in fp64.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..delta_rules import L1_EPS, dare_keep_threshold, trim_count
from .philox import dare_random_bits


def top_magnitude_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of the ``k`` largest ``|delta|`` (fp32); ties → lower flat index."""
    flat = delta.reshape(-1).float().abs()
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:k]] = True
    return mask


def magnitude_threshold(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th largest |delta| (k = trim_count), 0-dim, in delta's dtype."""
    flat = delta.reshape(-1).float().abs()
    kth = torch.sort(flat, descending=True).values[trim_count(density, flat.numel()) - 1]
    return kth.to(delta.dtype)


def _l1_factor(delta: torch.Tensor, kept: torch.Tensor) -> float:
    before = delta.double().abs().sum().item()
    after = (delta.double() * kept).abs().sum().item()
    return 1.0 if before < L1_EPS or after < L1_EPS else before / after


def delta_merge(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: str,
    densities: Sequence[float],
    elect: str | None,
    normalize: bool,
    scale: float,
    rescale: str | None,
    seed: int,
    tuned_are_deltas: bool,
) -> torch.Tensor:
    """fp64 merged tensor: base + scale · combine(wᵢ · sparsify(θᵢ − base)).

    ``sparsify`` is "none", "trim" (TIES) or "drop" (DARE); ``elect`` None, "sum" or
    "count"; ``rescale`` "density" (drop only), "l1" or None. Per-method defaults are
    resolved by the caller (vfuse_kernels.ops.delta_merge).
    """
    b32 = base.reshape(-1).float()
    numel = b32.numel()
    us = []
    for i, (t, w, p) in enumerate(zip(tuned, weights, densities)):
        delta = t.reshape(-1).float() if tuned_are_deltas else t.reshape(-1).float() - b32
        if sparsify == "trim":
            keep = top_magnitude_mask(delta, trim_count(p, numel))
        elif sparsify == "drop":
            keep = dare_random_bits(numel, seed, i, device=delta.device) < dare_keep_threshold(p)
        else:
            keep = torch.ones(numel, dtype=torch.bool, device=delta.device)
        factor = 1.0
        if sparsify != "none" and rescale == "l1":
            factor = _l1_factor(delta, keep)
        elif sparsify == "drop" and rescale == "density":
            factor = 1.0 / p
        coef = torch.tensor(w * factor, dtype=torch.float64).float()
        us.append(torch.where(keep, delta * coef, torch.zeros_like(delta)))
    w64 = torch.tensor([float(w) for w in weights], dtype=torch.float64, device=base.device)
    if elect is None:
        merged = torch.zeros(numel, dtype=torch.float64, device=base.device)
        for u in us:
            merged += u.double()
        divisor = w64.sum().expand(numel)
    else:
        vote = torch.zeros(numel, dtype=torch.float32, device=base.device)
        for u in us:
            vote = vote + (u if elect == "sum" else torch.sign(u))
        positive = vote >= 0
        merged = torch.zeros(numel, dtype=torch.float64, device=base.device)
        divisor = torch.zeros(numel, dtype=torch.float64, device=base.device)
        for u, w in zip(us, w64):
            agree = torch.where(positive, u > 0, u < 0)
            merged += torch.where(agree, u.double(), 0.0)
            divisor += torch.where(agree, w, 0.0)
    if normalize:
        merged = merged / torch.where(divisor == 0, 1.0, divisor)
    return (b32.double() + scale * merged).reshape(base.shape)
