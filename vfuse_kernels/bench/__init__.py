"""``vfuse bench``: the kernel benchmarks, shipped with the package.

Suites: ``merge`` (bench.merge: delta_merge vs eager / mergekit, % of copy bandwidth),
``tokens`` (bench.tokens --ops project: select + project_concat vs eager / torch.compile,
% of GEMM rate), ``scores`` (bench.tokens --ops scores: query_key_scores vs eager
attention weights). All rows go to one JSON file with the environment (device, versions,
date, commit); each row gets a ``suite`` and a ``shape`` string. ``benchmarks/*.py`` in the
source checkout are thin entry points to these modules.

``vfuse bench gpu`` is the one-call GPU suite (bench.gpu_suite): each area module's
``gpu_suite(device, quick)`` (checks, rows, targets), the device's copy / GEMM ceilings, the
distributed merge over NCCL and the test run, written to ``gpu-suite-<device>-<date>.json``.
"""
from __future__ import annotations

import importlib

SUITES = {"merge": ("merge", []), "tokens": ("tokens", ["--ops", "project"]),
          "scores": ("tokens", ["--ops", "scores"])}
SHAPE_KEYS = {"delta_merge": ("models", "numel"), "copy": ("numel",),
              "project_concat": ("M", "N", "B", "keep", "D", "H"), "query_key_scores": ("L", "H", "d")}


def load(name: str):
    """The benchmark module ``vfuse_kernels.bench.NAME``."""
    return importlib.import_module(f"{__name__}.{name}")


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
        if quick and module_name == "tokens":
            argv.append("--no-compile")
        print(f"## {suite}")
        rows += [dict(r, suite=suite, shape=shape(r)) for r in load(module_name).main(argv)]
        print()
    if json_path:
        import torch

        common = load("common")
        common.write_json(json_path, common.environment(torch.device(device)), rows)
    return rows
