"""Exact per-model magnitude top-k: the TIES trim, and any other "keep the k largest |δ|" cut.

For model i and kᵢ ∈ [1, numel) the selection returns the magnitude key Kᵢ (the fp32 bits of
the kᵢ-th largest |δᵢ|) and the cutoff Cᵢ, the last flat index kept among the elements whose
key equals Kᵢ: element e is kept iff ``key(e) > Kᵢ or (key(e) == Kᵢ and e <= Cᵢ)`` — exactly
kᵢ elements, ties going to the lower flat index. The same tensor may appear several times
with different k (a top and a bottom cut).

Algorithm, shared by the backends (each provides the bracket pass: Triton on CUDA, C++ on CPU):

1. Sample: S keys per model (runs of 16 contiguous elements at random positions).
   The kᵢ-th largest lies, with overwhelming probability, between the sample keys at ranks
   r ± m (r = S·kᵢ/numel, m = 4 binomial standard deviations + 64): the bracket [lo, hi].
2. One bracket pass reads base and every tuned tensor once: per block (1024 or 2048 elements) the
   counts of key > hi, key == hi, key == lo and lo < key < hi; the elements strictly inside
   (about 2m/S of the tensor) are compacted. Equal keys at the bracket ends are counted, never
   compacted or sorted, so heavy ties (bf16 deltas) cost nothing.
3. Resolve, with one host synchronisation per pass for all models: K = hi or lo → C is the
   r-th equal key in flat order, found from the per-block counts and one block; K inside →
   the candidates sorted by (key desc, index asc) give K and C at rank k.
4. A sample that missed (rare): the exact counts bound the key region holding K; a pass that
   compacts a uniform hash-subsample of that region gives a new sample, and a bracket pass
   from it resolves — about two more passes; the region shrinks every two passes, so every
   input finishes.

Extra memory: ~1.25·(2m/S)·numel int64 candidates per model (≤ 0.5% of the elements at
S = 2^20) plus 16 bytes per block. Largest tensor: numel < 2^33 (the packed index).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .._backend import host_to_device

RUN = 16  # sample run length (contiguous elements: coalesced / cache-friendly gathers)
Z = 4.0  # bracket half-width in binomial standard deviations
SLACK = 64  # ... plus this many sample ranks
MAX_KEY = 0x7FFFFFFF
FULL_RATE = 1 << 32  # subsample threshold on a 32-bit hash: keep every element
KEY_BIAS, INDEX_BITS = 1 << 30, 33  # candidate = (key − 2^30) << 33 | (2^33 − 1 − index)
INDEX_MASK = (1 << INDEX_BITS) - 1
MAX_NUMEL = 1 << INDEX_BITS
MAX_PASSES = 64
SMALL = 1 << 16  # up to this many elements, no sample
SORTING_DEVICES = ("cuda",)  # order statistics by a sort here, by selections elsewhere


def sample_size(numel: int, device: torch.device) -> int:
    """Sample keys per model: ~numel/64 on GPU (at most 2^20), ~numel/128 on CPU (at most 2^18).
    (H100, 2 × 268M bf16, density 0.3: ties_thresholds 2.02 ms at 2^20, 2.18 at 2^21 — a shorter
    sample sort — and 2.89 at 2^19 — a wider bracket.)"""
    top, share = (1 << 20, 64) if device.type == "cuda" else (1 << 18, 128)
    return max(RUN, min(top, numel // share) // RUN * RUN)


def block_size(device: torch.device) -> int:
    """Elements per block of the bracket pass's counts (< 2^16: 16-bit count fields): 1024 on GPU,
    2048 on CPU. (H200, 2 × 268M bf16, density 0.3, one run of the threshold-count kernel: the
    bracket pass 0.634 ms with blocks of 1024 and 4 warps, 0.708 with 2048 and 4, 0.668 with
    4096 and 4, 1.09 with 4096 and 8. benchmarks/NOTES.md, v0.10.)"""
    return 1024 if device.type == "cuda" else 2048


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """|x| of fp32 values as int32 keys (the fp32 bits without the sign; order-preserving)."""
    return values.contiguous().view(torch.int32) & MAX_KEY


def _deltas_at(base, t, idx, tuned_are_deltas):
    values = t.reshape(-1)[idx].float()
    return values if tuned_are_deltas else values - base.reshape(-1)[idx].float()


def _kth_largest(values: torch.Tensor, ranks: list[int], presorted: bool = False) -> list:
    """The ranks-th (0-based) largest values of a 1-D tensor: views where ``presorted`` (in
    descending order), else into a sort on the GPU and an introselect per rank on the CPU
    (``numpy.partition``: at several ranks in one call it took 22× one rank's time on 2^18 keys)."""
    if presorted:
        return [values[r] for r in ranks]
    if values.device.type in SORTING_DEVICES:
        return _kth_largest(_sorted_descending(values), ranks, True)
    array = values.numpy()
    return [torch.tensor(np.partition(array, array.size - 1 - r)[array.size - 1 - r]) for r in ranks]


def _sorted_descending(values: torch.Tensor) -> torch.Tensor:
    """The last axis sorted in descending order: a torch radix sort on the GPU, numpy's on the CPU
    (its vectorised sort: 0.56 ms for 2^18 tie-heavy int32 sample keys, where ``numpy.partition``
    at one rank took 3.1 ms and torch's sort 4.5)."""
    if values.device.type != "cpu":
        return torch.sort(values, dim=-1, descending=True).values
    return torch.from_numpy(np.ascontiguousarray(np.flip(np.sort(values.numpy(), axis=-1), axis=-1)))


def sample_keys(base, tuned, runs, run, tuned_are_deltas) -> torch.Tensor:
    """[N, len(runs)·run] int32 keys of each model's deltas at the aligned runs ``runs`` of ``run``
    elements (row gathers: a row copy, not an element-wise gather). The backends replace it: one
    Triton launch on the GPU, one C++ pass on the CPU (0.66–0.86 ms
    against this one's 1.15–1.4 for 2 × 2^18 keys on a 2-vCPU Xeon)."""
    numel = base.numel()

    def rows(t):
        return t.reshape(-1)[: numel // run * run].view(-1, run).index_select(0, runs).float()

    b = 0.0 if tuned_are_deltas else rows(base)
    return magnitude_keys(torch.stack([rows(t) - b for t in tuned]).reshape(len(tuned), -1))


def _sample(base, tuned, tuned_are_deltas, sampler) -> torch.Tensor:
    """[N, S] int32 keys of a random sample (fixed seed) of each model's deltas, S/16 random aligned
    runs of 16 elements, in descending order (on the GPU 32-bit keys: a radix sort of half the
    passes of int64 ones)."""
    numel, device = base.numel(), base.device
    runs = _sample_runs(numel, sample_size(numel, device), RUN, device)
    keys = sampler(base, tuned, runs, RUN, tuned_are_deltas)
    return _sorted_descending(keys)


@functools.lru_cache(maxsize=16)
def _sample_runs(numel: int, size: int, run: int, device: torch.device) -> torch.Tensor:
    """The sample's run indices for a shape (fixed seed), made once per shape and device: a
    checkpoint's tensors share a few shapes, and a call then launches no generator."""
    gen = torch.Generator(device=device).manual_seed(0x5EED)
    return torch.randint(0, numel // run, (size // run,), generator=gen, device=device)


class _Model:
    """One model's search state: the key region [low, high] known to hold K, with exact counts."""

    def __init__(self, k: int, numel: int):
        self.k, self.numel = k, numel
        self.low, self.high = 0, MAX_KEY
        self.above = self.below = 0  # keys > high, keys < low
        self.sample = None  # keys of a uniform sample of the region, when known
        self.sorted = False  # ... in descending order
        self.result = None  # (key, cutoff): ints or 0-dim tensors

    @property
    def population(self) -> int:
        return self.numel - self.above - self.below


def _bracket(model: _Model) -> tuple:
    """(lo, hi, expected share of the region strictly inside) around the target rank, from the
    model's sample; lo and hi are device scalars, or ints where the margin passes the sample's end."""
    sample = model.sample
    size = sample.numel()
    p = (model.k - model.above) / model.population
    rank, margin = p * size, Z * math.sqrt(size * p * (1.0 - p)) + SLACK
    hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)
    inner = [r for r in (hi_rank, lo_rank) if 0 <= r < size]
    found = iter(_kth_largest(sample, inner, model.sorted))
    hi = next(found) if hi_rank >= 0 else model.high + 1
    lo = next(found) if lo_rank < size else model.low - 1
    return lo, hi, (min(lo_rank, size) - max(hi_rank, -1)) / size


def tie_index(base, t, key: int, rank: int, counts: torch.Tensor, model: int, column: int, block: int,
              tuned_are_deltas) -> torch.Tensor:
    """Flat index (0-dim int64) of the rank-th (1-based) element whose key is ``key``, found from
    the per-block counts ``counts[:, model, column]`` of the bracket pass and one block. The
    backends provide their own ``tie_indices``."""
    device, numel = base.device, base.numel()
    cum = counts[:, model, column].cumsum(0)
    found = torch.searchsorted(cum, torch.full((1,), rank, dtype=cum.dtype, device=device))
    before = torch.where(found > 0, cum[(found - 1).clamp(min=0)], 0)
    offs = found * block + torch.arange(block, device=device)
    valid = offs < numel
    offs = offs.clamp(max=numel - 1)
    equal = (magnitude_keys(_deltas_at(base, t, offs, tuned_are_deltas)) == key) & valid
    nth = equal & (equal.long().cumsum(0) == rank - before)
    return offs[torch.argmax(nth.to(torch.int32))]


def tie_indices(base, tuned, queries, counts: torch.Tensor, block: int, tuned_are_deltas) -> list[torch.Tensor]:
    """``tie_index`` of every query (model, key, rank, column) of a pass, model indexing ``tuned``
    and ``counts``' second axis. The backends may replace it (the Triton one: two launches for all)."""
    return [tie_index(base, tuned[i], key, rank, counts, i, column, block, tuned_are_deltas)
            for i, key, rank, column in queries]


def _candidate_ranks(cand: torch.Tensor, rows: list[int], stored: list[int], ranks: list[int]) -> list:
    """(key, cutoff) of the ranks-th (1-based) largest of the first ``stored`` packed candidates
    of each of ``rows``: on the GPU one segmented sort and one gather for all rows (the unfilled
    tails masked to the smallest int64, below every candidate), on the CPU one selection per row."""
    if cand.device.type not in SORTING_DEVICES:
        packed = torch.stack([_kth_largest(cand[i, :n], [r - 1])[0] for i, n, r in zip(rows, stored, ranks)])
    else:
        device = cand.device
        rows_t, stored_t, ranks_t = host_to_device([rows, stored, ranks], torch.int64, device)
        width = max(stored)
        block = cand[:, :width] if list(rows) == list(range(cand.shape[0])) else cand[rows_t, :width]  # (a view)
        unfilled = torch.arange(width, device=device) >= stored_t[:, None]
        ordered = torch.sort(block.masked_fill_(unfilled, torch.iinfo(torch.int64).min), dim=1, descending=True).values
        packed = ordered.gather(1, (ranks_t - 1)[:, None]).reshape(-1)
    return list(zip(_candidate_keys(packed), INDEX_MASK - (packed & INDEX_MASK)))


def _candidate_keys(cand: torch.Tensor) -> torch.Tensor:
    return (cand >> INDEX_BITS) + KEY_BIAS


def _capacity(share: float, population: int) -> int:
    """Candidate slots per model for a pass expected to compact ``share`` of ``population`` keys."""
    return min(population, int(1.25 * share * population) + 8192)


def _pass_buffers(numel: int, n: int, cap: int, device) -> tuple:
    """(block, counts, cand, fill) of a bracket pass over n models: the count block size, per-block
    counts [blocks, n, 4] int32, candidates [n, cap] int64 and their fill counters [n] int64."""
    block = block_size(device)
    return (block, torch.empty(-(-numel // block), n, 4, dtype=torch.int32, device=device),
            torch.empty(n, cap, dtype=torch.int64, device=device), torch.zeros(n, dtype=torch.int64, device=device))


def _stack(values: list, device) -> torch.Tensor:
    """int64 [len(values)] on ``device`` from host ints and device scalars, without a sync: one
    host copy for the ints and one stack (not a launch per value)."""
    ints = [v for v in values if not isinstance(v, torch.Tensor)]
    if len(ints) == len(values):
        return host_to_device(values, torch.int64, device)
    host = iter(host_to_device(ints, torch.int64, device) if ints else ())
    return torch.stack([v.reshape(()) if isinstance(v, torch.Tensor) else next(host) for v in values]).to(torch.int64)


def magnitude_select(base, tuned, ks, tuned_are_deltas, kernels, subsample_size=None):
    """(keys, cutoffs), int64 [N] on base's device, of the top-kᵢ |δᵢ| of each model.

    ``kernels`` is the backend's module: ``bracket_pass(base, tuned, lo, hi, rate, cap, block,
    tuned_are_deltas, counts, cand, fill)`` (triton/magnitude_select.py, ops/_cpp_kernels.py), and
    where it has them its own ``sample_keys`` and ``tie_indices`` (else this module's). Contiguous
    inputs, 1 <= kᵢ < numel < 2^33.
    """
    device, numel = base.device, base.numel()
    if numel >= MAX_NUMEL:
        raise ValueError(f"magnitude selection supports tensors under 2^{INDEX_BITS} elements, got {numel}")
    models = [_Model(k, numel) for k in ks]
    subsample = subsample_size or sample_size(numel, device)
    if numel > SMALL:  # small tensors: the first pass compacts every element
        sampler = getattr(kernels, "sample_keys", sample_keys)
        for model, row in zip(models, _sample(base, tuned, tuned_are_deltas, sampler)):
            model.sample, model.sorted = row, True
    for _ in range(MAX_PASSES):
        pending = [m for m in models if m.result is None]
        if not pending:
            break
        _run_pass(base, [tuned[models.index(m)] for m in pending], pending, tuned_are_deltas, kernels.bracket_pass,
                  getattr(kernels, "tie_indices", tie_indices), subsample)
    else:  # pragma: no cover - the region shrinks every two passes
        raise RuntimeError("magnitude_select did not converge")
    return _stack([m.result[0] for m in models], device), _stack([m.result[1] for m in models], device)


def _run_pass(base, tuned, models, tuned_are_deltas, bracket_pass, find_ties, subsample):
    device, numel, n = base.device, base.numel(), len(models)
    los, his, rates, caps = [], [], [], []
    for m in models:
        if m.sample is not None:  # bracket around the target from a sample of the region
            lo, hi, share = _bracket(m)
            rate = FULL_RATE
        else:  # collect a uniform subsample of the region (all of it when small)
            lo, hi = m.low - 1, m.high + 1
            share = 1.0 if m.population <= max(subsample, SMALL) else subsample / m.population
            rate = min(FULL_RATE, math.ceil(share * FULL_RATE))
        los.append(lo)
        his.append(hi)
        rates.append(rate)
        caps.append(_capacity(share, m.population))
    lo_t, hi_t = _stack(los + his, device).split(n)
    rate_t = host_to_device(rates, torch.int64, device)
    cap = max(caps)
    block, counts, cand, fill = _pass_buffers(numel, n, cap, device)
    bracket_pass(base, tuned, lo_t, hi_t, rate_t, cap, block, tuned_are_deltas, counts, cand, fill)
    totals = counts.sum(0, dtype=torch.int64)
    host = torch.cat([totals.reshape(-1), fill, lo_t, hi_t]).tolist()  # the pass's one synchronisation
    ties = []  # (model, key, rank, column) of the models whose K is a bracket end
    inner = []  # (model, candidates stored, rank among them) of the models whose K is inside
    for i, m in enumerate(models):
        gt, eq_hi, eq_lo, inside = host[4 * i: 4 * i + 4]
        stored, lo, hi = host[4 * n + i], host[5 * n + i], host[6 * n + i]
        if lo == hi:
            eq_lo = inside = 0
        k = m.k
        m.sample, m.sorted = None, False
        if k <= gt:  # K above the bracket
            m.below, m.low = numel - gt, hi + 1
        elif k <= gt + eq_hi:
            ties.append((i, hi, k - gt, 1))
        elif k <= gt + eq_hi + inside:
            if stored == inside and stored <= cap:
                inner.append((i, stored, k - gt - eq_hi))
            else:
                m.above, m.below, m.low, m.high = gt + eq_hi, numel - gt - eq_hi - inside, lo + 1, hi - 1
                if rates[i] < FULL_RATE:  # a uniform subsample of the new region
                    m.sample = _candidate_keys(cand[i, :min(stored, cap)])
        elif k <= gt + eq_hi + inside + eq_lo:
            ties.append((i, lo, k - gt - eq_hi - inside, 2))
        else:  # K below the bracket
            m.above, m.high = gt + eq_hi + inside + eq_lo, lo - 1
    if inner:
        rows, stored, ranks = zip(*inner)
        for i, result in zip(rows, _candidate_ranks(cand, list(rows), list(stored), list(ranks))):
            models[i].result = result
    if ties:
        for (i, key, _, _), cutoff in zip(ties, find_ties(base, tuned, ties, counts, block, tuned_are_deltas)):
            models[i].result = key, cutoff
