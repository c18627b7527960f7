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
the whole ``ramplus_tl`` tensor NaN); r and alpha must be finite numbers. Computed in float32 —
on the CPU by C++ passes over the stored tensors (csrc/cpu/ram.cpp).
"""
from __future__ import annotations

import torch

from ..._backend import DTYPE_CODES, cpp_kernels_for
from ...ops._library import kernel_output
from . import Param, TensorInputs, TensorMethod, is_number, non_negative, positive, register
from .gta import task_vectors


def ram_masks(tvs: torch.Tensor, epsilon: float):
    """(flat τ with non-contributors zeroed, contribution mask, count c, unique, shared)."""
    flat = tvs.reshape(tvs.shape[0], -1)
    contrib = flat.abs() > epsilon
    count = contrib.sum(dim=0, keepdim=True)
    return flat * contrib, contrib, count, count == 1, count > 1


def ram_combine(inputs: TensorInputs, unique_scale=None) -> torch.Tensor:
    """b + the merged task vectors, unique contributions of model i scaled by
    ``unique_scale(n_shared, n_unique, epsilon)[i]`` (None: 1), the counts [N] of the shared and
    unique elements each model contributes to. On the CPU (1 to 4 models, one storage dtype) C++
    passes — the counts when they are needed, then the merge (into ``inputs.out`` where it can),
    without fp32 copies of the inputs;
    elsewhere torch over the fp32 task vectors. Within fp32 rounding of each other (the sum over
    models may be ordered differently)."""
    epsilon = float(inputs.shared["epsilon"])
    tuned = [t for i, t in enumerate(inputs.tensors) if i != inputs.base_index]
    ext = cpp_kernels_for([inputs.base, *tuned]) if 1 <= len(tuned) <= 4 else None
    if ext is not None:
        base, n = inputs.base, len(tuned)
        ptrs, code = [t.data_ptr() for t in tuned], DTYPE_CODES[base.dtype]
        scale = [1.0] * n
        if unique_scale is not None:
            counts = torch.tensor(ext.ram_counts(base.data_ptr(), ptrs, code, base.numel(), epsilon))
            scale = unique_scale(counts[:n], counts[n:], epsilon).tolist()
        out = kernel_output(inputs.out, base.shape)
        ext.ram_merge(out.data_ptr(), DTYPE_CODES[out.dtype], base.data_ptr(), ptrs, code, base.numel(), epsilon, scale)
        return out
    base, tvs, others = task_vectors(inputs)
    if not others:
        return base.float()
    flat, contrib, count, unique, shared = ram_masks(tvs, epsilon)
    scale = 1.0 if unique_scale is None else unique_scale(
        (contrib & shared).sum(dim=1), (contrib & unique).sum(dim=1), epsilon).unsqueeze(-1)
    merged = (flat * unique * scale + flat * shared / count.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def ram_merge(inputs: TensorInputs) -> torch.Tensor:
    """Unique contributions kept, shared ones averaged over their contributors."""
    return ram_combine(inputs)


def ramplus_tl_merge(inputs: TensorInputs) -> torch.Tensor:
    """RAM with each model's unique contributions scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, α)."""
    r, alpha = float(inputs.shared["r"]), float(inputs.shared["alpha"])

    def unique_scale(n_shared, n_unique, epsilon):
        rho = n_shared / n_unique.clamp(min=epsilon)
        return 1 + r * rho.clamp(min=0, max=alpha)

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
