"""``nearswap(a, b, t)``: mergekit's ``nearswap`` — per element, ``w = clamp(t / max(|a − b|,
1e-6), 0, 1)`` and ``w·b + (1 − w)·a``: elements closer than t take b, the others move
towards b by ``t / |a − b|``. One element-wise pass (torch ops, fp32 arithmetic; fp64 when an
input is fp64: the merge method's inputs).
"""
from __future__ import annotations

import torch

from ._checks import check_out, check_pair, check_real
from ._library import define, run_into


def nearswap_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` and ``w·b + (1-w)·a``: elements
    closer than ``t`` take b, the others move towards b by ``t / |a - b|``."""
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def _nearswap_into(out, a, b, t) -> None:
    out.copy_(nearswap_tensors(t, a.float(), b.float()))


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
