"""Spherical merge methods with mergekit 0.1.5's semantics: ``slerp``, ``nuslerp``,
``multislerp``, ``nearswap`` and ``karcher``.

Notation: ``B`` is the base model's tensor, ``M_i`` the other models' tensors in config order,
``θ = acos(<u, v>)`` the angle between two unit vectors.

- ``slerp`` (base + exactly one model, global ``t``): the whole tensor is one vector;
  ``(sin((1-t)θ)·B + sin(tθ)·M) / sin θ``, or ``(1-t)·B + t·M`` when ``|cos θ| > 0.9995``.
- ``nuslerp`` (exactly two non-base models, optional base, per-model ``weight``):
  ``t = w_1 / (w_0 + w_1)`` (0.5 when ``|w_0 + w_1| < 1e-6``); the same formula on ``M_i``
  (or on ``M_i - B``, then ``+ B``), over the flattened tensor (``nuslerp_flatten``, the
  default), or per vector along the last dim, or along dim 0 with ``nuslerp_row_wise``
  (dims 0 and -1 swapped: a [out, in] matrix's columns; no effect while flattening).
- ``multislerp`` (one or more non-base models, optional base, per-model ``weight``):
  barycentric interpolation on the sphere through the tangent space at the weighted mean of
  the unit vectors, rescaled to the weighted mean norm.
- ``nearswap`` (base + exactly one model, global ``t``): per element
  ``w = clamp(t / max(|B - M|, 1e-6), 0, 1)``, ``w·M + (1-w)·B``.
- ``karcher`` (any inputs, the base being an ordinary one): the equal-weight Karcher mean of
  the unit vectors on the sphere (fixed-point iteration), times the mean norm.

mergekit checks no range of ``t`` or ``weight`` (t outside [0, 1] extrapolates); the checks
here are its type checks, and slerp's ``t`` must lie in [0, 1] (a deliberate difference: an
extrapolating slerp is almost surely a config mistake) (pydantic's lax rules: numeric strings such as YAML's ``1e-5`` are
numbers, "yes"/"off"/0/1 are booleans, an int parameter takes 2.0 but not 2.5).

Edge cases kept from mergekit: slerp counts a norm <= 1e-8 as 1, so a zero (or tiny) tensor
is orthogonal to everything (slerp from a zero base gives ``sin(tπ/2)·M``, not ``t·M``), and
so does nuslerp (norms clamped at 1e-7); nuslerp's colinear test ``1 - cos²θ <= 1e-16`` holds
in fp32 only for cos θ = ±1 exactly, the formula being accurate at tiny θ anyway; multislerp
returns a single model as is (base ignored) and falls back to ``Σ w_i x_i`` for two antipodal
inputs, but refuses more whose unit vectors cancel; karcher leaves inputs with norm <= tol out
of the mean but keeps them in the norm scale, and returns zero when all are.

Deliberate differences from mergekit:
- slerp of two fp32/bf16/fp16 tensors of one dtype runs as ``vk.slerp`` (ops/slerp.py): two
  passes over the stored tensors, in C++ on the CPU and in Triton on CUDA — the sums Σa², Σb²,
  Σab in fp64, then ca·a + cb·b in fp32, stored in the inputs' dtype. mergekit sums normalised
  fp32 chunks; on near-parallel tensors (fine-tunes of one base) its cos θ is off enough to
  move the result by up to ~4e-5 relative at 2M elements, where the fp64 sums give the exactly
  rounded one (tests/test_merge_methods_slerp.py). Elsewhere (fp64, mixed dtypes,
  VFUSE_BACKEND=reference) slerp runs mergekit's torch arithmetic bit for bit.
- nuslerp (flattened) and multislerp with a base run on the CPU as two C++ passes: the
  offsets' Gram matrix with fp64 sums, then one fused blend ``base + Σ k_i (M_i − B)`` in fp32
  (ops/nuslerp.py, ops/multislerp.py): within fp32 rounding of mergekit's fp32 arithmetic,
  except where that is ill-conditioned (antipodal offsets, θ ≈ π: the fp64 sums see them
  colinear). The tests against mergekit run the torch path (VFUSE_BACKEND=reference).
- Arithmetic is fp32 (fp64 when an input is fp64) whatever the loaded dtype; mergekit runs
  nuslerp, multislerp, nearswap and karcher in the loaded dtype (bf16 arithmetic for bf16
  checkpoints), and slerp rounds its fp32 result to the input dtype before the output cast.
  On fp32 inputs the results are mergekit's, bit for bit.
- karcher takes the inputs in ``TensorInputs`` order (base first); mergekit uses the config
  order (the base last when it is not listed). The mean is symmetric: only rounding and the
  degenerate start (unit vectors that cancel: mergekit starts from the first one) can differ.
- Host syncs: karcher tests ``θ < tol`` per model with ``torch.where`` rather than ``.item()``
  (same values), multislerp picks its two-model linear fallback the same way.

The tensor math is the public ops' (``vk.slerp``, ``vk.nuslerp``, ``vk.multislerp``,
``vk.nearswap``, ``vk.karcher_mean``: ops/<name>.py); this module maps mergekit's parameters
onto it.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import REQUIRED, Param, TensorInputs, TensorMethod, register

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------
# Parameter values (mergekit validates them with pydantic in lax mode)

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}
_INT_TEXT = re.compile(r"\s*[+-]?[0-9][0-9_]*(\.0+)?\s*")


def as_float(value: Any) -> float:
    """A float as pydantic reads one: a bool, int, float or numeric string."""
    if isinstance(value, (bool, int, float, str)):
        return float(value)
    raise TypeError(f"{value!r} is not a number")


def as_int(value: Any) -> int:
    """An int as pydantic reads one: a bool, int, integral float (int64 range) or integer string."""
    if isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2.0**63:
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(float(value.replace("_", ""))) if "." in value else int(value)
    raise ValueError(f"{value!r} is not an integer")


def as_bool(value: Any) -> bool:
    """A bool as pydantic reads one: a bool, 0/1 (int or float), or yes/no-like text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"{value!r} is not a boolean")


def _check(convert: Callable[[Any], Any], what: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        try:
            convert(value)
        except (TypeError, ValueError):
            return f"must be {what}"
        return None

    return check


is_float = _check(as_float, "a number")


def is_fraction(value: Any) -> str | None:
    """A number in [0, 1] (slerp's t: mergekit would extrapolate outside; vfuse refuses)."""
    return is_float(value) or (None if 0.0 <= as_float(value) <= 1.0 else "must be in [0, 1]")
is_int = _check(as_int, "an integer")
is_bool = _check(as_bool, "a boolean")

# ---------------------------------------------------------------------------------------------
# Shared helpers


def compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """fp64 when an input is fp64, else fp32; non-float inputs are an error."""
    import torch

    if not all(x.is_floating_point() for x in tensors):
        raise TypeError("spherical merges need floating-point tensors")
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _split(inputs: TensorInputs, method: str, lo: int, hi: int | None):
    """(base or None, non-base tensors, their parameters), with lo..hi non-base models; the
    tensors as loaded (the ops convert them to the compute dtype, a chunk or a pass at a time)."""
    tensors = list(inputs.tensors)
    keep = [i for i in range(len(tensors)) if i != inputs.base_index]
    if len(keep) < lo or (hi is not None and len(keep) > hi):
        expected = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise ValueError(f"{method} takes {expected} models besides the base, got {len(keep)} ({inputs.name})")
    base = None if inputs.base_index is None else tensors[inputs.base_index]
    return base, [tensors[i] for i in keep], [inputs.params[i] for i in keep]


def _base_and_other(inputs: TensorInputs, method: str):
    base, others, _ = _split(inputs, method, 1, 1)
    if base is None:
        raise ValueError(f"{method} needs a base model ({inputs.name})")
    return base, others[0]


# ---------------------------------------------------------------------------------------------
# slerp

_SLERP_CHUNK = 1 << 20  # elements converted to fp32 at a time (mergekit's chunking: same sums)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(sin((1-t)θ)·v0 + sin(tθ)·v1) / sin θ`` over the whole tensor, ``θ`` the angle between
    v0 and v1 (a zero vector has cos θ = 0), or ``(1-t)·v0 + t·v1`` when ``|cos θ| > 0.9995``.
    Chunked over the flattened tensor so the fp32 scratch stays bounded. ``out`` (v0's dtype, for
    the fused passes): where the result goes, when given."""
    import torch

    from ..._backend import DTYPE_CODES, select_backend
    from ...ops.slerp import slerp
    from ...reference import slerp as slerp_reference

    if v0.dtype == v1.dtype and v0.dtype in DTYPE_CODES and select_backend(v0.device) != "reference":
        return slerp(v0, v1, t, out=out)  # the fused passes (C++ / Triton), fp64 sums
    dtype = compute_dtype((v0, v1))
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([float(t)], dtype=dtype, device=a.device).reshape(1, 1)
    if a.shape[1] == 0:
        return ((1 - t) * a.to(dtype) + t * b.to(dtype)).reshape(v0.shape)
    spans = [slice(s, s + _SLERP_CHUNK) for s in range(0, a.shape[1], _SLERP_CHUNK)]

    def piece(x: torch.Tensor, span: slice) -> torch.Tensor:
        return x[:, span].to(dtype)

    def norm(x: torch.Tensor) -> torch.Tensor:  # the norm of the chunks' norms
        parts = [torch.linalg.vector_norm(piece(x, s), dim=1, keepdim=True) for s in spans]
        n = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(n > slerp_reference.EPS, n, 1)

    na, nb = norm(a), norm(b)
    dot = torch.stack([(piece(a, s) / na * (piece(b, s) / nb)).sum(dim=1, keepdim=True) for s in spans])
    cos = dot.sum(dim=0).clamp(-1, 1)
    linear = cos.abs() > slerp_reference.LINEAR_ABOVE
    theta = torch.acos(torch.where(linear, 0, cos))  # keeps the unused branch finite
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    out = torch.empty(a.shape, dtype=dtype, device=a.device)
    for s in spans:
        out[:, s] = ca * piece(a, s) + cb * piece(b, s)
    return out.reshape(v0.shape)


def merge_slerp(inputs: TensorInputs) -> torch.Tensor:
    """slerp from the base (t = 0) to the other model (t = 1)."""
    base, other = _base_and_other(inputs, "slerp")
    out = inputs.out if inputs.out is not None and inputs.out.dtype == base.dtype == other.dtype else None
    return slerp_tensors(as_float(inputs.shared["t"]), base, other, out=out)


# ---------------------------------------------------------------------------------------------
# nuslerp

def nuslerp_t(w0: float, w1: float) -> float:
    """nuslerp's t from the two models' weights: w₁ / (w₀ + w₁), 0.5 where |w₀ + w₁| < 1e-6."""
    return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)


def merge_nuslerp(inputs: TensorInputs) -> torch.Tensor:
    """nuslerp of the two non-base models (of their deltas from the base when there is one)
    at ``t = w_1 / (w_0 + w_1)``."""
    from ...ops.nuslerp import nuslerp_merge

    base, (m0, m1), params = _split(inputs, "nuslerp", 2, 2)
    t = nuslerp_t(*(as_float(p["weight"]) for p in params))
    return nuslerp_merge(t, m0, m1, base, as_bool(inputs.shared["nuslerp_row_wise"]),
                         as_bool(inputs.shared["nuslerp_flatten"]), compute_dtype(inputs.tensors), out=inputs.out)


# ---------------------------------------------------------------------------------------------
# multislerp


def merge_multislerp(inputs: TensorInputs) -> torch.Tensor:
    """multislerp of the non-base models (of their deltas from the base when there is one)."""
    from ...ops.multislerp import multislerp_merge

    base, others, params = _split(inputs, "multislerp", 1, None)
    return multislerp_merge(others, [as_float(p["weight"]) for p in params], base,
                            as_bool(inputs.shared["normalize_weights"]), as_float(inputs.shared["eps"]),
                            compute_dtype(inputs.tensors), out=inputs.out)


# ---------------------------------------------------------------------------------------------
# nearswap


def merge_nearswap(inputs: TensorInputs) -> torch.Tensor:
    """nearswap of the base (a) towards the other model (b)."""
    from ...ops.nearswap import nearswap_merge

    base, other = _base_and_other(inputs, "nearswap")
    return nearswap_merge(as_float(inputs.shared["t"]), base, other, compute_dtype(inputs.tensors), out=inputs.out)


# ---------------------------------------------------------------------------------------------
# karcher


def merge_karcher(inputs: TensorInputs) -> torch.Tensor:
    """Equal-weight Karcher mean of every input, the base included (mergekit ignores the
    base's role for karcher)."""
    from ...ops.karcher import karcher_merge

    n = len(inputs.tensors)
    return karcher_merge(list(inputs.tensors), [1.0 / n] * n, as_int(inputs.shared["max_iter"]),
                         as_float(inputs.shared["tol"]), compute_dtype(inputs.tensors), out=inputs.out)


# ---------------------------------------------------------------------------------------------

SLERP = register(TensorMethod("slerp", merge_slerp, global_params={"t": Param(REQUIRED, is_fraction)},
                              needs_base=True, min_models=2, max_models=2))
NUSLERP = register(TensorMethod(
    "nuslerp", merge_nuslerp, model_params={"weight": Param(REQUIRED, is_float)},
    global_params={"nuslerp_row_wise": Param(False, is_bool), "nuslerp_flatten": Param(True, is_bool)},
    min_models=2, max_models=3, min_non_base=2, max_non_base=2))  # two models, plus the base when there is one
MULTISLERP = register(TensorMethod(
    "multislerp", merge_multislerp, model_params={"weight": Param(REQUIRED, is_float)},
    global_params={"normalize_weights": Param(True, is_bool), "eps": Param(1e-8, is_float)}, min_models=1,
    min_non_base=1))
NEARSWAP = register(TensorMethod("nearswap", merge_nearswap, global_params={"t": Param(REQUIRED, is_float)},
                                 needs_base=True, min_models=2, max_models=2))
KARCHER = register(TensorMethod(
    "karcher", merge_karcher, global_params={"max_iter": Param(10, is_int), "tol": Param(1e-5, is_float)},
    min_models=1))
