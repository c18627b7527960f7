"""vfuse_kernels: fused kernels for training-free fusion of multimodal LLMs.

>>> import torch, vfuse_kernels as vk
>>> vk.delta_merge(torch.zeros(3), [torch.ones(3)], 0.5)
tensor([0.5000, 0.5000, 0.5000])
"""
from .ops import METHODS, MagnitudeThresholds, delta_merge, magnitude_threshold, ties_thresholds

__version__ = "0.1.0"
__all__ = ["METHODS", "MagnitudeThresholds", "delta_merge", "magnitude_threshold", "ties_thresholds"]
