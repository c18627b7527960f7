"""The TIES trim thresholds (``ties_thresholds``), ``magnitude_threshold``, and the
``vfuse::magnitude_select`` op behind them.

For each model i with kᵢ = max(1, int(densityᵢ · numel)) the selection
(vfuse_kernels/selection.py) returns the magnitude key Kᵢ (the fp32 bits of the kᵢ-th largest
|δᵢ|) and the cutoff Cᵢ, the last flat index kept among elements whose |δᵢ| equals it:
element e is kept iff ``key(e) > Kᵢ or (key(e) == Kᵢ and e <= Cᵢ)`` — exactly kᵢ elements,
ties going to the lower flat index. Thresholds do not depend on merge weights, so one
selection can serve many merges (``delta_merge(..., thresholds=ties_thresholds(...))``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._backend import select_backend
from ..delta_rules import trim_count
from ..reference import delta_merge as ref
from ._checks import check_merge_inputs
from ._library import define
from ..selection import MAX_NUMEL, trim_thresholds


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
    numel = base.numel()
    keys, cutoffs = [], []
    b = base.reshape(-1).float()
    for t, k in zip(tuned, ks):
        if k == numel:  # everything kept
            keys.append(0)
            cutoffs.append(numel - 1)
            continue
        delta = t.reshape(-1).float() if tuned_are_deltas else t.reshape(-1).float() - b
        mask = ref.top_magnitude_mask(delta, k)
        kept = delta.abs()[mask]
        key = kept.min().view(torch.int32).item()
        keys.append(key)
        cutoffs.append(int(torch.nonzero(mask & (delta.abs() == kept.min())).max()))
    return (torch.tensor(keys, dtype=torch.int64, device=base.device),
            torch.tensor(cutoffs, dtype=torch.int64, device=base.device))


def _select(base: torch.Tensor, tuned: list[torch.Tensor], ks: list[int], tuned_are_deltas: bool):
    """(keys, cutoffs) int64 [N] on base's device; k == numel keeps everything (key 0, cutoff numel − 1)."""
    backend = select_backend(base.device)
    if backend == "reference":
        return _reference_select(base, tuned, ks, tuned_are_deltas)
    base, tuned = base.contiguous(), [t.contiguous() for t in tuned]  # (held here: the selector keeps addresses)
    selector = _kernels(backend).selector(base, tuned, tuned_are_deltas)
    return tuple(torch.as_tensor(x, device=base.device) for x in trim_thresholds(selector, ks))


def _magnitude_select_fake(base, tuned, ks, tuned_are_deltas):
    n = len(tuned)
    return base.new_empty(n, dtype=torch.int64), base.new_empty(n, dtype=torch.int64)


define("magnitude_select(Tensor base, Tensor[] tuned, int[] ks, bool tuned_are_deltas) -> (Tensor, Tensor)",
       _select, _magnitude_select_fake)
magnitude_select_op = torch.ops.vfuse.magnitude_select


def check_trim_size(base: torch.Tensor) -> None:
    if base.numel() >= MAX_NUMEL:
        raise ValueError(f"magnitude trimming supports tensors under 2^33 elements, got {base.numel()}")


def check_trim_inputs(base, tuned, density, tuned_are_deltas) -> tuple[list[torch.Tensor], list[int]]:
    """``check_merge_inputs`` plus the size limit; returns (tuned, kᵢ)."""
    tuned, densities = check_merge_inputs(base, tuned, density, tuned_are_deltas)
    check_trim_size(base)
    return tuned, [trim_count(p, base.numel()) for p in densities]


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
