"""Multi-encoder token fusion benchmark (select_tokens, project_concat, query_key_scores) and the
``tokens`` part of the GPU suite (``gpu_suite``).

project_concat rows: M encoders × N tokens (D → H → H projector MLPs, exact GELU as LLaVA's
``"gelu"``), batch B, keep ratio; each encoder's tokens are pruned to keep·N by precomputed scores
(selection included in every implementation) and projected into one [B, ΣK, H] sequence.
Implementations: ``vfuse`` (select_encoder_tokens — every encoder in one launch on CUDA — +
project_concat), ``eager`` (topk + sort + gather +
projector per encoder + torch.cat, what LLaVA-style code does), ``torch.compile`` of the eager function (compiled once per shape,
``dynamic=False``, warm; its compile time is reported as ``compile_s``) and ``GEMM`` — the same
two matmuls stacked over all encoders' rows, pre-gathered and contiguous (torch.mm: cuBLAS /
oneDNN; fp32 on a CPU without native bf16, as the library computes there): the rate limit,
measured in the same run. TFLOP/s from 2·B·ΣK·(D·H + H·H); ``pct_of_gemm`` = GEMM time /
implementation time.

select_tokens rows: ``vfuse`` vs one ``torch.topk`` of the same [B, N] fp32 scores (k = N/2 or
N/4, ``sorted=True`` as eager code calls it); ``ratio_vs_topk`` = vfuse time / topk time.

query_key_scores rows: Lq = Nk = L, H heads of d, bf16; ``vfuse`` (and its two passes alone:
``pass 1: row lse``, ``pass 2: key sums``) vs the SDPA flash-attention forward at the same shape
(``F.scaled_dot_product_attention`` restricted to the flash backend, v = a third [B, H, L, d]
tensor) and, in the CLI, eager attention with weights (softmax(q·kᵀ·scale) materialised, then the
mean). Peak memory above the inputs: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the
estimate of the temporaries, marked ``peak_source=estimate``.

    python -m vfuse_kernels.bench.tokens                       # GPU when available (full grid)
    python -m vfuse_kernels.bench.tokens --quick --device cpu  # seconds-to-minutes smoke run
"""
from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import math
import time

import torch
import torch.nn.functional as F

import vfuse_kernels as vk
from .._backend import triton_interpreted
from ..reference import project_concat as ref_project
from ..reference import query_key_scores as ref_scores
from ..reference import select_tokens as ref_select
from .common import environment, print_table, profile_rows, time_ms, write_json

PC = importlib.import_module("vfuse_kernels.ops.project_concat")  # the module (the package exports the function)
QK = importlib.import_module("vfuse_kernels.ops.query_key_scores")
GEMM = "GEMM (torch.mm)"
SDPA = "SDPA flash fwd"

PROJECT_COLUMNS = ["M", "N", "D", "H", "B", "keep", "impl", "median_ms", "TFLOP/s", "pct_of_gemm", "gemm_dtype",
                   "speedup_vs_eager", "speedup_vs_compile", "compile_s"]
SELECT_COLUMNS = ["B", "N", "k", "impl", "median_ms", "ratio_vs_topk"]
SCORE_COLUMNS = ["L", "H", "d", "impl", "median_ms", "TFLOP/s", "peak_MB", "peak_source", "speedup_vs_eager",
                 "ratio_vs_sdpa"]


class Projector(torch.nn.Module):
    def __init__(self, d, h, dtype, device):
        super().__init__()
        self.linear_1 = torch.nn.Linear(d, h, dtype=dtype, device=device)
        self.act = torch.nn.GELU()
        self.linear_2 = torch.nn.Linear(h, h, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def eager_select_project(features, scores, projectors, ks):
    """What LLaVA-style code does today: top-k + sort per encoder, gather, projector, concat."""
    outs = []
    for x, s, proj, k in zip(features, scores, projectors, ks):
        if k < x.shape[1]:
            idx = torch.topk(s, k, dim=1).indices.sort(dim=1).values
            x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[2]))
        outs.append(proj(x))
    return torch.cat(outs, dim=1)


def vfuse_select_project(features, scores, projectors, ks):
    """select_encoder_tokens of Σks (every encoder's selection in one launch on CUDA; a case's
    encoders share N, so the proportional split is ``ks``), then project_concat; keep 1: no selection."""
    keep = None if all(k == x.shape[1] for x, k in zip(features, ks)) else vk.select_encoder_tokens(scores, sum(ks))
    return vk.project_concat(features, projectors, keep=keep)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled(fn, device, *args, backend="inductor"):
    """(compiled ``fn`` warm on ``args``, compile seconds): one compiled graph for this shape — dynamo's
    caches are reset first and a recompile raises instead of silently running eager."""
    torch._dynamo.reset()
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # torch ≥ 2.6
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    compiled_fn = torch.compile(fn, dynamic=False, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        compiled_fn(*args)
        _sync(device)
        seconds = time.perf_counter() - start
        compiled_fn(*args)
    return compiled_fn, seconds


def project_case(m, n, batch, keep, d, h, dtype, device, seed=0) -> dict:
    """Inputs of one project_concat configuration (same data for every implementation)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        projectors = [Projector(d, h, dtype, device).requires_grad_(False) for _ in range(m)]
        features = [torch.randn(batch, n, d, generator=gen).to(device, dtype) for _ in range(m)]
        scores = [torch.rand(batch, n, generator=gen).to(device) for _ in range(m)]
    k = max(1, int(keep * n))
    return dict(M=m, N=n, B=batch, keep=keep, D=d, H=h, dtype=dtype, device=device, projectors=projectors,
                features=features, scores=scores, ks=[k] * m, rows=batch * k * m, gen=gen)


def bench_project(case, impl_names, reps, compile_backend="inductor") -> list[dict]:
    """Rows of the implementations in ``impl_names`` for one configuration."""
    device, d, h, rows = case["device"], case["D"], case["H"], case["rows"]
    args = (case["features"], case["scores"], case["projectors"], case["ks"])
    flops = 2 * rows * (d * h + h * h)
    gemm_dtype = PC.compute_dtype(case["dtype"], device)  # the dtype the library's matmuls use on this device
    extra = {}

    def gemm_fn():
        gathered = torch.randn(rows, d, generator=case["gen"]).to(device, gemm_dtype)
        w1, w2 = (p.weight.to(gemm_dtype) for p in (case["projectors"][0].linear_1, case["projectors"][0].linear_2))
        hidden = torch.empty(rows, h, device=device, dtype=gemm_dtype)
        out = torch.empty(rows, h, device=device, dtype=gemm_dtype)

        def gemm():
            torch.mm(gathered, w1.t(), out=hidden)
            torch.mm(hidden, w2.t(), out=out)
        return gemm

    def compile_fn():
        fn, extra["compile_s"] = compiled(eager_select_project, device, *args, backend=compile_backend)
        return lambda: fn(*args)

    impls = {GEMM: gemm_fn, "vfuse": lambda: lambda: vfuse_select_project(*args),
             "eager": lambda: lambda: eager_select_project(*args), "torch.compile": compile_fn}
    result = []
    with torch.no_grad():
        for impl in impl_names:
            fn = impls[impl]()
            median, p20, p80 = time_ms(fn, device, reps=reps)
            row = {"op": "project_concat", "M": case["M"], "N": case["N"], "B": case["B"], "keep": case["keep"], "D": d,
                   "H": h, "dtype": str(case["dtype"]).removeprefix("torch."), "gemm_dtype": str(gemm_dtype)[6:],
                   "impl": impl, "median_ms": median, "p20_ms": p20, "p80_ms": p80, "TFLOP/s": flops / median / 1e9}
            if impl == "torch.compile":
                row["compile_s"] = extra["compile_s"]
            result.append(row)
    return add_ratios(result)


def add_ratios(rows: list[dict]) -> list[dict]:
    """pct_of_gemm and the vfuse speedups, per configuration; rows come back grouped by configuration."""
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        configs.setdefault(tuple(r[k] for k in ("M", "N", "D", "H", "B", "keep")), []).append(r)
    ordered = []
    for group in configs.values():
        times = {r["impl"]: r["median_ms"] for r in group}
        for r in group:
            if GEMM in times:
                r["pct_of_gemm"] = 100.0 * times[GEMM] / r["median_ms"]
            if r["impl"].startswith("vfuse"):
                if "eager" in times:
                    r["speedup_vs_eager"] = times["eager"] / r["median_ms"]
                if "torch.compile" in times:
                    r["speedup_vs_compile"] = times["torch.compile"] / r["median_ms"]
        ordered += group
    return ordered


def bench_select(batch, n, k, device, reps) -> list[dict]:
    """vfuse select_tokens vs one torch.topk on the same fp32 scores."""
    scores = torch.rand(batch, n, generator=torch.Generator().manual_seed(n)).to(device)
    rows = []
    impls = (("vfuse", lambda: vk.select_tokens(scores, k)), ("torch.topk", lambda: torch.topk(scores, k, dim=1)))
    for impl, fn in impls:
        median, p20, p80 = time_ms(fn, device, reps=reps)
        rows.append({"op": "select_tokens", "B": batch, "N": n, "k": k, "dtype": "float32", "impl": impl,
                     "median_ms": median, "p20_ms": p20, "p80_ms": p80})
    rows[0]["ratio_vs_topk"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    return rows


def eager_scores(q, k, scale):
    """Attention with weights, as an eager attention layer with output_attentions computes it."""
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32)
    return weights.mean(dim=(1, 2))


def sdpa_flash(q, k, v):
    """The SDPA forward on the flash-attention backend (the reference speed of a q·kᵀ sweep)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def _peak(fn, device, estimate):
    """(MB above what is allocated before the call, source)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "measured"
    fn()
    return estimate / 2**20, "estimate"


def bench_scores(length, heads, d, dtype, device, reps, impl_names) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, length, d, generator=gen).to(device, dtype) for _ in range(3))
    scale = d**-0.5
    logits = heads * length * length
    # CPU path temporaries: one chunk of fp32 logits and probabilities, the fp32 k (+ transpose) and q chunk
    chunk_rows = min(length, max(1, QK.CHUNK_ELEMENTS // (heads * length)))
    vfuse_estimate = chunk_rows * heads * (length * 4 * 2 + d * 4) + 2 * k.numel() * 4
    lse_bytes = 4 * heads * length
    impls = {"vfuse": (lambda: vk.query_key_scores(q, k, scale=scale), vfuse_estimate, 2),
             SDPA: (lambda: sdpa_flash(q, k, v), q.numel() * q.element_size(), 2),
             "eager (weights)": (lambda: eager_scores(q, k, scale), logits * (q.element_size() + 4), 1)}
    if "vfuse passes" in impl_names and not (device.type == "cuda" or triton_interpreted()):
        impl_names = [i for i in impl_names if i != "vfuse passes"]  # Triton cannot run on this device
    if "vfuse passes" in impl_names:  # the two Triton sweeps alone (what an LSE from elsewhere would save)
        kernels = importlib.import_module("vfuse_kernels.triton.query_key_scores")
        lse = kernels.row_lse(q, k, scale)
        impls["pass 1: row lse"] = (lambda: kernels.row_lse(q, k, scale), lse_bytes, 1)
        impls["pass 2: key sums"] = (lambda: kernels.key_sums(q, k, lse, scale), 4 * heads * length, 1)
        impl_names = [i for i in impl_names if i != "vfuse passes"] + ["pass 1: row lse", "pass 2: key sums"]
    rows = []
    for impl in impl_names:
        fn, estimate, gemms = impls[impl]
        row = {"op": "query_key_scores", "L": length, "H": heads, "d": d, "dtype": str(dtype).removeprefix("torch."),
               "impl": impl}
        try:
            with torch.no_grad():
                peak, source = _peak(fn, device, estimate)
                median, p20, p80 = time_ms(fn, device, reps=reps)
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80, peak_MB=peak, peak_source=source,
                       **{"TFLOP/s": 2 * gemms * logits * d / median / 1e9})
        except torch.OutOfMemoryError:
            row.update(median_ms=None, peak_MB=None, peak_source="OOM")
            torch.cuda.empty_cache()
        rows.append(row)
    times = {r["impl"]: r["median_ms"] for r in rows}
    for r in rows:
        if r["impl"] == "vfuse" and r["median_ms"]:
            if times.get("eager (weights)"):
                r["speedup_vs_eager"] = times["eager (weights)"] / r["median_ms"]
            if times.get(SDPA):
                r["ratio_vs_sdpa"] = r["median_ms"] / times[SDPA]
    return rows


# --------------------------------------------------------------------------------------------- GPU suite

# (label, M, N, D, H, B, keep) at full size; quick mode keeps the labels with tiny sizes
SUITE_GRID = [("LLaVA-7B", 3, 576, 1024, 4096, 8, 0.5), ("B1 keep 0.25", 2, 576, 1024, 4096, 1, 0.25),
              ("SigLIP B1 keep 1", 2, 729, 1152, 5120, 1, 1.0), ("anyres B8 keep 0.25", 3, 2880, 1024, 5120, 8, 0.25),
              ("B8 keep 1", 2, 576, 1152, 4096, 8, 1.0)]
QUICK_GRID = [("LLaVA-7B", 3, 13, 16, 32, 2, 0.5), ("B1 keep 0.25", 2, 13, 16, 32, 1, 0.25),
              ("SigLIP B1 keep 1", 2, 9, 24, 40, 1, 1.0), ("anyres B8 keep 0.25", 3, 29, 16, 40, 2, 0.25),
              ("B8 keep 1", 2, 13, 24, 32, 2, 1.0)]
SUITE_SELECT = [(8, 576, 288), (8, 2880, 720)]
QUICK_SELECT = [(2, 37, 18), (2, 90, 22)]
SUITE_LENGTHS = {8192: 8192, 16384: 16384}  # target length → benchmarked length
QUICK_LENGTHS = {8192: 32, 16384: 48}
TIME_BUDGET_S = 75.0  # the GPU suite gives this part 90 s, process start and imports included
# seconds of the budget a step needs to start (H100 estimates: a torch.compile of the eager function;
# the checks' Triton compiles — ~1 s per bf16/fp16 kernel variant, 3–7 s per fp32 one)
RESERVE_S = {"torch.compile": 30.0, "project_concat": 3.0, "select_tokens": 8.0, "query_key_scores": 15.0}
TARGETS = [  # (name, comparison, threshold)
    ("project_concat LLaVA-7B: speedup vs eager", ">=", 1.3),
    ("project_concat LLaVA-7B: speedup vs torch.compile", ">=", 1.1),
    ("project_concat LLaVA-7B: % of the stacked cuBLAS GEMM rate", ">=", 75.0),
    ("project_concat: min speedup vs eager over the suite grid", ">=", 1.0),
    ("select_tokens: time / torch.topk time (max over shapes)", "<=", 1.5),
    ("query_key_scores: time / SDPA flash forward, L=8192", "<=", 1.5),
    ("query_key_scores: time / SDPA flash forward, L=16384", "<=", 1.5),
]


def _check(name: str, fn) -> dict:
    """A check entry from ``fn() -> (passed, detail)``; an exception fails it with its message."""
    try:
        passed, detail = fn()
    except Exception as exc:  # noqa: BLE001 - a failed check, the suite goes on
        passed, detail = False, f"{type(exc).__name__}: {exc}"[:500]
    return {"name": name, "passed": bool(passed), "detail": detail}


def _compare(out: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> tuple[bool, str]:
    out, expected = out.double().cpu(), expected.double().cpu()
    if out.shape != expected.shape:
        return False, f"shape {tuple(out.shape)} != {tuple(expected.shape)}"
    err = (out - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    ok = bool(torch.isfinite(out).all()) and worst <= 1.0
    return ok, f"max |err| {err.max().item() if err.numel() else 0:.3g}, {worst:.2f} of the tolerance"


def _project_checks(device) -> list[dict]:
    """Each dtype: 3 encoders of awkward sizes (a two-layer one, a one-token one), erf and tanh GELU,
    random keep with repeats, batch 3 (temporary + copy) and batch 1 (GEMM into the output), CLS-cropped
    views; bias-free tanh projectors; fp32 erf vs tanh resolved."""
    checks = []
    eps32 = torch.finfo(torch.float32).eps

    def case(dtype, batch, bias=True, tanh_all=False, cropped=False, seed=0):
        gen = torch.Generator().manual_seed(seed)
        specs = [(13, [40], 48), (7, [24, 16], 32), (1, [24], 16)]  # (N, layer widths, H1)
        feats, projs, keeps, weights = [], [], [], []
        for j, (n, dims, h1) in enumerate(specs):
            layers = [torch.randn(batch, n + cropped, dd, generator=gen).to(device, dtype)[:, int(cropped):]
                      for dd in dims]
            tanh = tanh_all or j % 2 == 1
            proj = torch.nn.Module()
            proj.linear_1 = torch.nn.Linear(sum(dims), h1, bias=bias, dtype=dtype, device=device)
            proj.act = torch.nn.GELU(approximate="tanh" if tanh else "none")
            proj.linear_2 = torch.nn.Linear(h1, 24, bias=bias, dtype=dtype, device=device)
            with torch.no_grad():
                for p in (*proj.linear_1.parameters(), *proj.linear_2.parameters()):
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1] if p.dim() == 2 else 4))
            feats.append(layers[0] if len(layers) == 1 else layers)
            projs.append(proj)
            keeps.append(torch.randint(0, n, (batch, max(1, (2 * n) // 3)), generator=gen).to(device))
            weights.append((proj.linear_1.weight, proj.linear_1.bias, proj.linear_2.weight, proj.linear_2.bias,
                            2 if tanh else 1))
        return feats, projs, keeps, weights

    def run(dtype, **kw):
        def fn():
            feats, projs, keeps, weights = case(dtype, **kw)
            with torch.no_grad():
                out = vk.project_concat(feats, projs, keep=keeps)
            expected = ref_project.project_concat(feats, weights, keeps)
            eps = torch.finfo(dtype).eps
            scale = expected.abs().max().item()
            return _compare(out, expected, 2 * eps, (2 * eps + 4 * math.sqrt(64) * eps32) * scale)
        return fn

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        checks.append(_check(f"project_concat vs reference, {name}, 3 encoders (layers, keep), batch 3",
                             run(dtype, batch=3, seed=1)))
        checks.append(_check(f"project_concat vs reference, {name}, batch 1", run(dtype, batch=1, seed=2)))
        checks.append(_check(f"project_concat vs reference, {name}, CLS-cropped views, no bias, tanh",
                             run(dtype, batch=2, bias=False, tanh_all=True, cropped=True, seed=3)))

    def variant():
        feats, projs, keeps, weights = case(torch.float32, batch=2, tanh_all=True, seed=4)
        for p in projs:
            with torch.no_grad():
                p.linear_1.weight.mul_(6.0)  # |h| ≈ 2, where the two GELU forms differ most
        with torch.no_grad():
            out = vk.project_concat(feats, projs, keep=keeps).double().cpu()
        tanh = ref_project.project_concat(feats, weights, keeps).cpu()
        erf = ref_project.project_concat(feats, [(*w[:4], 1) for w in weights], keeps).cpu()
        err_tanh, err_erf = (out - tanh).abs().max().item(), (out - erf).abs().max().item()
        return err_tanh < 1e-4 * max(1.0, tanh.abs().max().item()) and err_erf > 10 * err_tanh, \
            f"max |err| vs tanh GELU {err_tanh:.3g}, vs erf GELU {err_erf:.3g}"
    checks.append(_check("project_concat applies the projector's GELU form (tanh, not erf), float32", variant))
    return checks


def _select_checks(device, quick) -> list[dict]:
    """Exact equality with the stable-sort reference: tie-heavy and random scores, NaN/±inf/−0, rows
    held in registers and rows longer than MAX_BLOCK (chunked)."""
    checks = []
    long_n = 150 if quick else 9001
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for label, shape in (("short rows", [(1, 1), (3, 13), (8, 577)]), ("long rows", [(2, 2880), (2, long_n)])):
            def fn(dtype=dtype, shapes=shape):
                wrong = []
                for b, n in shapes:
                    gen = torch.Generator().manual_seed(n)
                    for ties in (False, True):
                        if ties:
                            s = (torch.randint(0, 4, (b, n), generator=gen).to(dtype) * 0.5 - 0.75)
                        else:
                            s = torch.randn(b, n, generator=gen).to(dtype)
                        if n > 8:
                            s[0, 3], s[-1, 5], s[0, 7], s[-1, 1] = float("nan"), float("inf"), -0.0, float("-inf")
                        s = s.to(device)
                        for k in sorted({1, n // 4, n // 2 + 1, n - 1} - {0}):
                            if not torch.equal(vk.select_tokens(s, k).cpu(), ref_select.select_tokens(s, k).cpu()):
                                wrong.append(f"[{b}, {n}] ties={ties} k={k}")
                return not wrong, "all equal" if not wrong else "differs at " + ", ".join(wrong[:6])
            checks.append(_check(f"select_tokens == reference, {name}, {label}", fn))
    return checks


def _score_checks(device, quick) -> list[dict]:
    """Against the fp64 materialised softmax: bf16 on a query-subset view with GQA heads, d = 64/128/80,
    partial and full key tiles; fp32 and fp16 on one case each (every new dtype and d is a compile)."""
    eps32 = torch.finfo(torch.float32).eps
    cases = [("B2 H4 Lq 33 Nk 577 d64", 2, 4, 4, 33, 577, 64),
             ("GQA 32/8 heads, last 7 queries of 1000, d128", 1, 32, 8, 7, 1000, 128),
             ("d80, Nk 512 (full key tiles)", 1, 4, 2, 130, 512, 80)]
    if quick:
        cases = [(label, b, min(hq, 4), min(hkv, 2), min(lq, 9), min(nk, 37), min(d, 24))
                 for label, b, hq, hkv, lq, nk, d in cases]

    def run(dtype, b, hq, hkv, lq, nk, d):
        gen = torch.Generator().manual_seed(nk)
        q = torch.randn(b, hq, lq + 5, d, generator=gen).to(device, dtype)[:, :, 5:]  # a query subset view
        k = torch.randn(b, hkv, nk, d, generator=gen).to(device, dtype)
        rtol = 8 * (d + math.sqrt(nk)) * eps32
        return _compare(vk.query_key_scores(q, k), ref_scores.query_key_scores(q, k), rtol, rtol / nk)

    plan = [(torch.bfloat16, c) for c in cases] + [(torch.float32, cases[0]), (torch.float16, cases[1])]
    return [_check(f"query_key_scores vs reference, {str(dtype).removeprefix('torch.')}, {c[0]}",
                   functools.partial(run, dtype, *c[1:])) for dtype, c in plan]


def _host_rows(case, label, calls: int = 300) -> list[dict]:
    """Time per call of the pieces of a small (host-bound) select + project_concat call, each
    issued ``calls`` times back to back (one synchronisation at the end): where host time goes."""
    features, scores, projectors, ks = case["features"], case["scores"], case["projectors"], case["ks"]
    keep = [vk.select_tokens(s, k) for s, k in zip(scores, ks)]
    pieces = {"vk.select_tokens (one encoder)": lambda: vk.select_tokens(scores[0], ks[0]),
              "torch.topk (one encoder)": lambda: torch.topk(scores[0], ks[0], dim=1),
              "vk.select_encoder_tokens (every encoder, one launch)": lambda: vk.select_encoder_tokens(scores, sum(ks)),
              "project_concat argument checks": lambda: PC.check_inputs(features, projectors, keep),
              "vk.project_concat (keep given)": lambda: vk.project_concat(features, projectors, keep=keep),
              "eager projectors + cat (gathered rows given)": lambda: torch.cat(
                  [p(torch.gather(x, 1, kp[..., None].expand(-1, -1, x.shape[2])))
                   for x, p, kp in zip(features, projectors, keep)], dim=1),
              "select + project_concat (vfuse)": lambda: vfuse_select_project(features, scores, projectors, ks),
              "select + project_concat (eager)": lambda: eager_select_project(features, scores, projectors, ks)}
    rows = []
    with torch.no_grad():
        for name, fn in pieces.items():
            for _ in range(20):
                fn()
            _sync(case["device"])
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(case["device"])
            rows.append({"op": "host time", "config": label, "impl": name,
                         "median_ms": (time.perf_counter() - start) * 1e3 / calls})
    return rows


def _target(name: str, value: float | None) -> dict:
    comparison, threshold = next((c, t) for n, c, t in TARGETS if n == name)
    met = value is not None and math.isfinite(value) and (value >= threshold if comparison == ">=" else
                                                          value <= threshold)
    return {"area": "tokens", "name": name, "value": value if value is not None else float("nan"),
            "target": f"{comparison} {threshold:g}", "met": bool(met)}


def gpu_suite(device: torch.device, quick: bool) -> dict:
    """{"checks", "rows", "targets"} of the token ops on ``device`` (see the module docstring);
    ``quick``: tiny sizes (CPU, Triton interpreter) with the same check, row and target names.

    Order: the timings behind the targets first (project_concat grid, select_tokens, query_key_scores),
    then the torch.compile baseline and the checks, each only with its ``RESERVE_S`` of
    ``TIME_BUDGET_S`` left (what is left out becomes a failed check saying so; the pytest part of the
    suite checks the same ops too)."""
    start = time.monotonic()
    reps = 1 if quick else 7
    cpu = device.type == "cpu"
    checks, rows, values = [], [], {}

    speedups = []
    for label, m, n, dd, h, b, keep in QUICK_GRID if quick else SUITE_GRID:
        case = project_case(m, n, b, keep, dd, h, torch.bfloat16, device)
        impls = [GEMM, "vfuse", "eager"]
        grid_rows = bench_project(case, impls, reps)
        with torch.no_grad():
            ours = vfuse_select_project(case["features"], case["scores"], case["projectors"], case["ks"])
            eager = eager_select_project(case["features"], case["scores"], case["projectors"], case["ks"])
        checks.append(_check(f"select + project_concat == eager (bf16), {label}", lambda: _compare(
            ours, eager, 2 ** -6, 2 ** -6 * eager.abs().max().item())))
        vfuse_row = next(r for r in grid_rows if r["impl"] == "vfuse")
        speedups.append(vfuse_row["speedup_vs_eager"])
        if label == "LLaVA-7B":
            llava, llava_rows = case, grid_rows
            values["project_concat LLaVA-7B: speedup vs eager"] = vfuse_row["speedup_vs_eager"]
            values["project_concat LLaVA-7B: % of the stacked cuBLAS GEMM rate"] = vfuse_row["pct_of_gemm"]
            if not cpu:  # where the LLaVA-7B call's time goes, ours beside eager's
                args = case["features"], case["scores"], case["projectors"], case["ks"]
                with torch.no_grad():
                    for impl, fn in (("vfuse", vfuse_select_project), ("eager", eager_select_project)):
                        rows += profile_rows(lambda: fn(*args), device, {"op": "profile", "config": label,
                                                                         "method": f"select + project_concat {impl}"})
        else:
            rows += [dict(r, config=label) for r in grid_rows]
            if label == "B1 keep 0.25" and not cpu:
                rows += _host_rows(case, label)
        del case, ours, eager
    values["project_concat: min speedup vs eager over the suite grid"] = min(speedups)

    ratios = []
    for b, n, k in QUICK_SELECT if quick else SUITE_SELECT:
        select_rows = bench_select(b, n, k, device, reps)
        rows += select_rows
        ratios.append(select_rows[0]["ratio_vs_topk"])
    values["select_tokens: time / torch.topk time (max over shapes)"] = max(ratios)

    heads, d = (2, 16) if quick else (32, 128)
    for target_length, length in (QUICK_LENGTHS if quick else SUITE_LENGTHS).items():
        score_rows = bench_scores(length, heads, d, torch.bfloat16, device, reps, ["vfuse", SDPA, "vfuse passes"])
        rows += score_rows
        values[f"query_key_scores: time / SDPA flash forward, L={target_length}"] = score_rows[0].get("ratio_vs_sdpa")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def left() -> float:
        return TIME_BUDGET_S - (time.monotonic() - start)

    if left() > RESERVE_S["torch.compile"]:
        compile_rows = bench_project(llava, ["torch.compile"], reps, "aot_eager" if cpu and quick else "inductor")
        llava_rows = add_ratios(llava_rows + compile_rows)
        values["project_concat LLaVA-7B: speedup vs torch.compile"] = next(
            r for r in llava_rows if r["impl"] == "vfuse")["speedup_vs_compile"]
    else:
        checks.append({"name": "torch.compile baseline (LLaVA-7B)", "passed": False,
                       "detail": f"not run: {left():.0f} s of the part's {TIME_BUDGET_S:.0f} s were left"})
    rows += [dict(r, config="LLaVA-7B") for r in llava_rows]
    del llava

    for name, make in (("project_concat", lambda: _project_checks(device)),
                       ("select_tokens", lambda: _select_checks(device, quick)),
                       ("query_key_scores", lambda: _score_checks(device, quick))):
        if left() > RESERVE_S[name]:
            checks += make()
        else:
            checks.append({"name": f"{name} checks", "passed": False,
                           "detail": f"not run: {left():.0f} s of the part's {TIME_BUDGET_S:.0f} s were left"})
    targets = [_target(name, values.get(name)) for name, _, _ in TARGETS]
    return {"checks": checks, "rows": [dict(r, suite="tokens") for r in rows], "targets": targets}


# --------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoders", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 729, 2880])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--dim", type=int, nargs="+", default=[1024, 1152], help="vision feature widths D")
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 5120], help="LLM widths H")
    parser.add_argument("--score-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--ops", nargs="+", choices=["project", "select", "scores"],
                        default=["project", "select", "scores"], help="which op families to run")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke test)")
    parser.add_argument("--json", help="write the rows (with device, versions, date, commit) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.encoders, args.tokens, args.batch = [2], [576], [1, 4]
        args.dim, args.hidden, args.reps = [256], [512], 5
        args.score_lengths, args.heads, args.head_dim = [512, 2048], 8, 64
    device = torch.device(args.device)
    if device.type == "cpu":  # one inductor compile thread: a worker pool left spinning would slow later rows
        torch._inductor.config.compile_threads = 1
    dtype = torch.bfloat16
    env = environment(device)
    configs = list(itertools.product(args.encoders, args.tokens, args.dim, args.hidden, args.batch, args.keep))
    configs = configs if "project" in args.ops else []
    project_rows = []
    for m, n, d, h, batch, keep in configs:
        project_rows += bench_project(project_case(m, n, batch, keep, d, h, dtype, device), [GEMM, "vfuse", "eager"],
                                      args.reps)
    if not args.no_compile:  # last: inductor's CPU kernels leave OpenMP threads spinning that would slow the
        for m, n, d, h, batch, keep in configs:  # rows measured after them on a small CPU
            project_rows += bench_project(project_case(m, n, batch, keep, d, h, dtype, device), ["torch.compile"],
                                          args.reps)
    project_rows = add_ratios(project_rows)
    select_rows = []
    for batch, n in itertools.product(args.batch, args.tokens) if "select" in args.ops else []:
        for keep in [kp for kp in args.keep if kp < 1.0]:
            select_rows += bench_select(batch, n, max(1, int(keep * n)), device, args.reps)
    score_rows = []
    for length in args.score_lengths if "scores" in args.ops else []:
        impls = ["vfuse", SDPA, "eager (weights)"] + (["vfuse passes"] if device.type == "cuda" else [])
        score_rows += bench_scores(length, args.heads, args.head_dim, dtype, device, args.reps, impls)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | bf16")
    for table, columns in ((project_rows, PROJECT_COLUMNS), (select_rows, SELECT_COLUMNS), (score_rows, SCORE_COLUMNS)):
        if table:
            print_table(table, columns)
            print()
    rows = project_rows + select_rows + score_rows
    if args.json:
        write_json(args.json, env, rows)
    return rows


if __name__ == "__main__":
    main()
