"""Exact per-model magnitude top-k: the TIES trim, and any other "keep the k largest |δ|" cut.

For model i and kᵢ ∈ [1, numel) the selection returns the magnitude key Kᵢ (the fp32 bits of
the kᵢ-th largest |δᵢ|) and the cutoff Cᵢ, the last flat index kept among the elements whose
key equals Kᵢ: element e is kept iff ``key(e) > Kᵢ or (key(e) == Kᵢ and e <= Cᵢ)`` — exactly
kᵢ elements, ties going to the lower flat index. The same tensor may appear several times
with different k (a top and a bottom cut).

Algorithm, written once here over a *selector* (the device layer's handle on one call's inputs:
``HostSelector`` below, numpy and the C++ passes without torch; ``triton/magnitude_select.py``'s
``DeviceSelector``, torch tensors and the Triton passes on the GPU):

1. Sample: S keys per model (runs of 16 contiguous elements at random positions).
   The kᵢ-th largest lies, with overwhelming probability, between the sample keys at ranks
   r ± m (r = S·kᵢ/numel, m = 4 binomial standard deviations + 64): the bracket [lo, hi].
2. One bracket pass reads base and every tuned tensor once: per block (1024 or 2048 elements) the
   counts of key > hi, key == hi, key == lo and lo < key < hi; the elements strictly inside
   (about 2m/S of the tensor) are compacted. Equal keys at the bracket ends are counted, never
   compacted or sorted, so heavy ties (bf16 deltas) cost nothing.
3. Resolve, with one host synchronisation per pass for all models: K = hi or lo → C is the
   r-th equal key in flat order, found from the per-block counts and one block; K inside →
   the candidates ordered by (key desc, index asc) give K and C at rank k. With ties to the
   higher index (``higher_index``) C is the last equal key left out: the same searches at
   another rank, after counting the candidates above and at K. A selector may resolve a pass
   itself (the GPU's: every step on the device, its one synchronisation after the last).
4. A sample that missed (rare): the exact counts bound the key region holding K; a pass that
   compacts a uniform hash-subsample of that region gives a new sample, and a bracket pass
   from it resolves — about two more passes; the region shrinks every two passes, so every
   input finishes.

A selector holds one call's inputs (base, N tuned tensors of ``numel`` elements) and provides:
``sample_size(numel)`` and ``sample(size)`` (each model's sample keys; in descending order where
``SAMPLE_SORTED``); ``order_statistics(samples, ranks, presorted)`` (per sample the keys at
those descending ranks, for every model in one call); ``bracket_pass(rows, los, his, rates, cap)`` (a
``PassCounts``, its one host synchronisation); ``candidate_ranks(cand, rows, stored, ranks)``;
``tie_indices(rows, queries, counts)``; ``results(values)`` (the returned keys or cutoffs); and
``subset(rows)``; ``rows`` index its tuned tensors. Optionally ``resolve_pass(rows, los, his, cap,
ks)``: a bracket pass without subsampling and its resolution with ties to the lower index, as
(keys, cutoffs), or None where a model's K lies outside its bracket or its candidates overflowed
(the pass above then runs).

Extra memory: ~1.25·(2m/S)·numel int64 candidates per model (≤ 0.5% of the elements at
S = 2^20) plus 16 bytes per block. Largest tensor: numel < 2^33 (the packed index).
"""
from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import numpy as np

from ._extension import cpu_extension

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
SAMPLE_SEED = 0x5EED


def sample_size(numel: int, top: int, share: int) -> int:
    """Sample keys per model: numel/share, at most ``top``, in whole runs."""
    return max(RUN, min(top, numel // share) // RUN * RUN)


def candidate_keys(cand):
    """The magnitude keys of packed candidates (numpy or torch int64)."""
    return (cand >> INDEX_BITS) + KEY_BIAS


def candidate_index(cand):
    """The flat indices of packed candidates (numpy or torch int64)."""
    return INDEX_MASK - (cand & INDEX_MASK)


class PassCounts(NamedTuple):
    """What a bracket pass found: ``host`` holds per model (gt, eq_hi, eq_lo, inside, stored,
    lo, hi) as ints (keys > hi, == hi, == lo, strictly inside, candidates stored, the bracket);
    ``counts`` [blocks, N, 4] int32 and ``cand`` [N, cap] int64 stay where the pass wrote them."""

    host: list
    counts: object
    cand: object


class _Model:
    """One model's search state: the key region [low, high] known to hold K, with exact counts."""

    def __init__(self, k: int, numel: int):
        self.k, self.numel = k, numel
        self.low, self.high = 0, MAX_KEY
        self.above = self.below = 0  # keys > high, keys < low
        self.sample = None  # keys of a uniform sample of the region, when known
        self.sorted = False  # ... in descending order
        self.result = None  # (key, cutoff): ints or device scalars

    @property
    def population(self) -> int:
        return self.numel - self.above - self.below


def _brackets(models: list[_Model], selector) -> list[tuple]:
    """(lo, hi, expected share of the region strictly inside) around each model's target rank,
    from its sample (one ``order_statistics`` call for all); lo and hi are the selector's
    scalars, or ints where the margin passes the sample's end."""
    plans, wanted = [], []
    for model in models:
        size = len(model.sample)
        p = (model.k - model.above) / model.population
        rank, margin = p * size, Z * math.sqrt(size * p * (1.0 - p)) + SLACK
        hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)
        plans.append((size, hi_rank, lo_rank))
        wanted.append([r for r in (hi_rank, lo_rank) if 0 <= r < size])
    found = selector.order_statistics([m.sample for m in models], wanted, [m.sorted for m in models])
    brackets = []
    for model, (size, hi_rank, lo_rank), values in zip(models, plans, found):
        values = iter(values)
        hi = next(values) if hi_rank >= 0 else model.high + 1
        lo = next(values) if lo_rank < size else model.low - 1
        brackets.append((lo, hi, (min(lo_rank, size) - max(hi_rank, -1)) / size))
    return brackets


def _capacity(share: float, population: int) -> int:
    """Candidate slots per model for a pass expected to compact ``share`` of ``population`` keys."""
    return min(population, int(1.25 * share * population) + 8192)


def magnitude_select(selector, ks: list[int], higher_index: bool = False) -> tuple:
    """(keys, cutoffs) of the top-kᵢ |δᵢ| of each of the selector's models, as
    ``selector.results`` gives them (1 <= kᵢ < numel < 2^33). ``higher_index``: equal magnitudes
    rank higher at the higher flat index instead, kept iff key > K or (key == K and e > C), C = -1
    where every equal key is kept."""
    numel = selector.numel
    if numel >= MAX_NUMEL:
        raise ValueError(f"magnitude selection supports tensors under 2^{INDEX_BITS} elements, got {numel}")
    models = [_Model(k, numel) for k in ks]
    size = selector.sample_size(numel)
    if numel > SMALL:  # small tensors: the first pass compacts every element
        for model, row in zip(models, selector.sample(size)):
            model.sample, model.sorted = row, selector.SAMPLE_SORTED
    for _ in range(MAX_PASSES):
        pending = [i for i, m in enumerate(models) if m.result is None]
        if not pending:
            break
        resolved = _run_pass(selector, pending, [models[i] for i in pending], size, higher_index)
        if resolved is not None:
            if len(pending) == len(models):  # (no restacking of the selector's results)
                return resolved
            for j, i in enumerate(pending):
                models[i].result = resolved[0][j], resolved[1][j]
    else:  # pragma: no cover - the region shrinks every two passes
        raise RuntimeError("magnitude_select did not converge")
    return selector.results([m.result[0] for m in models]), selector.results([m.result[1] for m in models])


def trim_thresholds(selector, ks: list[int]) -> tuple:
    """(keys, cutoffs) of the top-kᵢ |δᵢ| of each of the selector's models, as ``selector.results``
    gives them, for any 0 <= kᵢ <= numel: ``magnitude_select`` where kᵢ < numel, and key 0 with
    cutoff numel − 1 (everything kept) where kᵢ = numel."""
    numel = selector.numel
    active = [i for i, k in enumerate(ks) if k < numel]
    if len(active) == len(ks):
        return magnitude_select(selector, ks)
    keys, cutoffs = [0] * len(ks), [numel - 1] * len(ks)
    if active:
        found_keys, found_cutoffs = magnitude_select(selector.subset(active), [ks[i] for i in active])
        for j, i in enumerate(active):
            keys[i], cutoffs[i] = found_keys[j], found_cutoffs[j]
    return selector.results(keys), selector.results(cutoffs)


def _pass_brackets(selector, models: list[_Model], subsample: int) -> tuple[list, list, list[int], int]:
    """(los, his, subsample rates, candidate slots) of a bracket pass over ``models``: around the
    target from a model's sample where it has one, else the whole region with a uniform
    subsample of it (all of it when small)."""
    sampled = [m for m in models if m.sample is not None]
    brackets = iter(_brackets(sampled, selector) if sampled else ())
    los, his, rates, caps = [], [], [], []
    for m in models:
        if m.sample is not None:  # bracket around the target from a sample of the region
            lo, hi, share = next(brackets)
            rate = FULL_RATE
        else:  # collect a uniform subsample of the region (all of it when small)
            lo, hi = m.low - 1, m.high + 1
            share = 1.0 if m.population <= max(subsample, SMALL) else subsample / m.population
            rate = min(FULL_RATE, math.ceil(share * FULL_RATE))
        los.append(lo)
        his.append(hi)
        rates.append(rate)
        caps.append(_capacity(share, m.population))
    return los, his, rates, max(caps)


def _run_pass(selector, rows: list[int], models: list[_Model], subsample: int, higher: bool = False):
    """One bracket pass over the selector's models ``rows`` (their states ``models``), and the
    resolution of every model whose K it pins down (``higher``: ties to the higher flat index,
    the cutoff then the last equal key left out, -1 for none). Where the selector resolves the
    whole pass itself (``resolve_pass``: ties to the lower index, no subsampling), returns its
    (keys, cutoffs) of ``models`` instead of setting their results."""
    numel = selector.numel
    los, his, rates, cap = _pass_brackets(selector, models, subsample)
    resolve = getattr(selector, "resolve_pass", None)
    if resolve is not None and not higher and all(rate == FULL_RATE for rate in rates):
        resolved = resolve(rows, los, his, cap, [m.k for m in models])
        if resolved is not None:
            return resolved
    found = selector.bracket_pass(rows, los, his, rates, cap)
    ties = []  # (pass row, key, rank, column) of the models whose K is a bracket end
    inner = []  # (pass row, candidates stored, rank among them) of the models whose K is inside
    for j, (m, (gt, eq_hi, eq_lo, inside, stored, lo, hi)) in enumerate(zip(models, found.host)):
        if lo == hi:
            eq_lo = inside = 0
        k = m.k
        m.sample, m.sorted = None, False
        if k <= gt:  # K above the bracket
            m.below, m.low = numel - gt, hi + 1
        elif k <= gt + eq_hi:
            ties.append((j, hi, eq_hi - (k - gt) if higher else k - gt, 1))
        elif k <= gt + eq_hi + inside:
            if stored == inside and stored <= cap:
                inner.append((j, stored, k - gt - eq_hi))
            else:
                m.above, m.below, m.low, m.high = gt + eq_hi, numel - gt - eq_hi - inside, lo + 1, hi - 1
                if rates[j] < FULL_RATE:  # a uniform subsample of the new region
                    m.sample = candidate_keys(found.cand[j, :min(stored, cap)])
        elif k <= gt + eq_hi + inside + eq_lo:
            kept = k - gt - eq_hi - inside
            ties.append((j, lo, eq_lo - kept if higher else kept, 2))
        else:  # K below the bracket
            m.above, m.high = gt + eq_hi + inside + eq_lo, lo - 1
    if inner:
        at, stored, ranks = (list(x) for x in zip(*inner))
        results = list(selector.candidate_ranks(found.cand, at, stored, ranks))
        if higher:  # K's candidates hold ranks a+1 … a+q in index order, and the first q − (r − a) are left out
            again = []  # (position in at, rank of the last one left out)
            for p, (j, n, r, (key, _)) in enumerate(zip(at, stored, ranks, results)):
                keys = candidate_keys(found.cand[j, :n])
                above, equal = int((keys > key).sum()), int((keys == key).sum())
                left_out = equal - (r - above)
                results[p] = key, -1
                if left_out > 0:
                    again.append((p, above + left_out))
            if again:
                where = [p for p, _ in again]
                cuts = selector.candidate_ranks(found.cand, [at[p] for p in where], [stored[p] for p in where],
                                                [rank for _, rank in again])
                for p, (_, cutoff) in zip(where, cuts):
                    results[p] = results[p][0], cutoff
        for j, result in zip(at, results):
            models[j].result = result
    if higher:  # none of K's equal keys left out: cutoff -1, no search
        for j, key, _, _ in [t for t in ties if t[2] == 0]:
            models[j].result = key, -1
        ties = [t for t in ties if t[2] > 0]
    if ties:
        for (j, key, _, _), cutoff in zip(ties, selector.tie_indices(rows, ties, found.counts)):
            models[j].result = key, cutoff


def higher_index_cuts(selector, counts: list[int]) -> tuple[list[int], list[int]]:
    """For each of the selector's models j and counts[j]: the key K and cutoff C of the counts[j]
    largest |δ| with equal magnitudes ranked higher at the higher flat index (a stable ascending
    sort's order) — kept iff key > K or (key == K and e > C): ``magnitude_select`` with
    ``higher_index`` (no sort). Any count: ≥ numel keeps all, ≤ 0 none."""
    numel = selector.numel
    keys = [-1 if c >= numel else MAX_KEY + 1 for c in counts]
    cuts = [-1 if c >= numel else numel for c in counts]
    inner = [j for j, c in enumerate(counts) if 0 < c < numel]
    if not inner:
        return keys, cuts
    found_keys, found_cuts = magnitude_select(selector.subset(inner), [counts[j] for j in inner], higher_index=True)
    for j, key, cut in zip(inner, found_keys.tolist(), found_cuts.tolist()):
        keys[j], cuts[j] = key, cut
    return keys, cuts


class HostSelector:
    """The selection's CPU side, without torch: numpy for the order statistics, the C++ passes
    (csrc/cpu/magnitude_select.cpp) on raw addresses. ``tuned`` and ``codes``: the tuned
    tensors' addresses and storage dtype codes (csrc/cpu/common.h); every tensor holds
    ``numel`` contiguous elements."""

    BLOCK = 2048  # elements per block of the bracket pass's counts (< 2^16: 16-bit count fields)
    SAMPLE_TOP, SAMPLE_SHARE = 1 << 18, 128
    SAMPLE_SORTED = True

    def __init__(self, base: int, base_code: int, tuned: list[int], codes: list[int], numel: int,
                 tuned_are_deltas: bool):
        self.base, self.base_code, self.tuned, self.codes = base, base_code, list(tuned), list(codes)
        self.numel, self.tuned_are_deltas = numel, tuned_are_deltas
        self.ext = cpu_extension()

    def subset(self, rows: list[int]) -> HostSelector:
        return HostSelector(self.base, self.base_code, [self.tuned[i] for i in rows], [self.codes[i] for i in rows],
                            self.numel, self.tuned_are_deltas)

    def sample_size(self, numel: int) -> int:
        """~numel/128 keys, at most 2^18 (a 2-vCPU Xeon: the sort of 2^18 keys 0.56 ms)."""
        return sample_size(numel, self.SAMPLE_TOP, self.SAMPLE_SHARE)

    def sample(self, size: int) -> np.ndarray:
        """[N, size] int32 keys of each model's deltas at ``size / RUN`` random aligned runs (a fixed
        seed per shape), in descending order (numpy's vectorised sort)."""
        runs = _sample_runs(self.numel, size // RUN, RUN)
        keys = np.empty((len(self.tuned), runs.size * RUN), dtype=np.int32)
        self.ext.sample_keys(self.base, self.base_code, self.tuned, self.codes, self.numel, self.tuned_are_deltas,
                             runs.ctypes.data, runs.size, RUN, keys.ctypes.data)
        keys.sort(axis=-1)
        return keys[:, ::-1]

    def order_statistics(self, samples: list[np.ndarray], ranks: list[list[int]], presorted: list[bool]) -> list:
        return [self.kth_largest(s, r, p) for s, r, p in zip(samples, ranks, presorted)]

    @staticmethod
    def kth_largest(values: np.ndarray, ranks: list[int], presorted: bool) -> list[int]:
        """The ranks-th (0-based) largest values: read off where ``presorted`` (descending), else an
        introselect per rank in place (``ndarray.partition``, which reorders ``values``: several
        ranks in one call took 22× one rank's time on 2^18 keys)."""
        if presorted:
            return [int(values[r]) for r in ranks]
        found = []
        for r in ranks:
            values.partition(values.size - 1 - r)
            found.append(int(values[values.size - 1 - r]))
        return found

    def bracket_pass(self, rows: list[int], los: list, his: list, rates: list[int], cap: int) -> PassCounts:
        """The C++ pass into this thread's scratch arrays (valid until its next pass)."""
        n = len(rows)
        counts = _scratch("counts", (-(-self.numel // self.BLOCK), n, 4), np.int32)
        cand, fill = _scratch("cand", (n, cap), np.int64), np.zeros(n, dtype=np.int64)
        los, his = [int(v) for v in los], [int(v) for v in his]
        self.ext.bracket_pass(self.base, self.base_code, [self.tuned[i] for i in rows], [self.codes[i] for i in rows],
                              self.numel, self.tuned_are_deltas, los, his, rates, cap, self.BLOCK,
                              counts.ctypes.data, cand.ctypes.data, fill.ctypes.data)
        totals = counts.sum(0, dtype=np.int64).tolist()
        host = [(*t, int(f), lo, hi) for t, f, lo, hi in zip(totals, fill, los, his)]
        return PassCounts(host, counts, cand)

    def candidate_ranks(self, cand: np.ndarray, rows: list[int], stored: list[int], ranks: list[int]) -> list:
        """(key, cutoff) of the ranks-th (1-based) largest of the first ``stored`` candidates of
        each of ``rows``: one introselect per row, in place."""
        packed = [self.kth_largest(cand[i, :n], [r - 1], False)[0] for i, n, r in zip(rows, stored, ranks)]
        return [(candidate_keys(p), candidate_index(p)) for p in packed]

    def tie_indices(self, rows: list[int], queries: list, counts: np.ndarray) -> list[int]:
        """Flat index of the rank-th (1-based) element with key ``key`` of each query (pass row,
        key, rank, column): the block from the running per-block counts of that row and column,
        the element from one C++ scan of that block."""
        found = []
        for j, key, rank, column in queries:
            running = np.cumsum(counts[:, j, column], dtype=np.int64)
            block = int(np.searchsorted(running, rank))
            before = int(running[block - 1]) if block else 0
            start = block * self.BLOCK
            i = rows[j]
            found.append(self.ext.tie_index(self.base, self.base_code, self.tuned[i], self.codes[i], self.numel,
                                            self.tuned_are_deltas, start, min(self.numel, start + self.BLOCK),
                                            int(key), rank - before))
        return found

    @staticmethod
    def results(values: list) -> np.ndarray:
        return np.array([int(v) for v in values], dtype=np.int64)


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """An uninitialised array of ``shape`` over this thread's grow-only buffer ``name``: a
    checkpoint's hundreds of selections reuse its pages, where fresh arrays took a page fault
    per 4 KiB written. It stays as large as the largest pass's candidates or counts: for two
    models of 136M bf16 elements (a 0.5B model's embedding), 23 + 2 MB, ~3% of their inputs."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
        setattr(_SCRATCH, name, buffer)
    return buffer[:nbytes].view(dtype).reshape(shape)


@functools.lru_cache(maxsize=16)
def _sample_runs(numel: int, count: int, run: int) -> np.ndarray:
    """``count`` random aligned run indices for a shape (fixed seed), drawn once per shape: a
    checkpoint's tensors share a few shapes."""
    runs = np.random.default_rng(SAMPLE_SEED).integers(0, numel // run, count, dtype=np.int64)
    runs.flags.writeable = False
    return runs
