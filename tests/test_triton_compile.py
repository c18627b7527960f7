"""Every Triton kernel compiles to an sm_90 (H100/H200) cubin — checked without a GPU, in a
subprocess because the interpreter (on in these tests) replaces the compiler."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vfuse_kernels.triton.compile_check", "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_90")]
    names = " ".join(lines)
    for kernel in ("merge[", "merge_foreach[", "sparse_l1[", "bracket[", "sample[", "tie_find[", "chunk_sums",
                   "random_bits", "select_tokens[", "order_round[", "gather_rows[", "qk_row_lse[", "qk_key_sums["):
        assert kernel in names
    assert "[aligned]" in names
    assert all(int(line.split()[-3]) > 0 for line in lines)


def test_aligned_launches_compile_to_16_byte_loads():
    """The [aligned] configurations carry the JIT's divisibility hints into tuple arguments: the
    bracket pass loads base and both tuned tensors with one 16-byte load per row (8 bf16), where
    the unaligned configuration loads them 2 bytes at a time; project_concat's row gather copies
    its 4 rows × 1024 bf16 per program of each of 3 entries by 16-byte loads (4 per thread and entry)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from vfuse_kernels.triton import compile_check as c\n"
            "for name, cubin in c.compile_all(90, ['bracket[deltas=False]', 'gather_rows[bf16']).items():\n"
            "    ops = [i.split()[i.startswith('@')] for i in c.sass_instructions(cubin)]\n"
            "    print(name, ops.count('LDG.E.128'), ops.count('LDG.E.U16'), len(ops))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = {line.rsplit(" ", 3)[0]: [int(v) for v in line.rsplit(" ", 3)[1:]] for line in proc.stdout.splitlines()}
    assert counts["bracket[deltas=False][aligned]"][:2] == [3, 0]
    assert counts["bracket[deltas=False]"][:2] == [0, 24]
    assert counts["gather_rows[bf16,M=3][aligned]"][:2] == [12, 0]
    assert counts["gather_rows[bf16,M=3]"][:2] == [0, 96]
