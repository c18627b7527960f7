"""The CPU merge without torch. Task arithmetic and linear (the fused methods that select
nothing) run the C++ merge kernel straight from the files' pages into the engine's output
buffer, so ``vfuse merge`` on the CPU does not import torch for them: on the 2-core dev VM
the import costs ~1.5 s of a 2.5 s merge of 0.6B × 3. Any other task takes torch views of
the same memory through ``ops.delta_merge``, which calls the same kernel with the same
arguments: the bytes are identical either way.
"""
from __future__ import annotations

import numpy

from .._extension import KERNEL_DTYPES, cpu_extension, forced_backend
from .checkpoint import TensorInfo, itemsize

NATIVE_METHODS = ("task_arithmetic", "linear")


def _address(array: numpy.ndarray) -> int:
    return array.__array_interface__["data"][0]


def kernel_takes(plan, task, infos: list[TensorInfo]) -> bool:
    """Whether ``native_merge`` runs ``task`` (``infos``: its inputs' records): a fused task
    of task arithmetic or linear in dtypes the kernel has, the extension built and no other
    backend forced."""
    return (task.copy_from is None and task.method_inputs is None and plan.method in NATIVE_METHODS
            and forced_backend() in ("", "cpp") and cpu_extension() is not None
            and all(d in KERNEL_DTYPES for d in [task.out_dtype] + [info.dtype for info in infos]))


def native_merge(plan, task, infos: list[TensorInfo], loaded: list[numpy.ndarray], out: numpy.ndarray) -> None:
    """Merges ``task`` (``kernel_takes`` it; the base's bytes first in ``loaded`` when it has
    a base, ``infos`` their records) into the uint8 array ``out`` with the C++ kernel:
    θ = base + scale · Σ cᵢ (θᵢ − base), cᵢ = wᵢ (over Σ wᵢ when the plan normalizes), fp32
    arithmetic rounded once."""
    if out.nbytes == 0:
        return
    if task.base is None:  # linear: a zero base, the tuned tensors are the deltas
        base, base_dtype, tuned, tuned_infos = numpy.zeros(out.nbytes, numpy.uint8), task.out_dtype, loaded, infos
    else:
        base, base_dtype, tuned, tuned_infos = loaded[0], infos[0].dtype, loaded[1:], infos[1:]
    n = len(tuned)
    weights = [float(w) for w in task.weights]
    no_sparsify, no_keep, no_election = 0, [0] * n, 0  # (the codes of csrc/cpu/delta_merge.h)
    cpu_extension().merge(
        _address(out), KERNEL_DTYPES[task.out_dtype], _address(base), KERNEL_DTYPES[base_dtype],
        [_address(t) for t in tuned], [KERNEL_DTYPES[info.dtype] for info in tuned_infos],
        out.nbytes // itemsize(task.out_dtype), plan.tuned_are_deltas, no_sparsify, no_keep, no_keep, task.seed,
        weights, weights, no_election, plan.normalize, plan.scale)
