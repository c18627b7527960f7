"""Multi-encoder token fusion benchmark: project_concat (+ selection) and query_key_scores.

project_concat rows: M encoders × N tokens each (D → H → H projector MLPs), batch B, keep ratio;
each encoder's tokens are pruned to keep·N by precomputed scores (selection included in every
implementation) and projected into one [B, ΣK, H] sequence. Implementations:
``vfuse`` (select_tokens + project_concat), ``eager`` (topk/sort + gather + projector per
encoder + torch.cat), ``torch.compile`` of the eager function, and ``GEMM`` — the same two
matmuls on pre-gathered contiguous rows (torch.mm: cuBLAS / oneDNN; in fp32 on a CPU without
native bf16, as the library's CPU path computes there), measured in the same run as the
reference throughput. TFLOP/s from 2·B·ΣK·(D·H + H·H); ``pct_of_gemm`` = GEMM time /
implementation time.

query_key_scores rows: Lq = Nk = L (2k–32k on GPU), H heads of d; ``vfuse`` vs eager attention
with weights (softmax(q·kᵀ·scale) materialised, then the mean). Peak memory is measured with
``torch.cuda.max_memory_allocated`` on GPU (above the inputs); on CPU it is the estimate of the
temporaries (no allocator statistics there), marked ``peak_source=estimate``.

    python -m vfuse_kernels.bench.tokens                       # GPU when available (full grid)
    python -m vfuse_kernels.bench.tokens --quick --device cpu  # seconds-to-minutes smoke run
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os

# one inductor compile thread: a worker pool left busy by the torch.compile baseline would slow the
# rows measured after it on small CPUs (set before torch is imported)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

import vfuse_kernels as vk  # noqa: E402
from .common import environment, print_table, time_ms, write_json  # noqa: E402

QK_OPS = importlib.import_module("vfuse_kernels.ops.query_key_scores")
compute_dtype = importlib.import_module("vfuse_kernels.ops.project_concat").compute_dtype
GEMM = "GEMM (torch.mm)"

PROJECT_COLUMNS = ["M", "N", "B", "keep", "impl", "median_ms", "TFLOP/s", "pct_of_gemm", "gemm_dtype",
                   "speedup_vs_eager", "speedup_vs_compile"]
SCORE_COLUMNS = ["L", "H", "d", "impl", "median_ms", "peak_MB", "peak_source", "speedup_vs_eager"]


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
    keep = [None if k == x.shape[1] else vk.select_tokens(s, k) for x, s, k in zip(features, scores, ks)]
    return vk.project_concat(features, projectors, keep=keep)


def bench_project(m, n, batch, keep, d, h, dtype, device, reps, impl_names) -> list[dict]:
    """Rows of the implementations in ``impl_names`` for one configuration (same data every call)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with torch.no_grad():
        projectors = [Projector(d, h, dtype, device).requires_grad_(False) for _ in range(m)]
        features = [torch.randn(batch, n, d, generator=gen).to(device, dtype) for _ in range(m)]
        scores = [torch.rand(batch, n, generator=gen).to(device) for _ in range(m)]
    k = max(1, int(keep * n))
    ks = [k] * m
    rows = batch * k * m
    flops = 2 * rows * (d * h + h * h)
    # the reference GEMMs run in the dtype the library's matmuls use on this device (bf16, or fp32 on a
    # CPU without native bf16, where bf16 matmuls are ~8× slower than fp32 ones)
    gemm_dtype = compute_dtype(dtype, device)
    gathered = torch.randn(rows, d, generator=gen).to(device, gemm_dtype)
    w1, w2 = (p.weight.to(gemm_dtype) for p in (projectors[0].linear_1, projectors[0].linear_2))
    hidden = torch.empty(rows, h, device=device, dtype=gemm_dtype)
    out = torch.empty(rows, h, device=device, dtype=gemm_dtype)

    def gemm():
        torch.mm(gathered, w1.t(), out=hidden)
        torch.mm(hidden, w2.t(), out=out)

    def compiled():
        fn = torch.compile(eager_select_project)
        return lambda: fn(features, scores, projectors, ks)

    impls = {GEMM: lambda: gemm,
             "vfuse": lambda: lambda: vfuse_select_project(features, scores, projectors, ks),
             "eager": lambda: lambda: eager_select_project(features, scores, projectors, ks),
             "torch.compile": compiled}
    result = []
    with torch.no_grad():
        if "vfuse" in impl_names:
            check = vfuse_select_project(features, scores, projectors, ks)
            torch.testing.assert_close(check, eager_select_project(features, scores, projectors, ks), rtol=0.05,
                                       atol=0.05 * check.abs().max().item())
        for impl in impl_names:
            fn = impls[impl]()
            median, p20, p80 = time_ms(fn, device, reps=reps, warmup=2 if impl == "torch.compile" else 1)
            result.append({"op": "project_concat", "M": m, "N": n, "B": batch, "keep": keep, "D": d, "H": h,
                           "dtype": str(dtype).removeprefix("torch."), "gemm_dtype": str(gemm_dtype)[6:],
                           "impl": impl, "median_ms": median, "p20_ms": p20, "p80_ms": p80,
                           "TFLOP/s": flops / median / 1e9})
    return result


def add_ratios(rows: list[dict]) -> list[dict]:
    """pct_of_gemm and the vfuse speedups, per configuration; rows come back grouped by configuration."""
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        configs.setdefault((r["M"], r["N"], r["B"], r["keep"]), []).append(r)
    ordered = []
    for group in configs.values():
        times = {r["impl"]: r["median_ms"] for r in group}
        for r in group:
            r["pct_of_gemm"] = 100.0 * times[GEMM] / r["median_ms"]
            if r["impl"] == "vfuse":
                r["speedup_vs_eager"] = times["eager"] / r["median_ms"]
                if "torch.compile" in times:
                    r["speedup_vs_compile"] = times["torch.compile"] / r["median_ms"]
        ordered += group
    return ordered


def eager_scores(q, k, scale):
    """Attention with weights, as an eager attention layer with output_attentions computes it."""
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32)
    return weights.mean(dim=(1, 2))


def _peak(fn, device, base_bytes, estimate):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base_bytes) / 2**20, "measured"
    return estimate / 2**20, "estimate"


def bench_scores(length, heads, d, dtype, device, reps) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, heads, length, d, generator=gen).to(device, dtype)
    k = torch.randn(1, heads, length, d, generator=gen).to(device, dtype)
    scale = d**-0.5
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    itemsize = q.element_size()
    logits = heads * length * length
    # CPU path temporaries: one chunk of fp32 logits and probabilities, the fp32 k (+ transpose) and q chunk
    chunk_rows = min(length, max(1, QK_OPS.CHUNK_ELEMENTS // (heads * length)))
    vfuse_estimate = chunk_rows * heads * (length * 4 * 2 + d * 4) + 2 * k.numel() * 4
    impls = {"vfuse": (lambda: vk.query_key_scores(q, k, scale=scale), vfuse_estimate),
             "eager (weights)": (lambda: eager_scores(q, k, scale), logits * (itemsize + 4))}  # logits, weights
    rows = []
    for impl, (fn, estimate) in impls.items():
        row = {"op": "query_key_scores", "L": length, "H": heads, "d": d, "dtype": str(dtype).removeprefix("torch."),
               "impl": impl}
        try:
            with torch.no_grad():
                peak, source = _peak(fn, device, base, estimate)
                median, p20, p80 = time_ms(fn, device, reps=reps)
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80, peak_MB=peak, peak_source=source)
        except torch.OutOfMemoryError:
            row.update(median_ms=None, peak_MB=None, peak_source="OOM")
            torch.cuda.empty_cache()
        rows.append(row)
    if rows[1].get("median_ms"):
        rows[0]["speedup_vs_eager"] = rows[1]["median_ms"] / rows[0]["median_ms"]
    with torch.no_grad():  # the two agree (where eager fits)
        if rows[1].get("median_ms") and length <= 8192:
            torch.testing.assert_close(vk.query_key_scores(q, k, scale=scale), eager_scores(q, k, scale),
                                       rtol=2e-2, atol=2e-2 / length)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoders", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 2880])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--dim", type=int, default=1024, help="vision feature width D")
    parser.add_argument("--hidden", type=int, default=4096, help="LLM width H")
    parser.add_argument("--score-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--ops", nargs="+", choices=["project", "scores"], default=["project", "scores"],
                        help="which op families to run (project_concat + selection, query_key_scores)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke test)")
    parser.add_argument("--json", help="write the rows (with device, versions, date, commit) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.encoders, args.tokens, args.batch = [2], [576], [1, 4]
        args.dim, args.hidden, args.reps = 256, 512, 5
        args.score_lengths, args.heads, args.head_dim = [512, 2048], 8, 64
    device = torch.device(args.device)
    dtype = torch.bfloat16
    env = environment(device)
    configs = list(itertools.product(args.encoders, args.tokens, args.batch, args.keep))
    configs = configs if "project" in args.ops else []
    project_rows = []
    for m, n, batch, keep in configs:
        project_rows += bench_project(m, n, batch, keep, args.dim, args.hidden, dtype, device, args.reps,
                                      [GEMM, "vfuse", "eager"])
    if not args.no_compile:  # last: inductor's CPU kernels leave OpenMP threads spinning that would slow the
        for m, n, batch, keep in configs:  # rows measured after them on a small CPU
            project_rows += bench_project(m, n, batch, keep, args.dim, args.hidden, dtype, device, args.reps,
                                          ["torch.compile"])
    project_rows = add_ratios(project_rows)
    score_rows = []
    for length in args.score_lengths if "scores" in args.ops else []:
        score_rows += bench_scores(length, args.heads, args.head_dim, dtype, device, args.reps)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | bf16 | D={args.dim} H={args.hidden}")
    for table, columns in ((project_rows, PROJECT_COLUMNS), (score_rows, SCORE_COLUMNS)):
        if table:
            print_table(table, columns)
            print()
    rows = project_rows + score_rows
    if args.json:
        write_json(args.json, env, rows)
    return rows


if __name__ == "__main__":
    main()
