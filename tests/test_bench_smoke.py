"""The merge benchmark runs end to end (tiny sizes) and writes well-formed JSON rows."""
import json

import torch

from vfuse_kernels.bench import merge as bench_merge


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
