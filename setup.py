"""Builds vfuse_kernels._C from csrc/cpu/*.cpp with pybind11 (no torch headers).

Portable flags: -O3 without -march=native, so the wheel runs on any x86-64 / aarch64;
-ffp-contract=off keeps fp32 rounding identical to the reference (no FMA contraction).
OpenMP is used when the compiler accepts -fopenmp.
"""
import glob
import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = [cxx, flag, src, "-o", os.path.join(tmp, "probe")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


openmp = sys.platform != "win32" and os.environ.get("VFUSE_NO_OPENMP") != "1" and _compiler_accepts("-fopenmp")
compile_args = ["-O3", "-ffp-contract=off", "-fno-math-errno"] + (["-fopenmp"] if openmp else [])

ext = Pybind11Extension(
    "vfuse_kernels._C",
    sorted(glob.glob("csrc/cpu/*.cpp")),
    include_dirs=["csrc/cpu"],
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=["-fopenmp"] if openmp else [],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
