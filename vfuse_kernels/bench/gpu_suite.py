"""``vfuse bench gpu``: the one-call GPU suite — checks, timings and targets of every area, the
distributed merge over NCCL and the GPU test run, in one JSON file.

Parts, in this order; everything that runs our kernels runs in its own process, so a crash, a
hang or a CUDA error fails that part's check and never the suite:

- ``device``: the device's state at start (name, memory, versions, clocks; the check passes
  when it is idle) and the reference ceilings measured once, in this run: a bf16 ``copy_``
  (GB/s) and a bf16 ``torch.mm`` (TFLOP/s) — rows ``op="copy"`` and ``op="gemm"``.
- one part per entry of ``AREAS``: the module's ``gpu_suite(device, quick) -> {"checks",
  "rows", "targets"}``. A module that is missing, raises, outlives its time or returns a
  malformed result gives a failed check ``<area>: gpu_suite`` (the traceback's last line).
- ``ncu`` (a GPU, full sizes): Nsight Compute on ``bench.merge.ncu_workload``'s kernels (the
  TIES bracket pass, the TIES merge kernel, task arithmetic's), with ``--clock-control none``:
  a row per kernel with its duration, DRAM and SM throughput, achieved occupancy, registers and
  its largest warp stall reasons; the report (``…-ncu.ncu-rep``), its raw metrics (``.csv``) and
  its details page (``.txt``) beside the results. Its check fails where ncu cannot read the
  counters (not on PATH; a sandbox without profiler access).
- ``distributed``: ``vfuse merge --distributed --device cuda`` under torchrun, one rank per
  GPU (process group ``cpu:gloo,cuda:nccl``; one gloo rank on a CPU), TIES on a small
  Llama-shaped bf16 family, byte-compared with the single-process ``vfuse merge`` on the
  same device; both wall times as rows.
- ``tests``: pytest in a subprocess, with ``-n`` workers when pytest-xdist is installed: the
  tests that exercise CUDA first (``-k``: GPU_TESTS), then the others in the time left; a check
  per failed test. At its time limit pytest is interrupted (SIGINT) before it is killed, so the
  tests that failed so far are still named.

Every part has a time limit (``LIMIT_S``) within the suite's ``budget``, keeping
``RESERVE_S`` for the parts after it; each part's seconds are a row (suite ``gpu_suite``).
After every part the results are (re)written into the output folder, so a suite killed
midway leaves what it had: ``gpu-suite-<device>-<date>[-quick].json``

    {"environment": {"device", "torch", "triton", "date", "git_commit"},
     "checks": [{"name", "passed", "detail"}],
     "rows": [{"suite", "op", "impl", "median_ms", ...}],
     "targets": [{"area": "merge" | "tokens", "name", "value", "target", "met"}]}

with a ``.md`` rendering (targets, failed checks, time per part, rows per suite) and a
``.log`` of every subprocess's output next to it. A summary is printed last.

    vfuse bench gpu [--quick] [--device cpu|cuda] [--out DIR] [--no-tests] [--skip PART ...] [--budget SECONDS]
                    [--workers N]
    python -m vfuse_kernels.bench.gpu_suite [the same options]
"""
from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

import torch

from .checkpoint import write_family
from .common import device_slug, dump_json, environment, markdown_table, print_table, time_ms

AREAS = {"merge": "vfuse_kernels.bench.merge", "tokens": "vfuse_kernels.bench.tokens",
         "engine": "vfuse_kernels.bench.engine"}
SKIPPABLE = (*AREAS, "ncu", "distributed", "tests")
LIMIT_S = {"merge": 150, "tokens": 90, "engine": 90, "ncu": 60, "distributed": 90, "tests": 240}  # at most, per part
RESERVE_S = {"distributed": 30, "tests": 120}  # kept for these parts while the earlier ones run
INTERRUPT_GRACE_S = 15  # between a timed-out child's SIGINT and its SIGKILL
MIN_TEST_RUN_S = 30  # the tests part starts its second pytest run only with this much time left
DEFAULT_BUDGET_S = 480.0  # the whole suite: under the GPU tool's 10-minute command limit, with room to spare
MIN_PART_S = 10  # a part with less time left is not started
GPU_TESTS = "triton or cuda or patch_llava or distributed"  # the tests that run on the GPU
TARGET_AREAS = ("merge", "tokens")
SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the folder of vfuse_kernels/
ERROR_LINE = re.compile(r"vfuse [\w-]+: error: |(?![\w.]*ChildFailedError)[\w.]*(Error|Exception)\b")
AREA_MAIN = "from vfuse_kernels.bench.gpu_suite import _area_main; _area_main()"
NCU_WORKLOAD = "from vfuse_kernels.bench.merge import ncu_workload; ncu_workload()"
NCU_KERNELS = "regex:^(_bracket_kernel|_merge_kernel)$"
NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
                "MemoryWorkloadAnalysis")
NCU_METRICS = {  # raw metric: its column in the ncu rows
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct_of_peak",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct_of_peak",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers",
    "lts__t_sector_hit_rate.pct": "l2_hit_pct",
}
NCU_STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
NCU_STALLS_KEPT = 4  # the largest stall reasons per kernel
TIME_UNITS_MS = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}


def run_suite(device: torch.device, *, quick: bool, out_dir: str | None = None, skip=(),
              budget: float = DEFAULT_BUDGET_S, workers: int | None = None) -> dict:
    """Runs the parts not in ``skip`` within ``budget`` seconds, writes the JSON / markdown / log
    files into ``out_dir`` (default ``default_out_dir()``) and returns the JSON's content."""
    start = time.monotonic()
    env = environment(device)
    out_dir = out_dir or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"gpu-suite-{device_slug(device)}-{env['date']}{'-quick' if quick else ''}")
    data = {"environment": env, "checks": [], "rows": [], "targets": []}
    profiled = ("ncu",) if device.type == "cuda" and not quick else ()
    parts = [p for p in ("device", *AREAS, *profiled, "distributed", "tests") if p not in skip]
    print(f"# vfuse bench gpu{' --quick' if quick else ''}: {env['device']} | torch {env['torch']} | "
          f"triton {env['triton']} | budget {budget:.0f} s -> {stem}.*", flush=True)
    with open(stem + ".log", "w") as log:
        for i, part in enumerate(parts):
            left = budget - (time.monotonic() - start)
            limit = min(LIMIT_S.get(part, 90), left - sum(RESERVE_S.get(p, 0) for p in parts[i + 1:]))
            part_start = time.monotonic()
            print(f"## {part}" + ("" if part == "device" else f" (at most {max(limit, 0):.0f} s)"), flush=True)
            if part == "device":
                result = _device_part(device, quick)
            elif limit < MIN_PART_S:
                result = _failed(f"{part}: gpu_suite", f"not run: {max(left, 0):.0f} s of the suite's {budget:.0f} s "
                                 "budget were left")
            elif part in AREAS:
                result = _area_part(part, AREAS[part], device, quick, limit, log)
            elif part == "ncu":
                result = _ncu_part(limit, log, stem)
            elif part == "distributed":
                result = _distributed_part(device, quick, limit, log)
            else:
                result = _tests_part(limit, log, workers)
            seconds = time.monotonic() - part_start
            failed = sum(not c["passed"] for c in result["checks"])
            data["checks"] += result["checks"]
            data["rows"] += [dict(r, suite=r.get("suite", part)) for r in result["rows"]]
            data["targets"] += result["targets"]
            data["rows"].append({"suite": "gpu_suite", "op": "part", "impl": part, "median_ms": 1e3 * seconds,
                                 "seconds": seconds, "checks": len(result["checks"]), "failed": failed,
                                 "rows": len(result["rows"]), "targets": len(result["targets"])})
            print(f"   {seconds:.1f} s: {len(result['checks'])} checks ({failed} failed), {len(result['rows'])} rows, "
                  f"{len(result['targets'])} targets", flush=True)
            _write(stem, data)
    print_summary(data, stem)
    return data


def default_out_dir() -> str:
    """benchmarks/results of the source checkout the package runs from, else the current folder."""
    results = os.path.join(SOURCE, "benchmarks", "results")
    return results if os.path.isdir(os.path.dirname(results)) else os.getcwd()


def _failed(name: str, detail: str) -> dict:
    return {"checks": [{"name": name, "passed": False, "detail": detail}], "rows": [], "targets": []}


# ---------------------------------------------------------------------------------------------- device


def _device_part(device: torch.device, quick: bool) -> dict:
    try:
        idle, state = _device_state(device)
        rows = _ceilings(device, quick)
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        return _failed("device: idle at start", f"{type(exc).__name__}: {exc}")
    return {"checks": [{"name": "device: idle at start", "passed": idle, "detail": state}], "rows": rows,
            "targets": []}


def _device_state(device: torch.device) -> tuple[bool, str]:
    """(idle, a line of the device's state): idle = ≥ 90% of GPU memory free (CPU: 1-min load < 1)."""
    try:
        import triton

        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}, no triton"
    if device.type != "cuda":
        load = os.getloadavg()[0]
        return load < 1.0, f"{os.cpu_count()} cores, 1-min load {load:.2f}; {versions}"
    free, total = torch.cuda.mem_get_info(device)
    p = torch.cuda.get_device_properties(device)
    state = (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs), {total / 2**30:.1f} GiB, "
             f"{free / 2**30:.1f} GiB free; {torch.cuda.device_count()} GPU(s); {versions}, CUDA {torch.version.cuda}")
    query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu"
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", "-i",
                              str(device.index or 0)], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no nvidia-smi, or it hangs
        smi = ""
    return free >= 0.9 * total, state + (f"; nvidia-smi {query}: {smi}" if smi else "")


def _ceilings(device: torch.device, quick: bool) -> list[dict]:
    """The same-run reference ceilings: bf16 copy bandwidth and bf16 GEMM rate."""
    numel, n = (1 << 20, 256) if quick else (1 << 28, 8192)
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(numel, device=device, dtype=torch.bfloat16, generator=gen)
    dst = torch.empty_like(src)
    ms, p20, p80 = time_ms(lambda: dst.copy_(src), device)
    rows = [{"suite": "device", "op": "copy", "impl": "torch.Tensor.copy_", "dtype": "bfloat16", "numel": numel,
             "median_ms": ms, "p20_ms": p20, "p80_ms": p80, "GB/s": 2 * src.nbytes / ms / 1e6}]
    del src, dst
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    c = torch.empty_like(a)
    ms, p20, p80 = time_ms(lambda: torch.mm(a, b, out=c), device)
    rows.append({"suite": "device", "op": "gemm", "impl": "torch.mm", "dtype": "bfloat16", "M": n, "N": n, "K": n,
                 "median_ms": ms, "p20_ms": p20, "p80_ms": p80, "TFLOP/s": 2 * n**3 / ms / 1e9})
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- areas


def _area_part(area: str, module: str, device: torch.device, quick: bool, limit: float, log) -> dict:
    """The area's gpu_suite(device, quick), run in a child process (``_area_main``)."""
    name = f"{area}: gpu_suite"
    with tempfile.TemporaryDirectory(prefix="vfuse-gpu-suite-") as tmp:
        path = os.path.join(tmp, "result.json")
        command = [sys.executable, "-c", AREA_MAIN, module, str(device), "quick" if quick else "full", path]
        code, seconds, output = _spawn(area, command, limit, log, _child_env(device))
        if code != 0 or not os.path.exists(path):
            return _failed(name, _why(code, limit, output))
        with open(path) as f:
            result = json.load(f)
    checks, rows, targets, problems = _validated(result)
    summary = f"{len(checks)} checks, {len(rows)} rows, {len(targets)} targets in {seconds:.1f} s"
    detail = f"malformed result ({'; '.join(problems[:5])}); kept {summary}" if problems else summary
    return {"checks": [{"name": name, "passed": not problems, "detail": detail}, *checks], "rows": rows,
            "targets": targets}


def _area_main() -> None:
    """Child process: ``python -c AREA_MAIN MODULE DEVICE quick|full RESULT.json``."""
    module, device, mode, path = sys.argv[1:]
    result = importlib.import_module(module).gpu_suite(torch.device(device), mode == "quick")
    with open(path, "w") as f:
        json.dump(result, f, default=lambda value: value.tolist() if hasattr(value, "tolist") else str(value))


def _validated(result) -> tuple[list, list, list, list[str]]:
    """(checks, rows, targets, problems): the well-formed entries of an area's result, and what was wrong."""
    if not isinstance(result, dict):
        return [], [], [], [f"gpu_suite returned a {type(result).__name__}, not a dict"]
    problems: list[str] = []

    def entries(kind: str, problem) -> list:
        items = result.get(kind)
        if not isinstance(items, list):
            problems.append(f"{kind!r} is not a list")
            return []
        kept = []
        for i, item in enumerate(items):
            why = problem(item) if isinstance(item, dict) else "is not a dict"
            if why:
                problems.append(f"{kind}[{i}] {why}")
            else:
                kept.append(item)
        return kept

    def missing(item: dict, keys: tuple) -> str | None:
        absent = [k for k in keys if k not in item]
        return f"lacks {', '.join(absent)}" if absent else None

    def check(item):
        return missing(item, ("name", "passed", "detail")) or (
            None if isinstance(item["passed"], bool) else "has a non-bool 'passed'")

    def row(item):
        return missing(item, ("op", "impl", "median_ms"))

    def target(item):
        return missing(item, ("area", "name", "value", "target", "met")) or (
            f"has area {item['area']!r}, not one of {TARGET_AREAS}" if item["area"] not in TARGET_AREAS else
            None if isinstance(item["met"], bool) else "has a non-bool 'met'")

    return entries("checks", check), entries("rows", row), entries("targets", target), problems


# ---------------------------------------------------------------------------------------------- distributed

DISTRIBUTED_CONFIG = """merge_method: ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: [0.2, 0.8], density: 0.5}}}}
  - {{model: {ft1}, parameters: {{weight: 0.6, density: [0.3, 0.9]}}}}
parameters: {{normalize: true}}
"""
DISTRIBUTED_CHECK = "distributed: torchrun merge == single-process merge"


def _distributed_part(device: torch.device, quick: bool, limit: float, log) -> dict:
    """``vfuse merge --distributed`` under torchrun (one rank per GPU; 1 rank on a CPU) vs ``vfuse merge``."""
    deadline = time.monotonic() + limit
    ranks = torch.cuda.device_count() if device.type == "cuda" else 1
    backend = "nccl+gloo" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="vfuse-gpu-suite-") as tmp:
        try:
            base, ft0, ft1 = _write_family(tmp, quick, device)
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            return _failed(DISTRIBUTED_CHECK, f"writing the checkpoints failed: {type(exc).__name__}: {exc}")
        config = os.path.join(tmp, "ties.yml")
        with open(config, "w") as f:
            f.write(DISTRIBUTED_CONFIG.format(base=base, ft0=ft0, ft1=ft1))
        options = ["--device", device.type, "--out-shard-size", "8KB" if quick else "2MB", "--quiet"]
        single, spread = os.path.join(tmp, "single"), os.path.join(tmp, "distributed")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
                    "127.0.0.1", "--master-port", str(_free_port())]  # as tests/test_distributed.py: no DNS needed
        runs = [("vfuse merge", 1, [sys.executable, "-m", "vfuse_kernels.cli", "merge"], single),
                (f"vfuse merge --distributed (torchrun --nproc-per-node {ranks}, {backend})", ranks,
                 [*torchrun, "-m", "vfuse_kernels.merging.distributed"], spread)]
        rows = []
        for impl, n, command, out in runs:
            left = max(1.0, deadline - time.monotonic())
            code, seconds, output = _spawn(f"distributed: {impl}", [*command, config, out, *options], left, log,
                                           _child_env())
            if code != 0:
                return {"checks": [{"name": DISTRIBUTED_CHECK, "passed": False,
                                    "detail": f"{impl}: {_why(code, left, output)}"}], "rows": rows, "targets": []}
            rows.append({"suite": "distributed", "op": "merge_checkpoint", "impl": impl, "device": device.type,
                         "ranks": n, "out_MB": _folder_bytes(out) / 1e6, "median_ms": 1e3 * seconds,
                         "seconds": seconds})
        differ = _differences(single, spread)
        files = len(os.listdir(single))
    same = f"{files} files ({rows[0]['out_MB']:.2f} MB) byte-identical to the single-process merge's"
    detail = f"{runs[1][0]}, --device {device.type}: " + ("; ".join(differ[:5]) if differ else same)
    return {"checks": [{"name": DISTRIBUTED_CHECK, "passed": not differ, "detail": detail}], "rows": rows,
            "targets": []}


def _write_family(root: str, quick: bool, device: torch.device) -> list[str]:
    """A Llama-shaped bf16 base and two fine-tunes (``checkpoint.write_family``): tiny when
    ``quick``, else 20M parameters (40 MB per checkpoint) in 8 MB shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = (dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, vocab_size=99) if quick else
            dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, vocab_size=8192))
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"], **dims)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    base, tuned = write_family(root, shapes, json.loads(config.to_json_string()), 2,
                               shard_bytes=16 << 10 if quick else 8 << 20, device=device)
    return [base, *tuned]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def _differences(expected: str, got: str) -> list[str]:
    """What differs between two folders' files (names, then bytes)."""
    a, b = set(os.listdir(expected)), set(os.listdir(got))
    differ = [f"only in the single-process output: {sorted(a - b)}"] if a - b else []
    differ += [f"only in the distributed output: {sorted(b - a)}"] if b - a else []
    for name in sorted(a & b):
        with open(os.path.join(expected, name), "rb") as x, open(os.path.join(got, name), "rb") as y:
            if x.read() != y.read():
                differ.append(f"{name} differs")
    return differ


# ---------------------------------------------------------------------------------------------- ncu


def _ncu_part(limit: float, log, stem: str) -> dict:
    """Nsight Compute on NCU_WORKLOAD's kernels (NCU_KERNELS, NCU_SECTIONS): the report, its raw
    metrics and its details page at ``<stem>-ncu.{ncu-rep,csv,txt}``; a row per kernel (``ncu_rows``)."""
    name = "ncu: merge kernels profiled"
    ncu = shutil.which("ncu")
    if ncu is None:
        return _failed(name, "ncu is not on PATH")
    report = stem + "-ncu"
    sections = [arg for section in NCU_SECTIONS for arg in ("--section", section)]
    command = [ncu, "--clock-control", "none", "--target-processes", "all", "--kernel-name", NCU_KERNELS,
               "--launch-count", "4", *sections, "--export", report, "--force-overwrite",
               sys.executable, "-c", NCU_WORKLOAD]
    profiling_limit = max(limit - 20, MIN_PART_S)  # the rest for reading the report
    code, seconds, output = _spawn("ncu", command, profiling_limit, log, _child_env())
    if code != 0 or not os.path.exists(report + ".ncu-rep"):
        return _failed(name, _why(code, profiling_limit, output))
    pages = {}
    for page, suffix in (("raw", ".csv"), ("details", ".txt")):
        command = [ncu, "--import", report + ".ncu-rep", "--page", page, *(["--csv"] if page == "raw" else [])]
        try:
            shown = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return _failed(name, f"ncu --import --page {page} took over 10 s; the report is {report}.ncu-rep")
        pages[page] = shown.stdout
        with open(report + suffix, "w") as f:
            f.write(shown.stdout)
    rows = ncu_rows(pages["raw"])
    return {"checks": [{"name": name, "passed": bool(rows),
                        "detail": f"{len(rows)} kernel launches in {seconds:.0f} s: {report}.ncu-rep, .csv, .txt"}],
            "rows": rows, "targets": []}


def ncu_rows(text: str) -> list[dict]:
    """A row per kernel launch of ncu's raw page (``--page raw --csv``: a header naming the
    metrics, a row of their units, a row per launch): its duration in ms, the NCU_METRICS it
    has, and its NCU_STALLS_KEPT largest stall reasons (warps stalled per issued instruction)."""
    table = list(csv.reader(io.StringIO(text)))
    header = next((i for i, line in enumerate(table) if "Kernel Name" in line), None)
    if header is None or header + 1 >= len(table):
        return []
    names, units = table[header], dict(zip(table[header], table[header + 1]))
    rows = []
    for line in table[header + 2:]:
        if len(line) != len(names):
            continue
        values = {}
        for metric, text_value in zip(names, line):
            try:
                values[metric] = float(text_value.replace(",", ""))
            except ValueError:
                pass
        duration = values.get("gpu__time_duration.sum")
        row = {"suite": "ncu", "op": "ncu", "impl": line[names.index("Kernel Name")],
               "median_ms": duration * TIME_UNITS_MS.get(units.get("gpu__time_duration.sum"), float("nan"))
               if duration is not None else None}
        row.update({column: values[metric] for metric, column in NCU_METRICS.items() if metric in values})
        stalls = sorted(((values[m], NCU_STALL.fullmatch(m).group(1)) for m in values if NCU_STALL.fullmatch(m)),
                        reverse=True)
        row.update({f"stall {i + 1}": f"{reason} {value:.2f}" for i, (value, reason) in
                    enumerate(stalls[:NCU_STALLS_KEPT])})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- tests


def _tests_part(limit: float, log, workers: int | None = None, paths: list[str] | None = None) -> dict:
    """pytest on ``paths``; by default on the checkout's tests/, the GPU tests (-k GPU_TESTS) first
    and then, in the time left, the others (on a GPU machine their code can take other branches);
    with xdist workers where pytest-xdist is installed."""
    if paths is None and not os.path.isdir(os.path.join(SOURCE, "tests")):
        return _failed("pytest: tests pass", f"no tests/ in {SOURCE}: run from a source checkout, or pass --no-tests")
    xdist = importlib.util.find_spec("xdist") is not None
    workers = (min(8, os.cpu_count() or 1) if workers is None else workers) if xdist else 0
    runs = ([("pytest: tests pass", paths)] if paths else
            [("pytest: GPU tests pass", ["tests", "-k", GPU_TESTS]),
             ("pytest: other tests pass", ["tests", "-k", f"not ({GPU_TESTS})"])])
    result = {"checks": [], "rows": [], "targets": []}
    end = time.monotonic() + limit
    for name, selection in runs:
        left = end - time.monotonic()
        if left < MIN_TEST_RUN_S and result["rows"]:
            result["checks"].append({"name": name, "passed": False,
                                     "detail": f"not run: {max(left, 0):.0f} s of the tests part were left"})
            continue
        checks, row = _pytest_run(name, selection, left, log, workers)
        result["checks"] += checks
        result["rows"] += [row] if row else []
    return result


def _pytest_run(name: str, selection: list[str], limit: float, log, workers: int) -> tuple[list, dict | None]:
    """(checks: the summary, then one per failed test; the timing row) of one pytest run."""
    what = " ".join(selection) + (f" -n {workers}" if workers else "")
    with tempfile.TemporaryDirectory(prefix="vfuse-gpu-suite-") as tmp:
        junit = os.path.join(tmp, "junit.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-o", "junit_family=xunit1", f"--junitxml={junit}",
                   *selection, *(["-n", str(workers)] if workers else [])]
        code, seconds, output = _spawn(f"pytest {what}", command, limit, log, _child_env(), cwd=SOURCE)
        if not os.path.exists(junit):
            return _failed(name, f"pytest {what}: {_why(code, limit, output)}")["checks"], None
        counts, failures = _junit_outcomes(junit)
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    stopped = f" (stopped at its {limit:.0f} s limit)" if code is None else f" (exit code {code})"
    checks = [{"name": name, "passed": code == 0, "detail": f"pytest {what}: {summary} in {seconds:.0f} s"
               + ("" if code in (0, 1) else stopped)}]
    checks += [{"name": f"pytest: {test}", "passed": False, "detail": message} for test, message in failures]
    row = {"suite": "tests", "op": "pytest", "impl": f"pytest {what}", "median_ms": 1e3 * seconds,
           "seconds": seconds, **counts}
    return checks, row


def _junit_outcomes(path: str) -> tuple[dict, list[tuple[str, str]]]:
    """({passed, failed, errors, skipped: count}, [(failed test id, first line of its message)])."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        test = f"{file}::{case.get('name')}"
        for tag, outcome in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                counts[outcome] += 1
                if outcome != "skipped":
                    message = (found.get("message") or found.text or "").strip().splitlines() or [tag]
                    failures.append((test, message[0][:300]))
                break
        else:
            counts["passed"] += 1
    return counts, failures


# ---------------------------------------------------------------------------------------------- processes


def _child_env(device: torch.device | None = None) -> dict:
    """This process's environment for a child: the folder this package was imported from on
    PYTHONPATH (an uninstalled source checkout is found from any working directory), and the
    Triton interpreter for kernels on a CPU."""
    env = dict(os.environ)
    if os.path.basename(SOURCE) not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")]))
    if device is not None and device.type == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def _spawn(label: str, command: list[str], limit: float, log, env: dict, cwd: str | None = None):
    """(exit code, or None when stopped after ``limit`` seconds; seconds; its output): runs
    ``command`` in its own process group with stdout and stderr appended to ``log``. INTERRUPT_GRACE_S
    before the limit the group gets SIGINT (pytest then writes its report), at the limit SIGKILL."""
    log.write(f"\n===== {label}: {' '.join(command)}\n")
    log.flush()
    offset = os.path.getsize(log.name)
    start = time.monotonic()
    proc = _popen_interruptible(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        code = proc.wait(timeout=max(limit - INTERRUPT_GRACE_S, 1.0))
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:  # still running, or this process is being interrupted: end the child's group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - start
    with open(log.name, "rb") as f:
        f.seek(offset)
        output = f.read().decode(errors="replace")
    if code != 0:
        print("\n".join(f"   | {line}" for line in output.rstrip().splitlines()[-12:]), flush=True)
    return code, seconds, output


def _popen_interruptible(command: list[str], **kwargs) -> subprocess.Popen:
    """Popen with SIGINT's default action in the child even where this process ignores SIGINT (a
    shell starts background jobs so, and a child inherits an ignored signal across exec): the
    handler is swapped for the default one around the start (main thread only; else as inherited)."""
    swap = signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread()
    if swap:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a Python handler: the default after exec
    try:
        return subprocess.Popen(command, **kwargs)
    finally:
        if swap:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _why(code: int | None, limit: float, output: str) -> str:
    """Why a child failed: killed at its time limit, else its last error line — a traceback's last
    line, or a ``vfuse …: error:`` message (not torchrun's uninformative ChildFailedError) — else
    its last line."""
    if code is None:
        return f"killed after {limit:.0f} s (its share of the suite's time budget)"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    return f"{(errors or lines or ['no output'])[-1][:300]} (exit code {code})"


# ---------------------------------------------------------------------------------------------- output


def _write(stem: str, data: dict) -> None:
    dump_json(stem + ".json", data)
    with open(stem + ".md", "w") as f:
        f.write(markdown(data))


def markdown(data: dict) -> str:
    """The suite's result as markdown: environment, targets, failed checks, time per part, rows per suite."""
    env, checks, targets = data["environment"], data["checks"], data["targets"]
    failed = [c for c in checks if not c["passed"]]
    met = sum(t["met"] for t in targets)
    parts = [r for r in data["rows"] if r["suite"] == "gpu_suite"]
    text = [f"# vfuse bench gpu: {env['device']}\n",
            markdown_table([env], list(env)),
            f"## Targets: {met} of {len(targets)} met\n",
            markdown_table([dict(t, met="yes" if t["met"] else "**no**") for t in targets],
                           ["area", "name", "value", "target", "met"]) if targets else "none\n",
            f"## Checks: {len(checks) - len(failed)} of {len(checks)} passed\n",
            markdown_table(failed, ["name", "detail"]) if failed else "no failed checks\n",
            "## Time per part\n",
            markdown_table(parts, ["impl", "seconds", "checks", "failed", "rows", "targets"])]
    suites: dict[str, list[dict]] = {}
    for r in data["rows"]:
        if r["suite"] != "gpu_suite":
            suites.setdefault(r["suite"], []).append(r)
    for suite, rows in suites.items():
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "suite"))
        text += [f"## Rows: {suite}\n", markdown_table(rows, columns)]
    return "\n".join(text)


def print_summary(data: dict, stem: str) -> None:
    """The last lines of the output: time per part, targets, failed checks, the files written."""
    env, checks, targets = data["environment"], data["checks"], data["targets"]
    failed = [c for c in checks if not c["passed"]]
    print(f"\n# vfuse bench gpu: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | "
          f"commit {env['git_commit']}")
    print_table([r for r in data["rows"] if r["suite"] == "gpu_suite"],
                ["impl", "seconds", "checks", "failed", "rows", "targets"])
    print(f"\n## targets: {sum(t['met'] for t in targets)} of {len(targets)} met")
    if targets:
        print_table([dict(t, met="yes" if t["met"] else "NO") for t in targets],
                    ["area", "name", "value", "target", "met"])
    print(f"\n## checks: {len(failed)} of {len(checks)} failed")
    for c in failed[:30]:  # the GPU tool returns the last 12,000 characters of the output
        print(f"FAILED {c['name']}: {c['detail'][:160]}")
    if len(failed) > 30:
        print(f"... and {len(failed) - 30} more (see {stem}.md)")
    print(f"\nwrote {stem}.json, .md, .log")


def main(argv=None) -> int:
    """``vfuse bench gpu`` with these arguments."""
    from ..cli import main as cli_main

    return cli_main(["bench", "gpu", *(sys.argv[1:] if argv is None else argv)])


def run(args, prog: str) -> int:
    """The suite for the parsed ``vfuse bench gpu`` arguments; the exit code is 1 when a check
    failed (an unmet target is not a failure)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.quick:
        raise SystemExit(f"{prog}: no CUDA device: the full sizes need a GPU (--quick runs tiny ones on the CPU)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: --device cuda but CUDA is not available")
    if args.budget is not None and args.budget <= 0:
        raise SystemExit(f"{prog}: --budget must be a positive number of seconds")
    skip = [*(args.skip or []), *(["tests"] if args.no_tests else [])]
    unknown = sorted(set(skip) - set(SKIPPABLE))
    if unknown:
        raise SystemExit(f"{prog}: --skip {' '.join(unknown)}: the parts are {', '.join(SKIPPABLE)}")
    data = run_suite(device, quick=args.quick, out_dir=args.out, skip=skip, workers=args.workers,
                     budget=DEFAULT_BUDGET_S if args.budget is None else args.budget)
    return int(any(not c["passed"] for c in data["checks"]))


if __name__ == "__main__":
    sys.exit(main())
