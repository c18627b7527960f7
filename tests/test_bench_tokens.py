"""The token benchmark runs end to end (tiny sizes, CPU) and writes well-formed JSON rows; the
token ops' docstring examples run."""
import doctest
import importlib
import json

import torch

from vfuse_kernels.bench import tokens as bench_tokens


def test_bench_tokens_tiny(tmp_path, monkeypatch):
    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    path = tmp_path / "tokens.json"
    rows = bench_tokens.main(["--device", "cpu", "--no-compile", "--encoders", "2", "--tokens", "7", "--batch", "2",
                              "--keep", "1.0", "0.5", "--dim", "16", "--hidden", "32", "--score-lengths", "33",
                              "--heads", "2", "--head-dim", "16", "--reps", "1", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert data["rows"] == json.loads(json.dumps(rows))
    project = [r for r in rows if r["op"] == "project_concat"]
    assert {(r["keep"], r["impl"]) for r in project} == {(k, i) for k in (1.0, 0.5)
                                                         for i in ("GEMM (torch.mm)", "vfuse", "eager")}
    assert all(r["median_ms"] > 0 and r["TFLOP/s"] > 0 and r["pct_of_gemm"] > 0 for r in project)
    scores = [r for r in rows if r["op"] == "query_key_scores"]
    assert {r["impl"] for r in scores} == {"vfuse", "eager (weights)"}
    assert all(r["median_ms"] > 0 and r["peak_MB"] > 0 for r in scores)


def test_token_op_docstring_examples():
    for name in ("vfuse_kernels.ops.select_tokens", "vfuse_kernels.ops.project_concat",
                 "vfuse_kernels.ops.query_key_scores"):
        result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch})
        assert result.attempted > 0 and result.failed == 0, name
