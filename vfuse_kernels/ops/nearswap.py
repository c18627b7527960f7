"""``nearswap(a, b, t)``: mergekit's ``nearswap`` — per element, ``w = clamp(t / max(|a − b|,
1e-6), 0, 1)`` and ``w·b + (1 − w)·a``: elements closer than t take b, the others move
towards b by ``t / |a − b|``. One element-wise pass in fp32 (fp64 when an input is fp64: the
merge method's inputs): in C++ on the CPU (csrc/cpu/nearswap.cpp: the torch operations in their
order, the same bits, no fp32 copies of the inputs), else torch ops.
"""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, cpp_kernels_for
from ._checks import check_out, check_pair, check_real
from ._library import define, deliver, kernel_output, run_into


def nearswap_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` and ``w·b + (1-w)·a``: elements
    closer than ``t`` take b, the others move towards b by ``t / |a - b|``."""
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def nearswap_merge(t: float, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """nearswap in ``dtype`` (fp32 or fp64), into ``out`` when given (else a new ``dtype`` tensor)."""
    ext = cpp_kernels_for([a, b]) if dtype == torch.float32 else None
    if ext is None:
        return deliver(nearswap_tensors(t, a.to(dtype), b.to(dtype)), out)
    target = kernel_output(out, a.shape)
    ext.nearswap(target.data_ptr(), DTYPE_CODES[target.dtype], a.data_ptr(), b.data_ptr(), DTYPE_CODES[a.dtype],
                 a.numel(), t)
    return deliver(target, out)


def _nearswap_into(out, a, b, t) -> None:
    nearswap_merge(t, a, b, out=out)


def _nearswap_fake(out, a, b, t) -> None:
    return None


define("nearswap_(Tensor(a!) out, Tensor a, Tensor b, float t) -> ()", _nearswap_into, _nearswap_fake)
nearswap_op = torch.ops.vfuse.nearswap_


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a`` moved towards ``b`` element by element (module docstring); the result in ``out``, or
    a new tensor of a's dtype.

    >>> nearswap(torch.tensor([0.0, 0.0]), torch.tensor([0.1, 4.0]), 0.5)
    tensor([0.1000, 0.5000])
    """
    check_pair(a, b)
    t = check_real("t", t)
    check_out(out, a)
    return run_into(nearswap_op, out, a, a, b, t)
