"""``passthrough``: one input's tensor as it is, optionally scaled (mergekit 0.1.5 semantics).

The frankenmerge method: with ``slices:`` each output layer comes from one source layer.
``scale`` (per model, the base included) multiplies the tensor when given.
"""
from __future__ import annotations

import torch

from . import Param, TensorInputs, TensorMethod, register


def passthrough(inputs: TensorInputs) -> torch.Tensor:
    """θ = scale·θ₀ (θ₀ itself without a scale)."""
    (tensor,), (params,) = inputs.tensors, inputs.params
    scale = params.get("scale")
    return tensor if scale is None else tensor.float() * float(scale)


register(TensorMethod("passthrough", passthrough, model_params={"scale": Param(default=None, scope="input")},
                      min_models=1, max_models=1))
