"""TIES trim (exact k, ties → lower index), magnitude selection paths, and DARE drop
(keep rate, rescale, determinism across thread counts and block sizes)."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import backend_device, needs_avx512, with_and_without_avx512

import vfuse_kernels as vk
from vfuse_kernels import selection as ms
from vfuse_kernels._backend import cpu_extension
from vfuse_kernels.reference import delta_merge as ref
from vfuse_kernels.reference import magnitude_select as ref_select


def expected_trim(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by |δ| with ties to the lower flat index, written out with Python's sort."""
    flat = delta.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda e: (-abs(flat[e]), e))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(delta.shape)


@pytest.mark.parametrize("numel", [997, 5003])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.8, 1.0])
def test_ties_threshold_ties_go_to_lower_index(backend, density, numel):
    """Many equal magnitudes straddle the threshold: exactly k survive, the lowest indices first
    (5003 elements: the equal keys span several merge blocks, before and after the cutoff's)."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([0.5, -0.5, 1.0, -1.0, 2.0, 0.25])
    delta = values[torch.randint(0, len(values), (numel,), generator=gen)]
    base = torch.randn(numel, generator=gen).round()  # integers: θ = base + δ is exact in fp32
    out = vk.delta_merge(base.to(device), [(base + delta).to(device)], 1.0, method="ties", density=density)
    kept = (out.cpu() != base)
    k = ref.trim_count(density, numel)
    assert kept.sum().item() == k
    assert torch.equal(kept, expected_trim(delta, k))
    assert torch.equal(out.cpu()[kept], (base + delta)[kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_magnitude_threshold(backend, dtype):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(4001, generator=gen).to(dtype).to(device)
    for density in (0.001, 0.3, 0.999, 1.0):
        got = vk.magnitude_threshold(delta, density)
        assert got.dim() == 0 and got.dtype == dtype
        assert got.item() == ref.magnitude_threshold(delta.cpu(), density).item()
    assert vk.magnitude_threshold(torch.tensor([0.5, -2.0, 1.0, -0.25], device=device), 0.5).item() == 1.0


def test_ties_thresholds_match_reference_selection(backend):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3001, generator=gen).bfloat16()
    tuned = [(base.float() + 0.01 * torch.randn(3001, generator=gen)).bfloat16() for _ in range(3)]
    keys, cutoffs = vk.ties_thresholds(base.to(device), [t.to(device) for t in tuned], [0.2, 0.5, 0.9])
    for i, (t, p) in enumerate(zip(tuned, [0.2, 0.5, 0.9])):
        delta = t.float() - base.float()
        keep = ref.top_magnitude_mask(delta, ref.trim_count(p, delta.numel()))
        key = delta.abs().view(torch.int32).long()
        rebuilt = (key > keys[i].cpu()) | ((key == keys[i].cpu()) & (torch.arange(delta.numel()) <= cutoffs[i].cpu()))
        assert torch.equal(rebuilt, keep)


def _tie_heavy(numel, models, dtype=torch.bfloat16, seed=3, device="cpu"):
    """Fine-tunes whose deltas take few distinct values (θ and base both rounded to dtype)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(dtype)
    steps = torch.randint(-4, 5, (models, numel), generator=gen).float() * 2.0**-7
    tuned = [(base.float() + s).to(dtype) for s in steps]
    return base.to(device), [t.to(device) for t in tuned]


def _assert_exact_selection(base, tuned, densities, got, tuned_are_deltas=False):
    """(K, C) against the definition, in O(n): keys above K number fewer than k, and with the
    equal keys up to index C they number exactly k; C itself holds key K."""
    b = 0 if tuned_are_deltas else base.reshape(-1).float().cpu()
    for i, (t, p) in enumerate(zip(tuned, densities)):
        key = ((t.reshape(-1).float().cpu() - b).view(torch.int32).long() & 0x7FFFFFFF)
        k, numel = ref.trim_count(p, key.numel()), key.numel()
        K, C = got.keys[i].item(), got.cutoffs[i].item()
        if k == numel:
            assert (K, C) == (0, numel - 1)
            continue
        above = int((key > K).sum())
        assert above < k and key[C].item() == K
        assert above + int((key[: C + 1] == K).sum()) == k


@pytest.fixture
def select_passes(monkeypatch):
    """Records the models of every bracket pass of the selection (vfuse_kernels/selection.py)."""
    passes = []
    original = ms._run_pass

    def recorded(selector, rows, models, *args):
        passes.append(len(models))
        return original(selector, rows, models, *args)

    monkeypatch.setattr(ms, "_run_pass", recorded)
    return passes


def selector_class(backend):
    """The selection's device side that ``backend`` runs (C++ and numpy, or Triton and torch)."""
    if backend == "cpp":
        return ms.HostSelector
    from vfuse_kernels.triton.magnitude_select import DeviceSelector

    return DeviceSelector


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_selection_sampled_one_pass(backend, dtype, select_passes, monkeypatch):
    """Sampled brackets on tie-heavy data: every density edge exact, in one pass (order statistics
    by selections on the CPU's side, by a sort on the GPU's)."""
    monkeypatch.setattr(ms, "SMALL", 1024)
    numel = 200_003 if backend == "cpp" else 40_009
    base, tuned = _tie_heavy(numel, 4, dtype, device=backend_device(backend))
    densities = [1e-9, 0.01, 0.5, 0.99]
    _assert_exact_selection(base, tuned, densities, vk.ties_thresholds(base, tuned, densities))
    densities = [0.3, 0.9, 1.0, 2.0 / numel]
    _assert_exact_selection(base, tuned, densities, vk.ties_thresholds(base, tuned, densities))
    assert select_passes == [4, 3]  # density 1 needs no selection


@pytest.mark.parametrize("block", [256, 1024, 2048])
def test_selection_independent_of_block_size(backend, block, monkeypatch):
    """The bracket pass's count blocks (1024 elements on the GPU, 2048 on the CPU) only change
    the bookkeeping: the tie search and the counts give the same exact cut at every block size."""
    monkeypatch.setattr(ms, "SMALL", 1024)
    monkeypatch.setattr(selector_class(backend), "BLOCK", block)
    base, tuned = _tie_heavy(50_021, 3, device=backend_device(backend))
    densities = [0.002, 0.3, 0.7]
    _assert_exact_selection(base, tuned, densities, vk.ties_thresholds(base, tuned, densities))


@pytest.mark.parametrize("miss", ["above", "below", "inside"])
def test_selection_recovers_from_a_missed_sample(backend, miss, select_passes, monkeypatch):
    """A sample that misses (K above or below the bracket, or far more keys inside than expected)
    costs more passes, never exactness."""
    base, tuned = _tie_heavy(30_011, 2, device=backend_device(backend))
    deltas = [t.float().cpu() - base.float().cpu() for t in tuned]
    keys = [(d.view(torch.int32).long() & 0x7FFFFFFF).sort(descending=True).values for d in deltas]

    def wrong_sample(selector, size):
        if miss == "inside":  # half the sample at the top key, half at the bottom: a narrow bracket
            rows = torch.stack([torch.cat([k[0].expand(32), k[-1].expand(32)]) for k in keys])
        else:  # all sample keys at the top (or bottom) key
            rows = torch.stack([k[0 if miss == "below" else -1].expand(64) for k in keys])
        return rows.numpy() if backend == "cpp" else rows.to(base.device)

    cls = selector_class(backend)
    monkeypatch.setattr(cls, "sample", wrong_sample)
    monkeypatch.setattr(cls, "sample_size", lambda selector, numel: 512)
    monkeypatch.setattr(ms, "SMALL", 1024)  # sample tensors of this size
    monkeypatch.setattr(ms, "Z", 0.5)  # margins narrow enough that the 64 keys do not span everything
    monkeypatch.setattr(ms, "SLACK", 0)
    densities = [0.3, 0.6]
    _assert_exact_selection(base, tuned, densities, vk.ties_thresholds(base, tuned, densities))
    assert len(select_passes) >= 2


def test_selection_all_zero_deltas_and_single_element(backend):
    device = backend_device(backend)
    base = torch.randn(70_001).to(device)
    for tuned in ([base.clone()], [base.clone(), base + 1.0]):
        got = vk.ties_thresholds(base, tuned, 0.25)
        _assert_exact_selection(base, tuned, [0.25] * len(tuned), got)
    one = torch.tensor([0.5], device=device)
    got = vk.ties_thresholds(one, [one + 1], 0.5)
    assert got.keys.tolist() == [0] and got.cutoffs.tolist() == [0]


def test_selection_deltas_noncontiguous_and_repeated(backend):
    """tuned_are_deltas, non-contiguous views, and one tensor listed twice with two densities
    (a top and a bottom cut)."""
    device = backend_device(backend)
    base, tuned = _tie_heavy(2 * 50_021, 2, device=device)
    deltas = [(t.float() - base.float()).reshape(2, -1).t() for t in tuned]  # non-contiguous
    assert not deltas[0].is_contiguous()
    zero = torch.zeros_like(deltas[0])
    got = vk.ties_thresholds(zero, [deltas[0], deltas[0], deltas[1]], [0.1, 0.9, 0.5], tuned_are_deltas=True)
    flat = [d.contiguous() for d in (deltas[0], deltas[0], deltas[1])]
    _assert_exact_selection(zero.contiguous(), flat, [0.1, 0.9, 0.5], got, tuned_are_deltas=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_selection_at_scale(dtype, select_passes):
    """2^27 elements, tie-heavy: exact, one pass."""
    base, tuned = _tie_heavy(1 << 27, 2, dtype, seed=9)
    densities = [0.01, 0.5]
    _assert_exact_selection(base, tuned, densities, vk.ties_thresholds(base, tuned, densities))
    assert select_passes == [2]


def test_dare_keep_rate_and_density_rescale(backend):
    device = backend_device(backend)
    numel, p = 200_003 if backend == "cpp" else 20_011, 0.3
    gen = torch.Generator().manual_seed(4)
    delta = torch.randn(numel, generator=gen).abs() + 1.0  # nonzero everywhere
    base = torch.zeros(numel)
    out = vk.delta_merge(base.to(device), [delta.to(device)], 1.0, method="dare_linear", density=p, seed=11,
                         tuned_are_deltas=True).cpu()
    kept = out != 0
    rate = kept.double().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / numel) ** 0.5
    coef = torch.tensor(1.0 / p, dtype=torch.float64).float()
    assert torch.equal(out[kept], delta[kept] * coef)


def test_dare_l1_rescale_keeps_norm(backend):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    delta = torch.randn(5003, generator=gen)
    out = vk.delta_merge(torch.zeros(5003, device=device), [delta.to(device)], 1.0, method="dare_linear",
                         density=0.4, rescale="l1", seed=2, tuned_are_deltas=True).cpu()
    torch.testing.assert_close(out.double().abs().sum(), delta.double().abs().sum(), rtol=1e-6, atol=0)


def test_dare_seed_changes_mask_and_same_seed_repeats(backend):
    device = backend_device(backend)
    base = torch.zeros(4096, device=device)
    delta = torch.ones(4096, device=device)

    def mask(seed):
        return vk.delta_merge(base, [delta], 1.0, method="dare_linear", density=0.5, seed=seed,
                              tuned_are_deltas=True) != 0

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))


def test_cpu_result_independent_of_thread_count():
    ext = cpu_extension()
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(100_003, generator=gen).bfloat16()
    tuned = [(base.float() + 0.1 * torch.randn(100_003, generator=gen)).bfloat16() for _ in range(3)]
    before = ext.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            ext.set_num_threads(threads)
            results.append([vk.delta_merge(base, tuned, [0.5, 0.3, 0.2], method=m, density=0.35, seed=8)
                            for m in ("ties", "dare_ties")])
    finally:
        ext.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_triton_result_independent_of_block_size(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    from vfuse_kernels.triton import delta_merge as triton_merge

    device = backend_device("triton")
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(3000, generator=gen).to(device)
    tuned = [(base.cpu() + 0.1 * torch.randn(3000, generator=gen)).to(device) for _ in range(2)]
    outs = []
    for block in (256, 1024):
        monkeypatch.setattr(triton_merge, "BLOCK", block)
        outs.append(vk.delta_merge(base, tuned, [0.6, 0.4], method="dare_ties", density=0.5, seed=21))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("data", ["tie-heavy bf16", "gaussian fp32"])
def test_triton_device_resolution_gives_the_host_resolution(data, monkeypatch):
    """The GPU's one-synchronisation pass (resolve_pass: the resolution on the device) resolves
    bracket-end ties (tie-heavy data) and inside keys (distinct fp32 keys) in its first pass, with
    the thresholds of selection.py's host resolution, for 1 to 4 models and the density edges."""
    pytest.importorskip("triton")
    from vfuse_kernels.triton import magnitude_select as kernels

    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    monkeypatch.setattr(ms, "SMALL", 1024)
    monkeypatch.setattr(kernels.DeviceSelector, "SAMPLE_SHARE", 4)  # brackets narrow enough that K is often hi
    device = backend_device("triton")
    resolved = []
    original = kernels.DeviceSelector.resolve_pass

    def recorded(selector, *args):
        found = original(selector, *args)
        resolved.append(found is not None)
        return found

    for models in (1, 2, 4):
        if data == "tie-heavy bf16":
            base, tuned = _tie_heavy(30_011, models, device=device, seed=models)
        else:
            gen = torch.Generator().manual_seed(models)
            base = torch.randn(30_011, generator=gen)
            tuned = [(base + torch.randn(30_011, generator=gen)).to(device) for _ in range(models)]
            base = base.to(device)
        densities = [1e-9, 0.01, 0.5, 0.99, 2.0 / 30_011, 0.3, 0.9, 0.7][:models]
        monkeypatch.setattr(kernels.DeviceSelector, "resolve_pass", recorded)
        got = vk.ties_thresholds(base, tuned, densities)
        monkeypatch.setattr(kernels.DeviceSelector, "resolve_pass", None)  # selection.py's host resolution
        expected = vk.ties_thresholds(base, tuned, densities)
        assert torch.equal(got.keys, expected.keys) and torch.equal(got.cutoffs, expected.cutoffs)
        _assert_exact_selection(base, tuned, densities, got)
    assert resolved == [True] * 3


def test_triton_device_resolution_misses_when_candidates_overflow():
    """A bracket whose inside keys outnumber the candidate slots is a miss (None: the host's
    passes take over), never a rank among the slots that were kept."""
    pytest.importorskip("triton")
    from vfuse_kernels.triton import magnitude_select as kernels

    device = backend_device("triton")
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(5003, generator=gen)
    tuned = [(base + torch.randn(5003, generator=gen)).to(device)]
    selector = kernels.selector(base.to(device), tuned, False)
    assert selector.resolve_pass([0], [-1], [2**31], 100, [700]) is None  # every key inside, 100 slots
    keys, cutoffs = selector.resolve_pass([0], [-1], [2**31], 5003, [700])
    _assert_exact_selection(base, tuned, [700 / 5003], vk.MagnitudeThresholds(keys, cutoffs))


@pytest.mark.parametrize("data, starved, settles", [("tie-heavy bf16", False, True), ("gaussian fp32", False, False),
                                                    ("gaussian fp32", True, False), ("mixed fp32", False, False)],
                         ids=["settled", "inside", "missed", "one settled"])
def test_triton_merge_queued_before_the_wait_writes_only_settled_thresholds(data, starved, settles, monkeypatch):
    """The GPU's TIES merge is queued before the selection's wait, guarded by the device's
    verdict. Where every model settles at a bracket end (tie-heavy data), it is the merge; where
    one lies inside its bracket (distinct keys, narrow brackets) or misses (16 candidate slots),
    it writes nothing — in place into base — and the merge runs again with the host's
    thresholds; so it does where only the first model settles (its deltas tie-heavy, the others'
    distinct). Either way the bits of the merge with the selection's thresholds passed in
    (Triton against Triton: the interpreter rounds fp32 to bf16 toward zero, the GPU to nearest)."""
    pytest.importorskip("triton")
    from vfuse_kernels.triton import delta_merge as kernels
    from vfuse_kernels.triton import magnitude_select as select_kernels

    monkeypatch.setattr(ms, "SMALL", 1024)
    monkeypatch.setattr(select_kernels.DeviceSelector, "SAMPLE_SHARE", 4)
    resolve, merge, launches = select_kernels.DeviceSelector.resolve_pass, kernels.merge, []
    if starved:
        monkeypatch.setattr(select_kernels.DeviceSelector, "resolve_pass",
                            lambda self, rows, los, his, cap, ks: resolve(self, rows, los, his, 16, ks))
    monkeypatch.setattr(kernels, "merge", lambda *args, **kw: launches.append(kw.get("guard") is not None) or
                        merge(*args, **kw))
    statuses = []  # the device's verdict on each model, as the host reads it

    def recorded(found, later=select_kernels.to_host_later):
        fetch = later(found)
        return lambda: (lambda values: statuses.append(values[0]) or values)(fetch())

    monkeypatch.setattr(select_kernels, "to_host_later", recorded)
    device = backend_device("triton")
    for models in (3,) if data == "mixed fp32" else (1, 3):
        if data == "tie-heavy bf16":
            base, tuned = _tie_heavy(30_011, models, seed=models)
        elif data == "mixed fp32":
            base, tied = _tie_heavy(30_011, 1, dtype=torch.float32, seed=models)
            gen = torch.Generator().manual_seed(models)
            tuned = tied + [base + torch.randn(30_011, generator=gen) for _ in range(models - 1)]
        else:
            gen = torch.Generator().manual_seed(models)
            base = torch.randn(30_011, generator=gen)
            tuned = [base + torch.randn(30_011, generator=gen) for _ in range(models)]
        base, tuned = base.to(device), [t.to(device) for t in tuned]
        weights, densities = [0.6, -0.3, 0.9][:models], [0.3, 0.9, 0.01][:models]
        monkeypatch.setenv("VFUSE_BACKEND", "triton")
        expected = vk.delta_merge(base, tuned, weights, method="ties",
                                  thresholds=vk.ties_thresholds(base, tuned, densities))
        launches.clear()
        statuses.clear()
        got = base.clone()
        vk.delta_merge(got, tuned, weights, method="ties", density=densities, out=got)
        bits = torch.int16 if got.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got.view(bits), expected.view(bits))
        assert launches == ([True] if settles else [True, False])
        tie, inside, missed = select_kernels.TIE, select_kernels.INSIDE, select_kernels.MISSED
        first, rest = {"tie-heavy bf16": (tie, tie), "gaussian fp32": (missed, missed) if starved else (inside, inside),
                       "mixed fp32": (tie, inside)}[data]
        assert statuses == [[first] + [rest] * (models - 1)]  # (one resolving pass)


def test_triton_sample_keys_match_the_torch_sampler(monkeypatch):
    """The one-launch Triton sampler gathers the keys of the reference's gather, and with a
    histogram workspace adds each model's histogram of their top digit (bits 24…31, the radix
    select's round 0) into its start; bin 0 holds the lanes past the runs (never read)."""
    pytest.importorskip("triton")
    from vfuse_kernels.triton import magnitude_select as kernels

    device = backend_device("triton")
    base, tuned = _tie_heavy(10_007, 3, device=device)
    runs = torch.randint(0, 10_007 // 16, (77,), generator=torch.Generator().manual_seed(5)).to(device)
    for deltas in (False, True):
        expected = ref_select.sample_keys(base, tuned, runs, 16, deltas)
        assert torch.equal(kernels.sample_keys(base, tuned, runs, 16, deltas), expected)
        hist = torch.zeros(kernels.histogram_words(3, 6), dtype=torch.int32, device=device)
        assert torch.equal(kernels.sample_keys(base, tuned, runs, 16, deltas, hist=hist), expected)
        rows = hist[:3 * 256].view(3, 256).cpu()
        assert all(torch.equal(rows[i, 1:], torch.bincount(expected[i].cpu() >> 24, minlength=256)[1:]) for i in range(3))
        assert not hist[3 * 256:].any()


@pytest.mark.parametrize("size", [1, 17, 40_000])  # 40_000: five programs per query
def test_triton_order_statistics_match_a_sort(size, monkeypatch):
    """The radix select of the GPU's sample gives the keys of a descending sort at every queried
    rank: the first and last, repeated rows, on keys of bf16 deltas (few distinct values, equal
    high digits), on all-equal keys and on uniform 31-bit keys (every digit used); queries in two
    halves over the same rows (a bracket's ends: one program per pair) and not; round 0 counted
    by the select, or before it (in the histograms given, which it then fills: no round 0)."""
    pytest.importorskip("triton")
    from vfuse_kernels.triton import magnitude_select as kernels

    launches, kernel = [], kernels._order_round_kernel  # (round, programs per chunk, paired)

    class Recorded:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((kw["ROUND"], grid[1], kw["PAIRED"])) or kernel[grid](*args, **kw)

    monkeypatch.setattr(kernels, "_order_round_kernel", Recorded())
    gen = torch.Generator().manual_seed(size)
    deltas = (0.01 * torch.randn(3, size, generator=gen)).bfloat16().float()
    plans = [([0, 2, 1, 2, 0], [0, size - 1, size // 2, size // 3, min(7, size - 1)]),
             ([2, 0, 1, 2, 0, 1], [size // 3, 0, size - 1, min(5, size - 1), size - 1, size // 2])]
    for (rows, ranks), keys in itertools.product(plans, (
            deltas.view(torch.int32) & 0x7FFFFFFF, torch.full((3, size), 0x3C23D70A, dtype=torch.int32),
            torch.randint(0, 2**31, (3, size), generator=gen, dtype=torch.int64).int())):
        ordered = keys.sort(dim=1, descending=True).values
        expected = [ordered[row, rank].item() for row, rank in zip(rows, ranks)]
        programs = len(rows) // 2 if len(rows) == 6 else len(rows)  # (the second plan: pairs)
        launches.clear()
        assert kernels.order_statistics(keys.to(backend_device("triton")), rows, ranks).tolist() == expected
        assert launches == [(0, 3, False)] + [(r, programs, len(rows) == 6) for r in range(1, 5)]
        # round 0 counted before (as the sampler does): each row's top-digit histogram, bin 0 not read
        counted = torch.zeros(kernels.histogram_words(3, len(rows)), dtype=torch.int32)
        counted[:3 * 256].view(3, 256).copy_(torch.stack([torch.bincount(row >> 24, minlength=256) for row in keys]))
        counted[0:3 * 256:256] += 12345
        given = counted.to(backend_device("triton"))
        launches.clear()
        assert kernels.order_statistics(keys.to(backend_device("triton")), rows, ranks, given).tolist() == expected
        assert launches == [(r, programs, len(rows) == 6) for r in range(1, 5)]
        assert torch.equal(given[:3 * 256].cpu(), counted[:3 * 256]) and given[3 * 256:].any()


def test_triton_selection_brackets_every_model_by_one_order_statistics_call(monkeypatch):
    """The GPU's first pass takes every model's bracket ends from one radix select over its
    unsorted sample (no sort): the same ends as ranks in the sorted sample, and the pass's
    [lo…, hi…] a view of the select's output (no stack). A repeated selection copies no
    constants to the device."""
    pytest.importorskip("triton")
    from vfuse_kernels import _backend
    from vfuse_kernels.triton import magnitude_select as kernels

    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    monkeypatch.setattr(ms, "SMALL", 1024)
    monkeypatch.setattr(kernels.DeviceSelector, "SAMPLE_SHARE", 4)  # every bracket end inside the sample
    calls, passes, copies = [], [], []
    original, bracket_pass = kernels.order_statistics, kernels.bracket_pass

    def select(keys, rows, ranks, counted=None):
        assert counted is not None  # round 0 counted by the sampler
        out = original(keys, rows, ranks, counted)
        calls.append((keys.cpu(), rows, ranks, out.untyped_storage().data_ptr()))
        return out

    monkeypatch.setattr(kernels, "order_statistics", select)
    monkeypatch.setattr(kernels, "bracket_pass", lambda base, tuned, lo, hi, *args: passes.append(
        (lo.tolist(), hi.tolist(), lo.untyped_storage().data_ptr())) or bracket_pass(base, tuned, lo, hi, *args))
    for module in (kernels, _backend):
        monkeypatch.setattr(module, "host_to_device", lambda values, *args, copy=module.host_to_device: (
            copies.append(values), copy(values, *args))[1])
    base, tuned = _tie_heavy(40_009, 3, device=backend_device("triton"))
    densities = [0.2, 0.5, 0.7]
    for call in range(2):
        _assert_exact_selection(base, tuned, densities, vk.ties_thresholds(base, tuned, densities))
        (keys, rows, ranks, selected), = calls[call:]
        assert rows == [0, 1, 2, 0, 1, 2]  # both ends of every model: every lo, then every hi
        ordered = keys.sort(dim=1, descending=True).values
        ends = [ordered[row, rank].item() for row, rank in zip(rows, ranks)]
        lo, hi, storage = passes[call]
        assert (lo, hi) == (ends[:3], ends[3:]) and storage == selected  # (lo: the lower rank's key)
        if call == 1:
            assert copies == []
        copies.clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("models", [1, 4])
def test_cpp_sample_keys_match_the_torch_sampler(dtype, models):
    """The C++ sampler gathers the reference's keys: every storage dtype, deltas or not, runs
    repeated and at both ends of the tensor (prime size: the tail past the last run unused)."""
    from vfuse_kernels.ops._cpp_kernels import _pointers

    numel = 10_007
    base, tuned = _tie_heavy(numel, models, dtype=dtype)
    runs = torch.cat([torch.tensor([0, numel // 16 - 1, 3, 3]),
                      torch.randint(0, numel // 16, (77,), generator=torch.Generator().manual_seed(5))])
    ptrs, codes = _pointers(tuned)
    for deltas in (False, True):
        keys = torch.full((models, runs.numel() * 16), -7, dtype=torch.int32)  # poisoned
        cpu_extension().sample_keys(base.data_ptr(), codes[0], ptrs, codes, numel, deltas, runs.data_ptr(),
                                    runs.numel(), 16, keys.data_ptr())
        assert torch.equal(keys, ref_select.sample_keys(base, tuned, runs, 16, deltas))


def test_host_sample_is_every_model_s_keys_at_the_seeded_runs_descending():
    """``HostSelector.sample``: the C++ gather at the shape's seeded runs, each row in
    descending order; the same runs on every call for a shape."""
    from vfuse_kernels.ops._cpp_kernels import selector

    base, tuned = _tie_heavy(70_001, 2)
    sample = selector(base, tuned, False).sample(4096)
    runs = torch.from_numpy(ms._sample_runs(70_001, 4096 // 16, 16).copy())
    expected = ref_select.sample_keys(base, tuned, runs, 16, False).sort(dim=-1, descending=True).values
    assert sample.shape == (2, 4096) and torch.equal(torch.from_numpy(sample.copy()), expected)
    assert ms._sample_runs(70_001, 256, 16) is ms._sample_runs(70_001, 256, 16)


def test_triton_order_statistics_of_uneven_rank_lists():
    """The GPU selector's order statistics for samples asking for two, one or no ranks (a bracket
    end past the sample's end): each the key at that rank of the sorted sample, in the order asked."""
    pytest.importorskip("triton")
    from vfuse_kernels.triton.magnitude_select import selector

    base, tuned = _tie_heavy(20_011, 4, device=backend_device("triton"))
    found = selector(base, tuned, False)
    samples = found.sample(1024)
    ranks = [[5], [3, 900], [], [1023, 0]]
    got = found.order_statistics(samples, ranks, [False] * 4)
    for sample, rank, values in zip(samples, ranks, got):
        ordered = sample.cpu().sort(descending=True).values
        assert [int(v) for v in values] == [int(ordered[r]) for r in rank]


def test_triton_chunk_sums_and_totals():
    """The bracket counts' chunk sums (per 1024 blocks, every column) and the totals they add
    into: three chunks, the last partial, against torch's sums; totals start from what is there."""
    pytest.importorskip("triton")
    from vfuse_kernels.triton.magnitude_select import TIE_CHUNK, chunk_sums

    device = backend_device("triton")
    blocks = 2 * TIE_CHUNK + 77
    counts = torch.randint(0, 1 << 16, (blocks, 3, 4), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    totals = torch.arange(12, dtype=torch.int64).view(3, 4)
    sums = chunk_sums(counts.to(device), totals.to(device).clone())
    expected = torch.stack([counts[c * TIE_CHUNK:(c + 1) * TIE_CHUNK].sum(0, dtype=torch.int64) for c in range(3)])
    assert torch.equal(sums.cpu(), expected)
    got_totals = totals.to(device).clone()
    chunk_sums(counts.to(device), got_totals)
    assert torch.equal(got_totals.cpu(), totals + counts.sum(0, dtype=torch.int64))
    assert torch.equal(chunk_sums(counts.to(device)).cpu(), expected)  # (no totals)


@pytest.mark.parametrize("side", ["cpp", "triton"])
def test_tie_search_matches_the_reference(side):
    """The tie search (C++: the block from the running counts, one scan of it; Triton: chunk sums,
    then one program per query) finds the reference's flat index of the rank-th equal key, for
    every query of one call: ranks 1 to the last, both models, both count columns, many blocks."""
    if side == "triton":
        pytest.importorskip("triton")
    device = backend_device(side)
    numel, block = 9_001, 4  # Triton: 2251 blocks, three chunks of the first level
    base, tuned = _tie_heavy(numel, 2, device=device)
    deltas = [t.float() - base.float() for t in tuned]
    keys = [(d.view(torch.int32) & 0x7FFFFFFF) for d in deltas]
    top = [int(k.mode().values) for k in keys]
    second = [int(k[k != t].mode().values) for k, t in zip(keys, top)]
    blocks = -(-numel // block)
    counts = torch.zeros(blocks, 2, 4, dtype=torch.int32, device=device)
    queries = []
    for i, k in enumerate(keys):
        for column, key in ((1, top[i]), (2, second[i])):
            padded = torch.zeros(blocks * block, dtype=torch.int32, device=device)
            padded[:numel] = (k == key).int()
            counts[:, i, column] = padded.view(blocks, block).sum(1)
            for rank in (1, 2, 37, int((k == key).sum())):
                queries.append((i, key, rank, column))
    if side == "cpp":
        from vfuse_kernels.ops._cpp_kernels import selector
    else:
        from vfuse_kernels.triton.magnitude_select import selector
    for is_delta, b, t in ((False, base, tuned), (True, torch.zeros_like(base), deltas)):
        expected = [ref_select.tie_index(b, t[i], key, rank, is_delta) for i, key, rank, _ in queries]
        found = selector(b, t, is_delta)
        found.BLOCK = block
        got = found.tie_indices([0, 1], queries, counts.numpy() if side == "cpp" else counts)
        assert [int(x) for x in got] == expected


BRACKET_PASSES = """
import json, sys, torch
from vfuse_kernels.ops._cpp_kernels import selector
out = []
for dtype, n, deltas in ((torch.bfloat16, 3, False), (torch.float32, 2, False), (torch.bfloat16, 4, True),
                         (torch.float32, 1, True)):
    gen = torch.Generator().manual_seed(n)
    numel = 69_652  # a last chunk of 20 elements: fewer inside masks than the scan's word holds
    base = torch.randn(numel, generator=gen).to(dtype)
    tuned = [(base.float() + torch.randn(numel, generator=gen) * 0.01).to(dtype) for _ in range(n)]
    tuned[0][:100] = float("nan")  # keys 0x7fc00000 and the like
    keys = sorted(set((tuned[0].float() - base.float()).abs().view(torch.int32)[100:].tolist()))
    for lo, hi in ((keys[len(keys) // 3], keys[2 * len(keys) // 3]), (-1, 1 << 31), (keys[5], keys[5]),
                   (keys[-3], 1 << 31)):
        found = selector(base, tuned, deltas).bracket_pass(list(range(n)), [lo] * n, [hi] * n, [1 << 32] * n,
                                                           base.numel())
        out.append([found.counts.tolist(), [sorted(found.cand[i, :found.host[i][4]].tolist()) for i in range(n)]])
json.dump(out, sys.stdout)
"""


@needs_avx512
def test_the_avx512_bracket_loop_counts_and_compacts_like_the_portable_one():
    """bf16 and fp32, 1–4 models, deltas or not, tails, NaN keys, a bracket open at the top (hi =
    2^31), an empty one (lo = hi) and lo = -1: the same per-block counts and candidates with the
    AVX-512 loop and with the compiler-vectorised one (VFUSE_NO_AVX512)."""
    avx512, portable = with_and_without_avx512(BRACKET_PASSES)
    assert avx512 == portable
    assert all(sum(len(c) for c in cands) > 0 for _, cands in avx512[::4])  # the middle brackets compact elements
