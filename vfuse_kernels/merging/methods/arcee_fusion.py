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

Memory: torch ops a block of about 2^22 elements' rows at a time — the row KLs, the importance
at the sampled indices only, then the kept deltas straight into the output buffer — so the
fp32 temporaries are a block's, not the tensor's (mergekit's are the whole tensor's), with the
whole-tensor formula's bits (tests/test_merge_methods_sparse.py).
"""
from __future__ import annotations

import numpy as np
import torch

from ...ops.random_bits import random_bits
from . import TensorInputs, TensorMethod, register
from .gta import CHUNK

QUANTILE_SAMPLE_SIZE = 1_000_000
SOFTMAX_EPS = 1e-8


def fusion_kl(tuned: torch.Tensor, base: torch.Tensor, scratch: list[torch.Tensor]) -> torch.Tensor:
    """The per-row KL(softmax θ ‖ softmax b) (both smoothed by 1e-8), fp32, keepdim; the fp32
    temporaries in ``scratch`` (four buffers of at least the block's size, reused: no allocator
    churn), with torch's softmax, log and sum — the bits of the out-of-place formula."""
    t, b, p, q = (buffer[:tuned.numel()].view(tuned.shape) for buffer in scratch)
    torch.ops.aten._softmax.out(t.copy_(tuned), -1, False, out=p).add_(SOFTMAX_EPS)
    torch.ops.aten._softmax.out(b.copy_(base), -1, False, out=q).add_(SOFTMAX_EPS)
    return torch.sum(torch.div(p, q, out=t).log_().mul_(p), dim=-1, keepdim=True)


def sample_index(numel: int, seed: int, device) -> torch.Tensor:
    """The flat indices of the quantile sample of a tensor of more than 10⁶ elements."""
    bits = random_bits(QUANTILE_SAMPLE_SIZE, seed, 0, device)
    return torch.floor(bits.to(torch.float64) / 2.0**32 * numel).long().clamp_(max=numel - 1)


def quantile_threshold(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5·IQR of ``values`` (0-d tensor; the module docstring gives the rule). Sorted by
    numpy on the CPU (torch's CPU sort took 14 of this method's 31 s on a 0.5B merge), by torch
    elsewhere."""
    if values.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(values.numpy()))
    else:
        ordered = torch.sort(values).values
    q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32)
    q1, median, q3 = ordered[(q * (ordered.numel() - 1)).long().to(ordered.device)]
    return median + 1.5 * (q3 - q1)


def row_blocks(rows: int, cols: int) -> list[slice]:
    """Row ranges of about ``gta.CHUNK`` elements (the whole tensor up to that size), none a lone
    row out of several: torch reduces each row of a block on one thread, but splits a single
    long row across threads — the same row KL bits as the whole tensor's only without one."""
    step = rows if rows * cols <= CHUNK else max(2, CHUNK // max(cols, 1))
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] == 1:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, starts[1:] + [rows])]


def arcee_fusion_merge(inputs: TensorInputs) -> torch.Tensor:
    """b + (θ − b)·[importance ≥ threshold], a block of rows at a time: the row KLs, then the
    threshold from the importance at the sampled indices (all of them up to 10⁶ elements), then
    the kept deltas — fp32 temporaries of one block, not of the tensor. Into ``inputs.out``
    (rounded once) when given."""
    base = inputs.base
    tuned = inputs.tensors[1 - inputs.base_index]
    if base.numel() == 0:
        return base.float()
    cols = base.shape[-1] if base.dim() else 1
    base2, tuned2 = base.reshape(-1, cols), tuned.reshape(-1, cols)
    blocks = row_blocks(base2.shape[0], cols)
    block = max(rows.stop - rows.start for rows in blocks) * cols
    scratch = [torch.empty(block, dtype=torch.float32, device=base.device) for _ in range(4)]
    kl = torch.cat([fusion_kl(tuned2[rows], base2[rows], scratch) for rows in blocks])
    numel = base.numel()
    if numel > QUANTILE_SAMPLE_SIZE:
        index = sample_index(numel, inputs.seed, base.device)
        flat_base, flat_tuned = base.reshape(-1), tuned.reshape(-1)
        scores = (flat_tuned[index].float() - flat_base[index].float()).abs() * kl.reshape(-1)[index // cols]
    else:
        scores = ((tuned2.float() - base2.float()).abs() * kl).reshape(-1)
    threshold = quantile_threshold(scores)
    result = inputs.result_buffer()
    result2 = result.view(-1, cols)
    keep = torch.empty(block, dtype=torch.bool, device=base.device)
    for rows in blocks:
        n = (rows.stop - rows.start) * cols
        b, t, delta, score = (buffer[:n].view(-1, cols) for buffer in scratch)
        torch.sub(t.copy_(tuned2[rows]), b.copy_(base2[rows]), out=delta)
        kept = torch.ge(torch.abs(delta, out=score).mul_(kl[rows]), threshold, out=keep[:n].view(-1, cols))
        torch.add(b, delta.mul_(kept), out=result2[rows])
    return result


ARCEE_FUSION = register(TensorMethod(
    name="arcee_fusion",
    merge=arcee_fusion_merge,
    needs_base=True,
    min_models=2,
    max_models=2,
))
