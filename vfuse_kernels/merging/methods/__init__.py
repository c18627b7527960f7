"""Per-tensor merge methods beyond the fused ``delta_merge`` family, with mergekit 0.1.5's
semantics, parameter names and defaults (issue 13).

A method is a ``TensorMethod``: its per-model parameters (mergekit's ``tensor_parameters``;
given under ``models[i].parameters`` or globally under ``parameters``, gradients and filters
allowed), its global-only parameters (mergekit's ``parameters``), whether it needs a base
model, how many models it takes, and ``merge(inputs) -> tensor``. ``merge`` gets one output
tensor's inputs (``TensorInputs``) and returns the merged tensor in fp32 (or any float
dtype: the engine casts it to the output dtype), or ``inputs.out`` after writing the result
there, rounded once from fp32 — no whole-tensor fp32 temporary, no copy. The engine streams the inputs, so a method
sees one tensor of each model at a time, as mergekit's tasks do.

The five fused methods (linear, task_arithmetic, ties, dare_linear, dare_ties) keep their own
path (``ops.delta_merge``); the modules here register the others. ``METHODS`` knows every
name up front and imports a method's module when the method is first looked up, so a config
is checked without importing the modules of other methods (most compute with torch; the
CPU merge of some methods runs without it, ``merging/native.py``).
"""
from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class Param:
    """A method parameter: its default (``REQUIRED``: must be given), ``check(value)`` → an
    error text for a bad value (e.g. "must be in [0, 1]"), or None, and for a per-model
    parameter its scope: ``"non_base"`` (resolved for every model but the base; mergekit's
    default) or ``"input"`` (for the base too)."""
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None
    scope: str = "non_base"


@dataclass(frozen=True)
class TensorMethod:
    name: str
    merge: Callable[[TensorInputs], torch.Tensor]
    model_params: dict[str, Param] = field(default_factory=dict)
    global_params: dict[str, Param] = field(default_factory=dict)
    needs_base: bool = False  # mergekit refuses the config without base_model
    min_models: int = 1  # counting the base when it is one of the inputs
    max_models: int | None = None
    min_non_base: int = 0  # the models besides the base
    max_non_base: int | None = None

    def count_problem(self, models: int, has_base: bool) -> str | None:
        """Why ``models`` inputs (the base among them when ``has_base``) do not fit, or None."""
        for what, count, low, high in (("models (the base included)", models, self.min_models, self.max_models),
                                       ("models besides the base", models - has_base, self.min_non_base,
                                        self.max_non_base)):
            if count < low or (high is not None and count > high):
                expected = (f"exactly {low}" if low == high else f"at least {low}" if high is None else
                            f"{low} to {high}")
                return f"merge_method {self.name} takes {expected} {what}, got {count}"
        return None


@dataclass
class TensorInputs:
    """One output tensor's inputs. ``tensors``: the base model's tensor first when there is a
    base model, then every other model in config order (loaded dtype, any device);
    ``params[i]``: model i's per-model parameters, resolved for this tensor (defaults filled);
    ``shared``: the global parameters, resolved for this tensor; ``seed``: the tensor's random
    stream key (the DARE keying: config seed and tensor name); ``out``: the engine's output
    buffer (output dtype, contiguous), which ``merge`` may fill and return."""
    name: str
    tensors: list[torch.Tensor]
    base_index: int | None
    params: list[dict[str, Any]]
    shared: dict[str, Any]
    seed: int = 0
    out: torch.Tensor | None = None

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    def result_buffer(self) -> torch.Tensor:
        """Where a method computing with torch ops writes its result, a block at a time: ``out``
        when it is contiguous (each block rounded once into it), else a new fp32 tensor like the
        base."""
        if self.out is not None and self.out.is_contiguous():
            return self.out
        import torch

        return torch.empty(self.base.shape, dtype=torch.float32, device=self.base.device)


# every method's module: it registers the method when imported
MODULES = {"arcee_fusion": "arcee_fusion", "breadcrumbs": "gta", "breadcrumbs_ties": "gta", "della": "gta",
           "della_linear": "gta", "karcher": "slerp", "model_stock": "model_stock", "multislerp": "slerp",
           "nearswap": "slerp", "nuslerp": "slerp", "passthrough": "passthrough", "ram": "ram", "ramplus_tl": "ram",
           "sce": "sce", "slerp": "slerp"}


class _Registry(Mapping):
    """name → ``TensorMethod`` for every name of ``MODULES``; a lookup imports the method's module."""

    def __init__(self):
        self._methods: dict[str, TensorMethod] = {}

    def __getitem__(self, name: str) -> TensorMethod:
        if name not in self._methods and name in MODULES:
            importlib.import_module(f".{MODULES[name]}", __name__)
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(MODULES)

    def __len__(self) -> int:
        return len(MODULES)

    def __contains__(self, name) -> bool:
        return name in MODULES

    def add(self, method: TensorMethod) -> None:
        if method.name not in MODULES:
            raise ValueError(f"merge method {method.name!r} is not listed in MODULES")
        if method.name in self._methods:
            raise ValueError(f"merge method {method.name!r} is already registered")
        self._methods[method.name] = method


METHODS = _Registry()


def register(method: TensorMethod) -> TensorMethod:
    METHODS.add(method)
    return method


def in_unit_interval(value) -> str | None:
    return None if 0.0 <= float(value) <= 1.0 else "must be in [0, 1]"


# --- parameter checks (shared by the method modules) ---------------------------------------

def is_number(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return "must be a finite number"
    return None


def is_bool(value) -> str | None:
    if isinstance(value, bool) or (isinstance(value, numbers.Real) and value in (0, 1)):
        return None
    return "must be true or false"


def non_negative(value) -> str | None:
    return is_number(value) or (None if value >= 0 else "must be ≥ 0")


def positive(value) -> str | None:
    return is_number(value) or (None if value > 0 else "must be > 0")


def unit_interval(value) -> str | None:
    return is_number(value) or in_unit_interval(value)


def della_epsilon(value) -> str | None:
    return is_number(value) or (None if 0 <= value < 0.5 else "must be in [0, 0.5)")
