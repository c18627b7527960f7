"""vfuse_kernels: fused kernels for training-free fusion of multimodal LLMs.

>>> import torch, vfuse_kernels as vk
>>> vk.delta_merge(torch.zeros(3), [torch.ones(3)], 0.5)
tensor([0.5000, 0.5000, 0.5000])
"""
from .ops import (METHODS, MagnitudeThresholds, delta_merge, delta_merge_foreach, magnitude_threshold,
                  ties_thresholds)
from .ops import (cls_attention, encoder_budgets, project_concat, query_key_scores, select_encoder_tokens,
                  select_tokens)
from .patch import patch_llava, unpatch_llava

__version__ = "0.1.0"
__all__ = ["METHODS", "MagnitudeThresholds", "delta_merge", "delta_merge_foreach", "magnitude_threshold", "ties_thresholds",
           "project_concat", "query_key_scores", "cls_attention", "select_tokens", "select_encoder_tokens",
           "encoder_budgets", "patch_llava", "unpatch_llava"]
