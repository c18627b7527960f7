"""Bad arguments raise ValueError/TypeError naming the argument, and leave ``out`` untouched."""
from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

import vfuse_kernels as vk
from vfuse_kernels import _backend

BASE = torch.randn(4, 6)
TUNED = [BASE + 0.1, BASE - 0.2]

CASES = [
    # (description, kwargs overriding a valid call, exception, message fragment)
    ("tuned shape", dict(tuned=[BASE + 1, torch.zeros(4, 5)]), ValueError, r"tuned\[1\] has shape \(4, 5\)"),
    ("weights count", dict(weights=[0.5, 0.5, 0.5]), ValueError, "weights has 3 values for 2 tuned"),
    ("density count", dict(density=[0.5], method="ties"), ValueError, "density has 1 values"),
    ("density zero", dict(density=0.0, method="ties"), ValueError, r"density\[0\]=0.0 is outside"),
    ("density above one", dict(density=1.5, method="dare_ties"), ValueError, "outside"),
    ("density nan", dict(density=float("nan"), method="ties"), ValueError, "density must be finite"),
    ("density without sparsify", dict(density=0.5, method="task_arithmetic"), ValueError, "no effect"),
    ("method", dict(method="slerp"), ValueError, "method='slerp' is not one of"),
    ("consensus", dict(consensus="majority", method="ties"), ValueError, "consensus="),
    ("rescale", dict(rescale="l2", method="dare_linear"), ValueError, "rescale="),
    ("seed negative", dict(seed=-1), ValueError, "seed"),
    ("seed type", dict(seed=1.5), ValueError, "seed"),
    ("weights nan", dict(weights=[float("nan"), 1.0]), ValueError, "weights"),
    ("weights type", dict(weights=["a", "b"]), TypeError, r"weights\[0\] must be a real number"),
    ("scale inf", dict(scale=float("inf")), ValueError, "scale must be finite"),
    ("normalize type", dict(normalize="yes"), TypeError, "normalize"),
    ("tuned not a list", dict(tuned=BASE + 1), TypeError, "tuned must be a non-empty list"),
    ("tuned empty", dict(tuned=[], weights=[]), TypeError, "tuned must be a non-empty list"),
    ("tuned dtype", dict(tuned=[BASE.double(), BASE]), TypeError, r"tuned\[0\] has dtype torch.float64"),
    ("tuned int", dict(tuned=[BASE.int(), BASE]), TypeError, "torch.int32"),
    ("tuned device", dict(tuned=[BASE.to("meta"), BASE]), ValueError, r"tuned\[0\] is on meta"),
    ("tuned_are_deltas type", dict(tuned_are_deltas=1), TypeError, "tuned_are_deltas"),
    ("thresholds for non-ties", dict(thresholds=(torch.zeros(2), torch.zeros(2))), ValueError, "thresholds apply"),
    ("thresholds size", dict(method="ties", density=0.5, thresholds=(torch.zeros(3), torch.zeros(3))), ValueError,
     "thresholds must hold 2"),
]


@pytest.mark.parametrize("description,override,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_leaves_out_untouched(description, override, exc, match):
    out = torch.full_like(BASE, 123.0)
    kwargs = dict(tuned=TUNED, weights=[0.5, 0.5], method="task_arithmetic", out=out)
    kwargs.update(override)
    base = kwargs.pop("base", BASE)
    tuned, weights = kwargs.pop("tuned"), kwargs.pop("weights")
    with pytest.raises(exc, match=match):
        vk.delta_merge(base, tuned, weights, **kwargs)
    assert torch.equal(out, torch.full_like(BASE, 123.0))


def test_bad_out_is_rejected_and_untouched():
    out = torch.full((4, 5), 7.0)
    with pytest.raises(ValueError, match=r"out has shape \(4, 5\) but base has shape \(4, 6\)"):
        vk.delta_merge(BASE, TUNED, 0.5, out=out)
    assert torch.equal(out, torch.full((4, 5), 7.0))
    with pytest.raises(TypeError, match="out has dtype torch.float64"):
        vk.delta_merge(BASE, TUNED, 0.5, out=torch.zeros(4, 6, dtype=torch.float64))


def test_base_type_errors():
    with pytest.raises(TypeError, match="base must be a torch.Tensor"):
        vk.delta_merge([1.0, 2.0], TUNED, 0.5)
    with pytest.raises(TypeError, match="base has dtype torch.int64"):
        vk.delta_merge(torch.arange(3), [torch.arange(3)], 0.5)


def test_magnitude_threshold_errors():
    with pytest.raises(ValueError, match="empty"):
        vk.magnitude_threshold(torch.empty(0), 0.5)
    with pytest.raises(ValueError, match="outside"):
        vk.magnitude_threshold(torch.randn(5), 0.0)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set by conftest only without a GPU
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _backend.select_backend(torch.device("cpu"))


def test_extension_is_built():
    """CI and the GPU machine must exercise the C++ kernels, not the reference fallback."""
    importlib.import_module("vfuse_kernels._C")  # raises saying why when the build is missing
    assert _backend.cpu_extension() is not None
    assert _backend.select_backend(torch.device("cpu")) in ("cpp", "triton", "reference")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    _backend.cpu_extension.cache_clear()
    monkeypatch.setitem(sys.modules, "vfuse_kernels._C", None)  # makes the import fail
    try:
        with pytest.warns(RuntimeWarning, match=r"C\+\+ extension could not be loaded"):
            assert _backend.select_backend(torch.device("cpu")) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = vk.delta_merge(BASE, TUNED, [0.5, 0.5])  # no second warning
        torch.testing.assert_close(out, BASE + 0.5 * (TUNED[0] - BASE) + 0.5 * (TUNED[1] - BASE))
    finally:
        monkeypatch.undo()
        _backend.cpu_extension.cache_clear()
