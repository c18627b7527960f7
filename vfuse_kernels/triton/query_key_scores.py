"""Triton kernels of ``query_key_scores``: mean attention each key receives, tile by tile.

``scores[b, n] = 1/(H·Lq) · Σ_h Σ_i softmax_n(q[b,h,i]·k[b,h,:]ᵀ·scale)`` without ever holding
the [B, H, Lq, Nk] matrix — two passes over the keys, as FlashAttention's forward without V:

1. ``_row_lse_kernel`` (grid: query tiles × B·H): online softmax over all key tiles → the
   base-2 log-sum-exp of every query row, [B, H, Lq] fp32;
2. ``_key_scores_kernel`` (grid: key tiles × B × head splits): recomputes each [BM, BN]
   logit tile, p = exp2(s − lse) and sums it over queries and the split's heads into a
   register accumulator; the head splits' partial sums ([B, S, Nk] fp32) are added on the
   host, so the result is deterministic (no atomics). S is chosen to fill the GPU.

Grouped-query attention: k may have H/G heads; query head h reads key head h // G.
Logits use tl.dot with fp32 accumulation (``ieee`` for fp32 inputs); under the interpreter
the tiles are upcast to fp32 right after loading (it mishandles bf16 arithmetic).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

LOG2E = 1.4426950408889634
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
INTERPRET_BLOCK = 16
TARGET_PROGRAMS = 528  # 4 waves of an H100's 132 SMs


@triton.jit
def _load_tile(ptrs, rows_ok, d_ok, UPCAST: tl.constexpr):
    tile = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _logits(q, k, col_ok, qk_scale, PREC: tl.constexpr):
    """One [BM, BN] tile of q·kᵀ·scale·log2(e) in fp32; invalid keys → −inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _row_lse_kernel(q_ptr, k_ptr, lse_ptr, sqb, sqh, sql, skb, skh, skn, H, Lq, Nk, D, GROUP, qk_scale,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    row_ok = rm < Lq
    d_ok = rd < D
    q = _load_tile(q_ptr + b * sqb + h.to(tl.int64) * sqh + rm[:, None].to(tl.int64) * sql + rd[None, :], row_ok,
                   d_ok, UPCAST)
    k_base = k_ptr + b * skb + hk * skh + rd[None, :]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for n0 in range(0, Nk, BN):
        rn = n0 + tl.arange(0, BN)
        col_ok = rn < Nk
        k = _load_tile(k_base + rn[:, None].to(tl.int64) * skn, col_ok, d_ok, UPCAST)
        s = _logits(q, k, col_ok, qk_scale, PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log2(l_i)
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + rm, lse, mask=row_ok)


@triton.jit
def _key_scores_kernel(q_ptr, k_ptr, lse_ptr, partial_ptr, sqb, sqh, sql, skb, skh, skn, H, Lq, Nk, D,
                       GROUP, HEADS_PER_SPLIT, SPLITS, qk_scale,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr,
                       PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rd = tl.arange(0, BD)
    col_ok = rn < Nk
    d_ok = rd < D
    acc = tl.zeros([BN], tl.float32)
    h_start = split * HEADS_PER_SPLIT
    h_end = tl.minimum(h_start + HEADS_PER_SPLIT, H)
    for h in range(h_start, h_end):
        hk = h // GROUP  # h·strides stay far below 2^31; b (int64) carries the large offsets
        k = _load_tile(k_ptr + b * skb + hk * skh + rn[:, None].to(tl.int64) * skn + rd[None, :], col_ok, d_ok,
                       UPCAST)
        q_base = q_ptr + b * sqb + h * sqh + rd[None, :]
        lse_base = lse_ptr + (b * H + h) * Lq
        for m0 in range(0, Lq, BM):
            rm = m0 + tl.arange(0, BM)
            row_ok = rm < Lq
            q = _load_tile(q_base + rm[:, None].to(tl.int64) * sql, row_ok, d_ok, UPCAST)
            s = _logits(q, k, col_ok, qk_scale, PREC)
            lse = tl.load(lse_base + rm, mask=row_ok, other=float("inf"))
            p = tl.exp2(s - lse[:, None])
            acc += tl.sum(tl.where(row_ok[:, None], p, 0.0), axis=0)
    tl.store(partial_ptr + (b * SPLITS + split) * Nk + rn, acc, mask=col_ok)


def block_sizes(d: int) -> tuple[int, int, int]:
    """(BM, BN, BD) for head dim d."""
    bd = max(16, triton.next_power_of_2(d))
    if triton_interpreted():
        return INTERPRET_BLOCK, INTERPRET_BLOCK, bd
    return BLOCK_M, BLOCK_N, bd


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or triton_interpreted() else "tf32"


def query_key_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Nk] fp32 scores of q [B, H, Lq, d] against k [B, H/G, Nk, d] (any batch/head/token strides)."""
    batch, heads, lq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(batch, nk, dtype=torch.float32, device=q.device)
    if batch == 0 or nk == 0:
        return out
    bm, bn, bd = block_sizes(d)
    interpreted = triton_interpreted()
    common = dict(BD=bd, UPCAST=interpreted, PREC=precision(q.dtype))
    launch = {} if interpreted else dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=True)
    group = heads // k.shape[1]
    qk_scale = float(scale) * LOG2E
    q = q if q.stride(3) == 1 else q.contiguous()  # unit channel stride: vector loads
    k = k if k.stride(3) == 1 else k.contiguous()
    q_strides, k_strides = q.stride()[:3], k.stride()[:3]
    lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
    _row_lse_kernel[(triton.cdiv(lq, bm), batch * heads)](
        q, k, lse, *q_strides, *k_strides, heads, lq, nk, d, group, qk_scale, BM=bm, BN=bn, **common, **launch)
    key_tiles = triton.cdiv(nk, bn)
    splits = min(heads, max(1, math.ceil(TARGET_PROGRAMS / (key_tiles * batch))))
    heads_per_split = triton.cdiv(heads, splits)
    splits = triton.cdiv(heads, heads_per_split)
    partial = torch.empty(batch, splits, nk, dtype=torch.float32, device=q.device)
    _key_scores_kernel[(key_tiles, batch, splits)](
        q, k, lse, partial, *q_strides, *k_strides, heads, lq, nk, d, group, heads_per_split, splits, qk_scale,
        BM=bm, BN=bn, **common, **launch)
    return torch.sum(partial, dim=1, out=out).div_(heads * lq)
