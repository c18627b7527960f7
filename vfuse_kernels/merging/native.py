"""The CPU merge without torch. Task arithmetic and linear (the fused methods that select
nothing), nearswap, Model Stock and slerp run their C++ passes straight from the files'
pages into the engine's output buffer, so ``vfuse merge`` on the CPU does not import torch
for them: on the 2-core dev VM the import costs ~1.5 s of a 2.5 s merge of 0.6B × 3.

Each entry here calls the kernels with the arguments the op's C++ path passes them (and the
same scalar math between passes: ``gram.model_stock_t``, ``_C.slerp_coefficients``), so the
bytes equal those of the torch route, which any other task takes (torch views of the same
memory through the ops). Where the torch route would differ (other dtypes, a forced
backend, no extension, mixed input dtypes), ``kernel_takes`` says no.
"""
from __future__ import annotations

import numpy

from .._extension import KERNEL_DTYPES, cpu_extension, forced_backend
from ..gram import model_stock_t
from .checkpoint import TensorInfo, itemsize

FUSED = ("task_arithmetic", "linear")  # of ops.delta_merge
NATIVE_METHODS = (*FUSED, "nearswap", "model_stock", "slerp")  # config methods that may merge without torch


def _address(array: numpy.ndarray) -> int:
    return array.__array_interface__["data"][0]


def kernel_takes(plan, task, infos: list[TensorInfo]) -> bool:
    """Whether ``native_merge`` runs ``task`` (``infos``: its inputs' records): a merge of a
    ``NATIVE_METHODS`` method in dtypes the kernels store, the extension built and no other
    backend forced; a per-tensor method's inputs of one dtype, and for slerp the output's
    too (the op rounds through the inputs' dtype otherwise), for Model Stock 2 to 4 models
    and whole-tensor rows."""
    dtypes = [task.out_dtype] + [info.dtype for info in infos]
    if (task.copy_from is not None or forced_backend() not in ("", "cpp") or cpu_extension() is None
            or any(d not in KERNEL_DTYPES for d in dtypes)):
        return False
    if task.method_inputs is None:
        return plan.method in FUSED
    method, inputs = plan.config.method, len({info.dtype for info in infos})
    if method == "nearswap":
        return inputs == 1
    if method == "slerp":
        return len(set(dtypes)) == 1
    if method == "model_stock":
        whole = not bool(task.shared["filter_wise"]) or len(task.shape) < 2
        return inputs == 1 and 3 <= len(infos) <= 5 and whole
    return False


def native_merge(plan, task, infos: list[TensorInfo], loaded: list[numpy.ndarray], out: numpy.ndarray) -> None:
    """Merges ``task`` (``kernel_takes`` it; ``loaded``: its inputs' bytes in ``infos``' order,
    the base first when there is one) into the uint8 array ``out``."""
    if out.nbytes == 0:
        return
    numel = out.nbytes // itemsize(task.out_dtype)
    out_code = KERNEL_DTYPES[task.out_dtype]
    ext = cpu_extension()
    if task.method_inputs is None:
        _fused(ext, plan, task, infos, loaded, out, out_code, numel)
        return
    from .methods.slerp import as_float

    method, code, ptrs = plan.config.method, KERNEL_DTYPES[infos[0].dtype], [_address(x) for x in loaded]
    if method == "nearswap":  # the base towards the other model, element by element
        ext.nearswap(_address(out), out_code, ptrs[0], ptrs[1], code, numel, as_float(task.shared["t"]))
    elif method == "slerp":  # from the base (t = 0) to the other model
        ca, cb = ext.slerp_coefficients(ext.pair_sums(ptrs[0], ptrs[1], code, numel), as_float(task.shared["t"]))
        ext.pair_combine(_address(out), out_code, ptrs[0], ptrs[1], code, numel, ca, cb)
    else:  # model_stock: the offsets' Gram matrix, then the blend
        tuned = ptrs[1:]
        t = model_stock_t(ext.offset_gram(ptrs[0], tuned, code, numel), len(tuned))
        ext.stock_blend(_address(out), out_code, ptrs[0], tuned, code, numel, t)


def _fused(ext, plan, task, infos, loaded, out, out_code, numel) -> None:
    """θ = base + scale · Σ cᵢ (θᵢ − base), cᵢ = wᵢ (over Σ wᵢ when the plan normalizes), fp32
    arithmetic rounded once: ``ops.delta_merge``'s C++ call for task arithmetic and linear."""
    if task.base is None:  # linear: a zero base, the tuned tensors are the deltas
        base, base_dtype, tuned, tuned_infos = numpy.zeros(out.nbytes, numpy.uint8), task.out_dtype, loaded, infos
    else:
        base, base_dtype, tuned, tuned_infos = loaded[0], infos[0].dtype, loaded[1:], infos[1:]
    n = len(tuned)
    weights = [float(w) for w in task.weights]
    no_sparsify, no_keep, no_election = 0, [0] * n, 0  # (the codes of csrc/cpu/delta_merge.h)
    ext.merge(_address(out), out_code, _address(base), KERNEL_DTYPES[base_dtype], [_address(t) for t in tuned],
              [KERNEL_DTYPES[info.dtype] for info in tuned_infos], numel, plan.tuned_are_deltas, no_sparsify,
              no_keep, no_keep, task.seed, weights, weights, no_election, plan.normalize, plan.scale)
