"""Launchers of the C++ CPU kernels (``vfuse_kernels._C``) over contiguous CPU tensors.

Same interface as ``vfuse_kernels.triton.delta_merge``: the orchestration in
``ops/delta_merge.py`` calls either.
"""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, cpu_extension


def _pointers(tensors: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    return [t.data_ptr() for t in tensors], [DTYPE_CODES[t.dtype] for t in tensors]


def magnitude_select(base, tuned, ks, tuned_are_deltas):
    ptrs, codes = _pointers(tuned)
    keys, cutoffs = cpu_extension().magnitude_select(
        base.data_ptr(), DTYPE_CODES[base.dtype], ptrs, codes, base.numel(), tuned_are_deltas, list(ks)
    )
    return torch.tensor(keys, dtype=torch.int64), torch.tensor(cutoffs, dtype=torch.int64)


def sparse_l1(base, tuned, tuned_are_deltas, sparsify, keep_a, keep_b, seed):
    ptrs, codes = _pointers(tuned)
    sums = cpu_extension().sparse_l1(
        base.data_ptr(), DTYPE_CODES[base.dtype], ptrs, codes, base.numel(), tuned_are_deltas,
        sparsify, keep_a.tolist(), keep_b.tolist(), seed,
    )
    return torch.tensor(sums, dtype=torch.float64).reshape(len(tuned), 2)


def merge(out, base, tuned, tuned_are_deltas, sparsify, keep_a, keep_b, seed, coefs, weights, elect, normalize, scale):
    ptrs, codes = _pointers(tuned)
    cpu_extension().merge(
        out.data_ptr(), DTYPE_CODES[out.dtype], base.data_ptr(), DTYPE_CODES[base.dtype], ptrs, codes,
        base.numel(), tuned_are_deltas, sparsify, keep_a.tolist(), keep_b.tolist(), seed,
        coefs.tolist(), weights, elect, normalize, scale,
    )
