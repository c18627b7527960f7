"""The exact magnitude selection on the GPU (the algorithm: vfuse_kernels/selection.py).

One launch reads base and every tuned tensor once. For model i and its bracket
[loᵢ, hiᵢ] of magnitude keys, each program of ``block`` elements (1024) stores its counts of
key > hi, key == hi, key == lo and lo < key < hi (two int32 reductions of 16-bit field
pairs, no atomics), and appends the inside elements picked by the subsample rate as
``(key − 2³⁰) << 33 | (2³³ − 1 − index)`` to the model's candidate buffer (one atomic per
program for the slot, a scan over the rows of 8 for the positions). Equal keys at the bracket ends are
only counted, never compacted. Beside it: the sampler (every model's sample keys in one launch,
with their top digits' histograms), the sample's order statistics (every bracket end by one
radix select: four more launches), the tie search (each query's rank-th equal key's flat index:
chunk sums of the per-block counts, then one program per query, which may first resolve its
model's pass); ``DeviceSelector`` drives them for selection.py.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import device_constants, host_to_device, to_host_later
from ..selection import FULL_RATE, RUN, SAMPLE_SEED, PassCounts, candidate_index, candidate_keys, sample_size

NUM_WARPS = 4  # at 1024 elements per program (DeviceSelector.BLOCK): 8 per thread


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
def field_counts(key, first, second):
    """The block's count of key > first in bits 0–15 plus its count of key > second in bits 16–31
    ([BLOCK / ROW, ROW] keys in [0, 2³¹), thresholds in [−1, 2³¹)): key > t is the sign of t − key,
    which cannot overflow — a subtract and a shifted add per key and threshold."""
    above_first = tl.sum((first - key).to(tl.uint32, bitcast=True) >> 31, axis=1)
    above_second = tl.sum((second - key).to(tl.uint32, bitcast=True) >> 31, axis=1)
    return tl.sum(above_first + (above_second << 16), axis=0).to(tl.int32)


@triton.jit
def _bracket_kernel(counts_ptr, cand_ptr, fill_ptr, base_ptr, tuned, lo_ptr, hi_ptr, rate_ptr, numel, cap,
                    N: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, BLOCK: tl.constexpr):
    """Per model four counts of ``key > t``, for the 32-bit thresholds t = hi, hi − 1, lo, lo − 1
    (clamped to [−1, 2³¹ − 1]): key > hi is the first, key == hi the second less the first,
    lo < key < hi the third less the second, key == lo the fourth less the third. Lanes past
    the end load δ = 0, key 0, which passes only t = −1: scalar corrections take them out.

    The block is [BLOCK / ROW, ROW] with a row of ROW contiguous elements per thread (ROW = 8:
    one 16-byte bf16 load), offsets 32-bit from the block's start. Compaction works per row:
    the rows' picked counts, their exclusive scan for the positions, then round r stores each
    row's r-th largest picked candidate — one store of BLOCK / ROW values a round, usually one
    round, instead of a scattered store over the whole block (which Triton would first convert
    to one element per thread through shared memory)."""
    ROW: tl.constexpr = 8
    start = tl.program_id(0).to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK // ROW)[:, None] * ROW + tl.arange(0, ROW)[None, :]
    valid = tl.minimum(numel - start, BLOCK).to(tl.int32)
    mask = lane < valid
    loaded = ()  # every model's block, then a barrier: the block's loads are all in flight together (else
    for i in tl.static_range(N):  # ptxas issues model i + 1's only after model i's counting has waited for its own)
        loaded += (tl.load(tuned[i] + start + lane, mask=mask, other=0.0),)
    b = load_base(base_ptr + start, lane, mask, TUNED_ARE_DELTAS)
    tl.debug_barrier()
    outside = BLOCK - valid
    for i in tl.static_range(N):
        key = (loaded[i].to(tl.float32) - b).to(tl.int32, bitcast=True) & 0x7FFFFFFF  # b = 0 for deltas
        lo = tl.load(lo_ptr + i)  # >= -1
        hi = tl.load(hi_ptr + i)  # <= 2^31: 2^31 is above every key
        above_hi = tl.minimum(hi, 0x7FFFFFFF).to(tl.int32)
        from_hi = tl.minimum(hi - 1, 0x7FFFFFFF).to(tl.int32)
        above_lo = lo.to(tl.int32)
        from_lo = tl.maximum(lo - 1, -1).to(tl.int32)
        upper = field_counts(key, above_hi, from_hi)
        if lo == hi:  # the same thresholds (K in a run of equal keys that spans the bracket: bf16 deltas, often)
            lower = upper
        else:
            lower = field_counts(key, above_lo, from_lo)
        above_hi_n = (upper & 0xFFFF) - tl.where(above_hi < 0, outside, 0)
        from_hi_n = (upper >> 16) - tl.where(from_hi < 0, outside, 0)
        above_lo_n = (lower & 0xFFFF) - tl.where(above_lo < 0, outside, 0)
        from_lo_n = (lower >> 16) - tl.where(from_lo < 0, outside, 0)
        inside = tl.maximum(above_lo_n - from_hi_n, 0)  # lo == hi: no key is strictly inside
        row = counts_ptr + (tl.program_id(0).to(tl.int64) * N + i) * 4
        tl.store(row, above_hi_n)
        tl.store(row + 1, from_hi_n - above_hi_n)
        tl.store(row + 2, from_lo_n - above_lo_n)
        tl.store(row + 3, inside)
        if inside > 0:
            picked = mask & (key > above_lo) & (key <= from_hi)
            rate = tl.load(rate_ptr + i)
            if rate < 2**32:  # a subsampling pass (rare)
                picked = picked & (subsample_hash(start + lane) < rate)
            per_row = tl.sum(picked.to(tl.int32), axis=1)
            count = tl.sum(per_row, axis=0)
            if count > 0:
                slot = tl.atomic_add(fill_ptr + i, count.to(tl.int64))
                room = tl.minimum(tl.maximum(cap - slot, 0), BLOCK).to(tl.int32)
                first = tl.cumsum(per_row, axis=0) - per_row
                # (key − 2^30) << 33 | (2^33 − 1 − index): start is a multiple of BLOCK, so the index
                # part is (2^33 − 1 − start) ^ lane; −2^63 (index part 0: index 2^33 − 1) is no candidate
                value = tl.where(picked, ((key - 2**30).to(tl.int64) << 33) | (((2**33 - 1) - start) ^ lane), -2**63)
                best = tl.max(value, axis=1)
                destination = cand_ptr + i * cap + slot
                tl.store(destination + first, best, mask=(per_row > 0) & (first < room))
                rounds = tl.max(per_row, axis=0)
                r = 1
                while r < rounds:  # (not a for over range(1, rounds): triton 3.6's interpreter rejects that bound)
                    best = tl.max(tl.where(value < best[:, None], value, -2**63), axis=1)
                    tl.store(destination + first + r, best, mask=(per_row > r) & (first + r < room))
                    r += 1


DIGIT_BINS = tl.constexpr(256)  # a radix select round's digit: 8 bits, four rounds for a 31-bit key
ORDER_CHUNK, ORDER_BLOCK = 8192, 2048  # keys per program of a round (2^20 keys: 128 programs per query), per histogram


@triton.jit
def _sample_kernel(keys_ptr, hist_ptr, base_ptr, tuned, runs_ptr, count, N: tl.constexpr,
                   TUNED_ARE_DELTAS: tl.constexpr, RUN: tl.constexpr, RUNS: tl.constexpr, HIST: tl.constexpr):
    """keys[i, r·RUN + j] = key of model i's delta at runs[r]·RUN + j, for RUNS runs per program;
    with HIST also hist[i, :] += the histogram of those keys' top digit (bits 24…31), round 0 of
    their radix select (``order_statistics``): lanes past the runs go to bin 0, which it never reads."""
    run = tl.program_id(0) * RUNS + tl.arange(0, RUNS)
    valid = (run < count)[:, None]
    column = tl.arange(0, RUN)[None, :]
    offs = tl.load(runs_ptr + run, mask=run < count, other=0)[:, None] * RUN + column
    b = load_base(base_ptr, offs, valid, TUNED_ARE_DELTAS)
    dst = run.to(tl.int64)[:, None] * RUN + column
    for i in tl.static_range(N):
        key = magnitude_key(load_delta(tuned[i], b, offs, valid, TUNED_ARE_DELTAS)).to(tl.int32)
        tl.store(keys_ptr + i * count * RUN + dst, key, mask=valid)
        if HIST:
            counts = tl.histogram(tl.reshape(tl.where(valid, key >> 24, 0), [RUNS * RUN]), DIGIT_BINS)
            tl.atomic_add(hist_ptr + i * DIGIT_BINS + tl.arange(0, DIGIT_BINS), counts, mask=counts != 0,
                          sem="relaxed")


def sample_keys(base, tuned, runs, run, tuned_are_deltas, hist=None):
    """[N, len(runs)·run] int32 magnitude keys of each model's deltas at the runs (one launch); with
    ``hist`` (int32, zeroed) also their round-0 histograms, [N, 256] at its start (``order_statistics``)."""
    keys = torch.empty(len(tuned), runs.numel() * run, dtype=torch.int32, device=base.device)
    _sample_kernel[(triton.cdiv(runs.numel(), 64),)](
        keys, keys if hist is None else hist, base, tuple(tuned), runs, runs.numel(), N=len(tuned),
        TUNED_ARE_DELTAS=tuned_are_deltas, RUN=run, RUNS=64, HIST=hist is not None, num_warps=4,
    )
    return keys


@triton.jit
def digits_found(hist_ptr, row, rank, q, rows, queries, ROUND: tl.constexpr):
    """The digits (bits 32 − 8·ROUND … 31) of query q's key (the rank-th largest of its row), from
    the histograms of rounds 0 … ROUND − 1 (``_order_round_kernel``)."""
    bins = tl.arange(0, DIGIT_BINS)
    prefix = tl.zeros([], dtype=tl.int32)
    for r in tl.static_range(ROUND):
        if r == 0:
            counts = tl.load(hist_ptr + row * DIGIT_BINS + bins)
        else:
            counts = tl.load(hist_ptr + (rows + (r - 1) * queries + q).to(tl.int64) * DIGIT_BINS + bins)
        above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0)  # keys of a larger digit
        digit = tl.min(tl.where(above <= rank, bins, DIGIT_BINS), axis=0)
        rank -= tl.sum(tl.where(bins == digit, above, 0), axis=0)
        prefix = prefix * DIGIT_BINS + digit
    return prefix


@triton.jit
def _order_round_kernel(out_ptr, hist_ptr, keys_ptr, queries_ptr, size, rows, queries,
                        ROUND: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, PAIRED: tl.constexpr):
    """Round ROUND of a radix select of the queries [Q, 2] (row, rank) over ``keys`` [R, size]
    int32 in [0, 2³¹): query q asks for the rank-th largest key (0-based) of its row.

    ``hist`` holds each row's histogram of its keys' top digit (bits 24…31), [R, 256], then
    per round r = 1…3 and query q the histogram of bits [24 − 8r, 32 − 8r) of the row's keys
    whose higher bits equal the digits found before (``digits_found``: digit d of round r is
    the smallest whose keys of larger digits number ≤ rank, and the rank is then counted among
    d's keys). Only bins above d are read, so keys of other prefixes (and lanes past the row)
    go to bin 0 uncounted-for. Round 0 (program (c, row)) and rounds 1…3 (program (c, q)) add
    the histogram over the program's CHUNK keys (a privatised ``tl.histogram``, whose ballots do
    not serialise on equal keys, then one atomic per nonzero bin); ROUND 4 stores the key, the
    four digits, in out[q]. PAIRED: program (c, q) also serves query q + Q/2, of the same row,
    from the same read of the keys."""
    bins = tl.arange(0, DIGIT_BINS)
    if ROUND == 0:
        row = tl.program_id(1).to(tl.int64)
        target = hist_ptr + row * DIGIT_BINS
    else:
        q = tl.program_id(1)
        row = tl.load(queries_ptr + 2 * q).to(tl.int64)
        prefix = digits_found(hist_ptr, row, tl.load(queries_ptr + 2 * q + 1).to(tl.int32), q, rows, queries, ROUND)
        # (q inside the sum: rows and queries may be the JIT's constants 1)
        target = hist_ptr + (rows + (ROUND - 1) * queries + q).to(tl.int64) * DIGIT_BINS
        if PAIRED:
            pair = q + queries // 2
            paired = digits_found(hist_ptr, row, tl.load(queries_ptr + 2 * pair + 1).to(tl.int32), pair, rows,
                                  queries, ROUND)
    if ROUND == 4:
        tl.store(out_ptr + q, prefix.to(tl.int64))
        if PAIRED:
            tl.store(out_ptr + pair, paired.to(tl.int64))
    else:
        shift: tl.constexpr = 24 - 8 * ROUND
        start = tl.program_id(0).to(tl.int64) * CHUNK
        counts = tl.zeros([DIGIT_BINS], dtype=tl.int32)
        if PAIRED:
            counts_paired = tl.zeros([DIGIT_BINS], dtype=tl.int32)
        for offset in tl.static_range(0, CHUNK, BLOCK):
            idx = start + offset + tl.arange(0, BLOCK)
            in_row = idx < size
            key = tl.load(keys_ptr + row * size + idx, mask=in_row, other=0)
            digit = (key >> shift) & 255
            if ROUND == 0:  # (lanes past the row: bin 0, never read)
                counts += tl.histogram(tl.where(in_row, digit, 0), DIGIT_BINS)
            else:  # (keys of other prefixes too)
                high = key >> (shift + 8)
                counts += tl.histogram(tl.where(in_row & (high == prefix), digit, 0), DIGIT_BINS)
                if PAIRED:
                    counts_paired += tl.histogram(tl.where(in_row & (high == paired), digit, 0), DIGIT_BINS)
        tl.atomic_add(target + bins, counts, mask=counts != 0, sem="relaxed")
        if PAIRED:
            tl.atomic_add(target + (pair - q) * DIGIT_BINS + bins, counts_paired, mask=counts_paired != 0,
                          sem="relaxed")


def histogram_words(rows: int, queries: int) -> int:
    """The int32 words of ``order_statistics``' histograms for ``queries`` over ``rows`` rows."""
    return (rows + 3 * queries) * DIGIT_BINS.value


def order_statistics(keys: torch.Tensor, rows: list[int], ranks: list[int], counted=None) -> torch.Tensor:
    """[Q] int64: the ranks[q]-th largest (0-based) key of row rows[q] of ``keys`` [R, S] (contiguous
    int32 in [0, 2³¹), ranks < S), by a radix select: four rounds of 8-bit digit histograms over
    the rows, no sort; five launches for all the queries. ``counted``: the zeroed int32 histograms
    (``histogram_words(R, ≥ Q)``) whose round 0 the sampler has already counted (``sample_keys``
    with ``hist``): four launches. Where the second half of the queries asks for the rows of the
    first half (a bracket's two ends), one program serves both: one read of the keys."""
    size, count = keys.shape[1], len(rows)
    paired = count % 2 == 0 and rows[:count // 2] == rows[count // 2:]
    if not count:
        return torch.empty(0, dtype=torch.int64, device=keys.device)
    table = device_constants([v for row, rank in zip(rows, ranks) for v in (row, rank)], torch.int64, keys.device)
    hist = counted
    if hist is None:
        hist = torch.zeros(histogram_words(keys.shape[0], count), dtype=torch.int32, device=keys.device)
    out = torch.empty(count, dtype=torch.int64, device=keys.device)
    chunk = min(ORDER_CHUNK, max(triton.next_power_of_2(size), 16))
    for round_ in range(0 if counted is None else 1, 5):
        grid = (triton.cdiv(size, chunk) if round_ < 4 else 1,
                (count // 2 if paired else count) if round_ else keys.shape[0])
        _order_round_kernel[grid](out, hist, keys, table, size, keys.shape[0], count, ROUND=round_, CHUNK=chunk,
                                  BLOCK=min(ORDER_BLOCK, chunk), PAIRED=paired and round_ > 0, num_warps=4)
    return out


TIE_CHUNK = 1024  # bracket blocks per chunk: a row of the chunk sums, the tie search's first level


@triton.jit
def _chunk_sums_kernel(sums_ptr, totals_ptr, counts_ptr, models, blocks, CHUNK: tl.constexpr, TOTALS: tl.constexpr):
    """sums[c, m, :] = Σ counts[b, m, :] over the blocks b of chunk c (the four columns, int64), and
    with TOTALS totals[m, :] += sums[c, m, :]: one atomic per chunk, model and column."""
    c = tl.program_id(0).to(tl.int64)
    model = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    column = tl.arange(0, 4)
    count = tl.load(counts_ptr + (idx * models + model)[:, None] * 4 + column[None, :], mask=(idx < blocks)[:, None],
                    other=0)
    total = tl.sum(count.to(tl.int64), axis=0)
    tl.store(sums_ptr + (c * models + model) * 4 + column, total)
    if TOTALS:
        tl.atomic_add(totals_ptr + model * 4 + column, total, sem="relaxed")


def chunk_sums(counts: torch.Tensor, totals: torch.Tensor | None = None) -> torch.Tensor:
    """[chunks, N, 4] int64: the bracket pass's per-block ``counts`` [blocks, N, 4] summed per
    TIE_CHUNK blocks, each model's totals added into ``totals`` [N, 4] int64 when given (zeroed:
    they are the pass's totals): one launch."""
    blocks, models = counts.shape[0], counts.shape[1]
    chunks = triton.cdiv(blocks, TIE_CHUNK)
    sums = torch.empty(chunks, models, 4, dtype=torch.int64, device=counts.device)
    _chunk_sums_kernel[(chunks, models)](sums, sums if totals is None else totals, counts, models, blocks,
                                         CHUNK=TIE_CHUNK, TOTALS=totals is not None, num_warps=4)
    return sums


@triton.jit
def first_reaching(counts, idx, valid, seen, rank, none):
    """(the first idx whose running count seen + cumsum(counts) reaches rank, or none;
    the count before it)."""
    running = seen + tl.cumsum(counts, axis=0)
    first = tl.min(tl.where((running >= rank) & valid, idx, none), axis=0)
    return first, seen + tl.sum(tl.where(idx < first, counts, 0), axis=0)


@triton.jit
def resolve_model(found_ptr, totals_ptr, fill_ptr, lo_ptr, hi_ptr, k_ptr, j, n, cap):
    """selection.py's resolution of model j's bracket pass (ties to the lower index), from the pass's
    totals [n, 4] (key > hi, == hi, == lo, strictly inside), its candidates stored ``fill`` and the
    model's k: found[2, j] is TIE = 1 (K = found[0, j] a bracket end, its cutoff the answer to the
    returned tie query), INSIDE = 0 (K and C: the found[3, j]-th of the found[4, j] candidates in
    (key desc, index asc) order) or MISSED = 2 (K outside the bracket, or candidates lost past
    ``cap``). Returns the tie query (key, rank, column); a harmless one where not TIE."""
    gt = tl.load(totals_ptr + 4 * j)
    eq_hi = tl.load(totals_ptr + 4 * j + 1)
    lo = tl.load(lo_ptr + j)
    hi = tl.load(hi_ptr + j)
    eq_lo = tl.where(lo == hi, 0, tl.load(totals_ptr + 4 * j + 2))
    inside = tl.where(lo == hi, 0, tl.load(totals_ptr + 4 * j + 3))
    stored = tl.load(fill_ptr + j)
    k = tl.load(k_ptr + j)
    at_hi = (k > gt) & (k <= gt + eq_hi)
    within = (k > gt + eq_hi) & (k <= gt + eq_hi + inside) & (stored <= cap)  # (full rate: inside keys all stored)
    at_lo = (k > gt + eq_hi + inside) & (k <= gt + eq_hi + inside + eq_lo)
    key = tl.where(at_lo, lo, hi)
    tl.store(found_ptr + j, key)
    tl.store(found_ptr + 2 * n + j, tl.where(within, 0, tl.where(at_hi | at_lo, 1, 2)).to(tl.int64))
    tl.store(found_ptr + 3 * n + j, k - gt - eq_hi)
    tl.store(found_ptr + 4 * n + j, stored)
    rank = tl.where(at_lo, k - gt - eq_hi - inside, tl.where(at_hi, k - gt, 1))
    return key, rank, tl.where(at_lo, 2, 1).to(tl.int64)


@triton.jit
def _tie_find_kernel(out_ptr, sums_ptr, counts_ptr, queries_ptr, base_ptr, tuned, models, blocks, chunks, numel,
                     found_ptr, totals_ptr, fill_ptr, lo_ptr, hi_ptr, k_ptr, cap,
                     N: tl.constexpr, TUNED_ARE_DELTAS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                     SCAN: tl.constexpr, RESOLVE: tl.constexpr):
    """Query q = (key, rank, model, column): out[q] = the flat index of the rank-th element of
    that model whose key is ``key``. Three levels, each one vector scan: the chunk (from the
    chunk ``sums`` [chunks, models, 4]), the block in it (from the bracket pass's per-block
    counts), the element. RESOLVE: query q is model q's, from its bracket pass's resolution
    (``resolve_model``, into ``found``); else row q of ``queries`` [Q, 4]."""
    q = tl.program_id(0)
    if RESOLVE:
        key, rank, column = resolve_model(found_ptr, totals_ptr, fill_ptr, lo_ptr, hi_ptr, k_ptr, q, models, cap)
        model = q
    else:
        key = tl.load(queries_ptr + q * 4)
        rank = tl.load(queries_ptr + q * 4 + 1)
        model = tl.load(queries_ptr + q * 4 + 2)
        column = tl.load(queries_ptr + q * 4 + 3)
    chunk = tl.zeros([], dtype=tl.int64) + chunks  # (not chunks.to: an argument equal to 1 is a constant)
    before = tl.zeros([], dtype=tl.int64)  # equal keys before the chunk found
    seen = tl.zeros([], dtype=tl.int64)
    for start in range(0, chunks, SCAN):  # chunks <= 8192 for numel < 2^33: one or a few steps
        idx = start + tl.arange(0, SCAN).to(tl.int64)
        sums = tl.load(sums_ptr + (idx * models + model) * 4 + column, mask=idx < chunks, other=0)
        first, prior = first_reaching(sums, idx, idx < chunks, seen, rank, chunks)
        before = tl.where((chunk == chunks) & (first < chunks), prior, before)
        chunk = tl.minimum(chunk, first)
        seen = seen + tl.sum(sums, axis=0)
    idx = chunk * CHUNK + tl.arange(0, CHUNK)
    count = tl.load(counts_ptr + (idx * models + model) * 4 + column, mask=idx < blocks, other=0).to(tl.int64)
    block, before = first_reaching(count, idx, idx < blocks, before, rank, blocks)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_base(base_ptr, offs, mask, TUNED_ARE_DELTAS)
    keys = tl.full([BLOCK], -1, tl.int64)
    for i in tl.static_range(N):
        if model == i:
            keys = magnitude_key(load_delta(tuned[i], b, offs, mask, TUNED_ARE_DELTAS))
    equal = mask & (keys == key)
    nth = equal & (tl.cumsum(equal.to(tl.int64), axis=0) == rank - before)
    tl.store(out_ptr + q, tl.min(tl.where(nth, offs, numel), axis=0))


def tie_indices(base, tuned, queries, counts, block, tuned_are_deltas):
    """The flat index of the rank-th (1-based) element whose key is ``key``, of every query (model, key,
    rank, column) — model indexing ``tuned`` and the per-block ``counts``' second axis — in two
    launches for all after the queries' copy (reference/magnitude_select.tie_index states it)."""
    table = host_to_device([v for model, key, rank, column in queries for v in (key, rank, model, column)],
                           torch.int64, base.device)
    return list(_tie_search(base, tuned, table, counts, chunk_sums(counts), block, tuned_are_deltas))


def _tie_search(base, tuned, table, counts, sums, block, tuned_are_deltas, out=None, resolve=()) -> torch.Tensor:
    """[q] int64 (into ``out`` when given): ``tie_indices`` of the queries in the device ``table``
    [q, 4] (key, rank, model, column), from the pass's per-block ``counts`` and their ``chunk_sums``
    (one launch). ``resolve`` = (found, totals, fill, lo, hi, ks, cap), no table: every model's
    query from its pass's resolution (``resolve_model``), q = the models."""
    blocks, models, chunks = counts.shape[0], counts.shape[1], sums.shape[0]
    queries = table.numel() // 4 if table is not None else models
    out = torch.empty(queries, dtype=torch.int64, device=base.device) if out is None else out
    _tie_find_kernel[(queries,)](
        out, sums, counts, out if table is None else table, base, tuple(tuned), models, blocks, chunks, base.numel(),
        *(resolve or (out,) * 6 + (0,)), N=len(tuned), TUNED_ARE_DELTAS=tuned_are_deltas, BLOCK=block,
        CHUNK=TIE_CHUNK, SCAN=1024, RESOLVE=bool(resolve), num_warps=8,
    )
    return out


INSIDE, TIE, MISSED = 0, 1, 2  # resolve_model's statuses


def bracket_pass(base, tuned, lo, hi, rate, cap, block, tuned_are_deltas, counts, cand, fill):
    """Fills ``counts`` [blocks, N, 4] int32, ``cand`` [N, cap] int64 and adds to ``fill`` [N] int64."""
    _bracket_kernel[(triton.cdiv(base.numel(), block),)](
        counts, cand, fill, base, tuple(tuned), lo, hi, rate, base.numel(), cap,
        N=len(tuned), TUNED_ARE_DELTAS=tuned_are_deltas, BLOCK=block, num_warps=NUM_WARPS,
    )


class DeviceSelector:
    """The selection's GPU side (selection.py): torch tensors, the Triton passes above, order
    statistics by a radix select (candidates' by torch's sort). Bracket ends stay device scalars
    until the pass's one synchronisation. Contiguous ``base`` and ``tuned`` of one device."""

    # Elements per block of the bracket pass's counts (< 2^16: 16-bit count fields). H200, 2 × 268M
    # bf16, density 0.3: the pass 0.634 ms with blocks of 1024 and 4 warps, 0.708 with 2048 and 4,
    # 0.668 with 4096 and 4, 1.09 with 4096 and 8 (benchmarks/NOTES.md, v0.10).
    BLOCK = 1024
    SAMPLE_TOP, SAMPLE_SHARE = 1 << 20, 64
    SAMPLE_SORTED = False

    def __init__(self, base: torch.Tensor, tuned: list[torch.Tensor], tuned_are_deltas: bool):
        self.base, self.tuned, self.tuned_are_deltas = base, list(tuned), tuned_are_deltas
        self.numel, self.device = base.numel(), base.device
        # then(trim, statuses): called once, on the first resolve pass over every model, after that pass's
        # work is queued and before its wait (delta_merge queues its guarded merge there), trim [2N] its keys
        # then its cutoffs, statuses [N] int64 its models' (every one TIE: trim holds the results); settled:
        # whether that pass settled every model at a bracket end
        self.then, self.settled = None, False
        self._sample, self._sample_rows = None, []
        # zeroed with the sample by one memset, each used once: the radix select's histograms (round 0
        # counted by the sampler) and the first pass's fill counters and totals
        self._counted, self._pass_zeroed = None, None

    def subset(self, rows: list[int]) -> DeviceSelector:
        return DeviceSelector(self.base, [self.tuned[i] for i in rows], self.tuned_are_deltas)

    def sample_size(self, numel: int) -> int:
        """~numel/64 keys, at most 2^20. (H100, 2 × 268M bf16, density 0.3: ties_thresholds 2.02 ms
        at 2^20, 2.18 at 2^21 — a longer sample sort — and 2.89 at 2^19 — a wider bracket.)"""
        return sample_size(numel, self.SAMPLE_TOP, self.SAMPLE_SHARE)

    def sample(self, size: int) -> list[torch.Tensor]:
        """The rows of [N, size] int32 keys of each model's deltas at random aligned runs, unsorted:
        ``order_statistics`` selects from them (a sort of 2 × 2^20 keys took ~0.1 ms)."""
        runs = _sample_runs(self.numel, size // RUN, RUN, self.device)
        n = len(self.tuned)
        zeroed = torch.zeros(10 * n + histogram_words(n, 2 * n), dtype=torch.int32, device=self.device)
        self._pass_zeroed, self._counted = zeroed[:10 * n].view(torch.int64), zeroed[10 * n:]
        self._sample = sample_keys(self.base, self.tuned, runs, RUN, self.tuned_are_deltas, hist=self._counted)
        self._sample_rows = list(self._sample)
        return self._sample_rows

    def order_statistics(self, samples: list[torch.Tensor], ranks: list[list[int]], presorted: list[bool]) -> list:
        """Per sample, its ranks-th (0-based) largest keys as device scalars: for rows of this
        selector's ``sample``, one radix select for all (``order_statistics`` above); for any other
        (a subsample of candidates, after a miss) a sort."""
        rows = [next((i for i, row in enumerate(self._sample_rows) if row is s), None) for s in samples]
        if None in rows or any(presorted):
            return self.sorted_statistics(samples, ranks, presorted)
        # every sample's last rank first, then the ones before: a bracket's [lo…, hi…] is then one
        # view of the select's output (_stack), not a stack of 2N scalars
        order = [(s, p) for back in range(max(map(len, ranks), default=0))
                 for s, r in enumerate(ranks) for p in [len(r) - 1 - back] if p >= 0]
        found = [[None] * len(r) for r in ranks]
        counted, self._counted = self._counted, None  # (round 0 counted once, sized for 2 queries per row)
        if len(order) > 2 * len(self._sample_rows):
            counted = None
        for (s, p), value in zip(order, order_statistics(self._sample, [rows[s] for s, _ in order],
                                                         [ranks[s][p] for s, p in order], counted)):
            found[s][p] = value
        return found

    def sorted_statistics(self, samples: list[torch.Tensor], ranks: list[list[int]], presorted: list[bool]) -> list:
        """``order_statistics`` by a sort of each sample not ``presorted`` (views into it)."""
        found = []
        for values, rank, ordered in zip(samples, ranks, presorted):
            values = values if ordered else torch.sort(values, descending=True).values
            found.append([values[r] for r in rank])
        return found

    def pass_buffers(self, n: int, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A pass's per-block counts [blocks, n, 4] int32, candidates [n, cap] int64, and zeroed
        fill counters [n] int64 and totals [n, 4] int64 (the first pass's zeroed with the sample)."""
        device = self.device
        zeroed, self._pass_zeroed = self._pass_zeroed, None
        if zeroed is None or zeroed.numel() < 5 * n:
            zeroed = torch.zeros(5 * n, dtype=torch.int64, device=device)
        zeroed = zeroed[:5 * n]
        return (torch.empty(-(-self.numel // self.BLOCK), n, 4, dtype=torch.int32, device=device),
                torch.empty(n, cap, dtype=torch.int64, device=device), zeroed[:n], zeroed[n:].view(n, 4))

    def bracket_pass(self, rows: list[int], los: list, his: list, rates: list[int], cap: int) -> PassCounts:
        n, device = len(rows), self.device
        lo, hi = _stack(list(los) + list(his), device).split(n)
        counts, cand, fill, totals = self.pass_buffers(n, cap)
        bracket_pass(self.base, [self.tuned[i] for i in rows], lo, hi, device_constants(rates, torch.int64, device),
                     cap, self.BLOCK, self.tuned_are_deltas, counts, cand, fill)
        chunk_sums(counts, totals)
        host = torch.cat([totals.reshape(-1), fill, lo, hi]).tolist()  # the pass's one synchronisation
        rows = [(*host[4 * j: 4 * j + 4], host[4 * n + j], host[5 * n + j], host[6 * n + j]) for j in range(n)]
        return PassCounts(rows, counts, cand)

    def resolve_pass(self, rows: list[int], los: list, his: list, cap: int, ks: list[int]):
        """The bracket pass at full rate and its resolution (ties to the lower index). Queued on the
        device without a wait: the pass, its chunk sums and totals, and one tie search that resolves
        every model (``resolve_model``) and finds its cutoff; then the one synchronisation (the models'
        statuses). A model whose K lies strictly
        inside its bracket then takes its candidates' sort (``candidate_ranks``: a few launches,
        only for those models; bf16 deltas mostly resolve at a bracket end). (keys, cutoffs) [N]
        int64 on the device, or None where a model missed."""
        n, device = len(rows), self.device
        tuned = [self.tuned[i] for i in rows]
        lo, hi = _stack(list(los) + list(his), device).split(n)
        counts, cand, fill, totals = self.pass_buffers(n, cap)
        bracket_pass(self.base, tuned, lo, hi, device_constants([FULL_RATE] * n, torch.int64, device), cap,
                     self.BLOCK, self.tuned_are_deltas, counts, cand, fill)
        sums = chunk_sums(counts, totals)
        found = torch.empty(5, n, dtype=torch.int64, device=device)  # keys, cutoffs, statuses, ranks, stored
        keys, cutoffs = found[0], _tie_search(
            self.base, tuned, None, counts, sums, self.BLOCK, self.tuned_are_deltas, out=found[1],
            resolve=(found, totals, fill, lo, hi, device_constants(ks, torch.int64, device), cap))
        verdict = to_host_later(found[2:])
        then = self.then if n == len(self.tuned) else None  # (a pass over every model of the call)
        if then is not None:
            self.then = None
            then(found[:2].reshape(-1), found[2])
        statuses, ranks, stored = verdict()  # the one synchronisation (not with the work ``then`` queued)
        if MISSED in statuses:
            return None
        inside = [j for j, status in enumerate(statuses) if status == INSIDE]
        self.settled = then is not None and not inside
        if inside:
            packed = self._ranked(cand, inside, [stored[j] for j in inside], [ranks[j] for j in inside])
            at = host_to_device(inside, torch.int64, device)
            keys[at], cutoffs[at] = candidate_keys(packed), candidate_index(packed)
        return keys, cutoffs

    def candidate_ranks(self, cand: torch.Tensor, rows: list[int], stored: list[int], ranks: list[int]) -> list:
        """(key, cutoff) device scalars of the ranks-th (1-based) largest of the first ``stored``
        candidates of each of ``rows``."""
        packed = self._ranked(cand, rows, stored, ranks)
        return list(zip(candidate_keys(packed), candidate_index(packed)))

    def _ranked(self, cand: torch.Tensor, rows: list[int], stored: list[int], ranks: list[int]) -> torch.Tensor:
        """[len(rows)] packed: ``candidate_ranks``' candidates, by one segmented sort and one gather for
        all rows (the unfilled tails masked to the smallest int64, below every candidate)."""
        device = self.device
        rows_t, stored_t, ranks_t = host_to_device([rows, stored, ranks], torch.int64, device)
        width = max(stored)
        block = cand[:, :width] if rows == list(range(cand.shape[0])) else cand[rows_t, :width]  # (a view)
        unfilled = torch.arange(width, device=device) >= stored_t[:, None]
        ordered = torch.sort(block.masked_fill_(unfilled, torch.iinfo(torch.int64).min), dim=1, descending=True).values
        return ordered.gather(1, (ranks_t - 1)[:, None]).reshape(-1)

    def tie_indices(self, rows: list[int], queries: list, counts: torch.Tensor) -> list[torch.Tensor]:
        return tie_indices(self.base, [self.tuned[i] for i in rows], queries, counts, self.BLOCK,
                           self.tuned_are_deltas)

    def results(self, values: list) -> torch.Tensor:
        return _stack(values, self.device)


def selector(base: torch.Tensor, tuned: list[torch.Tensor], tuned_are_deltas: bool) -> DeviceSelector:
    """The selection's handle on one call's contiguous inputs (selection.magnitude_select)."""
    return DeviceSelector(base, tuned, tuned_are_deltas)


@functools.lru_cache(maxsize=16)
def _sample_runs(numel: int, count: int, run: int, device: torch.device) -> torch.Tensor:
    """``count`` random aligned run indices for a shape (fixed seed), drawn once per shape and
    device: a checkpoint's tensors share a few shapes, and a call then launches no generator."""
    gen = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
    return torch.randint(0, numel // run, (count,), generator=gen, device=device)


def _stack(values: list, device) -> torch.Tensor:
    """int64 [len(values)] on ``device`` from host ints and device scalars, without a sync: one
    host copy for the ints and one stack (not a launch per value); a view, without a launch, where
    the values are consecutive elements of one vector."""
    ints = [v for v in values if not isinstance(v, torch.Tensor)]
    if len(ints) == len(values):
        return host_to_device(values, torch.int64, device)
    if not ints and _consecutive(values):
        return values[0].as_strided((len(values),), (1,))
    host = iter(host_to_device(ints, torch.int64, device) if ints else ())
    return torch.stack([v.reshape(()) if isinstance(v, torch.Tensor) else next(host) for v in values]).to(torch.int64)


def _consecutive(values: list[torch.Tensor]) -> bool:
    """Whether ``values`` are 0-d int64 views of consecutive elements of one vector (as a select's
    output iterates): consecutive addresses, the first and the last in one storage."""
    first = values[0]
    start = first.data_ptr()
    return (all(v.dim() == 0 and v.dtype == torch.int64 and v.data_ptr() == start + 8 * i for i, v in enumerate(values))
            and values[-1].untyped_storage().data_ptr() == first.untyped_storage().data_ptr())
