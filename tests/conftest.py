"""Shared test helpers. Without a GPU the Triton kernels run under the interpreter, which
must be switched on before triton is first imported — hence here, at collection."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_device(backend: str) -> torch.device:
    """Where ``backend``'s tensors live: CUDA for "triton" on a GPU machine (no interpreter
    there: CPU tensors under VFUSE_BACKEND=triton are an error), else the CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="triton missing"))]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Forces VFUSE_BACKEND for the test; yields the backend name."""
    monkeypatch.setenv("VFUSE_BACKEND", request.param)
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    """``backend_device(backend)`` for a test that takes the ``backend`` fixture: create every
    input there (``torch.tensor(…, device=device)``, ``.to(device)``)."""
    return backend_device(backend)


AVX512 = "avx512bw" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False
needs_avx512 = pytest.mark.skipif(not AVX512, reason="no AVX-512 on this CPU: the C++ passes have one loop here")


def with_and_without_avx512(script: str):
    """The JSON that ``script`` prints, run with the C++ passes' AVX-512 loops (csrc/cpu/avx512.h)
    and with the compiler-vectorised ones (VFUSE_NO_AVX512=1), each in a fresh process."""
    def run(**env):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, **env})
        return json.loads(done.stdout)

    return run(), run(VFUSE_NO_AVX512="1")


def poisoned_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A tensor of t's shape filled with NaN, so unwritten elements show up."""
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


def assert_close_to_reference(out: torch.Tensor, expected64: torch.Tensor, n_terms: int = 1) -> None:
    """``out`` (any dtype) vs an fp64 reference: one rounding to out's dtype (≤ 1 ulp, which also
    covers the Triton interpreter's truncating bf16 store) plus fp32 accumulation error."""
    assert out.shape == expected64.shape
    assert not torch.isnan(out).any(), "unwritten (poisoned) elements in the output"
    eps_out = torch.finfo(out.dtype).eps
    scale = expected64.abs().max().item() if expected64.numel() else 1.0
    atol = 8 * n_terms * torch.finfo(torch.float32).eps * max(scale, 1.0)
    torch.testing.assert_close(out.double().cpu(), expected64.cpu(), rtol=eps_out, atol=atol)
