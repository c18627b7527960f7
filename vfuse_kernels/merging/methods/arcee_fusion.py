"""Arcee Fusion, ``arcee_fusion`` (mergekit 0.1.5 semantics): exactly one model θ besides
the base b.

    P = softmax(θ) + 1e-8, Q = softmax(b) + 1e-8          (along the last dim)
    KL = Σ P·log(P/Q) along the last dim (one value per row)
    importance s = |θ − b| · KL
    threshold = median + 1.5·(q₃ − q₁), the quantiles read from the sorted s at index
                floor(q·(N − 1)), q ∈ {0.25, 0.5, 0.75} (q·(N − 1) in float32)
    result = b + (θ − b)·[s ≥ threshold]

N is numel(s); above 1,000,000 elements the quantiles are read from a sample of 1,000,000
elements drawn with replacement.

Deliberate difference from mergekit: that sample's indices come from our Philox stream, not
torch.randint: sample j takes element floor(u_j·numel) with u_j = bits_j / 2^32 (float64),
bits = ``random_bits(1_000_000, seed, 0)`` (DARE's Philox stream) — reproducible on CPU and CUDA for the same
(seed, tensor name). At or below 1,000,000 elements the result equals mergekit's.
"""
from __future__ import annotations

import torch

from ...ops.random_bits import random_bits
from . import TensorInputs, TensorMethod, register

QUANTILE_SAMPLE_SIZE = 1_000_000
SOFTMAX_EPS = 1e-8


def fusion_importance(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − b| times the per-row KL(softmax θ ‖ softmax b) (both smoothed by 1e-8)."""
    p = torch.softmax(tuned, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (tuned - base).abs() * kl


def fusion_threshold(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """median + 1.5·IQR of ``scores`` (0-d tensor; see the module docstring for the rule)."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        bits = random_bits(QUANTILE_SAMPLE_SIZE, seed, 0, flat.device)
        index = torch.floor(bits.to(torch.float64) / 2.0**32 * flat.numel()).long().clamp_(max=flat.numel() - 1)
        flat = flat[index]
    ordered = torch.sort(flat).values
    q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32)
    q1, median, q3 = ordered[(q * (ordered.numel() - 1)).long().to(ordered.device)]
    return median + 1.5 * (q3 - q1)


def arcee_fusion_merge(inputs: TensorInputs) -> torch.Tensor:
    base = inputs.base.float()
    tuned = inputs.tensors[1 - inputs.base_index].float()
    scores = fusion_importance(tuned, base)
    keep = scores >= fusion_threshold(scores, inputs.seed)
    return base + (tuned - base) * keep


ARCEE_FUSION = register(TensorMethod(
    name="arcee_fusion",
    merge=arcee_fusion_merge,
    needs_base=True,
    min_models=2,
    max_models=2,
))
