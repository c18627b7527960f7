"""The mergekit methods in vfuse_kernels.merging.methods (breadcrumbs, breadcrumbs_ties, della,
della_linear, sce, model_stock, arcee_fusion, ram, ramplus_tl) against mergekit 0.1.5 itself.

Deterministic methods are compared with mergekit's registered methods on the same inputs
(mergekit fed the fp32 values, since ours compute in fp32 whatever the input dtype).

Tie-heavy data (bf16-exact values drawn from a few magnitudes) is where mergekit's unstable
sorts leave the order among equal magnitudes unspecified. There we check (1) our selection
against a Python statement of our documented rule (stable ascending order: lower flat index
first among equals), (2) against mergekit's own selection: the same count, the same decision
on every element whose magnitude is not at a cut point, and (3) the whole merge against
mergekit with its sort made stable (the same rule), which must then agree everywhere.

DELLA draws from our Philox stream instead of torch.bernoulli, so it is tested against an
exact (rational-arithmetic) statement of the keep rule on the same Philox bits, against
mergekit with its bernoulli replaced by our mask (its keep probabilities checked against
ours on the way), for its kept fraction, and for reproducibility.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

import pytest

pytest.importorskip("mergekit")
import torch
from mergekit import sparsify as mk_sparsify
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods import sce as mk_sce
from mergekit.merge_methods.base import ParameterScope, TensorGroup

from vfuse_kernels.merging.methods import (  # noqa: F401  (importing a module registers its methods)
    METHODS,
    REQUIRED,
    TensorInputs,
    arcee_fusion,
    gta,
    model_stock,
    ram,
    sce,
)
from vfuse_kernels._backend import cpp_kernels_for, cpu_extension
from vfuse_kernels.reference.philox import dare_random_bits
from conftest import poisoned_like

NEW_METHODS = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "arcee_fusion",
               "ram", "ramplus_tl"]
WEIGHTS = [0.6, -0.3, 1.0, 0.45]


# --- helpers -------------------------------------------------------------------------------

def inputs_for(name, tensors, model_params=None, shared=None, seed=0) -> TensorInputs:
    """What the engine hands a method: base first, per-model params with defaults filled."""
    method = METHODS[name]
    n = len(tensors) - 1
    model_params = model_params or [{} for _ in range(n)]
    params = [{}]
    for given in model_params:
        filled = {k: p.default for k, p in method.model_params.items() if p.default is not REQUIRED}
        filled.update(given)
        params.append(filled)
    merged_shared = {k: p.default for k, p in method.global_params.items()}
    merged_shared.update(shared or {})
    return TensorInputs(name="model.layers.0.mlp.up_proj.weight", tensors=list(tensors), base_index=0,
                        params=params, shared=merged_shared, seed=seed)


def ours(name, tensors, model_params=None, shared=None, seed=0) -> torch.Tensor:
    out = METHODS[name].merge(inputs_for(name, tensors, model_params, shared, seed))
    assert out.shape == tensors[0].shape and out.dtype == torch.float32
    return out


def mergekit(name, tensors, model_params=None, shared=None) -> torch.Tensor:
    """mergekit's registered method on the fp32 values (base first)."""
    method = mk_registry.get(name)
    parameters = dict(shared or {})
    for spec in method.spec.parameters:
        if spec.scope == ParameterScope.NON_BASE and model_params and spec.name in model_params[0]:
            parameters[spec.name] = [p[spec.name] for p in model_params]
    group = TensorGroup.from_tensors([t.float() for t in tensors], base_index=0)
    return method([group], parameters=parameters, dtype=torch.float32)[0]


def random_models(shape, n, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return [base] + [base + scale * torch.randn(shape, generator=gen) for _ in range(n)]


def tie_models(shape, n, seed, heavy_tail=False):
    """bf16 tensors whose deltas take only ±k·2⁻⁸ (k = 1…16, never 0): every magnitude is
    shared by ~6% of the elements (heavy_tail: k = 1, 2, 4, …, 32, each ~1/6). Base values
    are multiples of 2⁻⁴ in [−¼, ¼), so every θ = base + δ is exact in bf16 and fp32 deltas
    are exact."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-4, 4, shape, generator=gen) * 2.0**-4
    out = [base.bfloat16()]
    for _ in range(n):
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        k = 2 ** torch.randint(0, 6, shape, generator=gen) if heavy_tail else torch.randint(1, 17, shape, generator=gen)
        delta = sign * k * 2.0**-8
        theta = base + delta
        assert torch.equal(theta.bfloat16().float(), theta)
        out.append(theta.bfloat16())
    return out


def gta_params(n, density, extra):
    return [{"weight": WEIGHTS[i], "density": density, **extra(i)} for i in range(n)]


def close(got, expected, rtol=1e-6, atol=1e-6):
    torch.testing.assert_close(got, expected.float(), rtol=rtol, atol=atol)


@pytest.fixture
def stable_sorts(monkeypatch):
    """Make torch.sort / torch.argsort stable (mergekit's sparsifiers then rank equal
    magnitudes by our rule: lower flat index first)."""
    sort, argsort = torch.sort, torch.argsort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sort(*a, **{**k, "stable": True}))
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: argsort(*a, **{**k, "stable": True}))


# --- declarations --------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW_METHODS)
def test_declarations_match_mergekit(name):
    """Parameter names, scopes, defaults, base requirement and input counts as mergekit's spec."""
    ours_m, spec = METHODS[name], mk_registry.get(name).spec
    theirs_model = {p.name: p for p in spec.parameters if p.scope == ParameterScope.NON_BASE}
    theirs_shared = {p.name: p for p in spec.parameters if p.scope == ParameterScope.SHARED}
    assert not [p for p in spec.parameters if p.scope == ParameterScope.INPUT]
    assert set(ours_m.model_params) == set(theirs_model)
    assert set(ours_m.global_params) == set(theirs_shared)
    for mine, theirs in [(ours_m.model_params, theirs_model), (ours_m.global_params, theirs_shared)]:
        for key, param in mine.items():
            if theirs[key].required:
                assert param.default is REQUIRED, key
            else:
                assert param.default == theirs[key].default and type(param.default) is type(theirs[key].default), key
                assert param.check is None or param.check(param.default) is None, key
    assert ours_m.needs_base == (spec.contract.base.value == "required")
    assert ours_m.min_models == spec.contract.min_inputs
    assert ours_m.max_models == spec.contract.max_inputs


BAD_VALUES = [
    ("breadcrumbs", "model", "density", [1.5, -0.1, "0.5", True, float("nan")], [0.0, 0.3, 1]),
    ("breadcrumbs_ties", "model", "gamma", [-0.01, 1.01, None], [0.0, 0.01, 1.0]),
    ("della", "model", "epsilon", [-0.1, 0.5, 0.7, float("inf")], [0.0, 0.15, 0.49]),
    ("della_linear", "model", "weight", ["1", None, float("nan")], [-1.0, 0, 2.5]),
    ("della", "global", "normalize", ["yes", 2, None], [True, False, 0, 1]),
    ("breadcrumbs", "global", "lambda", ["x", float("inf")], [0.5, 2]),
    ("sce", "global", "select_topk", [1.1, -0.5], [0.0, 0.1, 1.0]),
    ("model_stock", "global", "filter_wise", ["true", 0.5], [True, False]),
    ("ram", "global", "epsilon", [-1e-5, "0"], [0.0, 1e-5]),
    ("ramplus_tl", "global", "epsilon", [0.0, -1.0], [1e-5, 0.1]),
    ("ramplus_tl", "global", "alpha", [float("nan"), "a"], [0.2, -1.0]),
]


@pytest.mark.parametrize("name,scope,key,bad,good", BAD_VALUES)
def test_param_checks(name, scope, key, bad, good):
    param = (METHODS[name].model_params if scope == "model" else METHODS[name].global_params)[key]
    for value in bad:
        assert isinstance(param.check(value), str), value
    for value in good:
        assert param.check(value) is None, value


@pytest.mark.parametrize("name,counts_ok,counts_bad", [
    ("arcee_fusion", [2], [1, 3]), ("model_stock", [3, 5], [1, 2]), ("della", [1, 2, 5], [0]),
    ("sce", [1, 3], [0]), ("ram", [1, 4], [0])])
def test_model_counts_declared(name, counts_ok, counts_bad):
    method = METHODS[name]
    assert method.needs_base
    allowed = lambda n: method.min_models <= n <= (method.max_models or math.inf)
    assert all(allowed(n) for n in counts_ok) and not any(allowed(n) for n in counts_bad)


def test_weight_required_for_gta_methods():
    for name in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        assert METHODS[name].model_params["weight"].default is REQUIRED


# --- breadcrumbs ---------------------------------------------------------------------------

GAMMAS = [0.01, 0.05, 0.2, 0.95]  # per model; 0.95 exceeds 1 − density: the cut shrinks


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", [(37, 53), (101,)], ids=str)
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 4])
def test_breadcrumbs_matches_mergekit_fp32(name, shape, density, n):
    tensors = random_models(shape, n, seed=n * 100 + len(shape))
    params = gta_params(n, density, lambda i: {"gamma": GAMMAS[i]})
    for shared in ({}, {"rescale": True, "normalize": True, "lambda": 0.7}):
        got = ours(name, tensors, params, shared)
        close(got, mergekit(name, tensors, params, shared))
        if density < 1:  # the sparsification did something
            assert not torch.allclose(got, ours("breadcrumbs", tensors, gta_params(n, 1.0, lambda i: {})))


def python_outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    flat = delta.reshape(-1).tolist()
    n = len(flat)
    order = sorted(range(n), key=lambda e: (abs(flat[e]), e))
    k, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - k - n_top)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_bot:n_bot + k]] = True
    return keep.reshape(delta.shape)


def outlier_certain(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Elements whose keep/drop does not depend on the order among equal magnitudes: those
    whose magnitude differs from both cut-point magnitudes."""
    mags = delta.abs().reshape(-1)
    s = torch.sort(mags).values
    n = mags.numel()
    k, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - k - n_top)
    cuts = [s[n_bot], s[n_bot + k - 1]] if k else []
    certain = torch.ones(n, dtype=torch.bool)
    for c in cuts:
        certain &= mags != c
    return certain.reshape(delta.shape)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", [(37, 53), (1961,)], ids=str)
@pytest.mark.parametrize("density", [0.1, 0.5])
@pytest.mark.parametrize("n", [2, 4])
def test_breadcrumbs_tie_heavy(name, shape, density, n, monkeypatch):
    tensors = tie_models(shape, n, seed=7 + n)
    params = gta_params(n, density, lambda i: {"gamma": GAMMAS[i]})
    shared = {"rescale": True, "normalize": True}
    base = tensors[0].float()
    all_certain = torch.ones(shape, dtype=torch.bool)
    for i in range(n):
        delta = tensors[i + 1].float() - base
        gamma = GAMMAS[i]
        mine = gta.outlier_keep_mask(delta, density, gamma)
        assert torch.equal(mine, python_outlier_mask(delta, density, gamma))  # our documented rule
        theirs = mk_sparsify.magnitude_outliers(delta, density, gamma=gamma) != 0  # δ has no zeros
        assert mine.sum() == theirs.sum() == int(density * delta.numel())
        certain = outlier_certain(delta, density, gamma)
        assert 0 < certain.sum() < certain.numel()  # ties do straddle the cuts
        assert torch.equal(mine[certain], theirs[certain])
        all_certain &= certain
    got = ours(name, tensors, params, shared)
    # mergekit as is: equal wherever no model's decision hangs on a tie (the l1 factors are
    # sums of the same magnitudes, so they agree to rounding)
    assert all_certain.sum() > 0
    close(got[all_certain], mergekit(name, tensors, params, shared)[all_certain])
    # mergekit with stable sorts: the same rule as ours, so equal everywhere
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sort(*a, **{**k, "stable": True}))
    close(got, mergekit(name, tensors, params, shared))


def test_breadcrumbs_base_only_and_density_zero():
    tensors = random_models((37, 53), 2, seed=3)
    assert torch.equal(ours("breadcrumbs", tensors[:1]), tensors[0])
    params = [{"weight": 1.0, "density": 0.0}, {"weight": 1.0, "density": 0.5}]
    for shared in ({}, {"rescale": True}):  # rescale: ‖kept‖₁ = 0 must leave the zeros unscaled
        got = ours("breadcrumbs", tensors, params, shared)
        assert not got.isnan().any()
        close(got, mergekit("breadcrumbs", tensors, params, shared))
        close(got, ours("breadcrumbs", [tensors[0], tensors[2]], params[1:], shared))


# --- DELLA ---------------------------------------------------------------------------------

def exact_della_keep(delta: torch.Tensor, density: float, epsilon: float, seed: int, model: int) -> torch.Tensor:
    """The documented rule in exact rational arithmetic: ranks by (|δ|, index) along dim 1
    (1-D: one row), p = (d − ε) + 2ε·r/(m − 1) (m = 1: p = d), keep iff bits < ⌊p·2³²⌋."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    moved = rows.movedim(1, -1)
    m = moved.shape[-1]
    flat_rows = moved.reshape(-1, m).tolist()
    index = torch.arange(delta.numel()).reshape(rows.shape).movedim(1, -1).reshape(-1, m).tolist()
    bits = dare_random_bits(delta.numel(), seed, model).tolist()
    d, e = Fraction(density), Fraction(epsilon)
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    for values, idx in zip(flat_rows, index):
        order = sorted(range(m), key=lambda c: (abs(values[c]), idx[c]))
        for r, c in enumerate(order):
            p = d if m == 1 else (d - e) + 2 * e * Fraction(r, m - 1)
            keep[idx[c]] = bits[idx[c]] < math.floor(p * 2**32)
    return keep.reshape(delta.shape)


def fp64_gta(tensors, weights, masks, *, consensus, normalize, rescale, scale):
    """GTA in float64 from given keep masks."""
    base = tensors[0].double()
    us = []
    for t, w, keep in zip(tensors[1:], weights, masks):
        delta = t.double() - base
        kept = delta * keep
        if rescale:
            before, after = delta.abs().sum(), kept.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        us.append(w * kept)
    u = torch.stack(us)
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * base.dim())
    if consensus:
        agree = u.sign() == torch.where(u.sum(0) >= 0, 1.0, -1.0)
        mixed, divisor = (u * agree).sum(0), (w * agree).sum(0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed, divisor = u.sum(0), w.sum(0)
        divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    # where the vote Σ uᵢ is ~0 (tie data: exact cancellations), fp32 and fp64 may elect
    # different signs; such elements are left out of the fp64 comparison
    settled = u.sum(0).abs() >= 1e-5 * u.abs().sum(0)
    if not consensus:
        settled = torch.ones_like(settled)
    return base + scale * mixed, settled


DELLA_CASES = [((37, 53), 0.1, 0.05), ((37, 53), 0.5, 0.15), ((101,), 0.5, 0.3), ((3, 4, 5), 0.3, 0.2),
               ((6, 1), 0.4, 0.1), ((1,), 0.6, 0.1), ((37, 53), 1.0, 0.15)]


@pytest.mark.parametrize("shape,density,epsilon", DELLA_CASES, ids=str)
@pytest.mark.parametrize("data", ["fp32", "ties"])
def test_della_mask_exact_rule(shape, density, epsilon, data):
    tensors = random_models(shape, 2, seed=11) if data == "fp32" else tie_models(shape, 2, seed=11)
    seed = 2**40 + 123
    for model in range(2):
        delta = tensors[model + 1].float() - tensors[0].float()
        if density >= 1:
            assert torch.equal(gta.sparsify_della(delta, {"density": density, "epsilon": epsilon}, True, seed, model),
                               delta)
            continue
        mine = gta.della_keep_mask(delta, density, epsilon, seed, model)
        assert torch.equal(mine, exact_della_keep(delta, density, epsilon, seed, model))


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(37, 53), (101,)], ids=str)
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("data", ["fp32", "ties"])
def test_della_merge_against_fp64_and_mergekit(name, shape, density, n, data, stable_sorts, monkeypatch):
    """Our merge vs (a) an fp64 GTA on the exact-rule masks, (b) mergekit with stable sorts
    and torch.bernoulli replaced by our masks (its probabilities checked against ours)."""
    tensors = random_models(shape, n, seed=5 + n) if data == "fp32" else tie_models(shape, n, seed=5 + n)
    epsilons = [0.05, 0.09, 0.01, 0.0]
    params = gta_params(n, density, lambda i: {"epsilon": epsilons[i]})
    seed = 99
    base = tensors[0].float()
    deltas = [t.float() - base for t in tensors[1:]]
    masks = [exact_della_keep(d, density, params[i]["epsilon"], seed, i) if density < 1 else torch.ones_like(d)
             for i, d in enumerate(deltas)]
    consensus = name == "della"
    calls = []
    for shared in ({}, {"rescale": False, "normalize": not consensus, "lambda": 1.3}):
        resolved = inputs_for(name, tensors, params, shared, seed).shared
        got = ours(name, tensors, params, shared, seed)
        expected, settled = fp64_gta(tensors, [p["weight"] for p in params], masks, consensus=consensus,
                                     normalize=resolved["normalize"], rescale=resolved["rescale"],
                                     scale=resolved["lambda"])
        assert settled.float().mean() > 0.97
        close(got[settled], expected[settled], rtol=1e-5, atol=1e-6)

        calls.clear()

        def fake_bernoulli(probs, *a, **k):
            i = len(calls)
            calls.append(i)
            p = gta.della_keep_probability(deltas[i], density, params[i]["epsilon"])
            torch.testing.assert_close(probs.reshape(p.shape).double(), p, rtol=0, atol=1e-6)
            return masks[i].reshape(probs.shape).to(probs.dtype)

        with monkeypatch.context() as patch:
            patch.setattr(torch, "bernoulli", fake_bernoulli)
            close(got, mergekit(name, tensors, params, shared), rtol=1e-5, atol=1e-6)
        assert len(calls) == (n if density < 1 else 0)
        if density < 1:
            assert any(0 < m.float().mean() < 1 for m in masks)


@pytest.mark.parametrize("shape", [(37, 53), (101,), (4099, 1031), (2051, 2053)], ids=str)
def test_della_bit_masks_are_the_whole_tensors_masks(shape):
    """The fused path's packed masks, built a block of 8k rows at a time (two blocks for the
    larger shapes; rows of 2053 elements: blocks still start on a byte), hold exactly the bits of
    ``della_keep_mask`` over the whole δ — density 0 drops all, density 1 needs no mask."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=gen).bfloat16()
    tuned = [(base.float() + 0.01 * torch.randn(shape, generator=gen)).bfloat16() for _ in range(3)]
    densities, epsilons = [0.3, 0.0, 1.0], [0.1, 0.0, 0.05]
    masks = gta.della_bit_masks(base, tuned, densities, epsilons, 23, False, cpu_extension())
    assert masks[2] is None
    for model, (t, mask) in enumerate(zip(tuned[:2], masks)):
        bits = torch.from_numpy(np.unpackbits(mask.numpy(), bitorder="little")[:base.numel()].copy()).bool()
        delta = t.float() - base.float()
        expected = gta.della_keep_mask(delta, densities[model], 0.1, 23, model) if densities[model] > 0 else \
            torch.zeros(shape, dtype=torch.bool)
        assert torch.equal(bits.reshape(shape), expected)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [{}, {"rescale": False}, {"lambda": 0.7}], ids=str)
def test_della_fused_passes_match_the_stacked_path(monkeypatch, name, n, dtype, shared):
    """DELLA on the CPU runs as packed masks + the fused C++ merge, without fp32 task vectors:
    within fp32 rounding of the stacked torch combine on the same masks (the L1 factor is summed
    in fp64 there and multiplied into the weight)."""
    tensors = [t.to(dtype) for t in tie_models((61, 37), n, seed=40 + n)]
    params = gta_params(n, 0.4, lambda i: {"epsilon": 0.1})
    fused = ours(name, tensors, params, shared, seed=3)
    monkeypatch.setattr(gta, "della_merge", lambda *a, **k: None)  # the stacked path
    stacked = ours(name, tensors, params, shared, seed=3)
    assert not torch.equal(stacked, tensors[0].float())
    close(fused, stacked, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sampled", [False, True], ids=["small", "sampled"])
@pytest.mark.parametrize("ties", ["tie-heavy", "gaussian"])
@pytest.mark.parametrize("shape", [(37, 53), (1,), (70001,), (3, 5, 7)], ids=str)
def test_higher_index_cuts_match_a_stable_sort(monkeypatch, shape, ties, sampled):
    """``higher_index_cuts`` keeps key > K or (key == K and e > C): exactly the last c of a stable
    ascending sort of |δ| (equal magnitudes: the higher flat index ranks higher), on tie-heavy
    deltas (bf16 steps) and on Gaussian bf16 ones (K then inside the sampled bracket), every
    count from none to all; with the sampled bracket forced on small tensors too."""
    from vfuse_kernels import selection
    from vfuse_kernels.ops._cpp_kernels import selector
    from vfuse_kernels.selection import higher_index_cuts

    if sampled:
        monkeypatch.setattr(selection, "SMALL", 64)
    if ties == "tie-heavy":
        base, tuned = (t.bfloat16() for t in tie_models(shape, 1, seed=31, heavy_tail=True))
    else:
        gen = torch.Generator().manual_seed(31)
        base = torch.randn(shape, generator=gen).bfloat16()
        tuned = (base.float() + 0.01 * torch.randn(shape, generator=gen)).bfloat16()
    n = base.numel()
    delta = (tuned.float() - base.float()).reshape(-1)
    order = torch.sort(delta.abs(), stable=True).indices
    counts = sorted({0, 1, n // 3, n // 2, n - 1, n, n + 4})
    keys, cuts = higher_index_cuts(selector(base, [tuned] * len(counts), False), counts)
    key = (delta.view(torch.int32) & 0x7FFFFFFF).long()
    index = torch.arange(n)
    for c, k, cut in zip(counts, keys, cuts):
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[n - min(max(c, 0), n):]] = True
        assert torch.equal((key > k) | ((key == k) & (index > cut)), expected), c


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("density, gamma", [(0.4, 0.05), (0.9, 0.3), (1.0, 0.1), (0.2, 0.0), (0.0, 0.2)])
def test_breadcrumbs_band_matches_the_stacked_path(monkeypatch, name, n, dtype, density, gamma):
    """Breadcrumbs on the CPU runs as two magnitude cuts per model and one merge pass keeping the
    band between them: the stacked torch path's bits (its masks, its fp32 operations), without
    fp32 task vectors; with the L1 rescale within fp32 rounding (fp64 sums)."""
    tensors = [t.to(dtype) for t in tie_models((61, 37), n, seed=60 + n)]
    params = gta_params(n, density, lambda i: {"gamma": gamma})
    fused = [ours(name, tensors, params, shared) for shared in ({}, {"rescale": True})]
    monkeypatch.setattr(gta, "breadcrumbs_merge", lambda *a, **k: None)  # the stacked path
    stacked = [ours(name, tensors, params, shared) for shared in ({}, {"rescale": True})]
    assert torch.equal(fused[0], stacked[0])
    close(fused[1], stacked[1], rtol=1e-6, atol=1e-7)
    if 0 < density < 1:
        assert not torch.equal(stacked[0], tensors[0].float())


def test_della_kept_fraction():
    """Kept count = Σp within 4 binomial SDs overall, and per magnitude tercile (the DELLA
    tilt: small magnitudes kept at ≈ d − 2ε/3, large at ≈ d + 2ε/3)."""
    gen = torch.Generator().manual_seed(4)
    delta = torch.randn(256, 256, generator=gen)
    for density, epsilon, seed, model in [(0.4, 0.2, 1, 0), (0.1, 0.05, 2, 3), (0.7, 0.0, 3, 1)]:
        keep = gta.della_keep_mask(delta, density, epsilon, seed, model)
        p = gta.della_keep_probability(delta, density, epsilon)
        ranks = gta.ascending_ranks(delta.abs(), dim=1)
        for part in (ranks < 85, (ranks >= 85) & (ranks < 171), ranks >= 171, torch.ones_like(keep)):
            expected = p[part].sum().item()
            sd = (p[part] * (1 - p[part])).sum().sqrt().item()
            assert abs(keep[part].sum().item() - expected) < 4 * sd
        if epsilon > 0:
            low, high = keep[ranks < 85].float().mean(), keep[ranks >= 171].float().mean()
            assert high - low > epsilon  # expected 4ε/3 apart


def test_della_reproducible_and_keyed():
    tensors = random_models((37, 53), 2, seed=8)
    params = gta_params(2, 0.3, lambda i: {"epsilon": 0.1})
    a = ours("della", tensors, params, seed=5)
    assert torch.equal(a, ours("della", tensors, params, seed=5))
    assert not torch.equal(a, ours("della", tensors, params, seed=6))
    delta = tensors[1] - tensors[0]
    m0 = gta.della_keep_mask(delta, 0.3, 0.1, 5, 0)
    assert torch.equal(m0, gta.della_keep_mask(delta, 0.3, 0.1, 5, 0))
    assert not torch.equal(m0, gta.della_keep_mask(delta, 0.3, 0.1, 5, 1))
    assert not torch.equal(m0, gta.della_keep_mask(delta, 0.3, 0.1, 6, 0))
    # the same model at another position draws another stream
    swapped = ours("della_linear", [tensors[0], tensors[2], tensors[1]], params[::-1], seed=5)
    assert not torch.allclose(swapped, ours("della_linear", tensors, params, seed=5))


@pytest.mark.parametrize("density,epsilon", [(0.1, 0.1), (0.9, 0.1), (0.2, 0.3)])
def test_della_rejects_epsilon_out_of_range_for_density(density, epsilon):
    tensors = random_models((37, 53), 2, seed=9)
    params = gta_params(2, 0.5, lambda i: {"epsilon": 0.1})
    params[1].update(density=density, epsilon=epsilon)
    with pytest.raises(ValueError, match="epsilon"):
        ours("della", tensors, params)
    with pytest.raises(ValueError, match="[Ee]psilon"):
        mergekit("della", tensors, params)


def test_della_density_zero_and_one():
    tensors = random_models((37, 53), 2, seed=10)
    params = [{"weight": 0.5, "density": 0.0, "epsilon": 0.3}, {"weight": 0.8, "density": 1.0, "epsilon": 0.4}]
    got = ours("della_linear", tensors, params)  # ε outside d's range is fine at d = 0 and 1 (as mergekit)
    close(got, tensors[0] + 0.8 * (tensors[2] - tensors[0]))
    close(got, mergekit("della_linear", tensors, params))


# --- SCE -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 53), (101,)], ids=str)
@pytest.mark.parametrize("topk", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("scale", [0.1, 1e-4])  # 1e-4: Σ mean(τ²) < 1e-6, equal weights
def test_sce_matches_mergekit(shape, topk, n, scale):
    tensors = random_models(shape, n, seed=20 + n, scale=scale)
    tvs = torch.stack([t - tensors[0] for t in tensors[1:]])
    assert (tvs.square().reshape(n, -1).mean(1).sum() < 1e-6) == (scale < 1e-3)
    got = ours("sce", tensors, shared={"select_topk": topk})
    close(got, mergekit("sce", tensors, shared={"select_topk": topk}))
    if topk < 1:
        assert not torch.allclose(got, ours("sce", tensors))


@pytest.mark.parametrize("shape", [(37, 53), (1961,)], ids=str)
@pytest.mark.parametrize("topk", [0.1, 0.5])
@pytest.mark.parametrize("n", [2, 4])
def test_sce_tie_heavy(shape, topk, n, monkeypatch):
    tensors = tie_models(shape, n, seed=30 + n)
    tvs = torch.stack([t.float() - tensors[0].float() for t in tensors[1:]])
    mine = sce.sce_select_mask(tvs, topk)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * topk)
    flat = var.reshape(-1).tolist()
    rule = torch.zeros(len(flat), dtype=torch.bool)
    rule[sorted(range(len(flat)), key=lambda e: (-flat[e], e))[:k]] = True
    assert torch.equal(mine.reshape(-1), rule)  # our documented rule
    theirs = mk_sce.sce_mask(tvs, topk, torch.float32) != 0
    assert mine.sum() == theirs.sum() == k
    cut = torch.sort(var.reshape(-1), descending=True).values[k - 1]
    certain = var != cut
    assert 0 < certain.sum() < certain.numel()
    assert torch.equal(mine[certain], theirs[certain])
    # the whole merge, with mergekit's selection replaced by ours
    monkeypatch.setattr(mk_sce, "sce_mask", lambda t, d, dtype=None: mine.to(dtype))
    close(ours("sce", tensors, shared={"select_topk": topk}), mergekit("sce", tensors, shared={"select_topk": topk}))


def test_sce_topk_zero_and_base_only():
    tensors = random_models((37, 53), 3, seed=12)
    close(ours("sce", tensors, shared={"select_topk": 0.0}), tensors[0])
    close(ours("sce", tensors, shared={"select_topk": 0.0}), mergekit("sce", tensors, shared={"select_topk": 0.0}))
    assert torch.equal(ours("sce", tensors[:1]), tensors[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("topk", [0.0, 0.01, 0.5, 0.99, 1.0])
def test_sce_fused_passes_match_the_stacked_path(monkeypatch, dtype, n, topk):
    """SCE on the CPU runs as C++ passes over the stored tensors, never the fp32 stack: the
    radix passes and tie cutoff select sce_select_mask's elements exactly (tie-heavy data,
    prime sizes), and the merge gives the stacked path's bits."""
    from vfuse_kernels._backend import DTYPE_CODES, cpu_extension

    tensors = [t.to(dtype) for t in tie_models((61, 67), n, seed=50 + n)]
    tvs = torch.stack([t.float() - tensors[0].float() for t in tensors[1:]])
    numel = tvs[0].numel()
    args = (tensors[0].data_ptr(), [t.data_ptr() for t in tensors[1:]], DTYPE_CODES[dtype], numel)
    threshold, cutoff = cpu_extension().sce_select(*args, topk)
    bits = sce.model_variance(tvs).reshape(-1).view(torch.int32).long()
    selected = (bits > threshold) | ((bits == threshold) & (torch.arange(numel) <= cutoff))
    assert torch.equal(selected, sce.sce_select_mask(tvs, topk).reshape(-1))
    if topk == 0.5 and n > 1:
        tied = bits == threshold
        assert 0 < (selected & tied).sum() < tied.sum()  # the cut runs through equal variances
    with monkeypatch.context() as patched:
        patched.setattr(sce, "task_vectors", None)  # the fused path never stacks
        fused = ours("sce", tensors, shared={"select_topk": topk})
    monkeypatch.setattr(sce, "fused_sce_merge", lambda *args: None)
    assert torch.equal(fused, ours("sce", tensors, shared={"select_topk": topk}))


# --- model_stock ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 53), (101,), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("data", ["fp32", "ties"])
def test_model_stock_matches_mergekit(shape, filter_wise, n, data):
    tensors = random_models(shape, n, seed=40 + n) if data == "fp32" else tie_models(shape, n, seed=40 + n)
    if data == "fp32":  # correlated offsets: t well away from 0 and 1
        common = tensors[1] - tensors[0]
        tensors = [tensors[0]] + [t + common for t in tensors[1:]]
    shared = {"filter_wise": filter_wise}
    got = ours("model_stock", tensors, shared=shared)
    close(got, mergekit("model_stock", tensors, shared=shared), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, tensors[0].float())


def test_model_stock_singular_keeps_base():
    """Opposite offsets: cos = −1, 1 + (N − 1)·cos = 0, so t = 0 (the base) for those rows."""
    gen = torch.Generator().manual_seed(13)
    base = torch.randn(4, 9, generator=gen)
    offset = torch.randn(4, 9, generator=gen)
    offset[2] = torch.randn(9, generator=gen)  # row 2: second model is not opposite
    second = -offset.clone()
    second[2] = torch.randn(9, generator=gen)
    tensors = [base, base + offset, base + second]
    got = ours("model_stock", tensors, shared={"filter_wise": True})
    close(got, mergekit("model_stock", tensors, shared={"filter_wise": True}))
    close(got[[0, 1, 3]], base[[0, 1, 3]])
    assert not torch.allclose(got[2], base[2])


# --- arcee_fusion --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 53), (101,), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("data", ["fp32", "ties"])
def test_arcee_fusion_matches_mergekit(shape, data):
    tensors = random_models(shape, 1, seed=50) if data == "fp32" else tie_models(shape, 1, seed=50, heavy_tail=True)
    got = ours("arcee_fusion", tensors)
    close(got, mergekit("arcee_fusion", tensors))
    kept = got != tensors[0].float()
    assert 0 < kept.sum() < kept.numel()


def fusion_scores(tuned, base):
    """|θ − b| · KL(softmax θ ‖ softmax b) per row, over the whole tensor at once."""
    p = torch.softmax(tuned.float(), dim=-1) + 1e-8
    q = torch.softmax(base.float(), dim=-1) + 1e-8
    return (tuned.float() - base.float()).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def documented_threshold(scores, seed):
    """median + 1.5·IQR of the scores (above 10⁶ of them: of 10⁶ drawn by the documented rule
    from DARE's stream), each quantile the sorted sample's element at floor(q·(n − 1))."""
    flat = scores.reshape(-1)
    if flat.numel() > 10**6:
        bits = dare_random_bits(10**6, seed, 0).double()
        flat = flat[(bits / 2**32 * flat.numel()).floor().long()]
    s = torch.sort(flat).values
    q1, med, q3 = (s[int(q * (s.numel() - 1))] for q in (0.25, 0.5, 0.75))
    return med + 1.5 * (q3 - q1)


def test_arcee_fusion_sampled_quantiles():
    """Above 10⁶ elements: the threshold comes from 10⁶ Philox-drawn samples (documented
    index rule), is reproducible, and its mask agrees with mergekit's (torch.randint sample)
    on nearly every element."""
    tensors = random_models((1001, 1000), 1, seed=51)
    base, tuned = tensors
    scores = fusion_scores(tuned, base)
    got = ours("arcee_fusion", tensors, seed=17)
    assert torch.equal(got, base + (tuned - base) * (scores >= documented_threshold(scores, 17)))
    assert torch.equal(got, ours("arcee_fusion", tensors, seed=17))
    torch.manual_seed(0)
    agree = ((got != base) == (mergekit("arcee_fusion", tensors) != base)).float().mean()
    assert agree > 0.99


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (7,), (1001, 1000), (3, 701, 509)], ids=str)
@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                              (torch.float32, torch.float32), (torch.float32, torch.bfloat16)], ids=str)
def test_arcee_fusion_cpp_passes_give_the_torch_paths_bits(monkeypatch, shape, dtype, out_dtype):
    """The C++ passes (the importance at the sample, then the kept deltas) leave the bits of the
    torch path: tie-heavy bf16-quantised deltas, sampled and whole-tensor quantiles, a row with
    an infinite and a NaN delta, −0 bases, every storage dtype, fp32 and bf16 outputs."""
    base, tuned = tie_models(shape, 1, seed=53, heavy_tail=True)
    base, tuned = base.to(dtype), tuned.to(dtype)
    if base.numel() > 8:
        base.view(-1)[:3] = -0.0
        tuned.view(-1)[-2:] = torch.tensor([float("inf"), float("nan")], dtype=dtype)
    results = []
    for backend in ("cpp", "reference"):
        monkeypatch.setenv("VFUSE_BACKEND", backend)
        inputs = inputs_for("arcee_fusion", [base, tuned], seed=9)
        inputs.out = poisoned_like(base, out_dtype)
        results.append(METHODS["arcee_fusion"].merge(inputs))
        assert results[-1] is inputs.out
    nan = results[0].isnan()  # NaN: stored as a NaN by either (torch's bf16 stores pick their own NaN bits)
    assert torch.equal(nan, results[1].isnan()) and nan.sum() == 2 * (base.numel() > 8)  # θ − b = ∞ dropped: ∞·0
    bits = {2: torch.int16, 4: torch.int32}[results[0].element_size()]
    assert torch.equal(*(r.masked_fill(nan, 0).view(bits) for r in results))  # −0 and +0 told apart
    kept = results[0] != base.to(out_dtype)
    assert 0 < kept.sum() < kept.numel() or base.numel() == 1


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_arcee_fusion_keeps_scores_equal_to_the_threshold(monkeypatch, backend):
    """θ = b + 1/4 in one row: softmax θ = softmax b exactly, every score is 0, and so is the
    threshold (IQR 0): importance ≥ threshold keeps every delta."""
    monkeypatch.setenv("VFUSE_BACKEND", backend)
    base = (torch.arange(1000) % 64 / 64).reshape(1, 1000)
    tuned = base + 0.25
    assert torch.equal(ours("arcee_fusion", [base, tuned]), tuned)


@pytest.mark.parametrize("shape, blocks", [((4099, 1031), 2), ((1031, 4099), 2), ((3, 1400, 1031), 2),
                                           ((9, 600000), 2), ((7, 600001), 1), ((4200001,), 1)], ids=str)
def test_arcee_fusion_row_blocks_give_the_whole_tensors_bits(shape, blocks):
    """Tensors above one block (2^22 elements) are merged a block of rows at a time: the same
    bits as the whole-tensor formula with the same sample (each row's KL reduced alike)."""
    gen = torch.Generator().manual_seed(52)
    base = torch.randn(shape, generator=gen).bfloat16()
    tuned = (base.float() + 0.01 * torch.randn(shape, generator=gen)).bfloat16()
    assert len(arcee_fusion.row_blocks(base.numel() // shape[-1], shape[-1])) == blocks  # (7 rows: no lone last row)
    scores = fusion_scores(tuned, base)
    expected = base.float() + (tuned.float() - base.float()) * (scores >= documented_threshold(scores, 5))
    got = ours("arcee_fusion", [base, tuned], seed=5)
    assert torch.equal(got, expected)
    kept = (got != base.float()).float().mean()
    assert 0 < kept < 0.5


# --- RAM -----------------------------------------------------------------------------------

def ram_models(shape, n, seed):
    """Deltas that are exactly 0 (θ = base) in ~half the elements, below ε = 1e-5 in some,
    so unique, shared and empty elements all occur; the last model's support lies inside the
    first's (no unique elements of its own)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    supports = [torch.rand(shape, generator=gen) < 0.5 for _ in range(n)]
    supports[-1] &= supports[0]
    out = [base]
    for support in supports:
        delta = 0.01 * torch.randn(shape, generator=gen) * support
        tiny = torch.rand(shape, generator=gen) < 0.05
        out.append(base + torch.where(tiny, torch.full_like(base, 2e-6), delta))
    return out


@pytest.mark.parametrize("name,shared", [("ram", {}), ("ram", {"epsilon": 1e-3}), ("ramplus_tl", {}),
                                         ("ramplus_tl", {"r": 0.5, "alpha": 1.5, "epsilon": 1e-4})], ids=str)
@pytest.mark.parametrize("shape", [(37, 53), (101,)], ids=str)
@pytest.mark.parametrize("n", [2, 4])
def test_ram_matches_mergekit(name, shared, shape, n):
    tensors = ram_models(shape, n, seed=60 + n)
    got = ours(name, tensors, shared=shared)
    close(got, mergekit(name, tensors, shared=shared))
    contrib = torch.stack([(t - tensors[0]).abs() > inputs_for(name, tensors, shared=shared).shared["epsilon"]
                           for t in tensors[1:]])
    count = contrib.sum(0)
    assert (count == 0).any() and (count == 1).any() and (count > 1).any()
    close(got[count == 0], tensors[0][count == 0])
    if name == "ramplus_tl":  # the scaling does something
        assert not torch.allclose(got, ours("ram", tensors, shared={"epsilon": shared.get("epsilon", 1e-5)}))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ram_cpp_passes_match_the_torch_path(monkeypatch, name, n, dtype):
    """The C++ counts and merge passes give the torch path's result within fp32 rounding (the
    sum over models may run in another order), unique, shared and untouched elements included."""
    tensors = [t.to(dtype) for t in ram_models((61, 37), n, seed=70 + n)]
    shared = {"r": 0.5, "alpha": 1.5, "epsilon": 1e-4} if name == "ramplus_tl" else {"epsilon": 1e-3}
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    assert cpp_kernels_for(tensors) is not None
    fast = ours(name, tensors, shared=shared)
    monkeypatch.setenv("VFUSE_BACKEND", "reference")
    assert cpp_kernels_for(tensors) is None
    close(fast, ours(name, tensors, shared=shared), rtol=2e-7, atol=2e-7)


def test_ram_base_only():
    base = torch.randn(5, 7)
    assert torch.equal(ours("ram", [base]), base)
    assert torch.equal(ours("ramplus_tl", [base]), base)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_stock_cpp_passes_match_the_torch_path(monkeypatch, n, dtype):
    """The C++ Gram + blend passes give the torch path's result within fp32 rounding of t."""
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(301, 7, generator=gen).to(dtype)
    tensors = [base] + [(base.float() + 0.01 * torch.randn(301, 7, generator=gen)).to(dtype) for _ in range(n)]
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    assert cpp_kernels_for(tensors) is not None  # the C++ passes run
    fast = ours("model_stock", tensors, shared={"filter_wise": False})
    monkeypatch.setenv("VFUSE_BACKEND", "reference")
    assert cpp_kernels_for(tensors) is None
    torch.testing.assert_close(fast, ours("model_stock", tensors, shared={"filter_wise": False}), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"])
@pytest.mark.parametrize("shape", [(37, 53), (5, 7, 11), (1031,)], ids=str)
def test_chunked_combines_and_cpp_passes_give_the_same_bits(name, shape, monkeypatch):
    """The torch path's element-wise combines and DELLA's per-row keep masks run a CHUNK of
    elements (a block of rows) at a time: chunks that split rows and tensors give the bits of
    one chunk. The CPU's C++ passes (SCE's variance, the consensus combine) give those bits too;
    DELLA's fused passes (blocks of 8 rows here) the same masks, the result within fp32 rounding
    (its L1 factor is summed in fp64)."""
    tensors = tie_models(shape, 3, seed=11)
    extra = {"breadcrumbs": lambda i: {"gamma": 0.05}, "breadcrumbs_ties": lambda i: {"gamma": 0.05}}
    params = None if name == "sce" else gta_params(3, 0.6, extra.get(name, lambda i: {"epsilon": 0.2}))
    shared = {"select_topk": 0.5} if name == "sce" else None
    monkeypatch.setenv("VFUSE_BACKEND", "reference")
    whole = ours(name, tensors, params, shared, seed=3)
    for chunk in (1, 7, 64):
        monkeypatch.setattr(gta, "CHUNK", chunk)
        assert torch.equal(ours(name, tensors, params, shared, seed=3), whole), chunk
    if cpu_extension() is not None:
        monkeypatch.setenv("VFUSE_BACKEND", "cpp")
        if name.startswith("della") and len(shape) <= 2:
            close(ours(name, tensors, params, shared, seed=3), whole, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(ours(name, tensors, params, shared, seed=3), whole)


@pytest.mark.parametrize("models", [1, 2, 3, 5])
@pytest.mark.parametrize("data", ["normal", "ties"])
def test_model_variance_is_torch_var_bit_for_bit(models, data, monkeypatch):
    """SCE's variance across models: the C++ pass (fp64 Welford, models in order) gives
    torch.var's bits — on plain and on tie-heavy (bf16-rounded) deltas, odd lengths."""
    if cpu_extension() is None:
        pytest.skip("the C++ extension is not built")
    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(models)
    tvs = torch.randn(models, 7 * 14_293, generator=gen) * 0.01
    if data == "ties":
        tvs = ((tvs * 512).round() / 512).bfloat16().float()
    assert sce.cpp_kernels_for([tvs]) is not None  # the C++ pass runs
    assert torch.equal(sce.model_variance(tvs), torch.var(tvs, dim=0, unbiased=False))
    assert torch.equal(sce.model_variance(tvs.reshape(models, 7, -1)),
                       torch.var(tvs.reshape(models, 7, -1), dim=0, unbiased=False))


@pytest.mark.parametrize("shape", [(37, 53), (1031,), (3, 2), (9, 896)], ids=str)
@pytest.mark.parametrize("data", ["normal", "ties", "zeros_and_nan"])
def test_della_cpp_mask_is_the_torch_mask(shape, data, monkeypatch):
    """The C++ DELLA mask (a radix sort per row, then the fp64 keep rule) equals the torch path's
    (stable sort, scatter, the same rule) on plain, tie-heavy and NaN/±0 deltas, for rows that
    start mid Philox group and seeds above 2^63."""
    if cpu_extension() is None:
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(sum(shape))
    delta = torch.randn(shape, generator=gen) * 0.01
    if data == "ties":
        delta = ((delta * 512).round() / 512).bfloat16().float()
    if data == "zeros_and_nan":
        delta = (delta * 64).round() / 64
        delta.view(-1)[::7] = float("nan")
        delta.view(-1)[1::5] = -0.0
    for density, epsilon, seed, model in ((0.5, 0.2, 3, 0), (0.3, 0.1, 2**63 + 5, 2)):
        monkeypatch.setenv("VFUSE_BACKEND", "cpp")
        assert gta.cpp_kernels_for([delta]) is not None  # the C++ pass runs
        fast = gta.della_keep_mask(delta, density, epsilon, seed, model)
        monkeypatch.setenv("VFUSE_BACKEND", "reference")
        assert torch.equal(fast, gta.della_keep_mask(delta, density, epsilon, seed, model))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl", "model_stock", "slerp", "nuslerp", "multislerp", "nearswap",
                                  "karcher", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                                  "arcee_fusion", "sce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_methods_fill_the_engines_output_buffer(name, dtype):
    """A method handed the engine's output buffer (``TensorInputs.out``, the stored dtype) leaves
    there exactly what the engine stored before: its fp32 result rounded once to that dtype."""
    gen = torch.Generator().manual_seed(80)
    base = torch.randn(61, 37, generator=gen)
    models = 2 if name in ("slerp", "nearswap", "arcee_fusion") else 3
    tensors = [base] + [base + 0.01 * torch.randn(61, 37, generator=gen) for _ in range(models - 1)]
    tensors = [t.to(dtype) for t in tensors]
    model_params = None
    if name in ("nuslerp", "multislerp"):
        model_params = [{"weight": 0.6}, {"weight": 0.4}]
    elif name.startswith(("breadcrumbs", "della")):
        model_params = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]
    shared = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.004}, "sce": {"select_topk": 0.5}}.get(name)
    expected = METHODS[name].merge(inputs_for(name, tensors, model_params, shared)).to(dtype)
    inputs = inputs_for(name, tensors, model_params, shared)
    inputs.out = poisoned_like(tensors[0])
    result = METHODS[name].merge(inputs)
    assert torch.equal(result.to(dtype), expected)
    assert result is inputs.out  # written there: no whole-tensor fp32 temporary, no copy
