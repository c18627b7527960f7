"""``vfuse bench``: runs the benchmark scripts of a source checkout (benchmarks/) in-process.

Suites: ``merge`` (bench_merge: delta_merge vs eager / mergekit, % of copy bandwidth),
``tokens`` (bench_tokens --ops project: select + project_concat vs eager / torch.compile,
% of GEMM rate), ``scores`` (bench_tokens --ops scores: query_key_scores vs eager
attention weights). All rows go to one JSON file with the environment (device, versions,
date, commit); each row gets a ``suite`` and a ``shape`` string.
"""
from __future__ import annotations

import importlib.util
import os
import sys

SUITES = {"merge": ("bench_merge", []), "tokens": ("bench_tokens", ["--ops", "project"]),
          "scores": ("bench_tokens", ["--ops", "scores"])}
SHAPE_KEYS = {"delta_merge": ("models", "numel"), "copy": ("numel",),
              "project_concat": ("M", "N", "B", "keep", "D", "H"), "query_key_scores": ("L", "H", "d")}


def benchmarks_dir() -> str:
    """The checkout's benchmarks/ folder (present in a source or editable install)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if not os.path.isfile(os.path.join(path, "common.py")):
        raise FileNotFoundError(f"vfuse bench needs the source checkout's benchmarks/ folder (looked in {path}); "
                                "install vfuse_kernels from a clone with `pip install -e .`")
    return path


def load(name: str):
    """Imports benchmarks/NAME.py by path (benchmarks/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(benchmarks_dir(), name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shape(row: dict) -> str:
    """``k=v`` of the row's size keys, e.g. ``M=2 N=576 B=1 keep=0.5 D=256 H=512``."""
    return " ".join(f"{k}={row[k]}" for k in SHAPE_KEYS.get(row.get("op"), ()) if k in row)


def run(suites, *, device: str, quick: bool = False, json_path: str | None = None) -> list[dict]:
    """Runs the suites (``merge``, ``tokens``, ``scores``) and returns their rows; ``quick`` uses
    each script's --quick sizes and skips the torch.compile baseline (its compile takes minutes on a
    small CPU)."""
    rows = []
    for suite in suites:
        module_name, extra = SUITES[suite]
        argv = ["--device", device, *extra] + (["--quick"] if quick else [])
        if quick and module_name == "bench_tokens":
            argv.append("--no-compile")
        print(f"## {suite}")
        rows += [dict(r, suite=suite, shape=shape(r)) for r in load(module_name).main(argv)]
        print()
    if json_path:
        import torch

        common = load("common")
        common.write_json(json_path, common.environment(torch.device(device)), rows)
    return rows
