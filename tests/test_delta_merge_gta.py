"""``vk.delta_merge`` with mergekit's breadcrumbs, breadcrumbs_ties, della and della_linear.

The merge methods behind ``vfuse merge`` are tested against mergekit itself
(tests/test_merge_methods_sparse.py); here the functional API must give their results bit for
bit with every parameter mapped (weights, density, gamma/epsilon, normalize, scale ↔ lambda,
rescale ↔ rescale, seed, the model index keying DELLA's draws), and breadcrumbs must match a
plain statement of its rule written here.
"""
from __future__ import annotations

import pytest
import torch

import vfuse_kernels as vk
from vfuse_kernels.merging.methods import METHODS, REQUIRED, TensorInputs

GTA = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


def tie_heavy(numel: int, n: int, dtype: torch.dtype, seed: int = 0):
    """base and n tuned tensors whose deltas take a few magnitudes (many equal |δ|)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(dtype)
    steps = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0]) * 0.01
    tuned = []
    for _ in range(n):
        pick = steps[torch.randint(0, len(steps), (numel,), generator=gen)]
        sign = torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
        tuned.append((base.float() + sign * pick).to(dtype))
    return base, tuned


def yaml_method(method, base, tuned, weights, density, param_value, normalize, scale, l1, seed):
    """The merge method's result as ``vfuse merge`` computes it from a YAML config (fp32)."""
    spec = METHODS[method]
    param = "gamma" if method.startswith("breadcrumbs") else "epsilon"
    params = [{}]
    for w in weights:
        filled = {k: p.default for k, p in spec.model_params.items() if p.default is not REQUIRED}
        filled.update(weight=w, density=density, **{param: param_value})
        params.append(filled)
    shared = {k: p.default for k, p in spec.global_params.items()}
    shared.update({"normalize": normalize, "lambda": scale, "rescale": l1})
    return spec.merge(TensorInputs(name="w", tensors=[base, *tuned], base_index=0, params=params, shared=shared,
                                   seed=seed))


@pytest.mark.parametrize("method", GTA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 3])
def test_matches_the_yaml_method(method, dtype, n):
    base, tuned = tie_heavy(30_011, n, dtype, seed=n)
    weights = [0.7, -0.4, 1.1][:n]
    param = {"gamma": 0.05} if method.startswith("breadcrumbs") else {"epsilon": 0.1}
    out = torch.full_like(base, float("nan"))
    got = vk.delta_merge(base, tuned, weights, method=method, density=0.4, scale=0.8, seed=11, out=out, **param)
    assert got is out
    default_normalize = method == "della"
    default_l1 = method.startswith("della")
    expected = yaml_method(method, base, tuned, weights, 0.4, next(iter(param.values())), default_normalize, 0.8,
                           default_l1, 11)
    assert torch.equal(out, expected.to(dtype))
    # the non-default settings map too
    flipped = vk.delta_merge(base, tuned, weights, method=method, density=0.4, scale=0.8, seed=11,
                             normalize=not default_normalize, rescale=None if default_l1 else "l1", **param)
    expected = yaml_method(method, base, tuned, weights, 0.4, next(iter(param.values())), not default_normalize,
                           0.8, not default_l1, 11)
    assert torch.equal(flipped, expected.to(dtype))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_rule(method):
    """Per model keep the ranks [n − k − top, n − top) of |δ| in a stable ascending order (top =
    int(γ·n) outliers dropped, k = int(d·n) kept), then the (consensus) sum."""
    base, tuned = tie_heavy(4099, 3, torch.float32, seed=5)
    weights, density, gamma = [1.0, 0.5, -0.75], 0.3, 0.02
    n = base.numel()
    k, top = int(density * n), int(gamma * n)
    kept = []
    for t, w in zip(tuned, weights):
        delta = (t - base).double()
        order = torch.sort(delta.abs(), stable=True).indices
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[n - k - top: n - top]] = True
        kept.append(w * delta * keep)
    stack = torch.stack(kept)
    if method == "breadcrumbs_ties":
        sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
        stack = stack * (stack.sign() == sign)
    expected = base.double() + stack.sum(0)
    got = vk.delta_merge(base, tuned, weights, method=method, density=density, gamma=gamma)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


def test_tuned_are_deltas_and_defaults():
    base, tuned = tie_heavy(10_007, 2, torch.float32, seed=2)
    deltas = [t - base for t in tuned]
    for method in GTA:
        plain = vk.delta_merge(base, tuned, [0.5, 0.5], method=method, density=0.5, seed=3)
        assert torch.equal(plain, vk.delta_merge(base, deltas, [0.5, 0.5], method=method, density=0.5, seed=3,
                                                 tuned_are_deltas=True))
    # DELLA's default rescale is mergekit's (L1), breadcrumbs' none
    della = vk.delta_merge(base, tuned, [0.5, 0.5], method="della", density=0.5, seed=3)
    assert torch.equal(della, vk.delta_merge(base, tuned, [0.5, 0.5], method="della", density=0.5, seed=3,
                                             rescale="l1"))
    assert not torch.equal(della, vk.delta_merge(base, tuned, [0.5, 0.5], method="della", density=0.5, seed=3,
                                                 rescale=None))


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="della", gamma=0.1), "gamma has no effect"),
    (dict(method="breadcrumbs", epsilon=0.1), "epsilon has no effect"),
    (dict(method="breadcrumbs", gamma=1.5), "gamma=1.5 must be in"),
    (dict(method="della", epsilon=0.5), "epsilon=0.5 must be in"),
    (dict(method="della", density=0.05, epsilon=0.1), "density ± epsilon"),
    (dict(method="della", consensus="count"), "consensus='count'"),
    (dict(method="breadcrumbs_ties", density=0.0), "outside"),
    (dict(method="ties", gamma=0.1), "gamma has no effect"),
    (dict(method="della_linear", seed=-1), "seed"),
])
def test_bad_arguments_write_nothing(kwargs, message):
    base, tuned = tie_heavy(1000, 2, torch.float32)
    out = torch.full_like(base, 7.0)
    with pytest.raises(ValueError, match=message):
        vk.delta_merge(base, tuned, [0.5, 0.5], out=out, **kwargs)
    assert torch.equal(out, torch.full_like(base, 7.0))
