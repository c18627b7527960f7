"""Triton kernel of ``select_tokens``: an exact order-preserving top-k per row in one launch.

One program per row of scores [B, N] (fp32, bf16 or fp16), for one or several score tensors
(one per encoder) in one launch:

1. every score becomes an integer key with the same order: the fp32 bit pattern, negative
   values' magnitude bits flipped, −0.0 mapped to +0.0 and NaN below −inf; bf16/fp16 scores,
   whose fp32 forms have 16/13 low zero bits, are shifted right by that many bits, so their
   keys span 2^16 / 2^19 values instead of 2^32;
2. a 4-way search over the key range finds v, the k-th largest key: each step counts the keys
   ≥ 3 thresholds at once (one [BLOCK, 4] compare and one reduction) and keeps the quarter
   where the count crosses k — 16 steps for fp32, 8 for bf16, 10 for fp16, no sort;
3. kept = keys > v, plus the first k − #(keys > v) of the keys equal to v in index order (a
   prefix count), so ties go to the lower index exactly; each kept index is stored at its
   prefix-count position, which keeps ascending order.

Rows of at most ``MAX_BLOCK`` scores stay in registers; longer rows are walked in chunks of
``MAX_BLOCK`` (each search step re-reads them from L1/L2, the final pass carries the counts
from chunk to chunk). No atomics, no host sync, deterministic.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

MAX_BLOCK = 4096  # longest row held in registers (8 warps: 16 keys per thread)
KEY_SHIFT = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}  # low bits that are 0 in the fp32 form


@triton.jit
def _keys(row_ptr, offs, n, stride, SHIFT: tl.constexpr):
    """int64 keys ordered like the scores at ``offs`` (NaN lowest); padding below every key."""
    ok = offs < n
    x = tl.load(row_ptr + offs.to(tl.int64) * stride, mask=ok, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)  # −0.0 ties with +0.0
    bits = x.to(tl.int32, bitcast=True)
    key = (tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) >> SHIFT).to(tl.int64)
    nan_key = tl.full([], -(1 << (31 - SHIFT)), tl.int64)
    key = tl.where(x != x, nan_key, key)
    return tl.where(ok, key, nan_key - 1)


@triton.jit
def _count_at_least(keys, thresholds):
    """[4] int32: how many ``keys`` are ≥ each of ``thresholds``."""
    return tl.sum((keys[:, None] >= thresholds[None, :]).to(tl.int32), axis=0)


@triton.jit
def _select_row(row_ptr, out_row, N, K, stride_n, SHIFT: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr,
                ONE_CHUNK: tl.constexpr):
    """The k largest of one row's N scores, their ascending indices stored at ``out_row``."""
    offs = tl.arange(0, BLOCK)
    quarter = tl.arange(0, 4).to(tl.int64)
    if ONE_CHUNK:
        keys = _keys(row_ptr, offs, N, stride_n, SHIFT)
    # invariant: #(keys ≥ lo) ≥ K > #(keys ≥ lo + 4·step); the range starts at the NaN key
    lo = tl.full([], -(1 << (31 - SHIFT)), tl.int64)
    step = tl.full([], 1 << (2 * STEPS - 2), tl.int64)
    for _ in range(STEPS):
        thresholds = lo + step * quarter
        if ONE_CHUNK:
            counts = _count_at_least(keys, thresholds)
        else:
            counts = tl.zeros([4], tl.int32)
            for c0 in range(0, N, BLOCK):
                counts += _count_at_least(_keys(row_ptr, c0 + offs, N, stride_n, SHIFT), thresholds)
        lo += step * (tl.sum((counts >= K).to(tl.int64), axis=0) - 1)
        step = step >> 2
    # lo is now the k-th largest key: keep every key above it and the first `need` equal to it
    if ONE_CHUNK:
        need = K - tl.sum((keys > lo).to(tl.int32), axis=0)
    else:
        need = K
        for c0 in range(0, N, BLOCK):
            need -= tl.sum((_keys(row_ptr, c0 + offs, N, stride_n, SHIFT) > lo).to(tl.int32), axis=0)
    ties_before = 0
    written = 0
    for c0 in range(0, N, BLOCK):
        if ONE_CHUNK:
            chunk = keys
        else:
            chunk = _keys(row_ptr, c0 + offs, N, stride_n, SHIFT)
        tie = (chunk == lo).to(tl.int32)
        kept = (chunk > lo) | ((tie != 0) & (tl.cumsum(tie, axis=0) + ties_before <= need))
        position = tl.cumsum(kept.to(tl.int32), axis=0) - 1 + written
        tl.store(out_row + position, (c0 + offs).to(tl.int64), mask=kept)
        ties_before += tl.sum(tie, axis=0)
        written += tl.sum(kept.to(tl.int32), axis=0)


@triton.jit
def _select_kernel(scores, outs, ns, ks, strides_b, strides_n, M: tl.constexpr, SHIFT: tl.constexpr,
                   STEPS: tl.constexpr, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """Program (b, j): row b of the j-th [B, ns[j]] score tensor of the tuple ``scores`` (M of them) →
    its ks[j] indices in row b of ``outs[j]`` ([B, ks[j]] contiguous)."""
    row = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    for j in tl.static_range(M):
        if which == j:
            _select_row(scores[j] + row * strides_b[j], outs[j] + row * ks[j], ns[j], ks[j], strides_n[j],
                        SHIFT, STEPS, BLOCK, ONE_CHUNK)


@functools.lru_cache(maxsize=1024)
def launch_config(n: int, dtype: torch.dtype) -> dict:
    """Block, step count and warps for rows of up to ``n`` scores of ``dtype``."""
    block = min(max(16, triton.next_power_of_2(n)), MAX_BLOCK)
    shift = KEY_SHIFT[dtype]
    steps = (32 - shift + 1) // 2  # 4^steps ≥ 2^(32 − shift): the whole key range
    warps = {} if triton_interpreted() else {"num_warps": 4 if block <= 1024 else 8}
    return dict(SHIFT=shift, STEPS=steps, BLOCK=block, ONE_CHUNK=n <= block, **warps)


def select_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] int64: ascending indices of the k largest scores per row (1 ≤ k < N, B ≥ 1)."""
    return select_tokens_many([scores], [k])[0]


def select_tokens_many(scores: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """``select_tokens`` of every [B, Nⱼ] tensor of ``scores`` (one dtype, one B ≥ 1; 1 ≤ kⱼ < Nⱼ)
    in one launch: grid (B, len(scores))."""
    batch = scores[0].shape[0]
    outs = [torch.empty(batch, k, dtype=torch.int64, device=scores[0].device) for k in ks]
    _select_kernel[(batch, len(scores))](
        tuple(scores), tuple(outs), tuple(s.shape[1] for s in scores), tuple(ks), tuple(s.stride(0) for s in scores),
        tuple(s.stride(1) for s in scores), M=len(scores),
        **launch_config(max(s.shape[1] for s in scores), scores[0].dtype))
    return outs
