"""The compiled CPU extension (``vfuse_kernels._C``) and the backend the environment forces,
without importing torch: the CPU merge of safetensors checkpoints runs the C++ kernels on
the files' pages directly and never loads torch (``merging/native.py``).

The C++ kernels take raw addresses and a storage dtype code per tensor (csrc/cpu/common.h),
keyed here by safetensors dtype name.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

BACKENDS = ("reference", "cpp", "triton")
KERNEL_DTYPES = {"F32": 0, "BF16": 1, "F16": 2}  # safetensors name -> csrc storage dtype code


@functools.cache
def cpu_extension():
    """The compiled ``_C`` module, or None (with one warning) when it cannot be loaded."""
    try:
        return importlib.import_module("vfuse_kernels._C")
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(
            f"vfuse_kernels: the C++ extension could not be loaded ({exc}); "
            "CPU ops fall back to the slow plain-PyTorch reference. Reinstall with "
            "`pip install -e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def forced_backend() -> str:
    """The backend ``VFUSE_BACKEND`` forces ("" when unset)."""
    forced = os.environ.get("VFUSE_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"VFUSE_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
    return forced
