"""Compile every Triton kernel ahead of time for a GPU architecture, without a GPU.

Runs Triton's whole pipeline (TTIR → TTGIR → LLVM → PTX → cubin with ptxas) for each
kernel in the configurations the launchers use, so a kernel that only the interpreter has
run is still known to compile for the device. Must run without TRITON_INTERPRET.

    python -m vfuse_kernels.triton.compile_check --arch 90
"""
from __future__ import annotations

import argparse
import itertools
import os

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import delta_merge, magnitude_select
from . import project_concat as project_concat_kernels
from . import query_key_scores as qk_kernels


def _tuned(dtype: str, n: int) -> tuple:
    return tuple([f"*{dtype}"] * n)


def kernel_configs():
    """(name, kernel, signature, constexprs[, launch options]) for the configurations worth compiling."""
    per_model = dict(keep_a_ptr="*i64", keep_b_ptr="*i64", seed_ptr="*i64")
    merges = [("bf16", 3, sparsify, elect, False) for sparsify, elect in itertools.product((0, 1, 2), (0, 1, 2))]
    merges += [("fp16", 1, 1, 1, True), ("fp32", 4, 2, 2, False)]
    for dtype, n, sparsify, elect, deltas in merges:
        sig = dict(out_ptr=f"*{dtype}", base_ptr=f"*{dtype}", tuned=_tuned(dtype, n), coef_ptr="*fp32",
                   weight_ptr="*fp32", **per_model, numel="i64", scale="fp32", weight_sum="fp32")
        consts = dict(N=n, N_PAD=triton.next_power_of_2(n), SPARSIFY=sparsify, ELECT=elect, NORMALIZE=True,
                      TUNED_ARE_DELTAS=deltas, BLOCK=delta_merge.BLOCK)
        yield f"merge[{dtype},N={n},sparsify={sparsify},elect={elect},deltas={deltas}]", delta_merge._merge_kernel, sig, consts
    for sparsify in (1, 2):
        sig = dict(partial_ptr="*fp32", base_ptr="*bf16", tuned=_tuned("bf16", 2), **per_model, numel="i64")
        consts = dict(N=2, SPARSIFY=sparsify, TUNED_ARE_DELTAS=False, BLOCK=delta_merge.BLOCK)
        yield f"sparse_l1[sparsify={sparsify}]", delta_merge._sparse_l1_kernel, sig, consts
    for deltas in (False, True):
        sig = dict(hist_ptr="*i32", base_ptr="*bf16", tuned=_tuned("bf16", 2), numel="i64")
        consts = dict(N=2, TUNED_ARE_DELTAS=deltas, BLOCK=magnitude_select.BLOCK, BINS=magnitude_select.HIST_BINS,
                      SHIFT=magnitude_select.HIST_SHIFT)
        yield f"key_histogram[deltas={deltas}]", magnitude_select._key_histogram_kernel, sig, consts
        sig = dict(cand_ptr="*i64", count_ptr="*i64", base_ptr="*bf16", tuned=_tuned("bf16", 2), lo_ptr="*i64",
                   hi_ptr="*i64", numel="i64", capacity="i64")
        consts = dict(N=2, TUNED_ARE_DELTAS=deltas, BLOCK=magnitude_select.BLOCK)
        yield f"bracket[deltas={deltas}]", magnitude_select._bracket_kernel, sig, consts
    yield from _token_configs()


def _token_configs():
    """project_concat's grouped GEMM and query_key_scores' two passes, as the launchers pick them
    on a GPU (options: the launch keyword arguments; precision: ieee for fp32, else tf32)."""
    pc = project_concat_kernels
    for dtype, torch_dtype, rows, aligned, groups in (("bf16", torch.bfloat16, 4096, True, 4),
                                                      ("bf16", torch.bfloat16, 256, True, 1),
                                                      ("bf16", torch.bfloat16, 4096, False, 2),
                                                      ("fp16", torch.float16, 4096, True, 4),
                                                      ("fp32", torch.float32, 4096, True, 4)):
        cfg = pc.config(rows, torch_dtype)
        sig = dict(out_ptr=f"*{dtype}", enc_ptr="*i64", layer_ptr="*i64", start_ptr="*i64")
        consts = dict(G_PAD=groups, E=pc.ENC_FIELDS, LF=pc.LAYER_FIELDS, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
                      GROUP_M=cfg["GROUP_M"], ALIGNED=aligned, UPCAST=False,
                      PREC="ieee" if dtype == "fp32" else "tf32")
        yield (f"grouped_linear[{dtype},BM={cfg['BM']},aligned={aligned}]", pc._grouped_linear_kernel, sig, consts,
               cfg["launch"])
    qk = qk_kernels
    strides = dict(sqb="i64", sqh="i32", sql="i32", skb="i64", skh="i32", skn="i32")
    sizes = dict(H="i32", Lq="i32", Nk="i32", D="i32", GROUP="i32")
    for dtype, d in (("bf16", 128), ("fp16", 64), ("fp32", 128), ("bf16", 80)):
        bd = max(16, triton.next_power_of_2(d))
        consts = dict(BM=qk.BLOCK_M, BN=qk.BLOCK_N, BD=bd, UPCAST=False, PREC="ieee" if dtype == "fp32" else "tf32")
        # contiguous q/k: the JIT specialises strides that are multiples of 16 (d ∈ {64, 128})
        divisible = (*strides, "D") if d % 16 == 0 else ("sqb", "skb")
        launch = dict(num_warps=qk.NUM_WARPS, num_stages=qk.NUM_STAGES, enable_fp_fusion=True, divisible=divisible)
        sig = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", lse_ptr="*fp32", **strides, **sizes, qk_scale="fp32")
        yield f"qk_row_lse[{dtype},d={d}]", qk._row_lse_kernel, sig, consts, launch
        sig = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", lse_ptr="*fp32", partial_ptr="*fp32", **strides, **sizes,
                   HEADS_PER_SPLIT="i32", SPLITS="i32", qk_scale="fp32")
        yield f"qk_key_scores[{dtype},d={d}]", qk._key_scores_kernel, sig, consts, launch


def compile_all(arch: int = 90, names: list[str] | None = None) -> dict[str, int]:
    """Compiles the kernels for sm_<arch>; returns the cubin size of each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    target = GPUTarget("cuda", arch, 32)
    sizes = {}
    for name, kernel, signature, constexprs, *launch in kernel_configs():
        if names and not any(name.startswith(n) for n in names):
            continue
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        options = {"num_warps": delta_merge.NUM_WARPS, "enable_fp_fusion": False}
        attrs = None
        if launch:  # kernels with their own launch options (fp fusion on: FMA contraction), compiled with the
            options = dict(launch[0])  # 16-byte pointer divisibility the JIT specialises aligned tensors to,
            divisible = options.pop("divisible", ())  # and the int arguments it would find divisible by 16
            attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(signature.items())
                     if v.startswith("*") or k in divisible}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options)
        sizes[name] = len(compiled.asm["cubin"])
    return sizes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    args = parser.parse_args(argv)
    for name, size in compile_all(args.arch).items():
        print(f"sm_{args.arch}  {name:48s} {size:8d} bytes cubin")


if __name__ == "__main__":
    main()
