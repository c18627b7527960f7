"""vfuse_kernels: fused kernels for training-free fusion of multimodal LLMs.

>>> import torch, vfuse_kernels as vk
>>> vk.delta_merge(torch.zeros(3), [torch.ones(3)], 0.5)
tensor([0.5000, 0.5000, 0.5000])

The names below are imported on first use, so ``vfuse --help`` and the merge path load
only what they need (``import vfuse_kernels.ops`` registers the ``torch.ops.vfuse`` ops).
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"
_SOURCES = {name: ".ops" for name in (
    "METHODS", "MagnitudeThresholds", "delta_merge", "delta_merge_foreach", "magnitude_threshold", "ties_thresholds",
    "project_concat", "query_key_scores", "cls_attention", "select_tokens", "select_encoder_tokens",
    "encoder_budgets", "slerp", "nuslerp", "multislerp", "nearswap", "karcher_mean", "model_stock")}
_SOURCES.update(patch_llava=".patch", unpatch_llava=".patch")
__all__ = list(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _SOURCES)
