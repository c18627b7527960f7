"""Compile every Triton kernel ahead of time for a GPU architecture, without a GPU.

Runs Triton's whole pipeline (TTIR → TTGIR → LLVM → PTX → cubin with ptxas) for each
kernel in the configurations the launchers use, so a kernel that only the interpreter has
run is still known to compile for the device. Must run without TRITON_INTERPRET.

    python -m vfuse_kernels.triton.compile_check --arch 90
    python -m vfuse_kernels.triton.compile_check --sass merge bracket   # with SASS instruction counts
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import selection
from . import delta_merge, magnitude_select, philox, slerp
from . import project_concat as pc_kernels
from . import query_key_scores as qk_kernels
from . import select_tokens as select_kernels


# The streaming kernels also compile as a launch specialises them for tensors of fewer than 2^31
# elements, aligned to 16 bytes, with a count divisible by 16 (the usual launch: numel an i32, it and
# every pointer, those inside the ``tuned`` tuple too, known divisible by 16: 16-byte loads); the
# configurations without the suffix are the unaligned or 2^31-and-more launch.
ALIGNED = "[aligned]"
ALIGNED_LAUNCH = dict(num_warps=delta_merge.NUM_WARPS, enable_fp_fusion=False, divisible=("numel",))


def _tuned(dtype: str, n: int) -> tuple:
    return tuple([f"*{dtype}"] * n)


def _divisibility(signature: dict, divisible: tuple) -> dict:
    """The JIT's 16-divisibility hints for aligned tensors: every pointer argument, every pointer in
    a tuple argument, and the integer arguments (or tuples of them) named in ``divisible``."""
    attrs = {}
    for i, (name, kind) in enumerate(signature.items()):
        if isinstance(kind, tuple):
            attrs.update({(i, j): [["tt.divisibility", 16]] for j, item in enumerate(kind)
                          if item[0] == "*" or (name in divisible and item[0] == "i")})
        elif kind.startswith("*") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")  # (Triton ships it)


def sass_instructions(cubin: bytes) -> list[str]:
    """The cubin's SASS instructions, one string each (padding NOPs left out), by nvdisasm."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout
    found = (re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;", line) for line in listing.splitlines())
    return [m.group(1) for m in found if m and m.group(1) != "NOP"]


TIE_FIND_SIG = dict(out_ptr="*i64", sums_ptr="*i64", counts_ptr="*i32", queries_ptr="*i64", base_ptr="*bf16",
                    tuned=_tuned("bf16", 2), models="i32", blocks="i32", chunks="i32", numel="i64", found_ptr="*i64",
                    totals_ptr="*i64", fill_ptr="*i64", lo_ptr="*i64", hi_ptr="*i64", k_ptr="*i64", cap="i64")


def kernel_configs():
    """(name, kernel, signature, constexprs[, launch options]) for the configurations worth compiling."""
    select_block = magnitude_select.DeviceSelector.BLOCK
    merges = [("bf16", 3, sparsify, elect, False) for sparsify, elect in itertools.product((0, 1, 2), (0, 1, 2))]
    merges += [("fp16", 1, 1, 1, True), ("fp32", 4, 2, 2, False), ("bf16", 9, 1, 1, False)]  # 9: past the inverse table
    for dtype, n, sparsify, elect, deltas in merges:
        consts = dict(N=n, SPARSIFY=sparsify, ELECT=elect, NORMALIZE=True, TUNED_ARE_DELTAS=deltas,
                      SELECT_MODELS=delta_merge.INVERSE_SELECT_MODELS, GUARDED=False, BLOCK=delta_merge.BLOCK)
        sig = dict(out_ptr=f"*{dtype}", base_ptr=f"*{dtype}", tuned=_tuned(dtype, n), params_ptr="*fp64",
                   trim_ptr="*i64", guard_ptr="*fp64", numel="i64", scale="fp32")
        name = f"[{dtype},N={n},sparsify={sparsify},elect={elect},deltas={deltas}]"
        yield "merge" + name, delta_merge._merge_kernel, sig, consts
        yield "merge" + name + ALIGNED, delta_merge._merge_kernel, dict(sig, numel="i32"), consts, ALIGNED_LAUNCH
        if sparsify == 1 and elect == 1:  # TIES queued before the selection's wait (select_then_merge)
            yield ("merge" + name + "[guarded]" + ALIGNED, delta_merge._merge_kernel,
                   dict(sig, numel="i32", guard_ptr="*i64"), dict(consts, GUARDED=True), ALIGNED_LAUNCH)
        sig = dict(table_ptr="*i64", block_start_ptr="*i32", params_ptr="*fp64", trim_ptr="*i64", tensors="i32",
                   scale="fp32")
        ty = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
        yield ("merge_foreach" + name, delta_merge._merge_foreach_kernel, sig,
               dict({k: v for k, v in consts.items() if k != "GUARDED"}, OUT_TY=ty, BASE_TY=ty, TUNED_TY=ty,
                    PARAMS=len(delta_merge._model_values([0.0] * n, [1.0] * n, [0] * n, 0, elect, True))))
    for sparsify in (1, 2):
        sig = dict(partial_ptr="*fp64", base_ptr="*bf16", tuned=_tuned("bf16", 2), params_ptr="*fp64",
                   trim_ptr="*i64", numel="i64")
        consts = dict(N=2, SPARSIFY=sparsify, TUNED_ARE_DELTAS=False, BLOCK=delta_merge.BLOCK)
        yield f"sparse_l1[sparsify={sparsify}]", delta_merge._sparse_l1_kernel, sig, consts
        yield (f"sparse_l1[sparsify={sparsify}]{ALIGNED}", delta_merge._sparse_l1_kernel, dict(sig, numel="i32"), consts,
               ALIGNED_LAUNCH)
    for deltas in (False, True):
        sig = dict(counts_ptr="*i32", cand_ptr="*i64", fill_ptr="*i64", base_ptr="*bf16", tuned=_tuned("bf16", 2),
                   lo_ptr="*i64", hi_ptr="*i64", rate_ptr="*i64", numel="i64", cap="i64")
        consts = dict(N=2, TUNED_ARE_DELTAS=deltas, BLOCK=select_block)
        options = dict(num_warps=magnitude_select.NUM_WARPS, enable_fp_fusion=False)
        yield f"bracket[deltas={deltas}]", magnitude_select._bracket_kernel, sig, consts, options
        yield (f"bracket[deltas={deltas}]{ALIGNED}", magnitude_select._bracket_kernel, dict(sig, numel="i32", cap="i32"),
               consts, dict(options, divisible=("numel", "cap")))
        sig = dict(keys_ptr="*i32", hist_ptr="*i32", base_ptr="*bf16", tuned=_tuned("bf16", 2), runs_ptr="*i64",
                   count="i32")
        for hist in (True, False):
            yield f"sample[deltas={deltas},hist={hist}]", magnitude_select._sample_kernel, sig, dict(
                N=2, TUNED_ARE_DELTAS=deltas, RUN=selection.RUN, RUNS=64, HIST=hist), dict(
                num_warps=4, enable_fp_fusion=False)
        for resolve in (True, False):  # (with the resolution: its table unread, the resolution's pointers read)
            yield f"tie_find[deltas={deltas},resolve={resolve}]", magnitude_select._tie_find_kernel, TIE_FIND_SIG, dict(
                N=2, TUNED_ARE_DELTAS=deltas, BLOCK=select_block, CHUNK=magnitude_select.TIE_CHUNK, SCAN=1024,
                RESOLVE=resolve), dict(num_warps=8, enable_fp_fusion=False)
    sig = dict(out_ptr="*i64", hist_ptr="*i32", keys_ptr="*i32", queries_ptr="*i64", size="i32", rows="i32",
               queries="i32")
    for round_ in range(5):  # the sample's order statistics
        consts = dict(ROUND=round_, CHUNK=magnitude_select.ORDER_CHUNK, BLOCK=magnitude_select.ORDER_BLOCK)
        for paired in (False, True) if round_ else (False,):
            yield (f"order_round[{round_},paired={paired}]", magnitude_select._order_round_kernel, sig,
                   dict(consts, PAIRED=paired), dict(num_warps=4))
        # one model, one query (a bracket end past the sample's): the JIT makes those 1s constants
        yield (f"order_round[{round_},rows=queries=1]", magnitude_select._order_round_kernel,
               {k: v for k, v in sig.items() if k not in ("rows", "queries")},
               dict(consts, PAIRED=False, rows=1, queries=1), dict(num_warps=4))
    sig = dict(sums_ptr="*i64", totals_ptr="*i64", counts_ptr="*i32", models="i32", blocks="i32")
    for totals in (True, False):
        yield f"chunk_sums[totals={totals}]", magnitude_select._chunk_sums_kernel, sig, dict(
            CHUNK=magnitude_select.TIE_CHUNK, TOTALS=totals), dict(num_warps=4)
    # one model, one block: the JIT turns integer arguments equal to 1 into constants
    yield "chunk_sums[models=blocks=1]", magnitude_select._chunk_sums_kernel, dict(
        sums_ptr="*i64", totals_ptr="*i64", counts_ptr="*i32"), dict(
        models=1, blocks=1, CHUNK=magnitude_select.TIE_CHUNK, TOTALS=True), dict(num_warps=4)
    # one model, one block, one chunk: the JIT turns integer arguments equal to 1 into constants
    sig = {name: ty for name, ty in TIE_FIND_SIG.items() if name not in ("models", "blocks", "chunks")}
    for resolve in (True, False):
        yield f"tie_find[models=blocks=chunks=1,resolve={resolve}]", magnitude_select._tie_find_kernel, dict(
            sig, base_ptr="*fp32", tuned=_tuned("fp32", 1)), dict(
            models=1, blocks=1, chunks=1, N=1, TUNED_ARE_DELTAS=False, BLOCK=select_block,
            CHUNK=magnitude_select.TIE_CHUNK, SCAN=1024, RESOLVE=resolve), dict(num_warps=8, enable_fp_fusion=False)
    yield "random_bits", philox._bits_kernel, dict(out_ptr="*i64", numel="i64", k0="i64", k1="i64", model="i32"), dict(
        BLOCK=philox.BITS_BLOCK)
    for dtype in ("bf16", "fp16", "fp32"):
        options = dict(num_warps=slerp.NUM_WARPS, enable_fp_fusion=False)
        yield f"slerp_sums[{dtype}]", slerp._pair_sums_kernel, dict(partial_ptr="*fp64", a_ptr=f"*{dtype}",
                                                                   b_ptr=f"*{dtype}", numel="i64"), dict(
            BLOCK=slerp.SUM_BLOCK), options
        yield f"slerp_combine[{dtype}]", slerp._pair_combine_kernel, dict(
            out_ptr=f"*{dtype}", a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", coef_ptr="*fp32", numel="i64"), dict(
            BLOCK=slerp.COMBINE_BLOCK), options
    yield from _token_configs()


def _token_configs():
    """select_tokens' search kernel and query_key_scores' two passes, as the launchers pick them
    on a GPU (options: the launch keyword arguments; precision: ieee for fp32, else tf32)."""
    for dtype, torch_dtype, n in (("fp32", torch.float32, 576), ("bf16", torch.bfloat16, 2880),
                                  ("fp16", torch.float16, 8192)):
        consts = dict(select_kernels.launch_config(n, torch_dtype))  # (a copy: the launcher caches it)
        launch = dict(num_warps=consts.pop("num_warps"))
        for m in (1, 3):  # one score tensor, or three encoders' in one launch
            ints = ("i32",) * m
            sig = dict(scores=(f"*{dtype}",) * m, outs=("*i64",) * m, ns=ints, ks=ints, strides_b=ints, strides_n=ints)
            yield f"select_tokens[{dtype},N={n},M={m}]", select_kernels._select_kernel, sig, dict(consts, M=m), launch
    for dtype, m, block_d in (("bf16", 3, 1024), ("fp32", 2, 2048)):  # the row gather: m entries in one launch
        ints = ("i32",) * m
        sig = dict(srcs=(f"*{dtype}",) * m, keeps=("*i64",) * m, dsts=(f"*{dtype}",) * m, ns=ints, widths=ints,
                   ks=ints, strides_b=ints, strides_n=ints, strides_d=ints, dst_strides=ints, batch="i32")
        consts = {"ENTRIES": m, "BLOCK_D": block_d, "ROWS": pc_kernels.ELEMENTS // block_d}
        yield (f"gather_rows[{dtype},M={m}]", pc_kernels._gather_kernel, sig, consts,
               dict(num_warps=4, debug=True, sanitize_overflow=False))
        strides_d = pc_kernels._gather_kernel.arg_names.index("strides_d")  # every channel stride 1: a constant
        yield (f"gather_rows[{dtype},M={m}]{ALIGNED}", pc_kernels._gather_kernel,
               dict(sig, strides_d=("constexpr",) * m), {**consts, **{(strides_d, j): 1 for j in range(m)}},
               dict(num_warps=4, debug=True, sanitize_overflow=False, divisible=("widths", "strides_b", "strides_n",
                                                                                  "dst_strides")))
    qk = qk_kernels
    strides = dict(sqb="i64", sqh="i32", sql="i32", skb="i64", skh="i32", skn="i32")
    sizes = dict(H="i32", Lq="i32", Nk="i32", GROUP="i32")
    for dtype, d in (("bf16", 128), ("fp16", 64), ("fp32", 128), ("bf16", 80)):
        tiles = dict(qk.TILES["fp32" if dtype == "fp32" else "half"])
        consts = dict(D=d, BM=tiles.pop("BM"), BN=tiles.pop("BN"), BD=max(16, triton.next_power_of_2(d)), UPCAST=False,
                      PREC="ieee" if dtype == "fp32" else "tf32")
        # contiguous q/k: the JIT specialises strides that are multiples of 16 (d ∈ {64, 128})
        launch = dict(tiles, divisible=tuple(strides) if d % 16 == 0 else ("sqb", "skb"))
        sig = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", lse_ptr="*fp32", **strides, **sizes, qk_scale="fp32")
        for even in (True, False):
            yield f"qk_row_lse[{dtype},d={d},even_n={even}]", qk._row_lse_kernel, sig, dict(consts, EVEN_N=even), launch
        sig = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", lse_ptr="*fp32", partial_ptr="*fp32", **strides, **sizes,
                   HEADS_PER_SPLIT="i32", SPLITS="i32", qk_scale="fp32")
        yield f"qk_key_sums[{dtype},d={d}]", qk._key_sums_kernel, sig, consts, launch


def compile_all(arch: int = 90, names: list[str] | None = None) -> dict[str, bytes]:
    """Compiles the kernels for sm_<arch>; returns the cubin of each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    target = GPUTarget("cuda", arch, 32)
    cubins = {}
    for name, kernel, signature, constexprs, *launch in kernel_configs():
        if names and not any(name.startswith(n) for n in names):
            continue
        signature = {k: "constexpr" if k in constexprs else signature[k] for k in kernel.arg_names}
        options = {"num_warps": delta_merge.NUM_WARPS, "enable_fp_fusion": False}
        attrs = None
        if launch:  # kernels with their own launch options (e.g. fp fusion on: FMA contraction); with
            options = dict(launch[0])  # "divisible", the 16-byte pointer divisibility the JIT specialises
            divisible = options.pop("divisible", None)  # aligned tensors to, and the int arguments it
            if divisible is not None:  # would find divisible by 16
                attrs = _divisibility(signature, divisible)
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options)
        cubins[name] = compiled.asm["cubin"]
    return cubins


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    parser.add_argument("--sass", action="store_true",
                        help="also count each kernel's SASS instructions (static: every path; by nvdisasm)")
    parser.add_argument("kernels", nargs="*", help="only the configurations whose names start with these")
    args = parser.parse_args(argv)
    for name, cubin in compile_all(args.arch, args.kernels or None).items():
        sass = f"  {len(sass_instructions(cubin)):6d} SASS instructions" if args.sass else ""
        print(f"sm_{args.arch}  {name:56s} {len(cubin):8d} bytes cubin{sass}")


if __name__ == "__main__":
    main()
