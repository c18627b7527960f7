"""Launchers of the C++ CPU kernels (``vfuse_kernels._C``) over contiguous CPU tensors.

Same interface as ``vfuse_kernels.triton.delta_merge``: the orchestration in
``ops/delta_merge.py`` calls either.
"""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, cpu_extension
from ..selection import HostSelector


def _pointers(tensors: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    return [t.data_ptr() for t in tensors], [DTYPE_CODES[t.dtype] for t in tensors]


def selector(base, tuned, tuned_are_deltas):
    """The selection's handle on one call's contiguous CPU tensors (selection.magnitude_select),
    which must outlive it."""
    ptrs, codes = _pointers(tuned)
    return HostSelector(base.data_ptr(), DTYPE_CODES[base.dtype], ptrs, codes, base.numel(), tuned_are_deltas)


MASK = 3  # the C++ sparsify code of per-model keep masks, one bit per element (csrc/cpu/delta_merge.h)
BAND = 4  # ... of the band between two magnitude cuts per model, ties to the higher index: trim=(keys, cutoffs),
# 2N each — every model's wider cut, then every model's narrower one


def packed_mask_bytes(numel: int) -> int:
    """Bytes of a keep mask with one bit per element (``MASK``)."""
    return (numel + 7) // 8


def _keep_lists(n, dare_thresholds, trim, masks):
    if trim is not None:
        return trim[0].tolist(), trim[1].tolist()
    if masks is not None:  # MASK: each model's packed keep bits (uint8 tensors), None keeping everything
        return [0 if m is None else m.data_ptr() for m in masks], [0] * n
    return list(dare_thresholds), [0] * n


def sparse_l1(base, tuned, tuned_are_deltas, sparsify, dare_thresholds, trim, seed, masks=None):
    ptrs, codes = _pointers(tuned)
    keep_a, keep_b = _keep_lists(len(tuned), dare_thresholds, trim, masks)
    sums = cpu_extension().sparse_l1(
        base.data_ptr(), DTYPE_CODES[base.dtype], ptrs, codes, base.numel(), tuned_are_deltas,
        sparsify, keep_a, keep_b, seed,
    )
    return torch.tensor(sums, dtype=torch.float64).reshape(len(tuned), 2)


def merge(out, base, tuned, tuned_are_deltas, sparsify, elect, normalize, scale, weights, coefs, dare_thresholds,
          trim, seed, masks=None):
    ptrs, codes = _pointers(tuned)
    keep_a, keep_b = _keep_lists(len(tuned), dare_thresholds, trim, masks)
    coefs = coefs.float().tolist() if isinstance(coefs, torch.Tensor) else coefs
    cpu_extension().merge(
        out.data_ptr(), DTYPE_CODES[out.dtype], base.data_ptr(), DTYPE_CODES[base.dtype], ptrs, codes,
        base.numel(), tuned_are_deltas, sparsify, keep_a, keep_b, seed, coefs, weights, elect, normalize, scale,
    )
