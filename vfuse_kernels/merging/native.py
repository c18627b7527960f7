"""The CPU merge without torch. Task arithmetic, linear, TIES and DARE (``ops.delta_merge``'s
fused methods), Model Breadcrumbs (both), nearswap, slerp, nuslerp, multislerp, karcher and
Model Stock run their C++ passes straight from the files' pages into the engine's output
buffer, so ``vfuse merge`` on the CPU does not import torch for them: on the 2-core dev VM the
import costs ~1.5 s of a 2.5 s merge of 0.6B × 3. TIES and breadcrumbs select through
``selection.HostSelector``.

Each entry here calls the kernels with the arguments the op's C++ path passes them (and the
same scalar math between passes: ``gram.py``, ``_C.slerp_coefficients``), so the bytes equal
those of the torch route, which any other task takes (torch views of the same memory
through the ops). Where the op would not take its C++ path (other dtypes, a forced backend,
no extension, mixed input dtypes, row-wise vectors), ``kernel_takes`` says no.
"""
from __future__ import annotations

import math

import numpy

from .._extension import KERNEL_DTYPES, cpu_extension, forced_backend
from ..delta_rules import L1_EPS, METHODS, SPARSIFY_CODES, dare_keep_threshold, trim_count
from ..gram import karcher_coefficients, model_stock_t, multislerp_coefficients, nuslerp_coefficients
from ..selection import MAX_NUMEL, HostSelector, higher_index_cuts, trim_thresholds
from .checkpoint import TensorInfo, itemsize
from .output import address

# ops.delta_merge's methods: (sparsify code, elects signs); task arithmetic and linear differ in the plan's
# normalize only
FUSED = {method: (SPARSIFY_CODES[sparsify], elects) for method, (sparsify, elects, _) in METHODS.items()}
BREADCRUMBS = {"breadcrumbs": False, "breadcrumbs_ties": True}  # method → sign consensus (methods/gta.py)
NATIVE_METHODS = (*FUSED, *BREADCRUMBS, "nearswap", "slerp", "nuslerp", "multislerp", "karcher",
                  "model_stock")  # may skip torch
BAND = 4  # the merge kernel's sparsify code of the band between two magnitude cuts (csrc/cpu/delta_merge.h)


def kernel_takes(plan, task, infos: list[TensorInfo]) -> bool:
    """Whether ``native_merge`` runs ``task`` (``infos``: its inputs' records): a merge of a
    ``NATIVE_METHODS`` method in dtypes the kernels store, the extension built and no other
    backend forced; a per-tensor method's inputs of one dtype, and where its op takes the C++
    path: slerp into its inputs' dtype (the op rounds through it otherwise), nuslerp and
    multislerp with a base (flattened; 2 to 4 models besides it), karcher over 2 to 4 inputs,
    Model Stock over 2 to 4 models besides the base with whole-tensor rows, breadcrumbs with a
    base and a fused combine (with sign consensus, or not normalised); tensors under 2^33
    elements for the magnitude selections."""
    dtypes = [task.out_dtype] + [info.dtype for info in infos]
    if (task.copy_from is not None or forced_backend() not in ("", "cpp") or cpu_extension() is None
            or any(d not in KERNEL_DTYPES for d in dtypes)):
        return False
    if task.method_inputs is None:
        return plan.method in FUSED and math.prod(task.shape) < MAX_NUMEL
    method, inputs = plan.config.method, len({info.dtype for info in infos})
    if method == "nearswap":
        return inputs == 1
    if method == "slerp":
        return len(set(dtypes)) == 1
    from .methods.slerp import as_bool

    has_base = task.base_index is not None
    if method in BREADCRUMBS:  # as gta.breadcrumbs_merge takes it: one pass where the combine is fused
        fused = BREADCRUMBS[method] or not bool(task.shared["normalize"])
        return inputs == 1 and has_base and len(infos) >= 2 and fused and math.prod(task.shape) < MAX_NUMEL
    if method == "nuslerp":
        return inputs == 1 and has_base and as_bool(task.shared["nuslerp_flatten"])
    if method == "multislerp":
        return inputs == 1 and has_base and 3 <= len(infos) <= 5
    if method == "karcher":
        return inputs == 1 and 2 <= len(infos) <= 4
    if method == "model_stock":
        whole = not bool(task.shared["filter_wise"]) or len(task.shape) < 2
        return inputs == 1 and 3 <= len(infos) <= 5 and whole
    return False


def range_merger(plan, task, infos: list[TensorInfo], loaded: list[numpy.ndarray]):
    """For ``ops.delta_merge``'s methods and Model Breadcrumbs (``kernel_takes`` the task), whose
    last pass merges element by element: runs the passes before it (the TIES selection, the
    breadcrumbs cuts, the L1 sums) and returns ``merge(out, first, count)``, which writes elements
    [first, first + count) of the result (first a multiple of the extension's ``MERGE_ALIGN``) to
    the address ``out``. None for the other methods (``native_merge`` runs them whole)."""
    numel = math.prod(task.shape)
    out_code = KERNEL_DTYPES[task.out_dtype]
    if task.method_inputs is None:
        return _fused(cpu_extension(), plan, task, infos, loaded, out_code, numel)
    if plan.config.method in BREADCRUMBS:
        return _breadcrumbs(cpu_extension(), task, BREADCRUMBS[plan.config.method], out_code,
                            [address(x) for x in loaded], KERNEL_DTYPES[infos[0].dtype], numel)
    return None


def native_merge(plan, task, infos: list[TensorInfo], loaded: list[numpy.ndarray], out: numpy.ndarray) -> bool:
    """Merges ``task`` (``kernel_takes`` it; ``loaded``: its inputs' bytes in ``infos``' order,
    the base first when there is one) into the uint8 array ``out``. False, with nothing
    written, where the op leaves its C++ path on what the first pass found (karcher with every
    input's norm below tol): the torch route runs it."""
    if out.nbytes == 0:
        return True
    numel = out.nbytes // itemsize(task.out_dtype)
    out_code = KERNEL_DTYPES[task.out_dtype]
    merge = range_merger(plan, task, infos, loaded)
    if merge is not None:
        merge(address(out), 0, numel)
        return True
    ext = cpu_extension()
    from .methods.slerp import as_bool, as_float, as_int, nuslerp_t

    method, code, ptrs, shared = plan.config.method, KERNEL_DTYPES[infos[0].dtype], [address(x) for x in loaded], \
        task.shared
    others = [i for i in range(len(ptrs)) if i != task.base_index]
    weights = [as_float(task.params[i]["weight"]) for i in others] if method in ("nuslerp", "multislerp") else None
    if method == "nearswap":  # the base towards the other model, element by element
        ext.nearswap(address(out), out_code, ptrs[0], ptrs[1], code, numel, as_float(shared["t"]))
    elif method == "slerp":  # from the base (t = 0) to the other model
        ca, cb = ext.slerp_coefficients(ext.pair_sums(ptrs[0], ptrs[1], code, numel), as_float(shared["t"]))
        ext.pair_combine(address(out), out_code, ptrs[0], ptrs[1], code, numel, ca, cb)
    elif method in ("nuslerp", "multislerp"):  # base + Σ kᵢ (xᵢ − base), k from the offsets' Gram matrix
        gram = ext.offset_gram(ptrs[0], ptrs[1:], code, numel)
        if method == "nuslerp":
            k = nuslerp_coefficients(gram, nuslerp_t(*weights))
        else:
            k = multislerp_coefficients(gram, len(weights), weights, as_bool(shared["normalize_weights"]),
                                        as_float(shared["eps"]))
        _merge_kernel(ext, out, out_code, ptrs[0], code, ptrs[1:], [code] * len(k), numel, k)
    elif method == "karcher":  # Σ kᵢ xᵢ over every input, the base among them, equal weights
        n = len(ptrs)
        k = karcher_coefficients(ext.offset_gram(0, ptrs, code, numel), n, [1.0 / n] * n, as_int(shared["max_iter"]),
                                 as_float(shared["tol"]))
        if k is None:
            return False
        ext.linear_combination(address(out), out_code, ptrs, k, code, numel)
    else:  # model_stock: the offsets' Gram matrix, then the blend
        t = model_stock_t(ext.offset_gram(ptrs[0], ptrs[1:], code, numel), len(ptrs) - 1)
        ext.stock_blend(address(out), out_code, ptrs[0], ptrs[1:], code, numel, t)
    return True


def _merge_kernel(ext, out, out_code, base, base_code, tuned, tuned_codes, numel, k, tuned_are_deltas=False,
                  normalize=False, scale=1.0, seed=0) -> None:
    """``ops.delta_merge``'s C++ call without sparsification or election: θ = base + scale ·
    Σ cᵢ (θᵢ − base), cᵢ = kᵢ (over Σ kᵢ when normalizing), fp32 arithmetic rounded once."""
    k = [float(x) for x in k]
    no_sparsify, no_keep, no_election = 0, [0] * len(k), 0  # (the codes of csrc/cpu/delta_merge.h)
    ext.merge(address(out), out_code, base, base_code, tuned, tuned_codes, numel, tuned_are_deltas, no_sparsify,
              no_keep, no_keep, seed, k, k, no_election, normalize, scale)


def _fused(ext, plan, task, infos, loaded, out_code, numel):
    """``ops.delta_merge``'s methods as its C++ path runs them with the plan's rescale (mergekit's:
    the L1 one or none; linear over a zero base, with the tuned tensors as the deltas): TIES's
    exact selection (``ties_thresholds``), DARE's keep thresholds, the L1 rescale's sums; returns
    the merge pass over a range (``range_merger``)."""
    if task.base is None:
        base, base_dtype, tuned, tuned_infos = numpy.zeros(numel * itemsize(task.out_dtype), numpy.uint8), \
            task.out_dtype, loaded, infos
    else:
        base, base_dtype, tuned, tuned_infos = loaded[0], infos[0].dtype, loaded[1:], infos[1:]
    sparsify, elects = FUSED[plan.method]
    ptrs, codes = [address(t) for t in tuned], [KERNEL_DTYPES[info.dtype] for info in tuned_infos]
    inputs = (KERNEL_DTYPES[base_dtype], ptrs, codes, numel, plan.tuned_are_deltas)  # (after the base's address)
    weights = [float(w) for w in task.weights]
    coefs, keep_a, keep_b = list(weights), [0] * len(ptrs), [0] * len(ptrs)
    if sparsify == SPARSIFY_CODES["drop"]:  # DARE: keep thresholds on 32 random bits
        keep_a = [dare_keep_threshold(p) for p in task.densities]
    elif sparsify == SPARSIFY_CODES["trim"]:
        ks = [trim_count(p, numel) for p in task.densities]
        keep_a, keep_b = (x.tolist() for x in trim_thresholds(HostSelector(address(base), *inputs), ks))
    if sparsify != SPARSIFY_CODES["none"] and plan.rescale == "l1":  # each sparsified delta keeps its L1 norm:
        # cᵢ = wᵢ · Σ|δᵢ| / Σ kept |δᵢ|
        sums = ext.sparse_l1(address(base), *inputs, sparsify, keep_a, keep_b, task.seed)  # (Σ|δᵢ|, Σ kept |δᵢ|)
        coefs = [w if before < L1_EPS or after < L1_EPS else before / after * w
                 for w, before, after in zip(weights, sums[0::2], sums[1::2])]

    def merge(out: int, first: int, count: int) -> None:
        ext.merge(out, out_code, address(base), *inputs, sparsify, keep_a, keep_b, task.seed, coefs, weights,
                  1 if elects else 0, plan.normalize, plan.scale, first, count)

    return merge


def _breadcrumbs(ext, task, consensus: bool, out_code: int, ptrs: list[int], code: int, numel: int):
    """``band_merger`` with the task's parameters (``ptrs``: the inputs' addresses, the base first)."""
    others = [i for i in range(len(task.params)) if i != task.base_index]
    params, shared = [task.params[i] for i in others], task.shared
    return band_merger(ext, out_code, ptrs[0], code, ptrs[1:], numel, [float(p["weight"]) for p in params],
                       [float(p["density"]) for p in params], [float(p["gamma"]) for p in params],
                       consensus=consensus, normalize=bool(shared["normalize"]), scale=float(shared["lambda"]),
                       rescale=bool(shared["rescale"]))


def band_merger(ext, out_code: int, base: int, code: int, tuned: list[int], numel: int, weights: list[float],
                densities: list[float], gammas: list[float], *, consensus: bool, normalize: bool, scale: float,
                rescale: bool, tuned_are_deltas: bool = False):
    """Model Breadcrumbs (``consensus``: breadcrumbs_ties) in C++ passes (output storage code
    ``out_code``; every input of storage code ``code``): per model the min(n, k + int(γn)) and
    the min(n, k + int(γn)) − k largest |δ| (k = int(density · n), all at density ≥ 1;
    ``selection.higher_index_cuts``), then the L1 sums; returns the merge pass over a range
    (``range_merger``), which keeps the band between the two cuts (``BAND``), with
    cᵢ = wᵢ · Σ|δᵢ| / Σ kept |δᵢ| under the L1 rescale (density < 1 and both sums ≥ L1_EPS;
    else wᵢ). ``methods/gta.py``'s CPU path for torch tensors, too."""
    wide, narrow = [], []
    for density, gamma in zip(densities, gammas):
        k = int(density * numel)
        top = min(numel, k + int(gamma * numel))
        wide.append(numel if density >= 1 else top)
        narrow.append(0 if density >= 1 else top - k)
    codes = [code] * len(tuned)
    keys, cuts = higher_index_cuts(HostSelector(base, code, tuned + tuned, codes + codes, numel, tuned_are_deltas),
                                   wide + narrow)
    coefs = list(weights)
    if rescale:
        sums = ext.sparse_l1(base, code, tuned, codes, numel, tuned_are_deltas, BAND, keys, cuts, 0)
        for i, (before, after) in enumerate(zip(sums[0::2], sums[1::2])):
            if densities[i] < 1 and before >= L1_EPS and after >= L1_EPS:
                coefs[i] = weights[i] * (before / after)

    def merge(out: int, first: int, count: int) -> None:
        ext.merge(out, out_code, base, code, tuned, codes, numel, tuned_are_deltas, BAND, keys, cuts, 0, coefs,
                  weights, 1 if consensus else 0, normalize, scale, first, count)

    return merge
