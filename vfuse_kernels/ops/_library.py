"""The ``vfuse`` torch.library namespace: one schema per op, CPU and CUDA kernels, fake kernels.

The low-level ``Library.define``/``impl`` API is used rather than ``custom_op``: its eager
calls go straight through the dispatcher (``custom_op`` imports torch._dynamo on the
first call, seconds of start-up for a command-line merge).
"""
from __future__ import annotations

import torch

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
