"""Exact per-model top-k by |δ| on the GPU (TIES trim thresholds), by bracketing.

1. A fixed random sample of 65536 magnitudes per model brackets the k-th largest:
   [lo, hi] with a margin of 4 binomial standard deviations (no pass over the tensor).
2. One pass over base and all tuned tensors counts keys above ``hi`` and compacts the keys
   inside [lo, hi] as ``key << 32 | (2^32 − 1 − index)`` (a larger value = a larger
   magnitude, then a lower index); a sort of these few candidates gives the exact k-th.
3. Where the sample missed (count above ≥ k, or too few / too many inside), a 4096-bin
   histogram pass of the top 12 key bits finds the exact bin, and the bracket pass runs
   again over that bin with an exact capacity.
Small tensors skip the sample: the whole tensor is one bracket.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4
SAMPLE = 65536
MAX_KEY = 0x7FFFFFFF  # |x| of a float as int: 31 bits
HIST_SHIFT = 19  # 31 - 19 = 12 bits → 4096 bins
HIST_BINS = 1 << (31 - HIST_SHIFT)


@triton.jit
def load_delta(tuned_ptr, b, offs, mask, TUNED_ARE_DELTAS: tl.constexpr):
    """δ = θ − base in fp32 (θ itself when the tuned tensors are deltas)."""
    delta = tl.load(tuned_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if not TUNED_ARE_DELTAS:
        delta = delta - b
    return delta


@triton.jit
def magnitude_key(delta):
    """|δ| as an order-preserving int64 key (the fp32 bits without the sign)."""
    return (delta.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _load_base(base_ptr, offs, mask, TUNED_ARE_DELTAS: tl.constexpr):
    if TUNED_ARE_DELTAS:
        b = tl.zeros(offs.shape, dtype=tl.float32)
    else:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return b


@triton.jit
def _key_histogram_kernel(hist_ptr, base_ptr, tuned, numel, N: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr,
                          BLOCK: tl.constexpr, BINS: tl.constexpr, SHIFT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = _load_base(base_ptr, offs, mask, TUNED_ARE_DELTAS)
    bins = tl.arange(0, BINS)
    for i in tl.static_range(N):
        key = magnitude_key(load_delta(tuned[i], b, offs, mask, TUNED_ARE_DELTAS))
        # lanes past numel hold δ = 0 and land in bin 0; the launcher subtracts them
        counts = tl.histogram((key >> SHIFT).to(tl.int32), BINS)
        tl.atomic_add(hist_ptr + i * BINS + bins, counts, mask=counts > 0)


@triton.jit
def _bracket_kernel(cand_ptr, count_ptr, base_ptr, tuned, lo_ptr, hi_ptr, numel, capacity,
                    N: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = _load_base(base_ptr, offs, mask, TUNED_ARE_DELTAS)
    for i in tl.static_range(N):
        key = magnitude_key(load_delta(tuned[i], b, offs, mask, TUNED_ARE_DELTAS))
        hi = tl.load(hi_ptr + i)
        inside = mask & (key >= tl.load(lo_ptr + i)) & (key <= hi)
        tl.atomic_add(count_ptr + 2 * i, tl.sum((mask & (key > hi)).to(tl.int64), axis=0))
        slot = tl.atomic_add(count_ptr + 2 * i + 1, tl.sum(inside.to(tl.int64), axis=0))
        pos = slot + tl.cumsum(inside.to(tl.int64), axis=0) - 1
        packed = (key << 32) | (0xFFFFFFFF - offs)
        tl.store(cand_ptr + i * capacity + pos, packed, mask=inside & (pos < capacity))


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, BLOCK),)


def _bracket(base, tuned, lo, hi, capacity, tuned_are_deltas):
    """Counts above hi, number inside [lo, hi], and the packed candidates [N, capacity]."""
    n = len(tuned)
    cand = torch.empty(n, max(capacity, 1), dtype=torch.int64, device=base.device)
    counts = torch.zeros(n, 2, dtype=torch.int64, device=base.device)
    _bracket_kernel[_grid(base.numel())](
        cand, counts, base, tuple(tuned), lo, hi, base.numel(), max(capacity, 1),
        N=n, TUNED_ARE_DELTAS=tuned_are_deltas, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    above, inside = counts.cpu().unbind(1)
    return above.tolist(), inside.tolist(), cand


def _sample_brackets(base, tuned, ks, tuned_are_deltas):
    """(lo, hi, capacity) per model from a fixed random sample of magnitudes."""
    numel, device = base.numel(), base.device
    gen = torch.Generator().manual_seed(0x5EED)
    idx = torch.randint(0, numel, (SAMPLE,), generator=gen).to(device)
    sample_base = 0.0 if tuned_are_deltas else base.reshape(-1)[idx].float()
    los, his, caps = [], [], []
    for t, k in zip(tuned, ks):
        keys = (t.reshape(-1)[idx].float() - sample_base).abs().view(torch.int32).long()
        keys = torch.sort(keys, descending=True).values.cpu()
        p = k / numel
        rank, margin = p * SAMPLE, 4.0 * math.sqrt(SAMPLE * p * (1.0 - p)) + 32.0
        hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)
        hi = MAX_KEY if hi_rank < 0 else int(keys[hi_rank])
        lo = 0 if lo_rank >= SAMPLE else int(keys[lo_rank])
        expected = int(((keys >= lo) & (keys <= hi)).sum()) / SAMPLE * numel
        caps.append(min(numel, int(1.25 * expected + 8.0 * math.sqrt(expected) + 1024)))
        los.append(lo)
        his.append(hi)
    return los, his, caps


def _histogram_brackets(base, tuned, ks, tuned_are_deltas):
    """(lo, hi, capacity) per model: the 2^19-wide key bin holding the k-th largest."""
    n, numel = len(tuned), base.numel()
    hist = torch.zeros(n, HIST_BINS, dtype=torch.int32, device=base.device)
    grid = _grid(numel)
    _key_histogram_kernel[grid](
        hist, base, tuple(tuned), numel, N=n, TUNED_ARE_DELTAS=tuned_are_deltas, BLOCK=BLOCK,
        BINS=HIST_BINS, SHIFT=HIST_SHIFT, num_warps=NUM_WARPS,
    )
    hist = hist.long().cpu()
    hist[:, 0] -= grid[0] * BLOCK - numel  # padding lanes
    los, his, caps = [], [], []
    for h, k in zip(hist, ks):
        above_incl = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])  # elements in bins >= b
        b = int(torch.nonzero(above_incl >= k).max())
        los.append(b << HIST_SHIFT)
        his.append(((b + 1) << HIST_SHIFT) - 1)
        caps.append(int(h[b]))
    return los, his, caps


def _select_in_brackets(base, tuned, ks, brackets, tuned_are_deltas):
    """Per model (key, cutoff) of the kᵢ-th largest, or None where the bracket missed it."""
    los, his, caps = brackets
    device = base.device
    capacity = max(caps)
    above, inside, cand = _bracket(
        base, tuned, torch.tensor(los, device=device), torch.tensor(his, device=device), capacity, tuned_are_deltas
    )
    results = []
    for i, k in enumerate(ks):
        if not (above[i] < k <= above[i] + inside[i] and inside[i] <= capacity):
            results.append(None)
            continue
        found = torch.sort(cand[i, : inside[i]], descending=True).values
        packed = int(found[k - above[i] - 1])
        results.append((packed >> 32, 0xFFFFFFFF - (packed & 0xFFFFFFFF)))
    return results


def magnitude_select(base, tuned, ks, tuned_are_deltas):
    """Threshold keys and tie cutoffs (int64 [N] each) of the top-kᵢ |δᵢ| per model."""
    n, numel = len(tuned), base.numel()
    if numel <= 4 * SAMPLE:
        brackets = [0] * n, [MAX_KEY] * n, [numel] * n
    else:
        brackets = _sample_brackets(base, tuned, ks, tuned_are_deltas)
    results = _select_in_brackets(base, tuned, ks, brackets, tuned_are_deltas)
    missed = [i for i, r in enumerate(results) if r is None]
    if missed:
        sub, sub_ks = [tuned[i] for i in missed], [ks[i] for i in missed]
        exact = _histogram_brackets(base, sub, sub_ks, tuned_are_deltas)
        for i, r in zip(missed, _select_in_brackets(base, sub, sub_ks, exact, tuned_are_deltas)):
            if r is None:  # the histogram bin holds the k-th largest by construction
                raise RuntimeError(f"magnitude_select: the histogram bracket missed model {i}")
            results[i] = r
    keys, cutoffs = zip(*results)
    return (torch.tensor(keys, dtype=torch.int64, device=base.device),
            torch.tensor(cutoffs, dtype=torch.int64, device=base.device))
