"""The bracket pass of the exact magnitude selection on the GPU (see ops/magnitude_select.py).

One launch reads base and every tuned tensor once. For model i and its bracket
[loᵢ, hiᵢ] of magnitude keys, each program of ``BLOCK`` elements stores its counts of
key > hi, key == hi, key == lo and lo < key < hi (one int64 reduction of four 16-bit
fields, no atomics), and appends the inside elements picked by the subsample rate as
``(key − 2³⁰) << 33 | (2³³ − 1 − index)`` to the model's candidate buffer (one atomic per
program for the slot, a block scan for the positions). Equal keys at the bracket ends are
only counted, never compacted.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 4096  # elements per program; also the granularity of the per-block tie counts
NUM_WARPS = 8
FIELD_BITS = 16  # BLOCK < 2^16: four block counts share one int64 reduction
KEY_BIAS = 1 << 30  # packed candidates: (key − 2^30) << 33 fits a signed int64 for 31-bit keys
INDEX_BITS = 33  # ... and the inverted flat index takes the low 33 bits (numel ≤ 2^33)


@triton.jit
def load_delta(tuned_ptr, b, offs, mask, TUNED_ARE_DELTAS: tl.constexpr):
    """δ = θ − base in fp32 (θ itself when the tuned tensors are deltas)."""
    delta = tl.load(tuned_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if not TUNED_ARE_DELTAS:
        delta = delta - b
    return delta


@triton.jit
def load_base(base_ptr, offs, mask, TUNED_ARE_DELTAS: tl.constexpr):
    """base in fp32 (zeros when the tuned tensors are deltas)."""
    if TUNED_ARE_DELTAS:
        b = tl.zeros(offs.shape, dtype=tl.float32)
    else:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return b


@triton.jit
def magnitude_key(delta):
    """|δ| as an order-preserving int64 key (the fp32 bits without the sign)."""
    return (delta.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)


@triton.jit
def subsample_hash(offs):
    """32 well-mixed bits of the flat index (the murmur3 finalizer), as int64 in [0, 2^32)."""
    x = (offs ^ (offs >> 32)) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    x ^= x >> 16
    return x


@triton.jit
def _bracket_kernel(counts_ptr, cand_ptr, fill_ptr, base_ptr, tuned, lo_ptr, hi_ptr, rate_ptr, numel, cap,
                    N: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_base(base_ptr, offs, mask, TUNED_ARE_DELTAS)
    mix = subsample_hash(offs)
    packed_index = (2**33 - 1) - offs
    for i in tl.static_range(N):
        key = magnitude_key(load_delta(tuned[i], b, offs, mask, TUNED_ARE_DELTAS))
        lo = tl.load(lo_ptr + i)
        hi = tl.load(hi_ptr + i)
        inside = mask & (key > lo) & (key < hi)
        fields = ((mask & (key > hi)).to(tl.int64) | ((mask & (key == hi)).to(tl.int64) << 16)
                  | ((mask & (key == lo)).to(tl.int64) << 32) | (inside.to(tl.int64) << 48))
        total = tl.sum(fields, axis=0)
        row = counts_ptr + (pid.to(tl.int64) * N + i) * 4
        for j in tl.static_range(4):
            tl.store(row + j, ((total >> (16 * j)) & 0xFFFF).to(tl.int32))
        if (total >> 48) > 0:
            picked = inside & (mix < tl.load(rate_ptr + i))
            ranks = tl.cumsum(picked.to(tl.int64), axis=0)
            n_picked = tl.max(ranks, axis=0)
            if n_picked > 0:
                pos = tl.atomic_add(fill_ptr + i, n_picked) + ranks - 1
                value = ((key - 2**30) << 33) | packed_index
                tl.store(cand_ptr + i * cap + pos, value, mask=picked & (pos < cap))


def bracket_pass(base, tuned, lo, hi, rate, cap, tuned_are_deltas, counts, cand, fill):
    """Fills ``counts`` [blocks, N, 4] int32, ``cand`` [N, cap] int64 and adds to ``fill`` [N] int64."""
    _bracket_kernel[(triton.cdiv(base.numel(), BLOCK),)](
        counts, cand, fill, base, tuple(tuned), lo, hi, rate, base.numel(), cap,
        N=len(tuned), TUNED_ARE_DELTAS=tuned_are_deltas, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
