"""Model Stock, ``model_stock`` (mergekit 0.1.5 semantics).

Base w₀, fine-tuned w₁…w_N (N ≥ 2), offsets oᵢ = wᵢ − w₀. Over "rows" — the whole
flattened tensor, or with ``filter_wise`` each vector along the last dim (a 1-D tensor is
one row either way):

    cos = mean over pairs i < j of clamp(⟨oᵢ, oⱼ⟩ / max(‖oᵢ‖·‖oⱼ‖, 1e-6), −1, 1)
    t   = N·cos / (1 + (N − 1)·cos), or 0 where |1 + (N − 1)·cos| < 1e-6
    out = t·mean(w₁…w_N) + (1 − t)·w₀

The singular case keeps the base for that row. No deliberate differences from mergekit
(computed in float32).
"""
from __future__ import annotations

import torch

from . import Param, TensorInputs, TensorMethod, register
from .gta import is_bool

NORM_PRODUCT_MIN = 1e-6
SINGULAR_EPS = 1e-6


def model_stock_merge(inputs: TensorInputs) -> torch.Tensor:
    w0 = inputs.base.float()
    ws = [t.float() for i, t in enumerate(inputs.tensors) if i != inputs.base_index]
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
