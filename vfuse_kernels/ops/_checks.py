"""Argument checks shared by the public ops: they raise before anything is written."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .._backend import DTYPE_CODES

SUPPORTED_DTYPES = tuple(DTYPE_CODES)


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {value.dtype}; supported: float32, bfloat16, float16")
    return value


def check_real(name: str, value, *, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def per_model(name: str, value, n: int) -> list[float]:
    """A float or a sequence of ``n`` floats → list of ``n`` floats."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} tuned tensors")
        return [check_real(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check_real(name, value)] * n


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not one of {shown}")


def check_like(name: str, tensor: torch.Tensor, base: torch.Tensor) -> None:
    if tensor.shape != base.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but base has shape {tuple(base.shape)}")
    if tensor.device != base.device:
        raise ValueError(f"{name} is on {tensor.device} but base is on {base.device}")


def check_tensor_list(name: str, tensors, like: torch.Tensor | None = None, least: int = 1) -> list[torch.Tensor]:
    """A list or tuple of at least ``least`` supported tensors, each of ``like``'s shape and
    device (the first one's when ``like`` is None); returned as a list."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence) or len(tensors) < least:
        what = "a non-empty list or tuple of tensors" if least == 1 else f"a list or tuple of at least {least} tensors"
        raise TypeError(f"{name} must be {what}")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        check_tensor(f"{name}[{i}]", t)
        check_like(f"{name}[{i}]", t, tensors[0] if like is None else like)
    return tensors


def check_pair(a, b) -> None:
    """Two supported tensors of one shape and device."""
    check_tensor("a", a)
    check_tensor("b", b)
    check_like("b", b, a)


def check_out(out, like: torch.Tensor) -> None:
    """``out`` is None or a supported tensor of ``like``'s shape and device."""
    if out is not None:
        check_tensor("out", out)
        check_like("out", out, like)


def check_merge_inputs(base, tuned, density, tuned_are_deltas) -> tuple[list[torch.Tensor], list[float]]:
    """Checks base, the tuned tensors, density and tuned_are_deltas; returns (tuned, densities)."""
    check_tensor("base", base)
    tuned = check_tensor_list("tuned", tuned, base)
    densities = per_model("density", density, len(tuned))
    for i, p in enumerate(densities):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"density[{i}]={p} is outside (0, 1]")
    if not isinstance(tuned_are_deltas, bool):
        raise TypeError(f"tuned_are_deltas must be a bool, got {type(tuned_are_deltas).__name__}")
    return tuned, densities


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_tensor(name: str, value, ndim: int | None = None, dtypes=SUPPORTED_DTYPES) -> torch.Tensor:
    """A floating tensor of one of ``dtypes`` and (when given) ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        shown = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; supported: {shown}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_count(name: str, value, low: int, high: int) -> int:
    """An int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is outside [{low}, {high}]")
    return value


def check_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}")
