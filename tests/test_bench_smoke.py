"""The merge and sweep benchmarks run end to end (tiny sizes) and write well-formed rows."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from vfuse_kernels.bench import merge as bench_merge
from conftest import backend_device


def test_bench_merge_quick(tmp_path, monkeypatch):
    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    path = tmp_path / "merge.json"
    rows = bench_merge.main(["--quick", "--device", "cpu", "--numel", "4096", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert {"device", "date", "git_commit", "triton"} <= set(data["environment"])
    assert data["rows"] == json.loads(json.dumps(rows))
    methods = {(r["method"], r["impl"]) for r in rows}
    assert ("copy", "torch.Tensor.copy_") in methods
    for method in ("task_arithmetic", "linear", "ties", "dare_linear", "dare_ties"):
        assert (method, "vfuse") in methods
    assert ("ties", "mergekit ops") in methods and ("task_arithmetic", "eager fp32") in methods
    for r in rows:
        assert r["median_ms"] > 0 and r["GB/s"] > 0 and r["pct_of_copy"] > 0


def test_bench_sweep_rows():
    """The sweep benchmark times merge_into_ and two sweep applications of the same merge."""
    from vfuse_kernels.bench import sweep as bench_sweep

    rows = bench_sweep.run(layers=1, device="cpu", reps=1, hidden=64, vocab=256)
    assert [r["impl"] for r in rows] == ["merge_into_ (ties, one pass)",
                                         "sweep apply, first configuration (thresholds computed)",
                                         "sweep apply, weights changed (thresholds reused)"]
    assert all(r["median_ms"] > 0 and r["GB/s"] > 0 for r in rows) and rows[0]["ratio_vs_merge_into"] == 1


def test_merge_kernel_ablations_run_the_triton_kernel():
    """The GPU suite's ablation rows (tiny; under the interpreter without a GPU): one row per
    ablation, and the kernel they time writes the merge that delta_merge writes (the last row:
    TIES with the inverse by an indexed load, the bits of delta_merge's select tree)."""
    import vfuse_kernels as vk

    device = backend_device("triton")
    base, tuned = bench_merge.tie_heavy_inputs(3000, 2, torch.float32, device)
    out = torch.full_like(base, float("nan"))
    trim = tuple(vk.ties_thresholds(base, tuned, 0.3))
    rows = bench_merge._merge_ablation_rows(base, tuned, trim, out, device, copy_gbps=10.0)
    assert [r["impl"] for r in rows] == [f"ablation: {a[0]}" for a in bench_merge.MERGE_ABLATIONS]
    assert all(r["median_ms"] > 0 and r["pct_of_copy"] > 0 for r in rows)
    expected = vk.delta_merge(base, tuned, [0.5, 0.5], method="ties", density=0.3)
    assert torch.equal(out, expected) and bench_merge.MERGE_ABLATIONS[-1][4:] == (0,)


def test_bracket_pass_rows_run_the_triton_kernel():
    """The GPU suite's bracket-pass rows (tiny; under the interpreter without a GPU): the pass, the
    pass without compaction and the counting-only pass, each timed."""
    device = backend_device("triton")
    base, tuned = bench_merge.tie_heavy_inputs(1 << 14, 2, torch.bfloat16, device)
    rows = bench_merge._bracket_rows(base, tuned, device, copy_gbps=10.0, config=" BLOCK=1024")
    assert [r["impl"] for r in rows] == ["bracket pass BLOCK=1024", "bracket pass, rate 0 (no compaction) BLOCK=1024",
                                         "bracket pass, lo = hi (counting only) BLOCK=1024"]
    assert all(r["median_ms"] > 0 and r["pct_of_copy"] > 0 for r in rows)


def test_launch_variant_rows_run_on_the_triton_backend(monkeypatch):
    """The GPU suite's launch-variant step (tiny; under the interpreter without a GPU): every row,
    each timed, and the launch settings it patches restored."""
    from vfuse_kernels.triton import delta_merge as kernels
    from vfuse_kernels.triton import magnitude_select as select_kernels

    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    saved = (kernels.BLOCK, kernels.NUM_WARPS, select_kernels.NUM_WARPS, select_kernels.DeviceSelector.BLOCK,
             select_kernels.DeviceSelector.sample_size, select_kernels.DeviceSelector.order_statistics)
    rows = bench_merge._variant_rows(backend_device("triton"), 10.0, numel=1 << 12, sample_sizes=(256,))
    impls = [r["impl"] for r in rows]
    assert len(impls) == 25 and impls.count("variant the sample's order statistics by torch.sort") == 2
    assert sum(i.startswith("bracket pass") for i in impls) == 6 and all(r["median_ms"] > 0 for r in rows)
    assert saved == (kernels.BLOCK, kernels.NUM_WARPS, select_kernels.NUM_WARPS, select_kernels.DeviceSelector.BLOCK,
                     select_kernels.DeviceSelector.sample_size, select_kernels.DeviceSelector.order_statistics)


def test_host_proxy_replays_a_ties_call():
    """benchmarks/host_proxy.py (its own process: it patches the interpreter) records a TIES call's
    launches and times their replay: every kernel of the call listed, a positive time per call."""
    pytest.importorskip("triton")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "host_proxy.py")
    proc = subprocess.run([sys.executable, script, "--numel", "65536", "--share", "8", "--calls", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launches = re.search(r"(\d+) Triton launches (\{.*\})", proc.stdout)
    kernels = ast.literal_eval(launches.group(2))  # kernel name -> launches
    assert int(launches.group(1)) == sum(kernels.values()) and {"_bracket_kernel", "_merge_kernel"} <= set(kernels)
    median, least = map(int, re.search(r"median (\d+) us, min (\d+) us", proc.stdout).groups())
    assert 0 < least <= median


def test_the_ncu_workload_merges_like_delta_merge(monkeypatch):
    """The kernels the GPU suite profiles under ncu (tiny; under the interpreter without a GPU)
    write what the Triton backend's delta_merge writes for TIES and task arithmetic."""
    import vfuse_kernels as vk

    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    device = backend_device("triton")
    ties, task_arithmetic = bench_merge.ncu_workload(3001, str(device))
    base, tuned = bench_merge.tie_heavy_inputs(3001, 2, torch.bfloat16, device)
    for got, method in ((ties, "ties"), (task_arithmetic, "task_arithmetic")):
        expected = vk.delta_merge(base, tuned, [0.5, 0.5], method=method, density=0.3 if method == "ties" else 1.0)
        assert torch.equal(got, expected)


def test_checkpoint_bench_write_floor(tmp_path):
    """The write-floor row of the checkpoint benchmark writes its bytes (more than one chunk) and
    leaves nothing behind."""
    from vfuse_kernels.bench import checkpoint as bench_checkpoint

    assert bench_checkpoint.write_seconds(str(tmp_path), (64 << 20) + 4099) > 0
    assert list(tmp_path.iterdir()) == []
