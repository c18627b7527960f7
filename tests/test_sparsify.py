"""TIES trim (exact k, ties → lower index), magnitude selection paths, and DARE drop
(keep rate, rescale, determinism across thread counts and block sizes)."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device

import vfuse_kernels as vk
from vfuse_kernels._backend import cpu_extension
from vfuse_kernels.reference import delta_merge as ref


def expected_trim(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by |δ| with ties to the lower flat index, written out with Python's sort."""
    flat = delta.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda e: (-abs(flat[e]), e))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(delta.shape)


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.8, 1.0])
def test_ties_threshold_ties_go_to_lower_index(backend, density):
    """Many equal magnitudes straddle the threshold: exactly k survive, the lowest indices first."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([0.5, -0.5, 1.0, -1.0, 2.0, 0.25])
    delta = values[torch.randint(0, len(values), (997,), generator=gen)]
    base = torch.randn(997, generator=gen).round()  # integers: θ = base + δ is exact in fp32
    out = vk.delta_merge(base.to(device), [(base + delta).to(device)], 1.0, method="ties", density=density)
    kept = (out.cpu() != base)
    k = ref.trim_count(density, 997)
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
    assert vk.magnitude_threshold(torch.tensor([0.5, -2.0, 1.0, -0.25]), 0.5).item() == 1.0


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


@pytest.fixture
def triton_select(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    from vfuse_kernels.triton import magnitude_select

    return magnitude_select


def _select_case(numel=6000, models=2):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(numel, generator=gen).bfloat16()
    tuned = [(base.float() + 0.02 * torch.randn(numel, generator=gen)).bfloat16() for _ in range(models)]
    device = backend_device("triton")
    return base.to(device), [t.to(device) for t in tuned]


def _assert_thresholds_exact(base, tuned, densities):
    got = vk.ties_thresholds(base, tuned, densities)
    for i, (t, p) in enumerate(zip(tuned, densities)):
        delta = t.float().cpu() - base.float().cpu()
        k = ref.trim_count(p, delta.numel())
        keep = ref.top_magnitude_mask(delta, k)
        assert got.keys[i].item() == delta.abs()[keep].min().view(torch.int32).item()
        tied = keep & (delta.abs() == delta.abs()[keep].min())
        assert got.cutoffs[i].item() == torch.nonzero(tied).max().item()


def test_triton_select_sampled_bracket(triton_select, monkeypatch):
    """The sampling path (normally for tensors over 4·SAMPLE elements) on a small tensor."""
    monkeypatch.setattr(triton_select, "SAMPLE", 512)
    base, tuned = _select_case()
    _assert_thresholds_exact(base, tuned, [0.05, 0.6])


def test_triton_select_histogram_fallback(triton_select, monkeypatch):
    """Brackets that miss the k-th largest (too high, too narrow) fall back to the histogram pass."""
    monkeypatch.setattr(triton_select, "SAMPLE", 512)
    wrong = lambda base, tuned, ks, deltas: ([0x7F000000, 0], [0x7F7FFFFF, 0], [8, 8])  # noqa: E731
    monkeypatch.setattr(triton_select, "_sample_brackets", wrong)
    base, tuned = _select_case()
    _assert_thresholds_exact(base, tuned, [0.05, 0.6])


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
