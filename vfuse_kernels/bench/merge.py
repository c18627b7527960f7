"""Delta-merge benchmark: vfuse_kernels vs eager PyTorch, torch.compile and mergekit's op sequence.

Inputs are bf16-style fine-tunes (base and θᵢ rounded to the storage dtype, so the deltas are
quantised and full of equal magnitudes, as in real checkpoints). Reports time, GB/s from the
ideal bytes a single pass must move ((N + 1) reads and one write of the storage dtype) and
that as % of a plain copy's bandwidth measured in the same run. TIES rows (one per density)
include the threshold selection; "thresholds only" rows time the selection alone beside a
``torch.topk`` threshold, and "thresholds, then the merge" rows the two calls in turn (on the
GPU the merge then waits for the selection's host synchronisation; in one ``delta_merge`` call
it is queued before it).

    python -m vfuse_kernels.bench.merge                       # CPU, 2 × 32M bf16
    python -m vfuse_kernels.bench.merge --device cuda --numel 268435456
    python -m vfuse_kernels.bench.merge --quick               # seconds, for CI smoke runs

``gpu_suite`` is the merge part of ``vfuse bench gpu``.
"""
from __future__ import annotations

import argparse
import math

import torch

import vfuse_kernels as vk  # noqa: E402
from vfuse_kernels.ops import SPARSE_METHODS  # noqa: E402
from .baselines import eager_merge, mergekit_merge, uses_mergekit  # noqa: E402
from .common import environment, print_table, profile_rows, time_ms, write_json  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ["method", "impl", "density", "median_ms", "GB/s", "pct_of_copy", "speedup_vs_eager",
           "speedup_vs_mergekit"]
DENSITIES = (0.01, 0.3, 0.5, 0.9)
LLAMA_7B_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 3  # q k v o, gate up down (transposed alike)


def run(numel: int, models: int, dtype: torch.dtype, device: torch.device, methods, densities, reps: int,
        with_mergekit: bool) -> list[dict]:
    """The copy row and every method's rows at one size (TIES once per density)."""
    base, tuned = tie_heavy_inputs(numel, models, dtype, device)
    copy_row = _copy_row(f"{models}x{numel}", base, device, reps)
    rows, _ = _merge_rows(f"{models}x{numel}", base, tuned, device, methods, densities, reps, with_mergekit,
                          with_compile=False, copy_gbps=copy_row["GB/s"])
    return [copy_row] + rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=32 * 1024 * 1024, help="elements per tensor")
    parser.add_argument("--models", type=int, default=2, help="number of tuned tensors")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES), help="TIES densities")
    parser.add_argument("--methods", nargs="+", default=list(vk.METHODS), choices=list(vk.METHODS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-mergekit", action="store_true", help="skip the (slow) mergekit op sequence")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke test)")
    parser.add_argument("--json", help="write the rows (with device, versions, date, commit) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.numel, args.reps, args.densities = min(args.numel, 1 << 16), 3, args.densities[:2]
    device = torch.device(args.device)
    env = environment(device)
    rows = run(args.numel, args.models, DTYPES[args.dtype], device, args.methods, args.densities, args.reps,
               not args.no_mergekit)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {args.models} × {args.numel} "
          f"{args.dtype} | mergekit ops: {'mergekit.sparsify' if uses_mergekit() else 'restated'}")
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, env, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# GPU suite (vfuse bench gpu): checks, rows and targets of the merge kernels
# ---------------------------------------------------------------------------------------------

def tie_heavy_inputs(numel: int, models: int, dtype, device, seed: int = 0):
    """bf16-style fine-tunes: base ~ N(0, 1) and θᵢ = base + 0.01·N(0, 1), both rounded to ``dtype``
    (so the deltas are quantised to base's ulp: equal magnitudes everywhere), drawn on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(numel, generator=gen, device=device).to(dtype)
    tuned = [(base.float() + 0.01 * torch.randn(numel, generator=gen, device=device)).to(dtype)
             for _ in range(models)]
    return base, tuned


def topk_thresholds(base, tuned, density):
    """What a user writes with torch: the k-th largest |δᵢ| per model by ``torch.topk``."""
    k = max(1, int(density * base.numel()))
    return [torch.topk((t.float() - base.float()).abs(), k, sorted=False).values.min() for t in tuned]


def selection_is_exact(base, tuned, densities, thresholds, chunk: int = 1 << 26) -> str:
    """'' if (K, C) of every model satisfy the definition (fewer than k keys above K; with the
    equal keys up to index C exactly k; key(C) == K), else what failed — in chunks, O(n)."""
    numel = base.numel()
    for i, (t, p) in enumerate(zip(tuned, densities)):
        k = min(numel, max(1, int(p * numel)))
        key_k, cut = int(thresholds.keys[i]), int(thresholds.cutoffs[i])
        above = equal_upto = 0
        for start in range(0, numel, chunk):
            key = ((t[start:start + chunk].float() - base[start:start + chunk].float()).view(torch.int32)
                   & 0x7FFFFFFF)
            above += int((key > key_k).sum())
            stop = min(chunk, max(0, cut + 1 - start))
            equal_upto += int((key[:stop] == key_k).sum())
            if start <= cut < start + chunk and int(key[cut - start]) != key_k:
                return f"model {i}: key at the cutoff {cut} is not the threshold key"
        if k < numel and not (above < k and above + equal_upto == k):
            return f"model {i}: {above} keys above, {equal_upto} tied up to the cutoff, k = {k}"
    return ""


def _time(fn, device, reps=5) -> float:
    return time_ms(fn, device, reps=reps)[0]


def _timed(fn, device, reps) -> dict:
    """``median_ms``, ``p20_ms``, ``p80_ms`` of ``fn``."""
    return dict(zip(("median_ms", "p20_ms", "p80_ms"), time_ms(fn, device, reps=reps)))


def _compiled(fn, example_args):
    """torch.compile of ``fn`` for these shapes only (dynamic=False), compiled and warmed now;
    (compiled function, compile seconds)."""
    import time

    compiled = torch.compile(fn, dynamic=False)
    start = time.perf_counter()
    compiled(*example_args)
    torch.cuda.synchronize()
    return compiled, time.perf_counter() - start


def _target(name, value, target):
    op, bound = target.split()
    met = value == value and (value <= float(bound) if op == "<=" else value >= float(bound))
    return {"area": "merge", "name": name, "value": value, "target": target, "met": bool(met)}


def _copy_row(label, base, device, reps) -> dict:
    """A device copy of ``base``: the bandwidth ceiling measured in the same run."""
    dst = torch.empty_like(base)
    timed = _timed(lambda: dst.copy_(base), device, reps)
    return {"op": "copy", "suite": "merge", "shape": label, "method": "copy", "impl": "torch.Tensor.copy_",
            "numel": base.numel(), "dtype": str(base.dtype).removeprefix("torch."), **timed,
            "GB/s": 2 * base.numel() * base.element_size() / timed["median_ms"] / 1e6, "pct_of_copy": 100.0}


def _merge_rows(label, base, tuned, device, methods, densities, reps, with_mergekit, with_compile, copy_gbps):
    """Rows of every method at one shape, and {(method, impl, density): ms}: vfuse, task arithmetic in
    place, eager fp32 and (``with_compile``) torch.compile of the dense formulas, TIES per density
    (select + merge, selection alone, torch.topk threshold), mergekit's op sequence."""
    n, numel, itemsize = len(tuned), base.numel(), base.element_size()
    gb = (n + 2) * numel * itemsize / 1e9
    weights = [1.0 / n] * n
    out = torch.empty_like(base)
    rows, times = [], {}

    def row(method, impl, fn, density=None, rep=reps, **extra):
        timed = _timed(fn, device, rep)
        ms = times[(method, impl, density)] = timed["median_ms"]
        rows.append({"op": "delta_merge", "suite": "merge", "shape": label, "method": method, "impl": impl,
                     "models": n, "numel": numel, "dtype": str(base.dtype).removeprefix("torch."),
                     "density": density, **timed, "GB/s": gb / ms * 1e3,
                     "pct_of_copy": 100 * gb / ms * 1e3 / copy_gbps, **extra})

    for method in methods:
        sparse = method in SPARSE_METHODS
        normalize = vk.METHODS[method][2]
        for p in (densities if method == "ties" else [0.3] if sparse else [None]):
            kw = {"density": p} if sparse else {}
            row(method, "vfuse", lambda: vk.delta_merge(base, tuned, weights, method=method, out=out, **kw), p)
            if method == "ties":
                row(method, "vfuse thresholds only", lambda: vk.ties_thresholds(base, tuned, p), p)
                row(method, "vfuse thresholds, then the merge", lambda: vk.delta_merge(  # (the merge after the wait)
                    base, tuned, weights, method=method, out=out, thresholds=vk.ties_thresholds(base, tuned, p)), p)
                row(method, "torch.topk thresholds", lambda: topk_thresholds(base, tuned, p), p)
            if sparse and with_mergekit:
                row(method, "mergekit ops", lambda: mergekit_merge(base, tuned, weights, method=method, density=p,
                                                                   normalize=normalize), p, rep=1)
        if method == "task_arithmetic":
            work = base.clone()
            row(method, "vfuse (in place)", lambda: vk.delta_merge(work, tuned, weights, out=work))
        if not sparse:
            row(method, "eager fp32", lambda: eager_merge(base, tuned, weights, normalize))
        if with_compile and method in ("task_arithmetic", "linear", "dare_linear"):
            formula = ((lambda b, *t: _bernoulli_merge(b, list(t), weights, 0.3)) if sparse else
                       (lambda b, *t, nz=normalize: eager_merge(b, list(t), weights, nz)))
            fn, seconds = _compiled(formula, (base, *tuned))
            row(method, "torch.compile", lambda: fn(base, *tuned), 0.3 if sparse else None, compile_s=seconds)
    for r in rows:
        if r["impl"] == "vfuse":
            for baseline, key in (("eager fp32", "speedup_vs_eager"), ("mergekit ops", "speedup_vs_mergekit")):
                if (r["method"], baseline, r["density"]) in times:
                    r[key] = times[(r["method"], baseline, r["density"])] / r["median_ms"]
    return rows, times


def _bernoulli_merge(base, tuned, weights, density):
    """DARE-linear as eager torch writes it: Bernoulli keep mask, 1/density rescale, weighted sum."""
    b = base.float()
    merged = sum(w * torch.bernoulli(torch.full_like(b, density)) * (t.float() - b) / density
                 for w, t in zip(weights, tuned))
    return (b + merged).to(base.dtype)


def _parity_checks(device) -> list[dict]:
    """Every method × dtype × awkward shape × N ∈ {1, 3} against the fp64 reference on the device;
    tie-heavy bf16 selections; CPU and GPU bit-identical; foreach equal to per-tensor merges."""
    from ..reference import delta_merge as ref

    checks = []
    shapes = [(0,), (1,), (7,), (13, 17), (1031,), (1_000_003,)]
    for method, (sparsify, elects, normalize) in vk.METHODS.items():
        failures = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for shape in shapes:
                for n in ((1, 3) if dtype == torch.bfloat16 else (3,)):  # each (dtype, N) compiles kernels
                    numel = math.prod(shape)
                    base, tuned = tie_heavy_inputs(numel, n, dtype, device, seed=numel + n)
                    base, tuned = base.reshape(shape), [t.reshape(shape) for t in tuned]
                    density = [0.3, 0.55, 0.9][:n] if sparsify != "none" else 1.0
                    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
                    vk.delta_merge(base, tuned, [0.7, -0.3, 1.1][:n], method=method, density=density, out=out,
                                   seed=3)
                    expected = ref.delta_merge(base, tuned, [0.7, -0.3, 1.1][:n], sparsify=sparsify,
                                               densities=density if isinstance(density, list) else [1.0] * n,
                                               elect="sum" if elects else None, normalize=normalize, scale=1.0,
                                               rescale="density", seed=3, tuned_are_deltas=False)
                    tol = torch.finfo(dtype).eps * max(1.0, float(expected.abs().max()) if numel else 1.0)
                    if out.isnan().any() or (numel and float((out.double() - expected).abs().max()) > tol + 1e-6):
                        failures.append(f"{str(dtype)[6:]} {shape} N={n}")
        checks.append({"name": f"delta_merge {method} vs fp64 reference (fp32/bf16/fp16, 6 shapes, N=1 and 3)",
                       "passed": not failures, "detail": "; ".join(failures[:5])})
    base, tuned = tie_heavy_inputs(1 << 22, 3, torch.bfloat16, device, seed=11)
    differ = []
    for method in vk.METHODS:
        sparse = method in SPARSE_METHODS
        for rescale in ("density", "l1") if sparse else ("density",):
            kw = dict(method=method, density=0.3 if sparse else 1.0, rescale=rescale, seed=5)
            gpu = vk.delta_merge(base, tuned, [0.5, 0.3, 0.15], **kw)
            cpu = vk.delta_merge(base.cpu(), [t.cpu() for t in tuned], [0.5, 0.3, 0.15], **kw)
            if not torch.equal(gpu.cpu(), cpu):
                differ.append(f"{method} rescale={rescale}: {int((gpu.cpu() != cpu).sum())} elements")
    checks.append({"name": "delta_merge CPU and GPU bit-identical (3 × 4M bf16, every method, L1 rescale too)",
                   "passed": not differ, "detail": "; ".join(differ)})
    tensors = [tie_heavy_inputs(r * c, 2, torch.bfloat16, device, seed=r) for r, c in ((64, 64), (1, 1), (300, 7))]
    fused = vk.delta_merge_foreach([b for b, _ in tensors], [t for _, t in tensors], [0.6, 0.4], method="dare_ties",
                                   density=0.5, seed=[1, 2, 3])
    single = [vk.delta_merge(b, t, [0.6, 0.4], method="dare_ties", density=0.5, seed=s)
              for (b, t), s in zip(tensors, (1, 2, 3))]
    checks.append({"name": "delta_merge_foreach equals per-tensor delta_merge (dare_ties, 3 shapes)",
                   "passed": all(torch.equal(a, b) for a, b in zip(fused, single)), "detail": ""})
    return checks


def _huge_tensor_check(device, numel: int = (1 << 31) + 4099) -> dict:
    """One tensor of more than 2^31 elements (4.3 GB in bf16): task arithmetic and TIES exact."""
    name = f"delta_merge on {numel} bf16 elements (> 2^31 elements and bytes): task arithmetic and TIES exact"
    try:
        base, (tuned,) = tie_heavy_inputs(numel, 1, torch.bfloat16, device, seed=7)
        out = vk.delta_merge(base, [tuned], 0.5)
        chunk, bad = 1 << 26, []
        for start in range(0, numel, chunk):
            b, t = base[start:start + chunk].float(), tuned[start:start + chunk].float()
            if not torch.equal(out[start:start + chunk], (b + 1.0 * (0.5 * (t - b))).to(torch.bfloat16)):
                bad.append(f"task arithmetic differs in chunk at {start}")
                break
        thresholds = vk.ties_thresholds(base, [tuned], 0.3)
        failure = selection_is_exact(base, [tuned], [0.3], thresholds)
        if failure:
            bad.append(failure)
        out = vk.delta_merge(base, [tuned], 1.0, method="ties", density=0.3, thresholds=thresholds, out=out)
        key_k, cut = int(thresholds.keys[0]), int(thresholds.cutoffs[0])
        for start in range(0, numel, chunk):
            b, t = base[start:start + chunk], tuned[start:start + chunk]
            key = (t.float() - b.float()).view(torch.int32) & 0x7FFFFFFF
            index = torch.arange(start, start + b.numel(), device=device)
            keep = (key > key_k) | ((key == key_k) & (index <= cut))
            if not torch.equal(out[start:start + chunk], torch.where(keep, t, b)):
                bad.append(f"TIES output differs in chunk at {start}")
                break
        return {"name": name, "passed": not bad, "detail": "; ".join(bad)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


SUITE_SECONDS = 130  # the merge part's own deadline, under the GPU suite's limit for it (150 s)


def gpu_suite(device: torch.device, quick: bool) -> dict:
    """The merge kernels' part of ``vfuse bench gpu``: checks, rows and targets (see bench/gpu_suite.py).

    Full (a GPU): 2 × 268M and 3 × 4096×11008 bf16 with bf16-quantised deltas, TIES at densities
    0.01/0.3/0.5/0.9 against mergekit's op sequence and a torch.topk threshold, task arithmetic /
    linear / DARE against torch.compile, 8 Llama-7B layers through ``delta_merge_foreach``; then,
    while time is left, every method against the fp64 reference, one tensor of more than 2^31
    elements, launch-configuration variants and the TIES merge kernel with each of its parts
    switched off (``MERGE_ABLATIONS``). Each step that fails becomes a failed check and
    the others still run. Quick: the same at tiny sizes (CPU), no torch.compile.
    """
    import time

    deadline = time.monotonic() + SUITE_SECONDS
    on_gpu, full = device.type == "cuda", device.type == "cuda" and not quick
    shapes = ([("2x268M", 1 << 28, 2), ("3x4096x11008", 4096 * 11008, 3)] if not quick
              else [("2x65536", 1 << 16, 2), ("3x64x172", 64 * 172, 3)])
    result = {"checks": [], "rows": [], "targets": []}

    def step(name, fn, optional=False):
        if optional and time.monotonic() > deadline:
            result["checks"].append({"name": name, "passed": False, "detail": "skipped: the merge part's time ran out"})
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported as a failed check, the other steps still run
            result["checks"].append({"name": name, "passed": False, "detail": f"{type(exc).__name__}: {exc}"[:500]})
        finally:
            if on_gpu:
                torch.cuda.empty_cache()

    copy_gbps = []
    for label, numel, n in shapes:
        step(f"merge timings {label}", lambda: _shape_part(result, label, numel, n, device, full, copy_gbps))
    step("merge timings, foreach", lambda: _foreach_part(result, device, quick, copy_gbps[0]))
    step("slerp", lambda: _slerp_part(result, device, quick, copy_gbps[0]))
    if on_gpu:
        step("delta_merge vs fp64 reference", lambda: result["checks"].extend(_parity_checks(device)), True)
    if full:
        step("TIES selection profile", lambda: result["rows"].extend(_selection_profile_rows(device)), True)
        step("delta_merge on more than 2^31 elements", lambda: result["checks"].append(_huge_tensor_check(device)),
             True)
        step("launch variants", lambda: result["rows"].extend(_variant_rows(device, copy_gbps[0])), True)
    return result


def _shape_part(result, label, numel, n, device, full, copy_gbps) -> None:
    """One shape's copy row, selection checks, rows and targets, appended to ``result``."""
    base, tuned = tie_heavy_inputs(numel, n, torch.bfloat16, device)
    result["rows"].append(_copy_row(label, base, device, reps=3))
    copy_gbps.append(result["rows"][-1]["GB/s"])
    for p in DENSITIES:
        thresholds = vk.ties_thresholds(base, tuned, p)
        failure = selection_is_exact(base, tuned, [p] * n, thresholds)
        result["checks"].append({"name": f"TIES selection exact, {label} bf16 tie-heavy, density {p}",
                                 "passed": not failure, "detail": failure or "keys {} cutoffs {}".format(
                                     thresholds.keys.tolist(), thresholds.cutoffs.tolist())})
    dense_shape = label.startswith("2x")
    methods = list(vk.METHODS) if dense_shape else ["task_arithmetic", "ties"]
    rows, times = _merge_rows(label, base, tuned, device, methods, DENSITIES, 3, True, full and dense_shape,
                              copy_gbps[-1])
    result["rows"] += rows
    ta, targets = times[("task_arithmetic", "vfuse", None)], result["targets"]
    for p in DENSITIES:
        ties, sel = times[("ties", "vfuse", p)], times[("ties", "vfuse thresholds only", p)]
        targets.append(_target(f"ties / task_arithmetic time, {label} bf16, density {p}", ties / ta, "<= 2.5"))
        targets.append(_target(f"ties speedup vs mergekit ops, {label} bf16, density {p}",
                               times[("ties", "mergekit ops", p)] / ties, ">= 10"))
        targets.append(_target(f"ties selection speedup vs torch.topk threshold, {label} bf16, density {p}",
                               times[("ties", "torch.topk thresholds", p)] / sel, ">= 3"))
    if dense_shape:
        for method, p in (("task_arithmetic", None), ("linear", None), ("dare_linear", 0.3)):
            value = times.get((method, "torch.compile", p), float("nan")) / times[(method, "vfuse", p)]
            targets.append(_target(f"{method} speedup vs torch.compile, {label} bf16", value, ">= 1.0"))


def _foreach_part(result, device, quick, copy_gbps) -> None:
    rows, pct = _foreach_rows(device, quick, copy_gbps)
    result["rows"] += rows
    result["targets"].append(_target("delta_merge_foreach task_arithmetic % of copy, 8 Llama-7B layers × 2 bf16"
                                     if not quick else "delta_merge_foreach task_arithmetic % of copy (quick sizes)",
                                     pct, ">= 75"))


def eager_slerp(a, b, t: float):
    """slerp as eager torch writes it (mergekit's formula on fp32 copies), in a's dtype."""
    x, y = a.float(), b.float()
    na, nb = x.norm(), y.norm()
    cos = ((x / torch.where(na > 1e-8, na, 1)) * (y / torch.where(nb > 1e-8, nb, 1))).sum().clamp(-1, 1)
    theta = torch.acos(cos)
    linear = cos.abs() > 0.9995
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta))
    cb = torch.where(linear, t, torch.sin(t * theta) / torch.sin(theta))
    return (ca * x + cb * y).to(a.dtype)


def _slerp_part(result, device, quick, copy_gbps) -> None:
    """``vk.slerp`` against its fp64 reference (every dtype, awkward sizes), then timed at a
    Llama-7B MLP weight (4096×11008 bf16) against eager torch and torch.compile of the same
    formula; GB/s from its ideal traffic (two passes: a and b read twice, out written once)."""
    from ..reference.slerp import slerp as reference_slerp

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for numel in (1, 4099, 1 << 20):
            a, b = tie_heavy_inputs(numel, 1, dtype, device, seed=numel)
            b = b[0]
            got, expected = vk.slerp(a, b, 0.3).double(), reference_slerp(a, b, 0.3)
            # one rounding to the dtype, plus fp32 arithmetic error on the scale of the values
            allowed = torch.finfo(dtype).eps * expected.abs() + 16 * 2**-23 * max(1.0, expected.abs().max().item())
            excess = ((got - expected).abs() - allowed).max().item()
            result["checks"].append({"name": f"slerp vs fp64 reference, {numel} {str(dtype)[6:]}",
                                     "passed": excess <= 0, "detail": f"max error {(got - expected).abs().max():.3g}"})
    numel = 4096 * 11008 if not quick else 64 * 172
    a, (b,) = tie_heavy_inputs(numel, 1, torch.bfloat16, device)
    gb = 5 * numel * a.element_size() / 1e9
    impls = [("vfuse", lambda: vk.slerp(a, b, 0.3)), ("eager fp32", lambda: eager_slerp(a, b, 0.3))]
    if device.type == "cuda" and not quick:
        compiled, seconds = _compiled(lambda x, y: eager_slerp(x, y, 0.3), (a, b))
        impls.append(("torch.compile", lambda: compiled(a, b)))
    for impl, fn in impls:
        timed = _timed(fn, device, 5)
        result["rows"].append({"op": "slerp", "suite": "merge", "shape": "4096x11008" if not quick else "64x172",
                               "method": "slerp", "impl": impl, "numel": numel, "dtype": "bfloat16", **timed,
                               "GB/s": gb / timed["median_ms"] * 1e3,
                               "pct_of_copy": 100 * gb / timed["median_ms"] * 1e3 / copy_gbps})


def _foreach_rows(device, quick, copy_gbps):
    """Task arithmetic over 8 Llama-7B decoder layers (56 tensors, 1.6G elements, 2 fine-tunes):
    one foreach launch vs one delta_merge per tensor."""
    layers, scale = (8, 1) if not quick else (2, 64)
    shapes = [(r // scale, c // scale) for _ in range(layers) for r, c in LLAMA_7B_LAYER]
    cases = [tie_heavy_inputs(r * c, 2, torch.bfloat16, device, seed=j) for j, (r, c) in enumerate(shapes)]
    bases, tuned = [b.reshape(s) for (b, _), s in zip(cases, shapes)], [[t.reshape(s) for t in ts]
                                                                          for (_, ts), s in zip(cases, shapes)]
    outs = [torch.empty_like(b) for b in bases]
    elements = sum(b.numel() for b in bases)
    gb = 4 * elements * 2 / 1e9
    fused = _time(lambda: vk.delta_merge_foreach(bases, tuned, [0.5, 0.5], outs=outs), device)
    loop = _time(lambda: [vk.delta_merge(b, t, [0.5, 0.5], out=o) for b, t, o in zip(bases, tuned, outs)], device)
    rows = [{"op": "delta_merge", "suite": "merge", "shape": f"{len(shapes)} tensors, {elements} elements",
             "method": "task_arithmetic", "impl": impl, "models": 2, "numel": elements, "dtype": "bfloat16",
             "median_ms": ms, "GB/s": gb / ms * 1e3, "pct_of_copy": 100 * gb / ms * 1e3 / copy_gbps}
            for impl, ms in (("vfuse foreach", fused), ("vfuse per tensor", loop))]
    return rows, rows[0]["pct_of_copy"]


def _selection_profile_rows(device, shapes=(("2x268M", 1 << 28, 2), ("3x4096x11008", 4096 * 11008, 3))
                            ) -> list[dict]:
    """Where a TIES call's time goes (``profile_rows``): ``ties_thresholds`` and
    ``delta_merge(method="ties")`` at both suite shapes."""
    rows = []
    for label, numel, n in shapes:
        base, tuned = tie_heavy_inputs(numel, n, torch.bfloat16, device)
        for what, fn in (("ties_thresholds", lambda: vk.ties_thresholds(base, tuned, 0.3)),
                         ("delta_merge ties", lambda: vk.delta_merge(base, tuned, [0.5] * n, method="ties",
                                                                     density=0.3))):
            rows += profile_rows(fn, device, {"op": "profile", "suite": "merge", "shape": label, "method": what})
        del base, tuned
    return rows


def _variant_rows(device, copy_gbps, numel: int = 1 << 28, sample_sizes=(1 << 19, 1 << 20, 1 << 21)):
    """Launch-configuration variants timed in the same run (for NOTES.md; not used for dispatch), and
    the selection with samples of ``sample_sizes`` keys."""
    from ..triton import delta_merge as kernels
    from ..triton import magnitude_select as select_kernels

    base, tuned = tie_heavy_inputs(numel, 2, torch.bfloat16, device)
    out = torch.empty_like(base)
    gb = 4 * base.numel() * 2 / 1e9
    rows = []
    saved = kernels.BLOCK, kernels.NUM_WARPS, select_kernels.NUM_WARPS
    selector = select_kernels.DeviceSelector
    block_size, sample_size, order_statistics = selector.BLOCK, selector.sample_size, selector.order_statistics
    try:
        trim = tuple(vk.ties_thresholds(base, tuned, 0.3))
        merges = (("task_arithmetic", {}, "", ((1024, 4), (2048, 8), (4096, 8))),
                  ("ties", {"density": 0.3, "thresholds": trim}, ", thresholds given",
                   ((1024, 4), (512, 2), (1024, 8))))
        for method, options, note, configs in merges:
            for block, warps in configs:
                kernels.BLOCK, kernels.NUM_WARPS = block, warps
                ms = _time(lambda: vk.delta_merge(base, tuned, [0.5, 0.5], method=method, out=out, **options), device)
                rows.append({"op": "delta_merge", "suite": "merge", "shape": "2x268M", "method": method,
                             "impl": f"variant BLOCK={block} warps={warps}{note}", "median_ms": ms,
                             "GB/s": gb / ms * 1e3, "pct_of_copy": 100 * gb / ms * 1e3 / copy_gbps})
        kernels.BLOCK, kernels.NUM_WARPS = saved[0], saved[1]
        rows += _merge_ablation_rows(base, tuned, trim, out, device, copy_gbps)
        for block, warps in ((1024, 4), (2048, 4), (4096, 4), (4096, 8)):
            selector.BLOCK, select_kernels.NUM_WARPS = block, warps
            ms = _time(lambda: vk.ties_thresholds(base, tuned, 0.3), device)
            rows.append({"op": "ties_thresholds", "suite": "merge", "shape": "2x268M", "method": "ties",
                         "impl": f"variant selection BLOCK={block} warps={warps}", "median_ms": ms,
                         "GB/s": 3 * base.numel() * 2 / ms / 1e6})
            rows += _bracket_rows(base, tuned, device, copy_gbps, f" BLOCK={block} warps={warps}",
                                  full=(block, warps) == (1024, 4))
        selector.BLOCK, select_kernels.NUM_WARPS = block_size, saved[2]
        for size in sample_sizes:
            selector.sample_size = lambda self, numel, size=size: size
            ms = _time(lambda: vk.ties_thresholds(base, tuned, 0.3), device)
            rows.append({"op": "ties_thresholds", "suite": "merge", "shape": "2x268M", "method": "ties",
                         "impl": f"variant sample of {size} keys", "median_ms": ms})
        selector.sample_size = sample_size
        selector.order_statistics = selector.sorted_statistics  # the bracket ends as v0.14 found them
        for density in (0.01, 0.3):
            ms = _time(lambda: vk.ties_thresholds(base, tuned, density), device)
            rows.append({"op": "ties_thresholds", "suite": "merge", "shape": "2x268M", "method": "ties",
                         "density": density, "impl": "variant the sample's order statistics by torch.sort",
                         "median_ms": ms})
    finally:
        kernels.BLOCK, kernels.NUM_WARPS, select_kernels.NUM_WARPS = saved
        selector.BLOCK, selector.sample_size, selector.order_statistics = block_size, sample_size, order_statistics
    return rows


def ncu_workload(numel: int = 1 << 28, device: str = "cuda") -> list[torch.Tensor]:
    """What the GPU suite's ncu part profiles, in a child process under ncu: on 2 × ``numel`` bf16
    tie-heavy inputs, the TIES selection at density 0.3 (its bracket pass), then the TIES merge
    kernel given those thresholds, then task arithmetic's merge kernel — one launch each. Returns
    the two merges."""
    base, tuned = tie_heavy_inputs(numel, 2, torch.bfloat16, torch.device(device))
    trim = tuple(vk.ties_thresholds(base, tuned, 0.3))
    outs = [torch.empty_like(base) for _ in range(2)]
    for out, codes in zip(outs, ((1, 1, True), (0, 0, False))):
        _merge_kernel_call(out, base, tuned, trim, *codes)
    return outs


def _merge_kernel_call(out, base, tuned, trim, sparsify, elect, normalize):
    """The Triton merge kernel alone, every weight and coefficient 0.5: with the TIES thresholds
    ``trim`` (keys, cutoffs) where ``sparsify`` is the trim code."""
    from ..triton import delta_merge as kernels

    n = len(tuned)
    kernels.merge(out, base, tuned, False, sparsify, elect, normalize, 1.0, [0.5] * n, [0.5] * n, [0] * n,
                  trim if sparsify else None, 0)


MERGE_ABLATIONS = (  # (name, sparsify code, elect code, normalize[, models up to which the inverse is selected]):
    # the TIES merge kernel, one part removed at a time, and the inverse by an indexed load (the kernel before v0.13)
    ("TIES merge kernel (trim, elect, normalise)", 1, 1, True), ("without normalising", 1, 1, False),
    ("trim only", 1, 0, False), ("elect and normalise, no trim", 0, 1, True), ("task arithmetic", 0, 0, False),
    ("TIES merge kernel, the inverse by an indexed load", 1, 1, True, 0))


def _merge_ablation_rows(base, tuned, trim, out, device, copy_gbps):
    """The merge kernel alone with the TIES thresholds ``trim`` (keys, cutoffs), each part of TIES
    switched off in turn (the same bytes every time): which part keeps it from memory speed."""
    from ..triton import delta_merge as kernels

    gb = (len(tuned) + 2) * base.numel() * base.element_size() / 1e9
    rows = []
    select_models = kernels.INVERSE_SELECT_MODELS
    try:
        for name, sparsify, elect, normalize, *select in MERGE_ABLATIONS:
            kernels.INVERSE_SELECT_MODELS = select[0] if select else select_models
            ms = _time(lambda: _merge_kernel_call(out, base, tuned, trim, sparsify, elect, normalize), device)
            rows.append({"op": "merge_kernel", "suite": "merge", "shape": "2x268M", "method": "ties",
                         "impl": f"ablation: {name}", "median_ms": ms, "GB/s": gb / ms * 1e3,
                         "pct_of_copy": 100 * gb / ms * 1e3 / copy_gbps})
    finally:
        kernels.INVERSE_SELECT_MODELS = select_models
    return rows


def _bracket_rows(base, tuned, device, copy_gbps, config="", full=True):
    """The bracket pass alone at density 0.3 (its bracket from the real sample); with ``full``,
    beside the same launch with no element picked for compaction (rate 0: the block scan, no slot
    atomics) and with an empty bracket (lo = hi: counting only) — what compaction and counting cost."""
    from .. import selection
    from ..triton import magnitude_select as select_kernels

    numel = base.numel()
    selector = select_kernels.selector(base, tuned, False)
    models = [selection._Model(int(0.3 * numel), numel) for _ in tuned]
    for model, row in zip(models, selector.sample(selector.sample_size(numel))):
        model.sample, model.sorted = row, selector.SAMPLE_SORTED
    brackets = selection._brackets(models, selector)
    lo, hi = (select_kernels._stack([b[j] for b in brackets], device) for j in (0, 1))
    cap = selection._capacity(max(b[2] for b in brackets), numel)
    block = selector.BLOCK
    counts, cand, fill, _ = selector.pass_buffers(len(tuned), cap)
    gb = (1 + len(tuned)) * numel * base.element_size() / 1e9
    rows = []
    variants = (("bracket pass", hi, selection.FULL_RATE), ("bracket pass, rate 0 (no compaction)", hi, 0),
                ("bracket pass, lo = hi (counting only)", lo, selection.FULL_RATE))
    for name, hi_t, rate in variants if full else variants[:1]:
        rate_t = torch.full((len(tuned),), rate, dtype=torch.int64, device=device)

        def run(hi_t=hi_t, rate_t=rate_t):
            fill.zero_()
            select_kernels.bracket_pass(base, tuned, lo, hi_t, rate_t, cap, block, False, counts, cand, fill)
        ms = _time(run, device)
        rows.append({"op": "bracket_pass", "suite": "merge", "shape": "2x268M", "method": "ties", "impl": name + config,
                     "median_ms": ms, "GB/s": gb / ms * 1e3, "pct_of_copy": 100 * gb / ms * 1e3 / copy_gbps})
    return rows


if __name__ == "__main__":
    main()
