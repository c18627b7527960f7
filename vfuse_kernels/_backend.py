"""Backend selection and the compiled CPU extension.

CUDA tensors run the Triton kernels, CPU tensors the C++ extension (``vfuse_kernels._C``).
``VFUSE_BACKEND=reference|cpp|triton`` forces one; ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported. A missing or broken extension falls
back to the reference with one warning.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "cpp", "triton")
# Storage dtype codes shared with csrc/cpu/common.h.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def select_backend(device: torch.device) -> str:
    """The backend that runs an op on ``device``."""
    forced = os.environ.get("VFUSE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"VFUSE_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
        if forced == "cpp" and device.type != "cpu":
            raise ValueError(f"VFUSE_BACKEND=cpp runs CPU tensors only, got tensors on {device}")
        if forced == "triton" and device.type == "cpu" and not triton_interpreted():
            raise ValueError(
                "VFUSE_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        if forced == "cpp" and cpu_extension() is None:
            return "reference"
        return forced
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and cpu_extension() is not None:
        return "cpp"
    return "reference"


def cpp_kernels_for(tensors):
    """The C++ extension when it can take ``tensors`` as they are (contiguous CPU tensors of
    one fp32/bf16/fp16 dtype, the ``cpp`` backend selected), else None (a torch path)."""
    first = tensors[0]
    if (first.dtype not in DTYPE_CODES or select_backend(first.device) != "cpp"
            or any(t.device.type != "cpu" or t.dtype != first.dtype or not t.is_contiguous() for t in tensors)):
        return None
    return cpu_extension()


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host ``values`` on ``device``, without waiting for the device: a
    non-blocking copy from pinned memory (``torch.tensor(values, device=cuda)`` synchronises)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)
