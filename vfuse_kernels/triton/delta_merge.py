"""Triton kernels of the fused delta merge (GPU path; CPU under TRITON_INTERPRET=1).

One pass per merge: each program loads a block of base and of every tuned tensor once,
computes the sparsified deltas, the sign election and the combination in fp32 registers
and stores the output once (DESIGN.md §2.1; formulas in ops/delta_merge.py).
``enable_fp_fusion=False`` keeps every rounding step identical to the reference, so the
discrete decisions (trim, vote, agreement) match it bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .magnitude_select import load_delta, magnitude_select  # noqa: F401  (re-exported launcher)
from .philox import dare_bits

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def sparse_delta(tuned_ptr, b, offs, mask, start, model, keep_a_ptr, keep_b_ptr, seed_ptr,
                 SPARSIFY: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, BLOCK: tl.constexpr):
    """(δ, keep) of one model on one block: trim keeps key > K or (key == K and e <= C);
    drop keeps random bits < threshold."""
    delta = load_delta(tuned_ptr, b, offs, mask, TUNED_ARE_DELTAS)
    if SPARSIFY == 1:
        key = (delta.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        threshold = tl.load(keep_a_ptr + model)
        keep = (key > threshold) | ((key == threshold) & (offs <= tl.load(keep_b_ptr + model)))
    elif SPARSIFY == 2:
        keep = dare_bits(seed_ptr, model, start, BLOCK).to(tl.int64) < tl.load(keep_a_ptr + model)
    else:
        keep = tl.full([BLOCK], 1, tl.int1)
    return delta, keep


@triton.jit
def _merge_kernel(out_ptr, base_ptr, tuned, coef_ptr, weight_ptr, keep_a_ptr, keep_b_ptr, seed_ptr,
                  numel, scale, weight_sum,
                  N: tl.constexpr, N_PAD: tl.constexpr, SPARSIFY: tl.constexpr, ELECT: tl.constexpr,
                  NORMALIZE: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rows = tl.arange(0, N_PAD)[:, None]
    stacked = tl.zeros([N_PAD, BLOCK], dtype=tl.float32)  # uᵢ kept for the agreement pass
    vote = tl.zeros([BLOCK], dtype=tl.float32)
    merged = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        delta, keep = sparse_delta(tuned[i], b, offs, mask, start, i, keep_a_ptr, keep_b_ptr, seed_ptr,
                                   SPARSIFY, TUNED_ARE_DELTAS, BLOCK)
        u = tl.where(keep, delta * tl.load(coef_ptr + i), 0.0)
        if ELECT == 0:
            merged += u
        else:
            if ELECT == 1:
                vote += u
            else:
                vote += (u > 0).to(tl.float32) - (u < 0).to(tl.float32)
            stacked = tl.where(rows == i, u[None, :], stacked)
    if ELECT == 0:
        divisor = weight_sum
    else:
        positive = vote >= 0
        divisor = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(N):
            u = tl.sum(tl.where(rows == i, stacked, 0.0), axis=0)
            agree = tl.where(positive, u > 0, u < 0)
            merged += tl.where(agree, u, 0.0)
            divisor += tl.where(agree, tl.load(weight_ptr + i), 0.0)
    if NORMALIZE:
        merged = merged / tl.where(divisor == 0, 1.0, divisor)
    result = b + scale * merged
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_l1_kernel(partial_ptr, base_ptr, tuned, keep_a_ptr, keep_b_ptr, seed_ptr, numel,
                      N: tl.constexpr, SPARSIFY: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for i in tl.static_range(N):
        delta, keep = sparse_delta(tuned[i], b, offs, mask, start, i, keep_a_ptr, keep_b_ptr, seed_ptr,
                                   SPARSIFY, TUNED_ARE_DELTAS, BLOCK)
        magnitude = tl.abs(delta)
        tl.store(partial_ptr + (pid * N + i) * 2, tl.sum(magnitude, axis=0))
        tl.store(partial_ptr + (pid * N + i) * 2 + 1, tl.sum(tl.where(keep, magnitude, 0.0), axis=0))


def _seed_words(seed: int, device) -> torch.Tensor:
    return torch.tensor([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], dtype=torch.int64, device=device)


def sparse_l1(base, tuned, tuned_are_deltas, sparsify, keep_a, keep_b, seed):
    """[N, 2] fp64: Σ|δᵢ| and Σ kept |δᵢ| (per-block fp32 sums added in fp64)."""
    n, numel = len(tuned), base.numel()
    grid = triton.cdiv(numel, BLOCK)
    partial = torch.empty(grid, n, 2, dtype=torch.float32, device=base.device)
    _sparse_l1_kernel[(grid,)](
        partial, base, tuple(tuned), keep_a, keep_b, _seed_words(seed, base.device), numel,
        N=n, SPARSIFY=sparsify, TUNED_ARE_DELTAS=tuned_are_deltas, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return partial.double().sum(dim=0)


def merge(out, base, tuned, tuned_are_deltas, sparsify, keep_a, keep_b, seed, coefs, weights, elect, normalize,
          scale):
    """Writes the merge of contiguous ``base``/``tuned`` into contiguous ``out``."""
    n, numel = len(tuned), base.numel()
    weight_sum = float(torch.tensor(weights, dtype=torch.float32).double().sum())
    weights = torch.tensor(weights, dtype=torch.float32, device=base.device)
    _merge_kernel[(triton.cdiv(numel, BLOCK),)](
        out, base, tuple(tuned), coefs, weights, keep_a, keep_b, _seed_words(seed, base.device), numel,
        float(scale), weight_sum,
        N=n, N_PAD=triton.next_power_of_2(n), SPARSIFY=sparsify, ELECT=elect, NORMALIZE=normalize,
        TUNED_ARE_DELTAS=tuned_are_deltas, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
