"""The ``vfuse`` torch.library namespace: one schema per op, CPU and CUDA kernels, fake kernels.

The low-level ``Library.define``/``impl`` API is used rather than ``custom_op``: its eager
calls go straight through the dispatcher (``custom_op`` imports torch._dynamo on the
first call, seconds of start-up for a command-line merge).
"""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES

LIB = torch.library.Library("vfuse", "DEF")


def define(schema: str, kernel, fake) -> None:
    """Registers ``vfuse::<schema>`` with ``kernel`` for CPU and CUDA and ``fake`` for tracing."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, kernel, "CPU")
    LIB.impl(name, kernel, "CUDA")
    torch.library.register_fake(f"vfuse::{name}", fake, lib=LIB)


def run_into(op, out: torch.Tensor | None, like: torch.Tensor, *args) -> torch.Tensor:
    """Calls the out-variant ``op(target, *args)`` without autograd; target = ``out``, or a new
    contiguous tensor like ``like``. Returns the target."""
    target = torch.empty_like(like, memory_format=torch.contiguous_format) if out is None else out
    with torch.no_grad():
        op(target, *args)
    return target


def kernel_output(out: torch.Tensor | None, shape) -> torch.Tensor:
    """Where a C++ pass writes a result of ``shape``: ``out`` when it is a contiguous CPU tensor of a
    dtype the passes store (fp32, bf16, fp16: rounded once from the fp32 result), else a new fp32
    tensor (``deliver`` then copies it into ``out``)."""
    if out is not None and out.is_contiguous() and out.device.type == "cpu" and out.dtype in DTYPE_CODES:
        return out
    return torch.empty(shape, dtype=torch.float32)


def deliver(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result``, copied into ``out`` when one is given and it is not already there."""
    return result if out is None or result is out else out.copy_(result)
