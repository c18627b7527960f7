"""``karcher_mean(tensors, weights)``: mergekit's ``karcher`` — the weighted Karcher (Fréchet)
mean of the tensors' directions on the unit sphere, times the weighted mean norm.

Inputs with ``|x_i| <= tol`` are left out of the mean (their weights renormalised over the
rest); if all are, the result is zero. Start: the normalised weighted sum of the unit vectors
(the first unit vector if that sum is below tol). Step: ``v = Σ w_i θ_i / sin θ_i · (u_i −
cos θ_i · m)`` over the ``θ_i >= tol``; stop when ``|v| < tol``, else ``m ← cos|v|·m +
sin|v|·v/|v|``, renormalised; at most ``max_iter`` steps. Torch ops on the inputs' device,
fp32 arithmetic (fp64 when an input is fp64: the merge method's inputs); one host read per step
(the stopping test, as mergekit's). On the CPU, 2 to 4 contiguous inputs of one dtype: every
vector above is a linear combination of the inputs, so two C++ passes give the mean — their
Gram matrix in fp64, the iteration on coefficient vectors in fp64, then ``Σ k_i x_i`` in fp32 —
without fp32 copies of the inputs or ``max_iter`` sweeps over them (fp64 inner products:
within the stopping tolerance of the torch path).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import DTYPE_CODES, cpp_kernels_for
from ..gram import karcher_coefficients
from ._checks import check_count, check_out, check_real, check_tensor_list, per_model
from ._library import define, deliver, kernel_output, run_into


def karcher_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float], max_iter: int = 10,
                    tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean on the unit sphere, times ``Σ w_i |x_i|``.

    Inputs with ``|x_i| <= tol`` are left out of the mean (their weights renormalised over the
    rest); if all are, the result is zero. Start: the normalised weighted sum of the unit
    vectors (the first unit vector if that sum is below tol). Step:
    ``v = Σ w_i θ_i / sin θ_i · (u_i - cos θ_i · m)`` over the ``θ_i >= tol``, stop when
    ``|v| < tol``, else ``m ← cos|v| · m + sin|v| · v / |v|``, renormalised; at most max_iter."""
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    norm_values = torch.stack(norms).tolist()  # one sync: which inputs take part
    valid = [i for i, n in enumerate(norm_values) if n > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(weights[i] for i in valid)
    alphas = [weights[i] / total for i in valid]
    units = [tensors[i] / norms[i] for i in valid]  # valid norms are > tol >= 0: no 0/0

    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0] if mean_norm.item() < tol else mean / mean_norm
    zero = torch.zeros((), dtype=mean.dtype, device=mean.device)
    # mergekit compares .item() values with tol, i.e. in fp64: so do these tests
    # (an fp32 tensor against a Python float would round tol to fp32)
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            cos = torch.dot(mean.flatten(), unit.flatten()).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            coef = torch.where(theta.double() < tol, zero, alpha * (theta / torch.sin(theta)))
            step += coef * (unit - cos * mean)
        step_norm = torch.linalg.vector_norm(step)
        if step_norm.item() < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        mean_norm = torch.linalg.vector_norm(mean)
        mean = torch.where(mean_norm.double() > tol, mean / mean_norm, mean)
    return sum(w * n for w, n in zip(weights, norms)) * mean


def karcher_merge(tensors: list[torch.Tensor], weights: list[float], max_iter: int = 10, tol: float = 1e-5,
                  dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Karcher mean in ``dtype`` (fp32 or fp64; the module docstring says where it runs), into
    ``out`` when given."""
    ext = cpp_kernels_for(tensors) if 2 <= len(tensors) <= 4 and dtype == torch.float32 else None
    if ext is not None:
        ptrs, code = [x.data_ptr() for x in tensors], DTYPE_CODES[tensors[0].dtype]
        k = karcher_coefficients(ext.offset_gram(0, ptrs, code, tensors[0].numel()), len(tensors), weights, max_iter,
                               tol)
        if k is not None:
            target = kernel_output(out, tensors[0].shape)
            ext.linear_combination(target.data_ptr(), DTYPE_CODES[target.dtype], ptrs, k, code, target.numel())
            return deliver(target, out)
    return deliver(karcher_tensors([x.to(dtype) for x in tensors], weights, max_iter, tol), out)


def _karcher_into(out, tensors, weights, max_iter, tol) -> None:
    karcher_merge(list(tensors), list(weights), max_iter, tol, out=out)


def _karcher_fake(out, tensors, weights, max_iter, tol) -> None:
    return None


define("karcher_mean_(Tensor(a!) out, Tensor[] tensors, float[] weights, int max_iter, float tol) -> ()",
       _karcher_into, _karcher_fake)
karcher_mean_op = torch.ops.vfuse.karcher_mean_


def karcher_mean(tensors: Sequence[torch.Tensor], weights: float | Sequence[float] | None = None, *,
                 max_iter: int = 10, tol: float = 1e-5, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Karcher mean of ``tensors`` (equal weights by default, as mergekit's ``karcher``;
    module docstring); the result in ``out``, or a new tensor of the first one's dtype.

    >>> karcher_mean([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])])
    tensor([1.4142, 1.4142])
    """
    tensors = check_tensor_list("tensors", tensors)
    weights = per_model("weights", 1.0 / len(tensors) if weights is None else weights, len(tensors))
    max_iter = check_count("max_iter", max_iter, 0, 1 << 20)
    tol = check_real("tol", tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    check_out(out, tensors[0])
    return run_into(karcher_mean_op, out, tensors[0], tensors, weights, max_iter, tol)
