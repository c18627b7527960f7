"""Timing and result rows shared by the benchmark scripts.

GPU: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flush). CPU: repeated
wall-clock runs. Both report the median and the 20th/80th percentiles in ms.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time

import torch


def time_ms(fn, device: torch.device, *, reps: int = 7, warmup: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        p20, median, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])
        return median, p20, p80
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), quantiles[0], quantiles[-1]


def profile_rows(fn, device: torch.device, common: dict, calls: int = 5, top: int = 8) -> list[dict]:
    """Where one call of ``fn`` spends its time, from ``torch.profiler`` over ``calls`` warm calls:
    rows (``common`` plus ``impl``/``median_ms``/``count``) for the wall time per call, the device-idle
    remainder (host work, launches, synchronisation), the ``top`` kernels by device time per call and
    the ``top`` host operations by self CPU time per call, with their call counts per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
    kernels, host = {}, {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.key and not event.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            kernels[event.key] = (device_us / 1e3 / calls, event.count / calls)
        if event.self_cpu_time_total:
            host[event.key] = (event.self_cpu_time_total / 1e3 / calls, event.count / calls)
    rows = [{**common, "impl": "wall per call", "median_ms": wall_ms},
            {**common, "impl": "device idle per call (host work, syncs)",
             "median_ms": wall_ms - sum(ms for ms, _ in kernels.values())}]
    for prefix, table in (("kernel", kernels), ("host", host)):
        for name, (ms, count) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
            rows.append({**common, "impl": f"{prefix} {name[:80]}", "median_ms": ms, "count": count})
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("VFUSE_GIT_COMMIT")  # a copied checkout's .git may be stale: the caller knows
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
        "git_commit": commit,
    }


def device_slug(device: torch.device) -> str:
    """A short file-name form of the device: ``NVIDIA H100 80GB HBM3`` → ``h100``; any CPU → ``cpu``."""
    if device.type != "cuda":
        return device.type
    name = device_name(device)
    model = re.search(r"\b[A-Z]{1,3}\d{2,4}[A-Z]?\b", name)
    words = model.group(0) if model else name.replace("NVIDIA", "")
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-") or "gpu"


def write_json(path: str, env: dict, rows: list[dict]) -> None:
    dump_json(path, {"environment": env, "rows": rows})


def dump_json(path: str, data: dict) -> None:
    """``data`` as indented JSON, NaN and ±inf written as null (strict JSON readers reject NaN)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(data), f, indent=1)
        f.write("\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` (numbers to 3 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    cells = [[_fmt(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns] for r in rows]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)
