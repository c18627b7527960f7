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

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import delta_merge, magnitude_select


def _tuned(dtype: str, n: int) -> tuple:
    return tuple([f"*{dtype}"] * n)


def kernel_configs():
    """(name, kernel, signature, constexprs) for the configurations worth compiling."""
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


def compile_all(arch: int = 90, names: list[str] | None = None) -> dict[str, int]:
    """Compiles the kernels for sm_<arch>; returns the cubin size of each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    target = GPUTarget("cuda", arch, 32)
    sizes = {}
    for name, kernel, signature, constexprs in kernel_configs():
        if names and not any(name.startswith(n) for n in names):
            continue
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                                  options={"num_warps": delta_merge.NUM_WARPS, "enable_fp_fusion": False})
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
