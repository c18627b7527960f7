"""The public ops of the merge methods that are not delta merges — ``vk.nuslerp``,
``vk.multislerp``, ``vk.nearswap``, ``vk.karcher_mean``, ``vk.model_stock`` — against mergekit
0.1.5's own methods on the same fp32 values (``vk.slerp``: tests/test_slerp.py), on every
backend; then outputs, dtypes and bad arguments.
"""
from __future__ import annotations

import pytest

pytest.importorskip("mergekit")
import torch
from mergekit.merge_methods import registry

import vfuse_kernels as vk
from conftest import backend_device, poisoned_like


def mergekit(name, tensors, base_index=None, **params):
    """mergekit's registered method on one group of fp32 tensors."""
    from mergekit.merge_methods.base import TensorGroup

    (result,) = registry.get(name)((TensorGroup.from_tensors(list(tensors), base_index=base_index),),
                                   parameters=params)
    return result


def tensors(n, shape=(37, 53), seed=0, tie_heavy=True):
    """n correlated fp32 tensors (fine-tunes of one base), bf16-quantised: many equal values."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    out = [base] + [base + 0.05 * torch.randn(shape, generator=gen) for _ in range(n - 1)]
    return [x.bfloat16().float() for x in out] if tie_heavy else out


def on(device, xs):
    return [x.to(device) for x in xs]


@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(backend, flatten, row_wise, with_base):
    base, a, b = tensors(3, seed=1)
    device = backend_device(backend)
    got = vk.nuslerp(*on(device, [a, b]), 0.3, base=base.to(device) if with_base else None, row_wise=row_wise,
                     flatten=flatten).cpu()
    group = [base, a, b] if with_base else [a, b]
    expected = mergekit("nuslerp", group, 0 if with_base else None, weight=[0.7, 0.3], nuslerp_flatten=flatten,
                        nuslerp_row_wise=row_wise)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp(backend, n, with_base, normalize):
    base, *models = tensors(n + 1, seed=n)
    device = backend_device(backend)
    weights = [0.6, 0.25, 0.9, 0.4][:n]
    got = vk.multislerp(on(device, models), weights, base=base.to(device) if with_base else None,
                        normalize_weights=normalize).cpu()
    group = [base, *models] if with_base else models
    expected = mergekit("multislerp", group, 0 if with_base else None, weight=weights, normalize_weights=normalize)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.01, 0.5, 3.0])
def test_nearswap(backend, t):
    a, b = tensors(2, seed=3)
    got = vk.nearswap(*on(backend_device(backend), [a, b]), t).cpu()
    torch.testing.assert_close(got, mergekit("nearswap", [a, b], 0, t=t), rtol=0, atol=0)


@pytest.mark.parametrize("n", [2, 3])
def test_karcher_mean(backend, n):
    xs = tensors(n, seed=4, tie_heavy=False)
    device = backend_device(backend)
    got = vk.karcher_mean(on(device, xs), max_iter=20, tol=1e-6).cpu()
    torch.testing.assert_close(got, mergekit("karcher", xs, None, max_iter=20, tol=1e-6), rtol=1e-5, atol=1e-6)
    weighted = vk.karcher_mean(on(device, xs), [0.9, 0.1] + [0.0] * (n - 2)).cpu()  # closer to the heavier input
    assert (weighted - xs[0]).norm() < (weighted - xs[1]).norm()


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(backend, n, filter_wise):
    base, *models = tensors(n + 1, seed=5)
    device = backend_device(backend)
    got = vk.model_stock(base.to(device), on(device, models), filter_wise=filter_wise).cpu()
    expected = mergekit("model_stock", [base, *models], 0, filter_wise=filter_wise)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_outputs_and_dtypes():
    base, a, b = (x.bfloat16() for x in tensors(3, seed=6))
    for call in (lambda **o: vk.nuslerp(a, b, 0.4, **o), lambda **o: vk.multislerp([a, b], [0.5, 0.5], **o),
                 lambda **o: vk.nearswap(a, b, 0.01, **o), lambda **o: vk.karcher_mean([a, b], **o),
                 lambda **o: vk.model_stock(base, [a, b], **o)):
        plain = call()
        assert plain.dtype == torch.bfloat16 and plain.shape == a.shape
        out = poisoned_like(a, torch.float32)
        assert call(out=out) is out  # fp32 output: the unrounded result
        assert torch.equal(out.bfloat16(), plain)


@pytest.mark.parametrize("call, error, message", [
    (lambda a, b: vk.nuslerp(a, b[:3], 0.5), ValueError, "shape"),
    (lambda a, b: vk.nuslerp(a, b, 0.5, flatten=1), TypeError, "flatten"),
    (lambda a, b: vk.multislerp([], [1.0]), TypeError, "non-empty"),
    (lambda a, b: vk.multislerp([a, b], [1.0]), ValueError, "1 values for 2"),
    (lambda a, b: vk.multislerp([a, b], [1.0, -1.0]), ValueError, "sum to 0"),
    (lambda a, b: vk.nearswap(a, b.double(), 0.5), TypeError, "float64"),
    (lambda a, b: vk.karcher_mean([a, b], tol=-1.0), ValueError, "tol"),
    (lambda a, b: vk.model_stock(a, [b]), TypeError, "at least 2 tensors"),
    (lambda a, b: vk.model_stock(a, [b, b], out=torch.empty(2)), ValueError, "shape"),
])
def test_bad_arguments(call, error, message):
    a, b = tensors(2)
    with pytest.raises(error, match=message):
        call(a, b)


def test_opcheck():
    base, a, b = tensors(3, shape=(9, 11))
    ops = torch.ops.vfuse
    for op, args in ((ops.nuslerp_, (a, b, 0.3, base, False, True)), (ops.multislerp_, ([a, b], [0.5, 0.5], None, True,
                                                                                         1e-8)),
                     (ops.nearswap_, (a, b, 0.1)), (ops.karcher_mean_, ([a, b], [0.5, 0.5], 10, 1e-5)),
                     (ops.model_stock_, (base, [a, b], False))):
        torch.library.opcheck(op.default, (torch.empty_like(a), *args))


@pytest.mark.parametrize("case", ["plain", "tie_heavy", "zero_offset", "colinear", "cancelling"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gram_paths_match_the_torch_paths(monkeypatch, case, dtype):
    """On the CPU nuslerp (flattened) and multislerp with a base run as the offsets' Gram matrix
    plus one fused blend: within fp32 rounding of the torch path, edge cases included (a zero
    offset, colinear offsets, two cancelling unit vectors: the linear fallback; three: an error)."""
    from vfuse_kernels._backend import cpp_kernels_for
    from vfuse_kernels.ops.multislerp import multislerp_merge
    from vfuse_kernels.ops.nuslerp import nuslerp_merge

    base, a, b, c = tensors(4, shape=(61, 29), seed=7, tie_heavy=case == "tie_heavy")
    if case == "zero_offset":
        a = base.clone()
    elif case == "colinear":
        b = base + 2 * (a - base)
    elif case == "cancelling":  # exactly opposite offsets (a zero base): the unit vectors cancel exactly
        base, b = torch.zeros_like(base), -a
    base, a, b, c = (x.to(dtype) for x in (base, a, b, c))
    weights = [0.5, 0.5] if case == "cancelling" else [0.7, 0.2]

    def both(fn):
        monkeypatch.setenv("VFUSE_BACKEND", "cpp")
        assert cpp_kernels_for([base, a, b]) is not None
        fast = fn()
        monkeypatch.setenv("VFUSE_BACKEND", "reference")
        return fast, fn()

    scale = float(a.float().abs().max()) * 4
    pairs = [both(lambda: multislerp_merge([a, b], weights, base)),
             both(lambda: multislerp_merge([a, b], weights, base, normalize=False))]
    if case != "cancelling":  # (antipodal offsets: nuslerp's θ ≈ π is ill-conditioned in fp32 sums)
        pairs.append(both(lambda: nuslerp_merge(0.3, a, b, base)))
    for fast, slow in pairs:
        assert fast.dtype == slow.dtype == torch.float32
        torch.testing.assert_close(fast, slow, rtol=4e-7, atol=4 * 2**-23 * scale)
    if case == "cancelling":
        for backend in ("cpp", "reference"):
            monkeypatch.setenv("VFUSE_BACKEND", backend)
            with pytest.raises(ValueError, match="weights cancel"):
                multislerp_merge([a, b, base - (c - base) * 0], [0.5, 0.5, 0.0], base)
    else:
        fast, slow = both(lambda: multislerp_merge([a, b, c], [0.5, 0.3, 0.2], base))
        torch.testing.assert_close(fast, slow, rtol=4e-7, atol=4 * 2**-23 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nearswap_cpp_pass_gives_the_torch_bits(monkeypatch, dtype):
    """The C++ pass performs the torch path's fp32 operations in their order: the same bits,
    equal elements, a NaN and every branch of the clamp included; into an fp32 or a bf16 out."""
    from vfuse_kernels._backend import cpp_kernels_for
    from vfuse_kernels.ops.nearswap import nearswap_merge, nearswap_tensors

    a, b = (x.to(dtype) for x in tensors(2, shape=(1009, 7), seed=8))
    b[:3] = a[:3]
    a[5, 2] = float("nan")
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    assert cpp_kernels_for([a, b]) is not None
    for t in (0.0, 1e-7, 0.003, 0.5, -0.1):
        expected = nearswap_tensors(t, a.float(), b.float())
        got = nearswap_merge(t, a, b)
        assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0)) and got.isnan().sum() == 1
        into = poisoned_like(a, torch.bfloat16)
        nearswap_merge(t, a, b, out=into)
        assert torch.equal(into.nan_to_num(7.0), expected.bfloat16().nan_to_num(7.0))


@pytest.mark.parametrize("case", ["plain", "one_zero_input", "all_zero", "identical", "opposite"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_karcher_gram_path_matches_the_torch_path(monkeypatch, case, n):
    """On the CPU the Karcher mean runs on coefficient vectors over the inputs' Gram matrix:
    within the stopping tolerance of the torch path's fp32 iteration, edge cases included (an
    input of zero norm left out of the mean, all inputs zero, identical inputs, opposite ones)."""
    from vfuse_kernels._backend import cpp_kernels_for
    from vfuse_kernels.ops.karcher import karcher_merge

    xs = tensors(n, shape=(97, 31), seed=9, tie_heavy=False)
    if case == "one_zero_input":
        xs[1] = torch.zeros_like(xs[1])
    elif case == "all_zero":
        xs = [torch.zeros_like(x) for x in xs]
    elif case == "identical":
        xs = [xs[0].clone() for _ in xs]
    elif case == "opposite":
        xs[1] = -xs[0]
    weights = [1.0 / n] * n
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    assert cpp_kernels_for(xs) is not None
    fast = karcher_merge(xs, weights)
    monkeypatch.setenv("VFUSE_BACKEND", "reference")
    slow = karcher_merge(xs, weights)
    assert fast.dtype == slow.dtype == torch.float32
    torch.testing.assert_close(fast, slow, rtol=2e-5, atol=2e-5 * float(slow.abs().max()))


def test_compiled_fullgraph():
    """Every op traces whole under torch.compile (its schema and fake kernel)."""
    base, a, b = tensors(3, shape=(16, 12))

    def merge_all(base, a, b):
        return (vk.slerp(a, b, 0.3), vk.nuslerp(a, b, 0.3, base=base), vk.multislerp([a, b], [0.6, 0.4], base=base),
                vk.nearswap(a, b, 0.01), vk.karcher_mean([a, b]), vk.model_stock(base, [a, b]))

    compiled = torch.compile(merge_all, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(base, a, b), merge_all(base, a, b)):
        torch.testing.assert_close(got, expected)
