"""Builds vfuse_kernels._C from csrc/cpu/*.cpp with pybind11 (no torch headers).

Portable flags: -O3 without -march=native, so the wheel runs on any x86-64 / aarch64;
-ffp-contract=off keeps fp32 rounding identical to the reference (no FMA contraction).
OpenMP is used when the compiler that builds the extension compiles and links an OpenMP
program with -fopenmp (``VFUSE_NO_OPENMP=1`` turns it off).

Builds with setuptools >= 64 (with ``--no-build-isolation`` below 70.1 the ``wheel`` package
must be installed too): the license is passed here, as an SPDX ``license_expression`` where
setuptools takes one (>= 77) and as the plain ``license`` field before (``license = "…"`` in
pyproject.toml is an error before 77, the table form a deprecation from 77 on).
"""
import glob
import os
import sys
import tempfile

import setuptools
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.errors import CompileError, LinkError

LICENSE = "Apache-2.0"
OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


class BuildExt(build_ext):
    """pybind11's build_ext, plus -fopenmp when this compiler supports it."""

    def build_extensions(self):
        if self._openmp():
            for ext in self.extensions:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        else:
            print("vfuse_kernels: building without OpenMP (the CPU kernels run on one thread)", file=sys.stderr)
        super().build_extensions()

    def _openmp(self) -> bool:
        if sys.platform == "win32" or os.environ.get("VFUSE_NO_OPENMP") == "1":
            return False
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write(OPENMP_PROBE)
            try:
                objects = self.compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=["-fopenmp"])
            except (CompileError, LinkError):
                return False
        return True


ext = Pybind11Extension(
    "vfuse_kernels._C",
    sorted(glob.glob("csrc/cpu/*.cpp")),
    include_dirs=["csrc/cpu"],
    cxx_std=17,
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
)

new_license_metadata = int(setuptools.__version__.split(".")[0]) >= 77
setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt},
      **({"license_expression": LICENSE} if new_license_metadata else {"license": LICENSE}))
