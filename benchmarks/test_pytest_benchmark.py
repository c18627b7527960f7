"""pytest-benchmark entry points for the `vfuse bench --quick` cases (CPU, or CUDA when present).

    pip install pytest-benchmark
    python -m pytest benchmarks/test_pytest_benchmark.py --benchmark-only
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

import vfuse_kernels as vk  # noqa: E402
from vfuse_kernels.bench import tokens as bench_tokens  # noqa: E402
from vfuse_kernels.bench.merge import tie_heavy_inputs  # noqa: E402
from vfuse_kernels.ops import SPARSE_METHODS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("method", list(vk.METHODS))
def test_delta_merge(benchmark, method):
    base, tuned = tie_heavy_inputs(1 << 16, 2, torch.bfloat16, DEVICE)
    density = 0.3 if method in SPARSE_METHODS else 1.0
    out = torch.empty_like(base)
    benchmark(_sync(lambda: vk.delta_merge(base, tuned, [0.5, 0.5], method=method, density=density, out=out)))


@pytest.mark.parametrize("impl", ["vfuse", "eager"])
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.25])
def test_select_project(benchmark, impl, keep):
    d, h, n, batch = 256, 512, 576, 1
    projectors = [bench_tokens.Projector(d, h, torch.bfloat16, DEVICE).requires_grad_(False) for _ in range(2)]
    features = [torch.randn(batch, n, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    scores = [torch.rand(batch, n, device=DEVICE) for _ in range(2)]
    ks = [max(1, int(keep * n))] * 2
    fn = bench_tokens.vfuse_select_project if impl == "vfuse" else bench_tokens.eager_select_project
    with torch.no_grad():
        benchmark(_sync(lambda: fn(features, scores, projectors, ks)))


@pytest.mark.parametrize("impl", ["vfuse", "eager (weights)"])
@pytest.mark.parametrize("length", [512, 2048])
def test_query_key_scores(benchmark, impl, length):
    q, k = (torch.randn(1, 8, length, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    fns = {"vfuse": lambda: vk.query_key_scores(q, k, scale=0.125),
           "eager (weights)": lambda: bench_tokens.eager_scores(q, k, 0.125)}
    with torch.no_grad():
        benchmark(_sync(fns[impl]))
