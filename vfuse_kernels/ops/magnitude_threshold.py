"""Exact per-model magnitude top-k (the TIES trim), and ``magnitude_threshold``.

For each model i with kᵢ = max(1, int(densityᵢ · numel)) the selection returns the
magnitude key Kᵢ (the fp32 bits of the kᵢ-th largest |δᵢ|) and the cutoff Cᵢ, the last
flat index kept among elements whose |δᵢ| equals it: element e is kept iff
``key(e) > Kᵢ or (key(e) == Kᵢ and e <= Cᵢ)`` — exactly kᵢ elements, ties going to the
lower flat index. Thresholds do not depend on merge weights, so one selection can serve
many merges (``delta_merge(..., thresholds=ties_thresholds(...))``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._backend import select_backend
from ..reference import delta_merge as ref
from ._checks import check_merge_inputs
from ._library import define

MAX_TRIM_NUMEL = 2**32  # the (key, index) pairs of the selection hold a 32-bit index


class MagnitudeThresholds(NamedTuple):
    """Per-model trim thresholds: ``keys`` and ``cutoffs`` are int64 tensors of shape [N]."""

    keys: torch.Tensor
    cutoffs: torch.Tensor


def _kernels(backend: str):
    if backend == "cpp":
        from . import _cpp_kernels

        return _cpp_kernels
    from ..triton import delta_merge as triton_kernels

    return triton_kernels


def _reference_select(base, tuned, ks, tuned_are_deltas):
    keys, cutoffs = [], []
    b = base.reshape(-1).float()
    for t, k in zip(tuned, ks):
        delta = t.reshape(-1).float() if tuned_are_deltas else t.reshape(-1).float() - b
        mask = ref.top_magnitude_mask(delta, k)
        kept = delta.abs()[mask]
        key = kept.min().view(torch.int32).item()
        keys.append(key)
        cutoffs.append(int(torch.nonzero(mask & (delta.abs() == kept.min())).max()))
    return torch.tensor(keys, device=base.device), torch.tensor(cutoffs, device=base.device)


def _select(base: torch.Tensor, tuned: list[torch.Tensor], ks: list[int], tuned_are_deltas: bool):
    backend = select_backend(base.device)
    numel = base.numel()
    keys = torch.zeros(len(tuned), dtype=torch.int64)
    cutoffs = torch.full((len(tuned),), numel - 1, dtype=torch.int64)
    active = [i for i, k in enumerate(ks) if k < numel]  # k == numel keeps everything
    if active and numel:
        sub = [tuned[i].contiguous() for i in active]
        sub_ks = [ks[i] for i in active]
        if backend == "reference":
            k_sel, c_sel = _reference_select(base, sub, sub_ks, tuned_are_deltas)
        else:
            k_sel, c_sel = _kernels(backend).magnitude_select(base.contiguous(), sub, sub_ks, tuned_are_deltas)
        keys = keys.to(base.device).index_copy(0, torch.tensor(active, device=base.device), k_sel.to(base.device))
        cutoffs = cutoffs.to(base.device).index_copy(0, torch.tensor(active, device=base.device), c_sel.to(base.device))
    return keys.to(base.device), cutoffs.to(base.device)


def _magnitude_select_fake(base, tuned, ks, tuned_are_deltas):
    n = len(tuned)
    return base.new_empty(n, dtype=torch.int64), base.new_empty(n, dtype=torch.int64)


define("magnitude_select(Tensor base, Tensor[] tuned, int[] ks, bool tuned_are_deltas) -> (Tensor, Tensor)",
       _select, _magnitude_select_fake)
magnitude_select_op = torch.ops.vfuse.magnitude_select


def check_trim_size(base: torch.Tensor) -> None:
    if base.numel() >= MAX_TRIM_NUMEL:
        raise ValueError(f"magnitude trimming supports tensors under 2^32 elements, got {base.numel()}")


def check_trim_inputs(base, tuned, density, tuned_are_deltas) -> tuple[list[torch.Tensor], list[int]]:
    """``check_merge_inputs`` plus the size limit; returns (tuned, kᵢ)."""
    tuned, densities = check_merge_inputs(base, tuned, density, tuned_are_deltas)
    check_trim_size(base)
    return tuned, [ref.trim_count(p, base.numel()) for p in densities]


def ties_thresholds(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    density: float | Sequence[float],
    *,
    tuned_are_deltas: bool = False,
) -> MagnitudeThresholds:
    """The TIES trim thresholds of each ``tuned`` tensor's delta, to pass to ``delta_merge``."""
    tuned, ks = check_trim_inputs(base, tuned, density, tuned_are_deltas)
    with torch.no_grad():
        return MagnitudeThresholds(*magnitude_select_op(base, tuned, ks, tuned_are_deltas))


def magnitude_threshold(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th largest |delta|, k = max(1, int(density · numel)): 0-dim, delta's dtype.

    >>> magnitude_threshold(torch.tensor([0.5, -2.0, 1.0, -0.25]), 0.5)
    tensor(1.)
    """
    tuned, ks = check_trim_inputs(delta, [delta], density, True)
    if delta.numel() == 0:
        raise ValueError("magnitude_threshold of an empty tensor is undefined")
    with torch.no_grad():
        keys, _ = magnitude_select_op(delta, tuned, ks, True)
    if ks[0] == delta.numel():  # everything kept: the smallest magnitude
        return delta.detach().abs().min().to(delta.dtype)
    return keys[:1].to(torch.int32).view(torch.float32)[0].to(delta.dtype)
