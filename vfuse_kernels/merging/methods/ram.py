"""Reinforced Agent Merging: ``ram`` and ``ramplus_tl`` (mergekit 0.1.5 semantics).

Task vectors τᵢ = θᵢ − b (no per-model weights). Model i contributes at an element when
|τᵢ| > ε; c = number of contributing models there. Elements with c = 1 are *unique* (the
one contributor's τᵢ is taken as is), elements with c > 1 are *shared* (the mean of the
contributors' τᵢ), c = 0 keeps the base:

    ram:         result = b + Σᵢ τᵢ·[contrib]·([c = 1] + [c > 1]/c)
    ramplus_tl:  unique values of model i are scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, α), with
                 ρᵢ = (#shared elements i contributes to) / max(#unique elements of i, ε),
                 counted over this tensor only ("tensor-local").

Differences from mergekit: epsilon must be ≥ 0 for ``ram`` and > 0 for ``ramplus_tl``
(mergekit accepts any float; with ε ≤ 0 a model without unique elements makes ρ = 0/0 and
the whole ``ramplus_tl`` tensor NaN); r and alpha must be finite numbers. Computed in float32.
"""
from __future__ import annotations

import torch

from . import Param, TensorInputs, TensorMethod, register
from .gta import is_number, non_negative, positive, task_vectors


def ram_masks(tvs: torch.Tensor, epsilon: float):
    """(flat τ with non-contributors zeroed, contribution mask, count c, unique, shared)."""
    flat = tvs.reshape(tvs.shape[0], -1)
    contrib = flat.abs() > epsilon
    count = contrib.sum(dim=0, keepdim=True)
    return flat * contrib, contrib, count, count == 1, count > 1


def ram_combine(inputs: TensorInputs, unique_scale) -> torch.Tensor:
    base, tvs, others = task_vectors(inputs)
    if not others:
        return base.float()
    epsilon = float(inputs.shared["epsilon"])
    flat, contrib, count, unique, shared = ram_masks(tvs, epsilon)
    scale = unique_scale(contrib, unique, shared, epsilon)
    merged = (flat * unique * scale + flat * shared / count.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def ram_merge(inputs: TensorInputs) -> torch.Tensor:
    """Unique contributions kept, shared ones averaged over their contributors."""
    return ram_combine(inputs, lambda contrib, unique, shared, epsilon: 1.0)


def ramplus_tl_merge(inputs: TensorInputs) -> torch.Tensor:
    """RAM with each model's unique contributions scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, α)."""
    r, alpha = float(inputs.shared["r"]), float(inputs.shared["alpha"])

    def unique_scale(contrib, unique, shared, epsilon):
        n_shared = (contrib & shared).sum(dim=1)
        n_unique = (contrib & unique).sum(dim=1)
        rho = n_shared / n_unique.clamp(min=epsilon)
        return (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)

    return ram_combine(inputs, unique_scale)


RAM = register(TensorMethod(
    name="ram",
    merge=ram_merge,
    global_params={"epsilon": Param(1e-5, non_negative)},
    needs_base=True,
    min_models=1,
))
RAMPLUS_TL = register(TensorMethod(
    name="ramplus_tl",
    merge=ramplus_tl_merge,
    global_params={"r": Param(0.1, is_number), "alpha": Param(0.2, is_number), "epsilon": Param(1e-5, positive)},
    needs_base=True,
    min_models=1,
))
