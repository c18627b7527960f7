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
    for kernel in ("merge[", "merge_foreach[", "sparse_l1[", "bracket[", "sample[", "tie_find[", "tie_chunk", "random_bits", "select_tokens[", "qk_row_lse[", "qk_key_sums["):
        assert kernel in names
    assert all(int(line.split()[-3]) > 0 for line in lines)
