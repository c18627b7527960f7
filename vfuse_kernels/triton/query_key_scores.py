"""Triton kernels of ``query_key_scores``: the mean attention each key receives, tile by tile.

``scores[b, n] = 1/(H·Lq) · Σ_h Σ_i exp2(s[h,i,n] − lse[h,i])`` with ``s = q·kᵀ·scale·log2(e)``
and ``lse[h,i]`` the base-2 log-sum-exp of row i, without ever holding the [B, H, Lq, Nk]
matrix — two sweeps of q·kᵀ, the least work an exact answer needs (every key's share of a
row is only known once the whole row has been seen):

1. ``_row_lse_kernel`` (grid: query tiles × B·H): FlashAttention's forward without V — an online
   max / sum over all key tiles → lse [B, H, Lq] fp32. Half the tensor-core work of a flash
   forward (no P·V), which is why it is not taken from SDPA's flash op (that one also needs a
   V and computes P·V);
2. ``_key_sums_kernel`` (grid: key tiles × B × head splits): each program holds a [BN, d] tile of
   keys and streams the query tiles of its heads, computing the transposed tile
   ``sᵀ = k·qᵀ`` [BN, BM] so the sum over queries is a row sum (in-thread adds and a
   quad shuffle, like FlashAttention's row sum) rather than a reduction across warps; the head
   splits' partial sums [B, S, Nk] are added by one ``torch.sum``, so the result is
   deterministic (no atomics). S is chosen to fill the GPU.

Grouped-query attention: k may have H/G heads; query head h reads key head h // G (``repeat_kv``).
Extra memory: lse (4·B·H·Lq bytes) and the partial sums (4·B·S·Nk bytes, S ≤ H).

Tiles (not autotuned, there was no GPU to tune on): bf16/fp16 128 × 128 with 8 warps and
3 stages (q·kᵀ on wgmma on Hopper; 32 KiB per operand tile); fp32 uses exact fp32 dots
(``ieee``, no tf32) on 64 × 64 tiles. Full key tiles run without masks (``EVEN_N``). Under the
interpreter: 16-wide tiles, upcast to fp32 right after loading (it mishandles bf16 arithmetic).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

LOG2E = 1.4426950408889634
TILES = {"half": dict(BM=128, BN=128, num_warps=8, num_stages=3, enable_fp_fusion=True),  # bf16 / fp16
         "fp32": dict(BM=64, BN=64, num_warps=4, num_stages=2, enable_fp_fusion=True)}  # (FMA: s·scale − m)
INTERPRET_TILE = 16
TARGET_PROGRAMS = 528  # pass 2: at least 4 waves of an H100's 132 SMs


@triton.jit
def _load_rows(ptrs, rows_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, BD] tile; masked lanes read 0."""
    if MASK_ROWS and MASK_D:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_D:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _row_lse_kernel(q_ptr, k_ptr, lse_ptr, sqb, sqh, sql, skb, skh, skn, H, Lq, Nk, GROUP, qk_scale,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, EVEN_N: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    d_ok = rd < D
    q = _load_rows(q_ptr + b * sqb + h.to(tl.int64) * sqh + rm[:, None].to(tl.int64) * sql + rd[None, :], rm < Lq,
                   d_ok, True, BD != D, UPCAST)
    k_base = k_ptr + b * skb + hk * skh + rd[None, :]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    n_full = (Nk // BN) * BN
    for n0 in range(0, n_full, BN):
        rn = n0 + tl.arange(0, BN)
        k = _load_rows(k_base + rn[:, None].to(tl.int64) * skn, rn < Nk, d_ok, False, BD != D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    if not EVEN_N:  # the last, partial key tile: keys past Nk get −inf
        rn = n_full + tl.arange(0, BN)
        col_ok = rn < Nk
        k = _load_rows(k_base + rn[:, None].to(tl.int64) * skn, col_ok, d_ok, True, BD != D, UPCAST)
        s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + rm, m_i + tl.log2(l_i), mask=rm < Lq)


@triton.jit
def _key_sums_kernel(q_ptr, k_ptr, lse_ptr, partial_ptr, sqb, sqh, sql, skb, skh, skn, H, Lq, Nk, GROUP,
                     HEADS_PER_SPLIT, SPLITS, qk_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
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
        k = _load_rows(k_ptr + b * skb + hk * skh + rn[:, None].to(tl.int64) * skn + rd[None, :], col_ok, d_ok,
                       True, BD != D, UPCAST)
        q_base = q_ptr + b * sqb + h * sqh + rd[None, :]
        lse_base = lse_ptr + (b * H + h) * Lq
        for m0 in range(0, Lq, BM):
            rm = m0 + tl.arange(0, BM)
            row_ok = rm < Lq
            q = _load_rows(q_base + rm[:, None].to(tl.int64) * sql, row_ok, d_ok, True, BD != D, UPCAST)
            lse = tl.load(lse_base + rm, mask=row_ok, other=float("inf"))  # queries past Lq weigh exp2(−inf) = 0
            s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            acc += tl.sum(tl.exp2(s_t - lse[None, :]), axis=1)
    tl.store(partial_ptr + (b * SPLITS + split) * Nk + rn, acc, mask=col_ok)


def tiles(dtype: torch.dtype) -> dict:
    """Tile sizes and launch options for ``dtype`` (16-wide, no options under the interpreter)."""
    if triton_interpreted():
        return dict(BM=INTERPRET_TILE, BN=INTERPRET_TILE)
    return dict(TILES["fp32" if dtype == torch.float32 else "half"])


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or triton_interpreted() else "tf32"


def row_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H, Lq] fp32: base-2 log-sum-exp of every row of q·kᵀ·scale over all Nk ≥ 1 keys."""
    batch, heads, lq, d = q.shape
    nk = k.shape[2]
    cfg = tiles(q.dtype)
    bm, bn = cfg.pop("BM"), cfg.pop("BN")
    lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
    _row_lse_kernel[(triton.cdiv(lq, bm), batch * heads)](
        q, k, lse, *q.stride()[:3], *k.stride()[:3], heads, lq, nk, heads // k.shape[1], float(scale) * LOG2E,
        D=d, BM=bm, BN=bn, BD=max(16, triton.next_power_of_2(d)), EVEN_N=nk % bn == 0,
        UPCAST=triton_interpreted(), PREC=precision(q.dtype), **cfg)
    return lse


def key_sums(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Nk] fp32: Σ over heads and queries of exp2(q·kᵀ·scale·log2 e − lse)."""
    batch, heads, lq, d = q.shape
    nk = k.shape[2]
    cfg = tiles(q.dtype)
    bm, bn = cfg.pop("BM"), cfg.pop("BN")
    key_tiles = triton.cdiv(nk, bn)
    splits = min(heads, max(1, math.ceil(TARGET_PROGRAMS / (key_tiles * batch))))
    heads_per_split = triton.cdiv(heads, splits)
    splits = triton.cdiv(heads, heads_per_split)
    partial = torch.empty(batch, splits, nk, dtype=torch.float32, device=q.device)
    _key_sums_kernel[(key_tiles, batch, splits)](
        q, k, lse, partial, *q.stride()[:3], *k.stride()[:3], heads, lq, nk, heads // k.shape[1], heads_per_split,
        splits, float(scale) * LOG2E, D=d, BM=bm, BN=bn, BD=max(16, triton.next_power_of_2(d)),
        UPCAST=triton_interpreted(), PREC=precision(q.dtype), **cfg)
    return partial.sum(dim=1)


def query_key_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Nk] fp32 scores of q [B, H, Lq, d] against k [B, H/G, Nk, d] (any batch/head/token
    strides; a channel stride ≠ 1 is copied to 1 first). Needs B, Nk, Lq ≥ 1."""
    q = q if q.stride(3) == 1 else q.contiguous()  # unit channel stride: vector loads
    k = k if k.stride(3) == 1 else k.contiguous()
    return key_sums(q, k, row_lse(q, k, scale), scale).div_(q.shape[1] * q.shape[2])
