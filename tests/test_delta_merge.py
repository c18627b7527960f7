"""delta_merge against the fp64 reference: every method × dtype × awkward shape × N."""
from __future__ import annotations

import pytest
import torch
from conftest import (DTYPES, assert_close_to_reference, backend_device, needs_avx512, poisoned_like,
                      with_and_without_avx512)

import vfuse_kernels as vk
from vfuse_kernels._backend import host_to_device
import vfuse_kernels.ops  # noqa: F401 - registers torch.ops.vfuse (the package imports lazily)
from vfuse_kernels.reference import delta_merge as ref

WEIGHTS = [0.7, -0.3, 1.1, 0.45]  # mixed signs; no subset sums to ~0
DENSITIES = [0.3, 0.55, 0.9, 0.2]
SHAPES = [(0,), (1,), (7,), (13, 17), (3, 5, 7), (1031,)]


def make_case(shape, n, dtype, device, seed, noncontiguous=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=gen)

    if noncontiguous:  # every second column of a wider tensor (sliced on the device: a copy is contiguous)
        full = (*shape[:-1], 2 * shape[-1])
        base = rand(*full).to(dtype)
        tuned = [(base.float() + 0.1 * rand(*full)).to(dtype) for _ in range(n)]
        return base.to(device)[..., ::2], [t.to(device)[..., ::2] for t in tuned]
    base = rand(*shape).to(dtype)
    tuned = [(base.float() + 0.1 * rand(*shape)).to(dtype) for _ in range(n)]
    return base.to(device), [t.to(device) for t in tuned]


def reference(base, tuned, weights, method, density, **kw):
    sparsify, elects, normalize = vk.METHODS[method]
    n = len(tuned)
    densities = density if isinstance(density, list) else [density] * n
    args = dict(sparsify=sparsify, densities=densities, elect="sum" if elects else None, normalize=normalize,
                scale=1.0, rescale="density", seed=0, tuned_are_deltas=False)
    args.update(kw)
    return ref.delta_merge(base, tuned, weights, **args)


def _densities(method, n):
    return 1.0 if method in ("task_arithmetic", "linear") else DENSITIES[:n]


@pytest.mark.parametrize("method", list(vk.METHODS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_reference_cpp(method, dtype, shape, n, monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    _check_parity(method, dtype, shape, n, torch.device("cpu"), seed=hash((method, str(dtype), shape, n)) % 10**6)


@pytest.mark.parametrize("method", list(vk.METHODS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (13, 17), (1031,)], ids=str)
@pytest.mark.parametrize("n", [1, 3])
def test_matches_reference_triton(method, dtype, shape, n, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    _check_parity(method, dtype, shape, n, backend_device("triton"), seed=hash((method, str(dtype), shape, n)) % 10**6)


def _check_parity(method, dtype, shape, n, device, seed):
    base, tuned = make_case(shape, n, dtype, device, seed)
    weights, density = WEIGHTS[:n], _densities(method, n)
    out = poisoned_like(base)
    result = vk.delta_merge(base, tuned, weights, method=method, density=density, out=out)
    assert result is out
    assert_close_to_reference(out, reference(base, tuned, weights, method, density), n_terms=n)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_noncontiguous_inputs_and_output(backend, method):
    device = backend_device(backend)
    base, tuned = make_case((6, 11), 2, torch.bfloat16, device, seed=3, noncontiguous=True)
    assert not base.is_contiguous()
    out = poisoned_like(torch.empty(6, 22, device=device))[:, ::2]
    vk.delta_merge(base, tuned, WEIGHTS[:2], method=method, density=_densities(method, 2), out=out)
    assert_close_to_reference(out, reference(base, tuned, WEIGHTS[:2], method, _densities(method, 2)), 2)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_consensus_and_normalize(backend, consensus, normalize, method):
    base, tuned = make_case((257,), 4, torch.float32, backend_device(backend), seed=11)
    out = vk.delta_merge(base, tuned, WEIGHTS, method=method, density=DENSITIES, consensus=consensus,
                         normalize=normalize, scale=0.8, seed=99)
    expected = reference(base, tuned, WEIGHTS, method, DENSITIES, elect=consensus, normalize=normalize, scale=0.8,
                         seed=99)
    assert_close_to_reference(out, expected, 4)


@pytest.mark.parametrize("rescale", ["density", "l1", None])
@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_rescale_modes(backend, rescale, method):
    base, tuned = make_case((613,), 3, torch.float32, backend_device(backend), seed=5)
    out = vk.delta_merge(base, tuned, WEIGHTS[:3], method=method, density=DENSITIES[:3], rescale=rescale, seed=4)
    assert_close_to_reference(out, reference(base, tuned, WEIGHTS[:3], method, DENSITIES[:3], rescale=rescale,
                                             seed=4), 3)


def test_tuned_are_deltas(backend):
    base, tuned = make_case((301,), 3, torch.float32, backend_device(backend), seed=8)
    deltas = [t - base for t in tuned]
    for method in vk.METHODS:
        density = _densities(method, 3)
        from_deltas = vk.delta_merge(base, deltas, WEIGHTS[:3], method=method, density=density, tuned_are_deltas=True)
        expected = reference(base, deltas, WEIGHTS[:3], method, density, tuned_are_deltas=True)
        assert_close_to_reference(from_deltas, expected, 3)


def test_linear_is_weighted_average(backend):
    base, tuned = make_case((97,), 3, torch.float32, backend_device(backend), seed=1)
    w = [1.0, 2.0, 5.0]
    out = vk.delta_merge(base, tuned, w, method="linear")
    average = sum(wi * t.double() for wi, t in zip(w, tuned)) / sum(w)
    torch.testing.assert_close(out.double(), average, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", [[0.3, 0.7, 0.11], [1.0, -0.9999, 3e-3], [0.25, 0.5, 0.25], [0.125, 0.125, 0.25],
                                     [1.0, 2.0, 1.0], [-0.5, -0.25, -0.25], [0.5, -0.5, 0.0]], ids=str)
def test_normalised_quotient_is_the_ieee_fp32_division(backend, weights):
    """Without election the kernels divide by Σw through an fp64 product with its inverse (on the
    CPU by an fp32 product where Σw is a power of two, 0 counting as 1): the same bits as fp32
    division, also for subnormal and overflowing quotients and zeros."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(4099, generator=gen) * torch.logspace(-38, 38, 4099)
    tuned = [base + torch.randn(4099, generator=gen) * torch.logspace(-44, 37, 4099) for _ in weights]
    tuned[0][:7] = base[:7]  # zero deltas
    got = vk.delta_merge(base.to(device), [t.to(device) for t in tuned], weights, method="linear").cpu()
    w = torch.tensor(weights, dtype=torch.float32)
    merged = torch.zeros_like(base)
    for wi, t in zip(w, tuned):
        merged = merged + (t - base) * wi
    divisor = w.double().sum().float()
    divisor = torch.where(divisor == 0, 1.0, divisor)
    expected = base + 1.0 * (merged / divisor)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    quotient = merged / divisor
    assert ((quotient != 0) & (quotient.abs() < 1.2e-38)).any() and (quotient == 0).any()
    assert quotient.isinf().any() == (divisor.abs() < 0.01)


@pytest.mark.parametrize("models", [3, 8, 9])
def test_elected_quotient_is_the_ieee_fp32_division(backend, models):
    """With election every element divides by the weight sum of the models agreeing with its sign
    (a table of 2^N inverses up to 8 models on the GPU, a division past them): the bits of the
    fp32 quotient of the fp32 sums in model order, 1 where the sum is 0 (weights whose subsets
    sum to 0 and to values that round differently in fp32 and fp64)."""
    weights = [0.1, 0.2, -0.1] if models == 3 else [0.1 * (i + 1) * (-1) ** i for i in range(models)]
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(3001, generator=gen)
    tuned = [base + torch.randn(3001, generator=gen) * torch.logspace(-30, 30, 3001) for _ in weights]
    got = vk.delta_merge(base.to(device), [t.to(device) for t in tuned], weights, method="ties", density=1.0).cpu()
    w = torch.tensor(weights, dtype=torch.float32)
    u = [(t - base) * wi for t, wi in zip(tuned, w)]
    vote = torch.zeros_like(base)
    for ui in u:
        vote = vote + ui
    merged, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for ui, wi in zip(u, w):
        agree = torch.where(vote >= 0, ui > 0, ui < 0)
        merged = merged + torch.where(agree, ui, 0.0)
        divisor = divisor + torch.where(agree, wi, 0.0)
    expected = base + merged / torch.where(divisor == 0, 1.0, divisor)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert (divisor == 0).any() and len(set(divisor.tolist())) > len(weights)


def test_zero_weight_sum_counts_as_one(backend):
    base, tuned = make_case((50,), 2, torch.float32, backend_device(backend), seed=2)
    out = vk.delta_merge(base, tuned, [1.0, -1.0], method="linear")
    expected = base.double() + (tuned[0].double() - tuned[1].double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
def test_mixed_storage_dtypes(backend, in_dtype, out_dtype):
    base, tuned = make_case((129,), 2, in_dtype, backend_device(backend), seed=6)
    tuned[1] = tuned[1].float()  # the tuned tensors need not share base's dtype
    out = poisoned_like(base, dtype=out_dtype)
    vk.delta_merge(base, tuned, WEIGHTS[:2], method="ties", density=DENSITIES[:2], out=out)
    assert_close_to_reference(out, reference(base, tuned, WEIGHTS[:2], "ties", DENSITIES[:2]), 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_store_rounds_to_nearest_even(dtype):
    """CPU conversions: weight 0 returns base rounded once (finite inputs: b + 0·(θ − b) = b);
    every finite fp16 value round-trips through fp32."""
    x = torch.cat([torch.randn(20000) * 1e3, torch.randn(20000) * 1e-6,
                   torch.tensor([65504.0, 65519.0, 65520.0, -7e4, 6e-8, 2.9e-8, 3e-8, 0.0])])
    out = vk.delta_merge(x, [x], 0.0, out=torch.empty(x.shape, dtype=dtype))
    assert torch.equal(out.view(torch.int16), x.to(dtype).view(torch.int16))
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every) & (every.view(torch.int16) != -32768)]  # -0 + 0 is +0
    back = vk.delta_merge(every, [every], 0.0, out=torch.empty(every.shape))
    assert torch.equal(back, every.float())


def test_in_place_into_base_and_into_tuned(backend):
    device = backend_device(backend)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        base, tuned = make_case((211,), 3, torch.bfloat16, device, seed=9)
        density = _densities(method, 3)
        expected = vk.delta_merge(base, tuned, WEIGHTS[:3], method=method, density=density)
        work = base.clone()
        assert vk.delta_merge(work, tuned, WEIGHTS[:3], method=method, density=density, out=work) is work
        assert torch.equal(work, expected)
        into_tuned = [t.clone() for t in tuned]
        vk.delta_merge(base, into_tuned, WEIGHTS[:3], method=method, density=density, out=into_tuned[1])
        assert torch.equal(into_tuned[1], expected)


def test_precomputed_thresholds_reused(backend):
    base, tuned = make_case((503,), 3, torch.bfloat16, backend_device(backend), seed=12)
    thresholds = vk.ties_thresholds(base, tuned, DENSITIES[:3])
    for weights in ([1.0, 1.0, 1.0], WEIGHTS[:3]):
        direct = vk.delta_merge(base, tuned, weights, method="ties", density=DENSITIES[:3])
        reused = vk.delta_merge(base, tuned, weights, method="ties", density=DENSITIES[:3], thresholds=thresholds)
        assert torch.equal(direct, reused)


def test_empty_tensor(backend):
    base = torch.empty(0, 3, device=backend_device(backend))
    for method in vk.METHODS:
        out = vk.delta_merge(base, [base.clone(), base.clone()], [0.5, 0.5], method=method,
                             density=_densities(method, 2))
        assert out.shape == (0, 3)


def test_reference_backend_forced(monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "reference")
    base, tuned = make_case((33,), 2, torch.float16, torch.device("cpu"), seed=13)
    out = vk.delta_merge(base, tuned, WEIGHTS[:2], method="dare_ties", density=DENSITIES[:2], seed=3)
    expected = reference(base, tuned, WEIGHTS[:2], "dare_ties", DENSITIES[:2], seed=3)
    assert torch.equal(out, expected.to(torch.float16))


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="VFUSE_BACKEND"):
        vk.delta_merge(torch.zeros(3), [torch.ones(3)], 1.0)


def test_compiled_fullgraph():
    base, tuned = make_case((64,), 2, torch.float32, torch.device("cpu"), seed=14)

    def merge(b, t0, t1):
        return vk.delta_merge(b, [t0, t1], [0.5, 0.25], method="ties", density=0.5)

    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(base, *tuned), merge(base, *tuned))


def test_opcheck():
    base, tuned = make_case((37,), 2, torch.float32, torch.device("cpu"), seed=15)
    torch.library.opcheck(torch.ops.vfuse.magnitude_select.default, (base, tuned, [5, 11], False))
    for sparsify, elect in ((0, 0), (1, 1), (2, 2)):
        args = (torch.empty_like(base), base, tuned, [0.5, -0.25], [0.5, 0.7], sparsify, elect, True, 1.0,
                "density", 7, False, None, None)
        torch.library.opcheck(torch.ops.vfuse.delta_merge_.default, args)


FOREACH_SHAPES = [(7,), (0,), (33, 65), (1,), (1031,), (2, 3, 5)]


@pytest.mark.parametrize("method", list(vk.METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_foreach_equals_per_tensor_merges(backend, method, dtype):
    """One fused launch over tensors of mixed shapes (0 and 1 elements among them), per-tensor
    weights, densities and seeds, a non-contiguous output: bit for bit the per-tensor merges."""
    device = backend_device(backend)
    cases = [make_case(shape, 3, dtype, device, seed=20 + j) for j, shape in enumerate(FOREACH_SHAPES)]
    bases, tuned = [c[0] for c in cases], [c[1] for c in cases]
    weights = [[0.7, -0.3, 1.1], [0.2, 0.5, 0.3]] * 3
    density = 1.0 if method in ("task_arithmetic", "linear") else [[0.3, 0.55, 0.9], [0.6, 0.2, 0.4]] * 3
    seeds = [5, 6, 7, 8, 9, 10]
    outs = [poisoned_like(b) for b in bases]
    outs[2] = poisoned_like(torch.empty(33, 130, dtype=dtype, device=device))[:, ::2]
    got = vk.delta_merge_foreach(bases, tuned, weights, method=method, density=density, seed=seeds, outs=outs)
    assert all(g is o for g, o in zip(got, outs))
    for j, base in enumerate(bases):
        expected = vk.delta_merge(base, tuned[j], weights[j], method=method,
                                  density=density if density == 1.0 else density[j], seed=seeds[j])
        assert torch.equal(got[j], expected), FOREACH_SHAPES[j]


def test_foreach_rejects_mismatched_lists():
    base = torch.zeros(3)
    with pytest.raises(ValueError, match="one list of tensors per base"):
        vk.delta_merge_foreach([base, base], [[base]], 1.0)
    with pytest.raises(ValueError, match="per-tensor entries"):
        vk.delta_merge_foreach([base, base], [[base], [base]], [[1.0]])
    with pytest.raises(ValueError, match="tuned\\[0\\] has shape"):
        vk.delta_merge_foreach([base], [[torch.zeros(4)]], 1.0)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_l1_rescale_identical_on_both_backends(method, monkeypatch):
    """The L1 rescale factors come from sums that agree to ~1e-15 on both backends, so the fp32
    coefficients, and the outputs, are bit-identical (the GPU engine writes the CPU's bytes)."""
    pytest.importorskip("triton")
    # fp32 storage: the interpreter truncates bf16 stores (a GPU rounds them like the CPU)
    base, tuned = make_case((40_009,), 3, torch.float32, torch.device("cpu"), seed=31)
    args = dict(method=method, density=[0.3, 0.5, 0.7], rescale="l1", seed=9)
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    on_cpu = vk.delta_merge(base, tuned, [0.6, 0.3, 0.45], **args)
    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    device = backend_device("triton")
    on_triton = vk.delta_merge(base.to(device), [t.to(device) for t in tuned], [0.6, 0.3, 0.45], **args)
    assert torch.equal(on_triton.cpu(), on_cpu)


def test_triton_scalars_copied_once_while_they_repeat(monkeypatch):
    """The GPU merge reuses its scalars' device copy while the weights repeat (no copy queued
    before the launch), a new one when they change: each merge the C++ kernel's bits."""
    pytest.importorskip("triton")
    from vfuse_kernels import _backend

    copies = []
    monkeypatch.setattr(_backend, "host_to_device", lambda values, *args: copies.append(len(values)) or
                        host_to_device(values, *args))
    _backend._constants.cache_clear()
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1031, generator=gen)
    tuned = [base + torch.randn(1031, generator=gen) for _ in range(2)]
    device = backend_device("triton")
    for weights in ([0.5, 0.25], [0.5, 0.25], [0.25, 0.5], [0.5, 0.25]):
        monkeypatch.setenv("VFUSE_BACKEND", "cpp")
        expected = vk.delta_merge(base, tuned, weights, method="task_arithmetic")
        monkeypatch.setenv("VFUSE_BACKEND", "triton")
        got = vk.delta_merge(base.to(device), [t.to(device) for t in tuned], weights, method="task_arithmetic")
        assert torch.equal(got.cpu().view(torch.int32), expected.view(torch.int32)), weights
    assert len(copies) == 2  # [0.5, 0.25] once, [0.25, 0.5] once


# The grids below run in fresh processes (with_and_without_avx512): this prologue is part of each.
GRID_PROLOGUE = """
import hashlib, json, sys, torch
out = {}
def bits(t, any_nan=False):  # any_nan: every NaN as one (its sign and payload follow the compiler's operand order)
    if any_nan:
        t = torch.where(t.isnan(), torch.tensor(float("nan"), dtype=t.dtype), t)
    return hashlib.sha1((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()).hexdigest()
def cases(counts, numels, tie_heavy):
    # (dtype, n, numel, base, tuned): fresh data, tie-heavy deltas (nine steps) or Gaussian ones, and
    # -0, 0, NaN, inf and -inf at fixed places
    for dtype in (torch.bfloat16, torch.float32):
        for n in counts:
            for numel in numels:
                gen = torch.Generator().manual_seed(numel + n)
                base = torch.randn(numel, generator=gen).to(dtype)
                if tie_heavy:
                    deltas = torch.randint(-4, 5, (n, numel), generator=gen).float() * 2.0**-7
                else:
                    deltas = 0.01 * torch.randn(n, numel, generator=gen)
                tuned = [(base.float() + d).to(dtype) for d in deltas]
                if numel > 40:
                    base[5], tuned[0][5], tuned[-1][7], base[9], tuned[0][11] = -0.0, 0.0, float("nan"), float("inf"), -0.0
                    tuned[-1][13] = float("-inf")
                yield dtype, n, numel, base, tuned
"""

TIES_GRID = GRID_PROLOGUE + """
import vfuse_kernels as vk
for dtype, n, numel, base, tuned in cases((1, 2, 3, 4), (1, 33, 1031, 70_001), tie_heavy=True):
    for deltas in (False, True):
        for consensus in ("sum", "count"):
            for normalize in (True, False):
                for weights in ([0.7, -0.3, 1.1, 0.25][:n], [0.5, -0.5, 0.5, -0.5][:n]):
                    for density in (0.01, 0.3, 1.0):
                        res = torch.full_like(base, float("nan"))
                        vk.delta_merge(base, tuned, weights, method="ties", density=density, out=res,
                                       tuned_are_deltas=deltas, consensus=consensus, normalize=normalize)
                        out[f"{dtype} {n} {numel} {deltas} {consensus} {normalize} {weights} {density}"] = bits(res)
    for key in (0, 2**31 - 1, -5, 1 << 40, 0x3C000000):  # given thresholds, cutoffs inside chunks
        for cut in (0, numel // 2, numel - 1, 600, 1024):
            res = torch.full_like(base, float("nan"))
            vk.delta_merge(base, tuned, [0.6, 0.4, 0.3, 0.2][:n], method="ties", out=res,
                           thresholds=(torch.tensor([key] * n), torch.tensor([cut + i for i in range(n)])))
            out[f"{dtype} {n} {numel} key={key} cut={cut}"] = bits(res)
json.dump(out, sys.stdout)
"""


DARE_GRID = GRID_PROLOGUE + """
import vfuse_kernels as vk
for dtype, n, numel, base, tuned in cases((1, 2, 3, 4), (1, 33, 1031, 70_001), tie_heavy=False):
    for deltas in (False, True):
        for method, consensus in (("dare_linear", None), ("dare_ties", "sum"), ("dare_ties", "count")):
            for normalize in (True, False):
                for weights in ([0.7, -0.3, 1.1, 0.25][:n], [0.5, -0.5, 0.5, -0.5][:n], [0.0] * n):
                    for density, rescale in ((0.01, None), (0.3, None), (1.0, None), (0.3, "l1")):
                        res = torch.full_like(base, float("nan"))
                        options = dict(consensus=consensus) if consensus else {}
                        vk.delta_merge(base, tuned, weights, method=method, density=density, out=res, seed=5,
                                       tuned_are_deltas=deltas, normalize=normalize, rescale=rescale, scale=0.9,
                                       **options)
                        key = f"{dtype} {n} {numel} {deltas} {method} {consensus} {normalize} {weights} {density}"
                        out[f"{key} {rescale}"] = bits(res, any_nan=True)
json.dump(out, sys.stdout)
"""


BAND_GRID = GRID_PROLOGUE + """
from vfuse_kernels.merging.methods.gta import breadcrumbs_merge
for dtype, n, numel, base, tuned in cases((1, 2, 3), (33, 1031, 70_001), tie_heavy=True):
    for deltas in (False, True):
        for consensus, normalize in ((True, True), (True, False), (False, False)):
            for rescale in (False, True):
                for densities, gammas in (([0.3, 0.9, 0.5][:n], [0.05, 0.0, 0.2][:n]),
                                          ([1.0, 0.01, 0.7][:n], [0.1, 0.5, 0.3][:n])):
                    res = breadcrumbs_merge(base, tuned, [0.7, -0.3, 1.1][:n], densities, gammas, consensus=consensus,
                                            normalize=normalize, scale=0.9, rescale=rescale, tuned_are_deltas=deltas)
                    out[f"{dtype} {n} {numel} {deltas} {consensus} {normalize} {rescale} {densities}"] = bits(
                        res, any_nan=True)
json.dump(out, sys.stdout)
"""


@needs_avx512
@pytest.mark.parametrize("grid, rows", [(TIES_GRID, 2000), (DARE_GRID, 2000), (BAND_GRID, 400)],
                         ids=["ties", "dare", "breadcrumbs"])
def test_the_avx512_loops_give_the_portable_loops_bits(grid, rows):
    """The AVX-512 merge loops write the bits of the compiler-vectorised loops (VFUSE_NO_AVX512),
    each grid on bf16 and fp32, deltas or not, NaN, ±0 and ±inf in the inputs:
    - TIES: 1–4 models, both consensus rules, normalised or not, weights that cancel, tie-heavy
      deltas, densities 0.01 to 1, given thresholds at the key range's ends and out of it, cutoffs
      anywhere in a chunk;
    - DARE (linear and TIES-style, both consensus rules): 1–4 models, normalised or not, weights
      that cancel or sum to 0, densities 0.01 to 1, with and without the L1 rescale (its sums'
      loop too): Philox words and flag products included, a NaN's sign and payload aside;
    - Model Breadcrumbs' band (both cuts, ties to the higher index at each): 1–3 models, tie-heavy
      deltas, with and without consensus and the L1 rescale, density 1 (every element) and gammas
      that empty the band, a NaN's sign and payload aside."""
    avx512, portable = with_and_without_avx512(grid)
    assert len(avx512) > rows  # the whole grid ran
    differing = [key for key in avx512 if avx512[key] != portable[key]]
    assert not differing, differing[:5]
