"""``multislerp(tensors, weights)``: mergekit's ``multislerp`` — barycentric interpolation of
several tensors on the sphere, through the tangent space at their weighted mean direction.

With ``x_i`` the tensors (minus ``base`` when given), ``u_i = x_i / (|x_i| + eps)`` and the
weights w (divided by their sum with ``normalize_weights``): ``m = Σ w_i u_i / |Σ w_i u_i|``,
``v = Σ w_i (u_i − <u_i, m> m)``, ``r = m cos|v|' + v sin|v|' / |v|'`` (``|v|' = |v| + eps``),
result ``r · Σ w_i |x_i|`` (plus the base). One tensor is returned as is; two whose unit
vectors cancel fall back to ``Σ w_i x_i`` (chosen without a host sync); more are an error.
Arithmetic in fp32 (fp64 when an input is fp64: the merge method's inputs), torch ops — except
on the CPU with a base and 2 to 4 contiguous inputs of one dtype: every vector above is a linear
combination of the offsets x_i, so two C++ passes give it — their Gram matrix in fp64
(model_stock's pass), then ``base + Σ k_i x_i`` in fp32 (the fused task-arithmetic pass), k
from the Gram matrix in fp64: within fp32 rounding of the torch path, without fp32 copies.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import DTYPE_CODES, cpp_kernels_for
from ..gram import CANCELLING, multislerp_coefficients
from ._checks import check_like, check_out, check_real, check_tensor, check_tensor_list, per_model
from ._library import define, deliver, kernel_output, run_into
from .delta_merge import delta_merge


def multislerp_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                       base: torch.Tensor | None = None, normalize: bool = True,
                       eps: float = 1e-8) -> torch.Tensor:
    """With ``x_i`` the tensors (minus the base), ``u_i = x_i / (|x_i| + eps)``, ``w`` the
    weights (divided by their sum when ``normalize``): ``m = Σ w_i u_i / |Σ w_i u_i|``,
    ``v = Σ w_i (u_i - <u_i, m> m)``, ``r = m cos|v|' + v sin|v|' / |v|'`` (``|v|' = |v| + eps``),
    result ``r · Σ w_i |x_i|`` (plus the base). A single tensor is returned as is. When
    ``|Σ w_i u_i| < eps``: two tensors fall back to ``Σ w_i x_i``, more are an error."""
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(list(tensors))
    if base is not None:
        x = x - base
    flat = x.reshape(len(tensors), -1)
    w = torch.tensor(list(weights), dtype=x.dtype, device=x.device)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if len(tensors) > 2 and mean_norm < eps:
        raise ValueError(CANCELLING)
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(dim=-1, keepdim=True) * mean
    step = (tangent * w.view(-1, 1)).sum(dim=0)
    step_norm = torch.linalg.vector_norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    if len(tensors) == 2:  # the linear fallback, chosen without a host sync
        out = torch.where(mean_norm < eps, (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:]), out)
    return out if base is None else out + base


def multislerp_merge(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None,
                     normalize: bool = True, eps: float = 1e-8, dtype: torch.dtype = torch.float32,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """multislerp of ``tensors`` (of their offsets from ``base`` when given) in ``dtype`` (fp32 or
    fp64; the module docstring says where it runs), into ``out`` when given."""
    if base is not None and 2 <= len(tensors) <= 4 and dtype == torch.float32:
        ext = cpp_kernels_for([base, *tensors])
        if ext is not None:
            gram = ext.offset_gram(base.data_ptr(), [x.data_ptr() for x in tensors], DTYPE_CODES[base.dtype],
                                   base.numel())
            k = multislerp_coefficients(gram, len(tensors), weights, normalize, eps)
            return deliver(delta_merge(base, tensors, k, out=kernel_output(out, base.shape)), out)
    return deliver(multislerp_tensors([x.to(dtype) for x in tensors], weights,
                                      None if base is None else base.to(dtype), normalize, eps), out)


def _multislerp_into(out, tensors, weights, base, normalize_weights, eps) -> None:
    multislerp_merge(list(tensors), list(weights), base, normalize_weights, eps, out=out)


def _multislerp_fake(out, tensors, weights, base, normalize_weights, eps) -> None:
    return None


define("multislerp_(Tensor(a!) out, Tensor[] tensors, float[] weights, Tensor? base, bool normalize_weights, "
       "float eps) -> ()", _multislerp_into, _multislerp_fake)
multislerp_op = torch.ops.vfuse.multislerp_


def multislerp(tensors: Sequence[torch.Tensor], weights: float | Sequence[float], *, base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted spherical mean of ``tensors`` (of their deltas from ``base`` when given;
    module docstring); the result in ``out``, or a new tensor of the first one's dtype.

    >>> multislerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [0.5, 0.5])
    tensor([0.7071, 0.7071])
    """
    tensors = check_tensor_list("tensors", tensors)
    weights = per_model("weights", weights, len(tensors))
    if base is not None:
        check_tensor("base", base)
        check_like("base", base, tensors[0])
    if not isinstance(normalize_weights, bool):
        raise TypeError(f"normalize_weights must be a bool, got {type(normalize_weights).__name__}")
    if normalize_weights and sum(weights) == 0:
        raise ValueError(f"weights {weights} sum to 0: they cannot be normalised")
    eps = check_real("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    check_out(out, tensors[0])
    return run_into(multislerp_op, out, tensors[0], tensors, weights, base, normalize_weights, eps)
