"""SCE (select, calculate, erase) merging, ``sce`` (mergekit 0.1.5 semantics).

Task vectors τᵢ = θᵢ − b over the non-base models (no per-model weights):

1. select (select_topk = t < 1): σ² = population variance of τ₁…τₙ per element; keep the
   k = floor(count(σ² ≠ 0)·t) elements of largest σ² (k evaluated in float32, as mergekit's
   tensor arithmetic does), zero the others in every τᵢ. t ≤ 0: all dropped; t ≥ 1: none.
2. calculate: cᵢ = mean(τᵢ²) (over the masked τᵢ; fp32 squares summed in fp64), weights
   ωᵢ = cᵢ / Σ c, or 1/n when |Σ c| < 1e-6, rounded once to fp32 (note: small task vectors —
   mean square below 1e-6 — fall back to equal weights).
3. erase: TIES 'sum' sign election on the τᵢ (model i takes part where sign(τᵢ) equals the
   sign of Σ τⱼ, +1 for a sum ≥ 0); result = b + Σ ωᵢτᵢ[part] / max(Σ ωᵢ[part], 1e-6).

``int8_mask`` is accepted without numerical effect (mergekit's mask storage dtype).

On the CPU (one storage dtype, 1–4 models) the same steps run as C++ passes over the stored
tensors without the fp32 stack (``fused_sce_merge``, csrc/cpu/sce.cpp): two radix passes over
σ²'s bits find the k-th largest, one more the cutoff among its ties, then the square sums and
the merge — the stacked path's selection and operations (its fp64 sums add in another order).

Deliberate differences from mergekit: among equal variances the lower flat index is
selected first (mergekit's torch.topk leaves that order unspecified); select_topk must be
in [0, 1] (mergekit treats values above 1 as 1 and below 0 as 0); the weights' sums are
fp64 (mergekit's are in the merge dtype).
"""
from __future__ import annotations

import torch

from ..._backend import DTYPE_CODES, cpp_kernels_for
from ...ops._library import deliver, kernel_output
from . import Param, TensorInputs, TensorMethod, is_bool, register, unit_interval
from .gta import element_chunks, largest_masks, sign_consensus, task_vectors

WEIGHT_SUM_EPS = 1e-6
ERASED_SUM_MIN = 1e-6


def model_variance(tvs: torch.Tensor) -> torch.Tensor:
    """σ² across models per element: ``torch.var(tvs, dim=0, unbiased=False)``, bit for bit; on
    the CPU one C++ pass (csrc/cpu/model_variance.cpp: the same fp64 Welford updates, ~18× faster
    than torch's reduction over the model axis)."""
    ext = cpp_kernels_for([tvs]) if tvs.dtype == torch.float32 else None  # (the pass reads fp32)
    if ext is None:
        return torch.var(tvs, dim=0, unbiased=False)
    var = torch.empty(tvs.shape[1:], dtype=torch.float32)
    ext.model_variance(var.data_ptr(), tvs.data_ptr(), tvs.shape[0], var.numel())
    return var


def sce_select_mask(tvs: torch.Tensor, topk: float) -> torch.Tensor:
    """Boolean mask over one tensor's elements: the k largest variances across models, ties
    to the lower flat index; k = floor(float32(count(σ² ≠ 0)) · float32(topk))."""
    if topk <= 0:
        return torch.zeros(tvs.shape[1:], dtype=torch.bool, device=tvs.device)
    if topk >= 1:
        return torch.ones(tvs.shape[1:], dtype=torch.bool, device=tvs.device)
    var = model_variance(tvs)
    k = torch.floor(torch.count_nonzero(var) * topk)  # float32, like mergekit's int(count * topk)
    return largest_masks(var, [int(k)], lower_index_first=True)[0]


def sce_weights(tvs: torch.Tensor) -> torch.Tensor:
    """ωᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²), or 1/n when that sum is below 1e-6: fp32 squares,
    summed and divided in fp64, rounded once (``weights_from_sums``)."""
    sums = tvs.square().reshape(tvs.shape[0], -1).sum(dim=1, dtype=torch.float64)
    return weights_from_sums(sums, tvs[0].numel())[:, None]


def weights_from_sums(sums, numel: int) -> torch.Tensor:
    """The SCE weights (fp32, one per model) from each model's Σ τᵢ² (fp64) over ``numel`` elements."""
    c = torch.as_tensor(sums, dtype=torch.float64) / max(numel, 1)
    total = c.sum()
    return torch.where(total.abs() < WEIGHT_SUM_EPS, torch.full_like(c, 1.0 / len(c)), c / total).float()


def fused_sce_merge(inputs: TensorInputs, others: list[int], topk: float) -> torch.Tensor | None:
    """SCE in C++ passes over the stored tensors (see the module docstring); None where they do
    not apply (not the CPU, mixed dtypes, more than 4 models): the caller stacks."""
    base = inputs.base
    tuned = [inputs.tensors[i] for i in others]
    ext = cpp_kernels_for([base, *tuned]) if len(tuned) <= 4 else None
    if ext is None:
        return None
    numel = base.numel()
    args = (base.data_ptr(), [t.data_ptr() for t in tuned], DTYPE_CODES[base.dtype], numel)
    selection = ext.sce_select(*args, topk)  # keep e where bits(σ²) > T, or = T and e ≤ cutoff
    weights = weights_from_sums(ext.sce_square_sums(*args, *selection), numel)
    target = kernel_output(inputs.out, base.shape)
    ext.sce_merge(target.data_ptr(), DTYPE_CODES[target.dtype], *args, *selection, weights.tolist())
    return deliver(target, inputs.out)


def sce_merge(inputs: TensorInputs) -> torch.Tensor:
    others = [i for i in range(len(inputs.tensors)) if i != inputs.base_index]
    topk = float(inputs.shared["select_topk"])
    if others and inputs.base.numel():
        fused = fused_sce_merge(inputs, others, topk)
        if fused is not None:
            return fused
    base, tvs, others = task_vectors(inputs)
    if not others:
        return base.float()
    if topk < 1:
        tvs.mul_(sce_select_mask(tvs, topk))
    weights = sce_weights(tvs)
    out = inputs.result_buffer()
    flat_base, flat_tvs, flat_out = base.reshape(-1), tvs.reshape(len(tvs), -1), out.view(-1)
    for start, end in element_chunks(base.numel()):  # element-wise: bounded temporaries
        part = flat_tvs[:, start:end]
        erased = weights * sign_consensus(part)
        torch.add(flat_base[start:end], (part * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=ERASED_SUM_MIN),
                  out=flat_out[start:end])
    return out


SCE = register(TensorMethod(
    name="sce",
    merge=sce_merge,
    global_params={"int8_mask": Param(False, is_bool), "select_topk": Param(1.0, unit_interval)},
    needs_base=True,
    min_models=1,
))
