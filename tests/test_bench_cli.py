"""`vfuse bench` writes well-formed JSON rows (and refuses options of another suite); `vfuse
profile-sequence` writes its CSV and PNG."""
import csv
import json

import pytest
import torch

from vfuse_kernels import cli, profile


def test_bench_quick_json(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "all", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    assert "## scores" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert {"device", "torch", "triton", "date", "git_commit"} <= set(data["environment"])
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"merge", "tokens", "scores"}
    assert {r["op"] for r in rows} == {"copy", "delta_merge", "project_concat", "query_key_scores"}
    for r in rows:
        assert r["impl"] and r["shape"] and r["dtype"]
        assert r["median_ms"] > 0 and r["p20_ms"] > 0 and r["p80_ms"] >= r["p20_ms"]
        rate = {"copy": "GB/s", "delta_merge": "GB/s", "project_concat": "TFLOP/s", "query_key_scores": "peak_MB"}
        assert r[rate[r["op"]]] > 0


def test_bench_options_belong_to_their_suite(tmp_path):
    with pytest.raises(SystemExit, match="--out, --no-tests: options of `vfuse bench gpu` only"):
        cli.main(["bench", "merge", "--out", str(tmp_path), "--no-tests"])
    with pytest.raises(SystemExit, match="scores: --workers: options of `vfuse bench gpu` only"):
        cli.main(["bench", "scores", "--workers", "0"])
    with pytest.raises(SystemExit, match="writes its JSON into --out DIR, not --json"):
        cli.main(["bench", "gpu", "--quick", "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--skip gemm: the parts are merge, tokens, engine, ncu, distributed, tests"):
        cli.main(["bench", "gpu", "--quick", "--skip", "tests", "gemm"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device: the full sizes need a GPU"):
            cli.main(["bench", "gpu"])
    assert not any(tmp_path.iterdir())


def test_profile_sequence_quick(tmp_path):
    out = tmp_path / "prof"
    assert cli.main(["profile-sequence", "--quick", "--device", "cpu", "--out", str(out),
                     "--cache-dir", str(tmp_path / "family")]) == 0
    with open(out / "profile.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == profile.COLUMNS and len(rows) == 4
    assert {float(r["keep"]) for r in rows} == {1.0, 0.5}
    for r in rows:
        assert float(r["towers_ms"]) > 0 and float(r["prefill_ms"]) > 0 and float(r["total_ms"]) > 0
        assert int(r["kept_tokens"]) <= int(r["visual_tokens"]) and r["mem_source"] == "cpu ru_maxrss growth"
    assert len({r["visual_tokens"] for r in rows}) == 2
    png = (out / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_profile_needs_matplotlib(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        profile.profile_sequence("unused")
