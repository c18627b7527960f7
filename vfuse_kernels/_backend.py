"""Backend selection for torch tensors (the CPU extension itself: ``_extension.py``).

CUDA tensors run the Triton kernels, CPU tensors the C++ extension (``vfuse_kernels._C``).
``VFUSE_BACKEND=reference|cpp|triton`` forces one; ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported. A missing or broken extension falls
back to the reference with one warning.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

from ._extension import BACKENDS, KERNEL_DTYPES, cpu_extension, forced_backend

# Storage dtype codes shared with csrc/cpu/common.h.
DTYPE_CODES = {torch.float32: KERNEL_DTYPES["F32"], torch.bfloat16: KERNEL_DTYPES["BF16"],
               torch.float16: KERNEL_DTYPES["F16"]}
__all__ = ["BACKENDS", "DTYPE_CODES", "cpp_kernels_for", "cpu_extension", "device_constants", "host_to_device",
           "select_backend", "triton_interpreted"]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def select_backend(device: torch.device) -> str:
    """The backend that runs an op on ``device``."""
    forced = forced_backend()
    if forced:
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


NUMPY_DTYPES = {torch.int32: np.int32, torch.int64: np.int64, torch.float64: np.float64}  # (device_constants)


def device_constants(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``host_to_device(values, dtype, device)``, reused while the values repeat: one read-only copy
    per (values' bits, dtype, device, current stream), an LRU of 64. A checkpoint's tensors merge
    with the same weights and select at the same ranks, and a copy queued before a launch costs
    stream time (H200: task arithmetic timed 0.5%, 2–3 µs, behind the compiled formula, which copies
    nothing before its kernel) and host time. The copy is queued on the stream in the key, so every
    launch there that reads it runs after it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    return _constants(np.asarray(values, dtype=NUMPY_DTYPES[dtype]).tobytes(), dtype, device, stream)


@functools.lru_cache(maxsize=64)
def _constants(packed: bytes, dtype: torch.dtype, device: torch.device, stream) -> torch.Tensor:
    return host_to_device(torch.frombuffer(bytearray(packed), dtype=dtype).tolist(), dtype, device)


def to_host_later(tensor: torch.Tensor):
    """A function returning ``tensor.tolist()``. On CUDA the copy is queued now (into pinned memory,
    an event after it) and the function waits only for that copy, not for work queued after it."""
    if tensor.device.type != "cuda":
        return tensor.tolist
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait():
        copied.synchronize()
        return host.tolist()

    return wait
