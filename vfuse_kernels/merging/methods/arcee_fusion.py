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

Memory: the row KLs are torch ops a block of rows at a time (about 2^18 elements on the CPU, in
buffers kept from tensor to tensor; 2^22 elsewhere), so the fp32 temporaries are a block's, not
the tensor's (mergekit's are the whole tensor's), with the whole-tensor formula's bits
(tests/test_merge_methods_sparse.py). The importance at the sampled indices and the kept deltas
are one pass each, straight from the inputs into the output buffer: C++ on the CPU
(csrc/cpu/arcee_fusion.cpp, the same fp32 operations in the same order), torch ops a block at
a time elsewhere.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from ..._backend import DTYPE_CODES, cpp_kernels_for
from ...ops._library import kernel_output
from ...ops.random_bits import MASK64, random_bits
from . import TensorInputs, TensorMethod, register
from .gta import CHUNK

QUANTILE_SAMPLE_SIZE = 1_000_000
SOFTMAX_EPS = 1e-8
CPU_BLOCK = 1 << 18  # elements per block of rows on the CPU: four fp32 buffers of it stay in the L2 caches
_cpu_scratch = threading.local()  # .buffers: this thread's four CPU block buffers, kept from tensor to tensor


def fusion_kl(tuned: torch.Tensor, base: torch.Tensor, scratch: list[torch.Tensor]) -> torch.Tensor:
    """The per-row KL(softmax θ ‖ softmax b) (both smoothed by 1e-8), fp32, keepdim; the fp32
    temporaries in ``scratch`` (four buffers of at least the block's size, reused: no allocator
    churn), with torch's softmax, log and sum — the bits of the out-of-place formula."""
    t, b, p, q = (buffer[:tuned.numel()].view(tuned.shape) for buffer in scratch)
    torch.ops.aten._softmax.out(t.copy_(tuned), -1, False, out=p).add_(SOFTMAX_EPS)
    torch.ops.aten._softmax.out(b.copy_(base), -1, False, out=q).add_(SOFTMAX_EPS)
    return torch.sum(torch.div(p, q, out=t).log_().mul_(p), dim=-1, keepdim=True)


def sample_index(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat indices of the quantile sample of a tensor of more than 10⁶ elements, from its draws."""
    return torch.floor(bits.to(torch.float64) / 2.0**32 * numel).long().clamp_(max=numel - 1)


def quantile_threshold(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5·IQR of ``values`` (0-d tensor; the module docstring gives the rule). Sorted by
    numpy on the CPU (torch's CPU sort took 14 of this method's 31 s on a 0.5B merge; numpy's
    partition at three positions takes 19 ms for 10⁶ values, its sort 2–5), by torch elsewhere."""
    if values.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(values.numpy()))
    else:
        ordered = torch.sort(values).values
    q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32)
    q1, median, q3 = ordered[(q * (ordered.numel() - 1)).long().to(ordered.device)]
    return median + 1.5 * (q3 - q1)


def row_blocks(rows: int, cols: int, block: int = CHUNK) -> list[slice]:
    """Row ranges of about ``block`` elements (the whole tensor up to that size), none a lone
    row out of several: torch reduces each row of a block on one thread, but splits a single
    long row across threads — the same row KL bits as the whole tensor's only without one."""
    step = rows if rows * cols <= block else max(2, block // max(cols, 1))
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] == 1:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, starts[1:] + [rows])]


def cpu_scratch(elements: int) -> list[torch.Tensor]:
    """Four fp32 CPU buffers of ``elements`` for the KL's blocks: those of up to CPU_BLOCK elements
    are kept from call to call (fresh ones cost a page fault per 4 KiB, every tensor)."""
    if elements > CPU_BLOCK:
        return [torch.empty(elements, dtype=torch.float32) for _ in range(4)]
    if not hasattr(_cpu_scratch, "buffers"):
        _cpu_scratch.buffers = [torch.empty(CPU_BLOCK, dtype=torch.float32) for _ in range(4)]
    return _cpu_scratch.buffers


def arcee_fusion_merge(inputs: TensorInputs) -> torch.Tensor:
    """b + (θ − b)·[importance ≥ threshold]: the row KLs a block of rows at a time, then the
    threshold from the importance at the sampled indices (all of them up to 10⁶ elements), then
    the kept deltas. On the CPU the importance and the result are C++ passes (``arcee_scores``,
    ``arcee_apply``: the torch operations in their order, one pass each); elsewhere torch ops a
    block at a time — fp32 temporaries of one block, not of the tensor. Into ``inputs.out``
    (rounded once) when it can."""
    base = inputs.base
    tuned = inputs.tensors[1 - inputs.base_index]
    if base.numel() == 0:
        return base.float()
    cols = base.shape[-1] if base.dim() else 1
    base2, tuned2 = base.reshape(-1, cols), tuned.reshape(-1, cols)
    on_cpu = base.device.type == "cpu"
    blocks = row_blocks(base2.shape[0], cols, CPU_BLOCK if on_cpu else CHUNK)
    block = max(rows.stop - rows.start for rows in blocks) * cols
    scratch = cpu_scratch(block) if on_cpu else \
        [torch.empty(block, dtype=torch.float32, device=base.device) for _ in range(4)]
    kl = torch.cat([fusion_kl(tuned2[rows], base2[rows], scratch) for rows in blocks])
    numel = base.numel()
    ext = cpp_kernels_for([base, tuned])
    if ext is not None:
        code = DTYPE_CODES[base.dtype]
        scores = torch.empty(min(numel, QUANTILE_SAMPLE_SIZE), dtype=torch.float32)
        ext.arcee_scores(scores.data_ptr(), base.data_ptr(), tuned.data_ptr(), code, numel, kl.data_ptr(), cols,
                         inputs.seed & MASK64, scores.numel())
        result = kernel_output(inputs.out, base.shape)
        ext.arcee_apply(result.data_ptr(), DTYPE_CODES[result.dtype], base.data_ptr(), tuned.data_ptr(), code, numel,
                        kl.data_ptr(), cols, float(quantile_threshold(scores)))
        return result
    if numel > QUANTILE_SAMPLE_SIZE:
        index = sample_index(random_bits(QUANTILE_SAMPLE_SIZE, inputs.seed, 0, base.device), numel)
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
