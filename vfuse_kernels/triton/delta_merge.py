"""Triton kernels of the fused delta merge (GPU path; CPU under TRITON_INTERPRET=1).

One pass per merge: each program loads a block of base and of every tuned tensor once,
computes the sparsified deltas, the sign election and the combination in fp32 registers
and stores the output once (DESIGN.md §2.1; formulas in ops/delta_merge.py).
``enable_fp_fusion=False`` keeps every rounding step identical to the reference, so the
discrete decisions (trim, vote, agreement) match it bit for bit.

Per-merge scalars travel in one small fp64 tensor (``params``: coefficients, weights, DARE
thresholds, seed words, the inverse divisors) copied from pinned memory without blocking, and
the TIES thresholds stay on the device where the selection left them: a launch never waits
for the GPU.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from .._backend import device_constants, host_to_device
from ..delta_rules import SPARSIFY_CODES
from ..selection import trim_thresholds
from .magnitude_select import load_base, load_delta, selector
from .philox import dare_bits

BLOCK = 1024
NUM_WARPS = 4
SPARSIFY_TRIM = SPARSIFY_CODES["trim"]
INVERSE_TABLE_MODELS = tl.constexpr(8)  # up to this many models, elected merges divide by a table of 2^N inverses
# ... picked from the table by a tree of selects on the agreement masks up to this many models (no dependent
# per-element load; sm_90 SASS, bf16, per thread of a 1024-element program: N = 2, 375 instructions against 378
# with the gather; N = 3, 546 against 539; N = 4, 741 against 689), by an indexed load past it. A launch
# parameter: the GPU suite times both.
INVERSE_SELECT_MODELS = 3


@triton.jit
def sparse_delta(tuned_ptr, b, lane, mask, start, model, params_ptr, trim_ptr,
                 N: tl.constexpr, SPARSIFY: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, BLOCK: tl.constexpr):
    """(δ, keep) of one model on one block: trim keeps key > K or (key == K and e <= C), i.e.
    key > K − [e <= C], in 32-bit compares (keys and K are < 2^31; C relative to the block,
    clamped); drop keeps random bits < threshold."""
    delta = load_delta(tuned_ptr + start, b, lane, mask, TUNED_ARE_DELTAS)
    if SPARSIFY == 1:
        key = delta.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        threshold = tl.load(trim_ptr + model).to(tl.int32)
        last = tl.minimum(tl.maximum(tl.load(trim_ptr + N + model) - start, -1), BLOCK).to(tl.int32)
        if (last < 0) | (last >= BLOCK - 1):  # every lane on one side of C (all blocks but one): one threshold
            keep = key > threshold - (last >= 0).to(tl.int32)
        else:
            keep = key > tl.where(lane <= last, threshold - 1, threshold)
    elif SPARSIFY == 2:
        k0 = tl.load(params_ptr + 3 * N).to(tl.int64).to(tl.uint32)
        k1 = tl.load(params_ptr + 3 * N + 1).to(tl.int64).to(tl.uint32)
        threshold = tl.load(params_ptr + 2 * N + model).to(tl.int64)
        keep = dare_bits(k0, k1, model, start, BLOCK).to(tl.int64) < threshold
    else:
        keep = tl.full([BLOCK], 1, tl.int1)
    return delta, keep


@triton.jit
def merged_block(b, lane, mask, start, tuned, table_row, params_ptr, trim_ptr,
                 N: tl.constexpr, SPARSIFY: tl.constexpr, ELECT: tl.constexpr,
                 NORMALIZE: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, FOREACH: tl.constexpr,
                 TUNED_TY: tl.constexpr, SELECT_MODELS: tl.constexpr, BLOCK: tl.constexpr):
    """combine(uᵢ) of one block in fp32, divided by the divisor when normalising; the tuned
    pointers come from the ``tuned`` tuple, or (FOREACH) from the tensor table's row. The
    quotient is the fp64 product with the divisor's inverse rounded to fp32, the IEEE quotient's
    bits (csrc/cpu/common.h, exact_quotient): without election one inverse for the block, with it
    the inverse of the agreeing models' weight sum, picked by their bit set from the table of
    all 2^N sums (``_inverse_table``): by a tree of selects on the agreement masks up to
    SELECT_MODELS models, else by an indexed load; past INVERSE_TABLE_MODELS models an IEEE
    division."""
    kept = ()  # uᵢ of every model, for the agreement pass
    vote = tl.zeros([BLOCK], dtype=tl.float32)
    merged = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        if FOREACH:
            tuned_ptr = tl.load(table_row + 2 + i).to(tl.pointer_type(TUNED_TY))
        else:
            tuned_ptr = tuned[i]
        delta, keep = sparse_delta(tuned_ptr, b, lane, mask, start, i, params_ptr, trim_ptr,
                                   N, SPARSIFY, TUNED_ARE_DELTAS, BLOCK)
        u = tl.where(keep, delta * tl.load(params_ptr + i).to(tl.float32), 0.0)
        if ELECT == 0:
            merged += u
        else:
            if ELECT == 1:
                vote += u
            else:
                vote += (u > 0).to(tl.float32) - (u < 0).to(tl.float32)
            kept = kept + (u,)
    if ELECT == 0:
        if NORMALIZE:
            merged = (merged.to(tl.float64) * tl.load(params_ptr + 3 * N + 2)).to(tl.float32)
    else:
        sign = tl.where(vote >= 0, 1.0, -1.0)  # agreeing: u > 0 where vote >= 0, else u < 0 (u·sign is exact)
        divisor = tl.zeros([BLOCK], dtype=tl.float32)
        agrees = ()  # model i agrees with the elected sign
        for i in tl.static_range(N):
            u = kept[i]
            agree = u * sign > 0
            merged += tl.where(agree, u, 0.0)
            agrees += (agree,)
            if N > INVERSE_TABLE_MODELS:
                divisor += tl.where(agree, tl.load(params_ptr + N + i).to(tl.float32), 0.0)
        if NORMALIZE:
            if N <= SELECT_MODELS:
                level = ()
                for s in tl.static_range(1 << N):
                    level += (tl.load(params_ptr + 3 * N + 3 + s),)
                for i in tl.static_range(N):
                    pairs = ()
                    for j in tl.static_range(1 << (N - 1 - i)):
                        pairs += (tl.where(agrees[i], level[2 * j + 1], level[2 * j]),)
                    level = pairs
                merged = (merged.to(tl.float64) * level[0]).to(tl.float32)
            elif N <= INVERSE_TABLE_MODELS:
                agreeing = tl.zeros([BLOCK], dtype=tl.int32)  # the agreeing models' bit set
                for i in tl.static_range(N):
                    agreeing += tl.where(agrees[i], 1 << i, 0)
                inverse = tl.load(params_ptr + 3 * N + 3 + agreeing.to(tl.uint32))  # (unsigned: one wide multiply-add)
                merged = (merged.to(tl.float64) * inverse).to(tl.float32)
            else:
                merged = tl.div_rn(merged, tl.where(divisor == 0, 1.0, divisor))  # IEEE division: "/" is approximate
    return merged


@triton.jit
def _merge_kernel(out_ptr, base_ptr, tuned, params_ptr, trim_ptr, guard_ptr, numel, scale,
                  N: tl.constexpr, SPARSIFY: tl.constexpr, ELECT: tl.constexpr,
                  NORMALIZE: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, SELECT_MODELS: tl.constexpr,
                  GUARDED: tl.constexpr, BLOCK: tl.constexpr):
    """GUARDED: a merge queued before the selection it reads was confirmed; it writes nothing
    unless the N int64 statuses at ``guard_ptr`` are all 1 (every model's selection settled at a
    bracket end on the device: magnitude_select.TIE)."""
    if GUARDED:
        go = tl.load(guard_ptr) == 1
        for i in tl.static_range(1, N):
            go = go & (tl.load(guard_ptr + i) == 1)
    else:
        go = True
    if go:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        lane = tl.arange(0, BLOCK)  # 32-bit offsets from the block's start
        mask = lane < tl.minimum(numel - start, BLOCK).to(tl.int32)
        b = tl.load(base_ptr + start + lane, mask=mask, other=0.0).to(tl.float32)
        merged = merged_block(b, lane, mask, start, tuned, params_ptr, params_ptr, trim_ptr,
                              N, SPARSIFY, ELECT, NORMALIZE, TUNED_ARE_DELTAS, False, tl.float32, SELECT_MODELS, BLOCK)
        tl.store(out_ptr + start + lane, (b + scale * merged).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["tensors"])
def _merge_foreach_kernel(table_ptr, block_start_ptr, params_ptr, trim_ptr, tensors, scale,
                          N: tl.constexpr, SPARSIFY: tl.constexpr, ELECT: tl.constexpr,
                          NORMALIZE: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, OUT_TY: tl.constexpr,
                          BASE_TY: tl.constexpr, TUNED_TY: tl.constexpr, PARAMS: tl.constexpr,
                          SELECT_MODELS: tl.constexpr, BLOCK: tl.constexpr):
    """Many tensors in one launch: row j of the table holds (out, base, tuned₀ … tuned_N−1,
    numel) as int64, tensor j's scalars are params[PARAMS·j : PARAMS·(j + 1)]; tensor j owns
    programs [block_start[j], block_start[j + 1])."""
    pid = tl.program_id(0)
    low = 0  # the last tensor whose first program is <= pid (binary search)
    high = tensors
    while high - low > 1:
        middle = (low + high) // 2
        if tl.load(block_start_ptr + middle) <= pid:
            low = middle
        else:
            high = middle
    row = table_ptr + low.to(tl.int64) * (N + 3)
    start = (pid - tl.load(block_start_ptr + low)).to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK)
    mask = lane < tl.minimum(tl.load(row + 2 + N) - start, BLOCK).to(tl.int32)
    base_ptr = tl.load(row + 1).to(tl.pointer_type(BASE_TY))
    b = tl.load(base_ptr + start + lane, mask=mask, other=0.0).to(tl.float32)
    params = params_ptr + low.to(tl.int64) * PARAMS
    merged = merged_block(b, lane, mask, start, row, row, params, trim_ptr + low.to(tl.int64) * (2 * N),
                          N, SPARSIFY, ELECT, NORMALIZE, TUNED_ARE_DELTAS, True, TUNED_TY, SELECT_MODELS, BLOCK)
    out_ptr = tl.load(row).to(tl.pointer_type(OUT_TY))
    tl.store(out_ptr + start + lane, (b + scale * merged).to(OUT_TY), mask=mask)


@triton.jit
def _sparse_l1_kernel(partial_ptr, base_ptr, tuned, params_ptr, trim_ptr, numel,
                      N: tl.constexpr, SPARSIFY: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK)
    mask = lane < tl.minimum(numel - start, BLOCK).to(tl.int32)
    b = load_base(base_ptr + start, lane, mask, TUNED_ARE_DELTAS)
    for i in tl.static_range(N):
        delta, keep = sparse_delta(tuned[i], b, lane, mask, start, i, params_ptr, trim_ptr,
                                   N, SPARSIFY, TUNED_ARE_DELTAS, BLOCK)
        magnitude = tl.abs(delta).to(tl.float64)  # fp64 sums, as on the CPU: the rescale factors agree
        tl.store(partial_ptr + (pid * N + i) * 2, tl.sum(magnitude, axis=0))
        tl.store(partial_ptr + (pid * N + i) * 2 + 1, tl.sum(tl.where(keep, magnitude, 0.0), axis=0))


def _model_values(coefs, weights, dare_thresholds, seed, elect, normalize) -> list:
    """One merge's scalars as the kernels read them from fp64: coefficients, weights, DARE keep
    thresholds, the two seed words (exact: every value fits 53 bits), 1 / d for the divisor d
    without election (Σ wᵢ of the fp32 weights summed in fp64 and rounded to fp32 like the CPU
    kernel's, 1 where it is 0), and with election and normalising the ``_inverse_table``."""
    divisor = 0.0
    for w in np.asarray(weights, dtype=np.float32).tolist():  # (in order, as the C++ kernel: no pairwise sum)
        divisor += w
    divisor = float(np.float32(divisor))
    elected = elect and normalize and len(weights) <= INVERSE_TABLE_MODELS.value
    table = _inverse_table(tuple(float(w) for w in weights)) if elected else ()
    return [*coefs, *weights, *dare_thresholds, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF,
            1.0 / (divisor or 1.0), *table]


@functools.lru_cache(maxsize=64)
def _inverse_table(weights: tuple[float, ...]) -> tuple[float, ...]:
    """[2^N] RN64(1 / dₛ) for every subset s of the models (bit i: model i): dₛ the fp32 weights of
    s summed in model order in fp32, as the kernel's division would sum them, 1 where it is 0.
    Cached: a multi-tensor merge asks once per tensor, with the same weights."""
    subsets = np.arange(1 << len(weights))
    sums = np.zeros(len(subsets), dtype=np.float32)
    for i, w in enumerate(np.asarray(weights, dtype=np.float32)):
        sums = np.where(subsets >> i & 1, sums + w, sums)
    return tuple((1.0 / np.where(sums == 0, 1.0, sums.astype(np.float64))).tolist())


def _params(device, coefs, weights, dare_thresholds, seed, elect=0, normalize=False) -> torch.Tensor:
    """fp64 ``_model_values`` on ``device``. ``coefs`` may be a device tensor (the L1 rescale computes
    them there): then a non-blocking copy from pinned memory, the coefficients written over it.
    Otherwise the values' tensor is reused while they repeat (``device_constants``)."""
    n = len(weights)
    if isinstance(coefs, torch.Tensor):
        params = host_to_device(_model_values([0.0] * n, weights, dare_thresholds, seed, elect, normalize),
                                torch.float64, device)
        params[:n] = coefs
        return params
    return device_constants(_model_values(coefs, weights, dare_thresholds, seed, elect, normalize), torch.float64,
                            device)


def _trim(base, trim):
    """int64 [2N] keys then cutoffs (TIES: from the pair, or as given packed), or any tensor as an
    unread placeholder."""
    if trim is None:
        return base
    return trim if isinstance(trim, torch.Tensor) else torch.cat(trim)


def sparse_l1(base, tuned, tuned_are_deltas, sparsify, dare_thresholds, trim, seed):
    """[N, 2] fp64 on the device: Σ|δᵢ| and Σ kept |δᵢ| (fp64 per-block sums added in fp64: accurate
    to ~1e-15, so the fp32 coefficients derived from them match the CPU's)."""
    n, numel = len(tuned), base.numel()
    grid = triton.cdiv(numel, BLOCK)
    partial = torch.empty(grid, n, 2, dtype=torch.float64, device=base.device)
    params = _params(base.device, [0.0] * n, [0.0] * n, dare_thresholds, seed)
    _sparse_l1_kernel[(grid,)](
        partial, base, tuple(tuned), params, _trim(base, trim), numel,
        N=n, SPARSIFY=sparsify, TUNED_ARE_DELTAS=tuned_are_deltas, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return partial.sum(dim=0)


def merge(out, base, tuned, tuned_are_deltas, sparsify, elect, normalize, scale, weights, coefs, dare_thresholds,
          trim, seed, guard=None):
    """Writes the merge of contiguous ``base``/``tuned`` into contiguous ``out`` (with ``guard``, the
    selection's N int64 device statuses: only where every one is TIE when the kernel runs)."""
    n, numel = len(tuned), base.numel()
    params = _params(base.device, coefs, weights, dare_thresholds, seed, elect, normalize)
    _merge_kernel[(triton.cdiv(numel, BLOCK),)](
        out, base, tuple(tuned), params, _trim(base, trim), params if guard is None else guard, numel, float(scale),
        N=n, SPARSIFY=sparsify, ELECT=elect, NORMALIZE=normalize, TUNED_ARE_DELTAS=tuned_are_deltas,
        SELECT_MODELS=INVERSE_SELECT_MODELS, GUARDED=guard is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def select_then_merge(out, base, tuned, tuned_are_deltas, elect, normalize, scale, weights, ks, seed) -> None:
    """The TIES trim's selection (ties to the lower index) and the merge (coefficients = weights), the
    merge queued before the selection's one wait: where the device settles every model's K at a
    bracket end, the guarded merge writes ``out`` and nothing runs after the wait; otherwise it
    writes nothing, and the merge runs again with the thresholds the host then resolves."""
    ties_merge = functools.partial(merge, out, base, tuned, tuned_are_deltas, SPARSIFY_TRIM, elect, normalize, scale,
                                   weights, weights, [0] * len(tuned))
    dev_selector = selector(base, tuned, tuned_are_deltas)
    dev_selector.then = lambda trim, statuses: ties_merge(trim, seed, guard=statuses)
    trim = trim_thresholds(dev_selector, ks)  # (device tensors)
    if not dev_selector.settled:
        ties_merge(trim, seed)


TL_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def merge_foreach(outs, bases, tuned, tuned_are_deltas, sparsify, elect, normalize, scale, weights, coefs,
                  dare_thresholds, trims, seeds):
    """One launch merging tensor j of every list (contiguous; one dtype per role, N models each)."""
    count, n, device = len(bases), len(tuned[0]), bases[0].device
    table, starts, params, blocks = [], [], [], 0
    for j, base in enumerate(bases):
        table += [outs[j].data_ptr(), base.data_ptr(), *(t.data_ptr() for t in tuned[j]), base.numel()]
        starts.append(blocks)
        blocks += triton.cdiv(base.numel(), BLOCK)
        params += _model_values(coefs[j], weights[j], dare_thresholds[j], seeds[j], elect, normalize)
    table_t = host_to_device(table, torch.int64, device)
    trim = torch.cat([torch.cat(t) for t in trims]) if sparsify == 1 else table_t
    _merge_foreach_kernel[(blocks,)](
        table_t, host_to_device(starts, torch.int32, device), host_to_device(params, torch.float64, device), trim,
        count, float(scale),
        N=n, SPARSIFY=sparsify, ELECT=elect, NORMALIZE=normalize,
        TUNED_ARE_DELTAS=tuned_are_deltas, OUT_TY=TL_TYPES[outs[0].dtype], BASE_TY=TL_TYPES[bases[0].dtype],
        TUNED_TY=TL_TYPES[tuned[0][0].dtype], PARAMS=len(params) // count,
        SELECT_MODELS=INVERSE_SELECT_MODELS, BLOCK=BLOCK, num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
