"""Model Stock, ``model_stock`` (mergekit 0.1.5 semantics): the merge method over
``vk.model_stock`` (ops/model_stock.py states the math and where it runs). Imports no torch
until it merges (the CPU merge may run it without torch: ``merging/native.py``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import Param, TensorInputs, TensorMethod, is_bool, register

if TYPE_CHECKING:
    import torch


def model_stock_merge(inputs: TensorInputs) -> torch.Tensor:
    from ...ops.model_stock import model_stock_tensors

    tuned = [t for i, t in enumerate(inputs.tensors) if i != inputs.base_index]
    return model_stock_tensors(inputs.base, tuned, bool(inputs.shared["filter_wise"]), out=inputs.out)


MODEL_STOCK = register(TensorMethod(
    name="model_stock",
    merge=model_stock_merge,
    global_params={"filter_wise": Param(False, is_bool)},
    needs_base=True,
    min_models=3,  # the base and at least two others
))
