"""Model Stock, ``model_stock`` (mergekit 0.1.5 semantics).

Base w₀, fine-tuned w₁…w_N (N ≥ 2), offsets oᵢ = wᵢ − w₀. Over "rows" — the whole
flattened tensor, or with ``filter_wise`` each vector along the last dim (a 1-D tensor is
one row either way):

    cos = mean over pairs i < j of clamp(⟨oᵢ, oⱼ⟩ / max(‖oᵢ‖·‖oⱼ‖, 1e-6), −1, 1)
    t   = N·cos / (1 + (N − 1)·cos), or 0 where |1 + (N − 1)·cos| < 1e-6
    out = t·mean(w₁…w_N) + (1 − t)·w₀

The singular case keeps the base for that row. On the CPU (whole-tensor rows, 2 to 4 models, one
storage dtype) two C++ passes compute it (csrc/cpu/model_stock.cpp): the offsets' Gram matrix
with fp64 sums, then the blend in fp32 in mergekit's order — the one deliberate difference:
cos and t come from fp64 sums rather than fp32 ones (results within fp32 rounding of
mergekit's); elsewhere the torch path below is mergekit's arithmetic.
"""
from __future__ import annotations

import math

import torch

from ..._backend import DTYPE_CODES
from . import Param, TensorInputs, TensorMethod, cpp_kernels_for, register
from .gta import is_bool

NORM_PRODUCT_MIN = 1e-6
SINGULAR_EPS = 1e-6


def _stock_kernels(base: torch.Tensor, tuned: list[torch.Tensor]):
    """The C++ extension when it can take the tensors as they are (2 to 4 models besides the
    base), else None."""
    return cpp_kernels_for([base, *tuned]) if 2 <= len(tuned) <= 4 else None


def _stock_t(gram: list[float], n: int) -> float:
    """t from the offsets' Gram matrix (upper triangle, row-major): mergekit's formula in fp64."""
    index, entry = {}, iter(gram)
    for i in range(n):
        for j in range(i, n):
            index[i, j] = next(entry)
    norms = [math.sqrt(index[i, i]) for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(max(-1.0, min(1.0, index[i, j] / max(norms[i] * norms[j], NORM_PRODUCT_MIN))) for i, j in pairs)
    cos /= len(pairs)
    denominator = 1 + (n - 1) * cos
    return 0.0 if abs(denominator) < SINGULAR_EPS else n * cos / denominator


def model_stock_merge(inputs: TensorInputs) -> torch.Tensor:
    tuned = [t for i, t in enumerate(inputs.tensors) if i != inputs.base_index]
    ext = _stock_kernels(inputs.base, tuned)
    if ext is not None and (not bool(inputs.shared["filter_wise"]) or inputs.base.dim() < 2):
        # C++: the Gram matrix in one pass (fp64 sums), the blend in a second (fp32, mergekit's order)
        ptrs, code = [t.data_ptr() for t in tuned], DTYPE_CODES[inputs.base.dtype]
        t = _stock_t(ext.offset_gram(inputs.base.data_ptr(), ptrs, code, inputs.base.numel()), len(tuned))
        out = torch.empty(inputs.base.shape, dtype=torch.float32)
        ext.stock_blend(out.data_ptr(), inputs.base.data_ptr(), ptrs, code, inputs.base.numel(), t)
        return out
    w0 = inputs.base.float()
    ws = [t.float() for t in tuned]
    shape = w0.shape
    if bool(inputs.shared["filter_wise"]):
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
    return (t * average + (1 - t) * w0).reshape(shape)


MODEL_STOCK = register(TensorMethod(
    name="model_stock",
    merge=model_stock_merge,
    global_params={"filter_wise": Param(False, is_bool)},
    needs_base=True,
    min_models=3,  # the base and at least two others
))
