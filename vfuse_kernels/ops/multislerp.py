"""``multislerp(tensors, weights)``: mergekit's ``multislerp`` — barycentric interpolation of
several tensors on the sphere, through the tangent space at their weighted mean direction.

With ``x_i`` the tensors (minus ``base`` when given), ``u_i = x_i / (|x_i| + eps)`` and the
weights w (divided by their sum with ``normalize_weights``): ``m = Σ w_i u_i / |Σ w_i u_i|``,
``v = Σ w_i (u_i − <u_i, m> m)``, ``r = m cos|v|' + v sin|v|' / |v|'`` (``|v|' = |v| + eps``),
result ``r · Σ w_i |x_i|`` (plus the base). One tensor is returned as is; two whose unit
vectors cancel fall back to ``Σ w_i x_i`` (chosen without a host sync); more are an error.
Arithmetic in fp32 (fp64 when an input is fp64: the merge method's inputs), torch ops.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_like, check_out, check_real, check_tensor, check_tensor_list, per_model
from ._library import define, run_into


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
        raise ValueError("multislerp: the weighted sum of the unit vectors is zero (antipodal inputs whose "
                         "weights cancel); change the weights")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(dim=-1, keepdim=True) * mean
    step = (tangent * w.view(-1, 1)).sum(dim=0)
    step_norm = torch.linalg.vector_norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    if len(tensors) == 2:  # the linear fallback, chosen without a host sync
        out = torch.where(mean_norm < eps, (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:]), out)
    return out if base is None else out + base


def _multislerp_into(out, tensors, weights, base, normalize_weights, eps) -> None:
    base = None if base is None else base.float()
    out.copy_(multislerp_tensors([x.float() for x in tensors], weights, base, normalize_weights, eps))


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
