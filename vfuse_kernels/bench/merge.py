"""Delta-merge benchmark: vfuse_kernels vs eager PyTorch vs mergekit's op sequence.

Reports time, GB/s from the ideal bytes a single pass must move ((N + 1) reads and one
write of the storage dtype) and that as % of a plain copy's bandwidth measured in the
same run. TIES rows include the threshold selection.

    python -m vfuse_kernels.bench.merge                       # CPU, 2 × 32M bf16
    python -m vfuse_kernels.bench.merge --device cuda --numel 268435456
    python -m vfuse_kernels.bench.merge --quick               # seconds, for CI smoke runs
"""
from __future__ import annotations

import argparse

import torch

import vfuse_kernels as vk  # noqa: E402
from vfuse_kernels.ops import SPARSE_METHODS  # noqa: E402
from .baselines import eager_merge, mergekit_merge, uses_mergekit  # noqa: E402
from .common import environment, print_table, time_ms, write_json  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ["method", "impl", "median_ms", "p20_ms", "p80_ms", "GB/s", "pct_of_copy", "speedup_vs_eager",
           "speedup_vs_mergekit"]


def make_inputs(numel, models, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(device=device, dtype=dtype)
    tuned = [(base.float() + 0.01 * torch.randn(numel, generator=gen).to(device)).to(dtype) for _ in range(models)]
    return base, tuned


def run(numel: int, models: int, dtype: torch.dtype, device: torch.device, methods, density: float, reps: int,
        with_mergekit: bool) -> list[dict]:
    base, tuned = make_inputs(numel, models, dtype, device)
    weights = [1.0 / models] * models
    itemsize = base.element_size()
    ideal_bytes = (models + 2) * numel * itemsize
    copy_dst = torch.empty_like(base)
    copy_ms, copy_p20, copy_p80 = time_ms(lambda: copy_dst.copy_(base), device, reps=reps)
    copy_gbps = 2 * numel * itemsize / copy_ms / 1e6
    out = torch.empty_like(base)
    rows = [{"op": "copy", "method": "copy", "impl": "torch.Tensor.copy_", "numel": numel,
             "dtype": str(dtype).removeprefix("torch."), "median_ms": copy_ms, "p20_ms": copy_p20,
             "p80_ms": copy_p80, "GB/s": copy_gbps, "pct_of_copy": 100.0}]
    for method in methods:
        sparse = method in SPARSE_METHODS
        p = density if sparse else 1.0
        normalize = vk.METHODS[method][2]
        impls = {"vfuse": lambda: vk.delta_merge(base, tuned, weights, method=method, density=p, out=out)}
        if method == "task_arithmetic":
            work = base.clone()
            # in place: the deltas are read against the (changing) work tensor; the bytes moved are the same
            impls["vfuse (in place)"] = lambda: vk.delta_merge(work, tuned, weights, method=method, out=work)
        if not sparse:
            impls["eager fp32"] = lambda: eager_merge(base, tuned, weights, normalize)
        if sparse and with_mergekit:
            impls["mergekit ops"] = lambda: mergekit_merge(base, tuned, weights, method=method, density=p,
                                                           normalize=normalize)
        method_rows = []
        for impl, fn in impls.items():
            median, p20, p80 = time_ms(fn, device, reps=1 if impl == "mergekit ops" else reps)
            gbps = ideal_bytes / median / 1e6
            method_rows.append({"op": "delta_merge", "method": method, "impl": impl, "numel": numel,
                                "models": models, "dtype": str(dtype).removeprefix("torch."),
                                "density": p, "median_ms": median, "p20_ms": p20, "p80_ms": p80,
                                "GB/s": gbps, "pct_of_copy": 100.0 * gbps / copy_gbps})
        times = {r["impl"]: r["median_ms"] for r in method_rows}
        for r in method_rows:
            if r["impl"].startswith("vfuse"):
                for baseline, key in (("eager fp32", "speedup_vs_eager"), ("mergekit ops", "speedup_vs_mergekit")):
                    if baseline in times:
                        r[key] = times[baseline] / r["median_ms"]
        rows += method_rows
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=32 * 1024 * 1024, help="elements per tensor")
    parser.add_argument("--models", type=int, default=2, help="number of tuned tensors")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--methods", nargs="+", default=list(vk.METHODS), choices=list(vk.METHODS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-mergekit", action="store_true", help="skip the (slow) mergekit op sequence")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke test)")
    parser.add_argument("--json", help="write the rows (with device, versions, date, commit) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.numel, args.reps = min(args.numel, 1 << 16), 3
    device = torch.device(args.device)
    env = environment(device)
    rows = run(args.numel, args.models, DTYPES[args.dtype], device, args.methods, args.density, args.reps,
               not args.no_mergekit)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {args.models} × {args.numel} "
          f"{args.dtype} | mergekit ops: {'mergekit.sparsify' if uses_mergekit() else 'restated'}")
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, env, rows)
    return rows


if __name__ == "__main__":
    main()
