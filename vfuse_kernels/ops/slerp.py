"""``slerp(a, b, t)``: spherical interpolation between two whole tensors, mergekit's ``slerp``.

θ is the angle between a and b as flat vectors (a norm ≤ 1e-8 counts as 1, so a zero tensor
is orthogonal to everything); the result is ``(sin((1−t)θ)·a + sin(tθ)·b) / sin θ``, or
``(1−t)·a + t·b`` where ``|cos θ| > 0.9995``; t in [0, 1] (t = 0 gives a, t = 1 gives b).

Two passes over the inputs, on the CPU in C++ (csrc/cpu/slerp.cpp) and on CUDA in Triton
(triton/slerp.py): the sums Σa², Σb², Σab in fp64, then ``ca·a + cb·b`` in fp32, rounded once
to ``out``'s dtype. ca and cb come from the sums as mergekit computes them from its fp32
tensors: cos θ rounded to fp32, the trigonometry in fp32 — on the CPU in C++ (libm), on CUDA
with torch ops on the device, without a host sync.
mergekit sums normalised fp32 chunks instead; on near-parallel tensors its cos θ drifts (up to
~4e-5 relative in the result at 2M elements) where the fp64 sums give the exactly rounded one.
Inputs of different dtypes are read as fp32 (exactly). The reference (``VFUSE_BACKEND=reference``)
is ``reference/slerp.py``, all in fp64.
"""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, cpu_extension, select_backend
from ..reference import slerp as ref
from ._checks import check_out, check_pair, check_real
from ._library import define, run_into


def slerp_coefficients(sums: torch.Tensor, t: float) -> torch.Tensor:
    """fp32 [2] (ca, cb) on ``sums``' device from the fp64 sums (Σa², Σb², Σab): the CUDA path's
    (the C++ path's twin is ``_C.slerp_coefficients``, the same operations with libm's acosf
    and sinf, where torch's CPU ops differ in the last bit for ~5% of inputs)."""
    norms = sums[:2].sqrt()
    norms = torch.where(norms > ref.EPS, norms, 1.0)
    cos = (sums[2] / (norms[0] * norms[1])).clamp(-1, 1).float()
    t = torch.full((), t, dtype=torch.float32, device=sums.device)
    linear = cos.abs() > ref.LINEAR_ABOVE
    theta = torch.acos(torch.where(linear, 0, cos))  # keeps the unused branch finite
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return torch.stack([ca, cb])


def _slerp_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float) -> None:
    backend = select_backend(a.device)
    if backend == "reference":
        out.copy_(ref.slerp(a, b, t))
        return
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    a, b = a.contiguous(), b.contiguous()
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if backend == "cpp":
        ext, dtype = cpu_extension(), DTYPE_CODES[a.dtype]
        ca, cb = ext.slerp_coefficients(ext.pair_sums(a.data_ptr(), b.data_ptr(), dtype, a.numel()), t)
        ext.pair_combine(target.data_ptr(), DTYPE_CODES[target.dtype], a.data_ptr(), b.data_ptr(), dtype, a.numel(),
                         ca, cb)
    else:
        from ..triton import slerp as kernels

        kernels.pair_combine(target, a, b, slerp_coefficients(kernels.pair_sums(a, b), t))
    if target is not out:
        out.copy_(target)


def _slerp_fake(out, a, b, t) -> None:
    return None


define("slerp_(Tensor(a!) out, Tensor a, Tensor b, float t) -> ()", _slerp_into, _slerp_fake)
slerp_op = torch.ops.vfuse.slerp_


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1) over the whole tensors
    (module docstring); the result in ``out``, or a new tensor of a's dtype.

    >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    tensor([0.7071, 0.7071])
    """
    check_pair(a, b)
    t = check_real("t", t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t} is outside [0, 1]")
    check_out(out, a)
    return run_into(slerp_op, out, a, a, b, t)
