"""``vk.slerp`` against its fp64 reference (reference/slerp.py) on every backend: dtypes, awkward
shapes, tie-heavy data, poisoned outputs, endpoints, degenerate inputs, bad arguments."""
from __future__ import annotations

import math

import pytest
import torch

import vfuse_kernels as vk
from conftest import DTYPES, assert_close_to_reference, poisoned_like
from vfuse_kernels.reference.slerp import slerp as reference_slerp


def pair(shape, dtype, device, spread=0.3, seed=0):
    """a and a correlated b (a fine-tune-like pair), bf16-quantised then cast: many equal values."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen).bfloat16().float()
    b = (a + spread * torch.randn(shape, generator=gen)).bfloat16().float()
    return a.to(dtype).to(device), b.to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (7919,), (37, 53), (3, 5, 7)])
@pytest.mark.parametrize("t", [0.3, 0.85])
def test_matches_reference(backend, device, dtype, shape, t):
    a, b = pair(shape, dtype, device)
    out = poisoned_like(a)
    assert vk.slerp(a, b, t, out=out) is out
    assert_close_to_reference(out, reference_slerp(a, b, t), n_terms=2)


def test_noncontiguous_mixed_dtypes_and_out_dtype(backend, device):
    a, b = pair((64, 96), torch.float32, device, seed=1)
    a_t, b16 = a.t(), b.t().contiguous().to(torch.bfloat16)
    assert not a_t.is_contiguous()
    out = poisoned_like(a_t, torch.float32).t().contiguous().t()  # a non-contiguous output
    vk.slerp(a_t, b16, 0.4, out=out)
    assert_close_to_reference(out, reference_slerp(a_t, b16, 0.4), n_terms=2)
    assert vk.slerp(b16, a_t, 0.4).dtype == torch.bfloat16


def test_endpoints_are_the_inputs(backend, device):
    """t = 0 gives a and t = 1 gives b bit for bit (the coefficients are exactly 1 and 0), on the
    spherical branch and on the near-parallel linear one."""
    for spread in (0.5, 1e-3):
        a, b = pair((4099,), torch.float32, device, spread=spread, seed=2)
        assert torch.equal(vk.slerp(a, b, 0.0), a)
        assert torch.equal(vk.slerp(a, b, 1.0), b)


def test_orthogonal_and_zero_inputs(backend, device):
    a = torch.tensor([3.0, 0.0, 0.0, 0.0], device=device)
    b = torch.tensor([0.0, 0.0, 2.0, 0.0], device=device)
    half = math.sqrt(0.5)
    torch.testing.assert_close(vk.slerp(a, b, 0.5).cpu(), torch.tensor([3 * half, 0.0, 2 * half, 0.0]))
    zero = torch.zeros(4, device=device)  # a zero norm counts as 1: orthogonal to everything
    torch.testing.assert_close(vk.slerp(zero, b, 0.25).cpu(), math.sin(0.25 * math.pi / 2) * b.cpu())


def test_bad_arguments_write_nothing():
    a, b = pair((10,), torch.float32, "cpu")
    out = torch.full_like(a, 7.0)
    cases = [((a, b[:5], 0.5), ValueError, "shape"), ((a, b, 1.5), ValueError, "outside"),
             ((a, b, -0.1), ValueError, "outside"), ((a, b.double(), 0.5), TypeError, "float64"),
             ((a, b, "x"), TypeError, "real number"), ((a.tolist(), b, 0.5), TypeError, "torch.Tensor")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            vk.slerp(*args, out=out)
    with pytest.raises(ValueError, match="shape"):
        vk.slerp(a, b, 0.5, out=torch.empty(11))
    assert torch.equal(out, torch.full_like(a, 7.0))


def test_opcheck():
    a, b = pair((257,), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.vfuse.slerp_.default, (torch.empty_like(a), a, b, 0.3))


def test_cpu_coefficients_are_the_fp32_trigonometry_of_the_sums():
    """``_C.slerp_coefficients`` (both CPU routes' ca, cb): the fp64 formula within fp32
    rounding on random angles and norms, the linear blend beyond |cos θ| = 0.9995 (fp32), a
    norm ≤ 1e-8 (or NaN) read as 1, a NaN ⟨a, b⟩ giving NaN — torch's ops on the sums, in fp32."""
    from vfuse_kernels._extension import cpu_extension

    ext = cpu_extension()
    if ext is None:
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(5)
    for _ in range(2000):
        aa, bb = (10 ** (16 * torch.rand((), generator=gen).item() - 8) for _ in range(2))
        cos, t = 1.998 * torch.rand((), generator=gen).item() - 0.999, torch.rand((), generator=gen).item()
        ca, cb = ext.slerp_coefficients([aa, bb, cos * math.sqrt(aa * bb)], t)
        theta = math.acos(float(torch.tensor(cos, dtype=torch.float32)))
        for got, want in ((ca, math.sin((1 - t) * theta) / math.sin(theta)), (cb, math.sin(t * theta) / math.sin(theta))):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (aa, bb, cos, t)  # fp32 trigonometry
    at = torch.tensor(0.9995, dtype=torch.float32)
    above = float(torch.nextafter(at, torch.tensor(2.0)))
    assert ext.slerp_coefficients([1.0, 1.0, above], 0.25) == [0.75, 0.25]  # linear beyond 0.9995
    assert ext.slerp_coefficients([1.0, 1.0, float(at)], 0.25) != [0.75, 0.25]  # spherical at it
    assert ext.slerp_coefficients([1.0, 1.0, -1.0], 0.25) == [0.75, 0.25]  # antipodal: |cos θ| = 1, linear
    assert ext.slerp_coefficients([0.0, 1e-17, 0.0], 0.5) == pytest.approx((math.sqrt(0.5),) * 2, rel=1e-6)
    assert all(math.isnan(c) for c in ext.slerp_coefficients([1.0, 1.0, float("nan")], 0.5))  # a NaN dot
