"""``model_stock(base, tuned)``: Model Stock, mergekit 0.1.5's ``model_stock``.

Base w₀, fine-tuned w₁…w_N (N ≥ 2), offsets oᵢ = wᵢ − w₀. Over "rows" — the whole flattened
tensor, or with ``filter_wise`` each vector along the last dim (a 1-D tensor is one row either
way):

    cos = mean over pairs i < j of clamp(⟨oᵢ, oⱼ⟩ / max(‖oᵢ‖·‖oⱼ‖, 1e-6), −1, 1)
    t   = N·cos / (1 + (N − 1)·cos), or 0 where |1 + (N − 1)·cos| < 1e-6
    out = t·mean(w₁…w_N) + (1 − t)·w₀

The singular case keeps the base for that row. On the CPU (whole-tensor rows, 2 to 4 models,
one storage dtype) two C++ passes compute it (csrc/cpu/model_stock.cpp): the offsets' Gram
matrix with fp64 sums, then the blend in fp32 in mergekit's order — the one deliberate
difference: cos and t come from fp64 sums rather than fp32 ones (results within fp32 rounding
of mergekit's); elsewhere torch ops compute mergekit's fp32 arithmetic.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import DTYPE_CODES, cpp_kernels_for
from ..gram import NORM_PRODUCT_MIN, SINGULAR_EPS, model_stock_t
from ._checks import check_out, check_tensor, check_tensor_list
from ._library import define, deliver, kernel_output, run_into

def model_stock_tensors(base: torch.Tensor, tuned: list[torch.Tensor], filter_wise: bool,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """The Model Stock merge (module docstring): in ``out`` when given, else an fp32 tensor of base's shape."""
    ext = cpp_kernels_for([base, *tuned]) if 2 <= len(tuned) <= 4 else None
    if ext is not None and (not filter_wise or base.dim() < 2):
        # C++: the Gram matrix in one pass (fp64 sums), the blend in a second (fp32, mergekit's order)
        ptrs, code = [t.data_ptr() for t in tuned], DTYPE_CODES[base.dtype]
        t = model_stock_t(ext.offset_gram(base.data_ptr(), ptrs, code, base.numel()), len(tuned))
        target = kernel_output(out, base.shape)
        ext.stock_blend(target.data_ptr(), DTYPE_CODES[target.dtype], base.data_ptr(), ptrs, code, base.numel(), t)
        return deliver(target, out)
    w0 = base.float()
    ws = [t.float() for t in tuned]
    shape = w0.shape
    if filter_wise:
        if w0.dim() < 2:
            w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_MIN)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    t = torch.where(singular, torch.zeros_like(cos),
                    n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / n
    return deliver((t * average + (1 - t) * w0).reshape(shape), out)


def _model_stock_into(out, base, tuned, filter_wise) -> None:
    model_stock_tensors(base, list(tuned), filter_wise, out=out)


def _model_stock_fake(out, base, tuned, filter_wise) -> None:
    return None


define("model_stock_(Tensor(a!) out, Tensor base, Tensor[] tuned, bool filter_wise) -> ()", _model_stock_into,
       _model_stock_fake)
model_stock_op = torch.ops.vfuse.model_stock_


def model_stock(base: torch.Tensor, tuned: Sequence[torch.Tensor], *, filter_wise: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Model Stock of at least two fine-tunes of ``base`` (module docstring); the result in
    ``out``, or a new tensor of base's dtype.

    >>> model_stock(torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    tensor([0., 0.])
    """
    check_tensor("base", base)
    tuned = check_tensor_list("tuned", tuned, base, least=2)
    if not isinstance(filter_wise, bool):
        raise TypeError(f"filter_wise must be a bool, got {type(filter_wise).__name__}")
    check_out(out, base)
    return run_into(model_stock_op, out, base, base, tuned, filter_wise)
