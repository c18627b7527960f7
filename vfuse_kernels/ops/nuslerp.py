"""``nuslerp(a, b, t)``: mergekit's ``nuslerp`` — slerp without renormalisation, over the whole
tensor or vector by vector.

For each vector pair (the flattened tensors with ``flatten``, the default; else each vector
along the last dim, or with ``row_wise`` along dim 0): ``(sin((1−t)θ)·a + sin(tθ)·b) / sin θ``,
θ their angle (a zero vector has cos θ = 0), or ``(1−t)·a + t·b`` where ``1 − cos²θ ≤ 1e-16``.
With ``base``: ``base + nuslerp(a − base, b − base)``. mergekit's per-model weights w₀, w₁ give
``t = w₁ / (w₀ + w₁)``; t is not range-checked (mergekit extrapolates). Arithmetic in fp32 (fp64
when an input is fp64: the merge method's inputs), torch ops on the device of the inputs:
memory-bound element-wise work plus one reduction per vector — except the common case on the
CPU (flattened, with a base, contiguous inputs of one dtype): two C++ passes, the offsets' Gram
matrix in fp64 (model_stock's pass), then ``base + k₀·(a − base) + k₁·(b − base)`` in fp32 (the
fused task-arithmetic pass), k from the Gram matrix in fp64 — within fp32 rounding of the
torch path, without fp32 copies of the inputs.
"""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, cpp_kernels_for
from ..gram import NUSLERP_EPS, UNIT_EPS, nuslerp_coefficients
from ._checks import check_like, check_out, check_pair, check_real, check_tensor
from ._library import define, deliver, kernel_output, run_into
from .delta_merge import delta_merge



def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=UNIT_EPS)


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False,
                    flatten: bool = True) -> torch.Tensor:
    """slerp of v0 and v1 (no renormalisation), vector by vector: the flattened tensor, else
    each vector along the last dim, or (``row_wise``) along dim 0, swapping dims 0 and -1 as
    mergekit does. A vector pair with
    ``1 - cos²θ <= 1e-16`` interpolates linearly; a zero vector has cos θ = 0."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = (_unit_rows(v0) * _unit_rows(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_merge(t: float, a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None, row_wise: bool = False,
                  flatten: bool = True, dtype: torch.dtype = torch.float32,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """nuslerp of a and b, of their offsets from ``base`` when given, in ``dtype`` (fp32 or fp64;
    the module docstring says where it runs), into ``out`` when given."""
    if base is not None and flatten and dtype == torch.float32:
        ext = cpp_kernels_for([base, a, b])
        if ext is not None:
            k = nuslerp_coefficients(ext.offset_gram(base.data_ptr(), [a.data_ptr(), b.data_ptr()],
                                                     DTYPE_CODES[base.dtype], base.numel()), t)
            return deliver(delta_merge(base, [a, b], k, out=kernel_output(out, base.shape)), out)
    a, b = a.to(dtype), b.to(dtype)
    if base is None:
        return deliver(nuslerp_tensors(t, a, b, row_wise, flatten), out)
    base = base.to(dtype)
    return deliver(base + nuslerp_tensors(t, a - base, b - base, row_wise, flatten), out)


def _nuslerp_into(out, a, b, t, base, row_wise, flatten) -> None:
    nuslerp_merge(t, a, b, base, row_wise, flatten, out=out)


def _nuslerp_fake(out, a, b, t, base, row_wise, flatten) -> None:
    return None


define("nuslerp_(Tensor(a!) out, Tensor a, Tensor b, float t, Tensor? base, bool row_wise, bool flatten) -> ()",
       _nuslerp_into, _nuslerp_fake)
nuslerp_op = torch.ops.vfuse.nuslerp_


def nuslerp(a: torch.Tensor, b: torch.Tensor, t: float, *, base: torch.Tensor | None = None, row_wise: bool = False,
            flatten: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """nuslerp from ``a`` (t = 0) to ``b`` (t = 1), of their deltas from ``base`` when given
    (module docstring); the result in ``out``, or a new tensor of a's dtype.

    >>> nuslerp(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 4.0]]), 0.5, flatten=False)
    tensor([[0.7071, 0.7071],
            [0.0000, 3.0000]])
    """
    check_pair(a, b)
    t = check_real("t", t)
    if base is not None:
        check_tensor("base", base)
        check_like("base", base, a)
    for name, value in (("row_wise", row_wise), ("flatten", flatten)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    check_out(out, a)
    return run_into(nuslerp_op, out, a, a, b, t, base, row_wise, flatten)
