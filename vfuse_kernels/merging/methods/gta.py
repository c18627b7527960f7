"""Generalized task arithmetic with magnitude-outlier (Model Breadcrumbs) and DELLA
sparsification: ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``
(mergekit 0.1.5 semantics, parameter names and defaults).

For base b and models θ₁…θₙ (weights wᵢ): δᵢ = sparsify(θᵢ − b), uᵢ = wᵢ·δᵢ, then

- no consensus (breadcrumbs, della_linear): m = Σ uᵢ, divisor D = Σ wᵢ (|D| < 1e-8 → 1);
- sign consensus (breadcrumbs_ties, della): per element the majority sign s = +1 where
  Σ uᵢ ≥ 0 else −1; model i takes part where sign(uᵢ) = s (a zero uᵢ never does);
  m = Σ uᵢ·[takes part], D = Σ wᵢ·[takes part] (D = 0 → 1);

result = b + λ·(m / D if normalize else m). ``int8_mask`` is accepted and has no numerical
effect (mergekit only uses it as the mask's storage dtype).

Sparsification of δ (n = numel, density d; d ≥ 1 keeps δ unchanged, without rescaling):

- magnitude outliers (breadcrumbs): order the elements by |δ| ascending; keep the ranks
  [n_bot, n_bot + k) with k = int(d·n), n_top = int(γ·n), n_bot = max(0, n − k − n_top):
  the γ·n largest are dropped as outliers, then the smallest, so that k remain (when
  k + n_top > n the outlier cut shrinks: the k smallest are kept).
- DELLA magnitude pruning: d ≤ 0 drops everything; otherwise d ± ε must lie in (0, 1)
  (ValueError). Ranks r ∈ [0, m) by |δ| ascending along dim 1 (the whole tensor for a 1-D
  one: one row); keep probability p = (d − ε) + 2ε·r/(m − 1), from d − ε for the smallest
  to d + ε for the largest magnitude of its row.
- rescale (l1): the kept elements are scaled by ‖δ‖₁ / ‖δ·mask‖₁ unless either is < 1e-7.

Ranking rule for equal magnitudes (mergekit uses unstable sorts, so its order among equal
|δ| is unspecified): a stable ascending sort, i.e. among equal magnitudes the lower flat
index takes the lower rank. For breadcrumbs this decides which of the equal magnitudes at
the two cut points are kept; the count kept is always exactly k.

Deliberate differences from mergekit:

- DELLA's random mask is not torch.bernoulli: element e (row-major flat index) of the
  j-th non-base model (j = 0, 1, … in config order, as DARE) is kept iff
  ``random_bits(numel, seed, j)[e] < floor(p · 2^32)`` (ops/random_bits.py: DARE's stream), with p evaluated in float64 as
  ``(d − ε) + (r / (m − 1)) · (2ε)`` (separate IEEE operations, so CPU and CUDA agree bit
  for bit). Results depend only on (seed, tensor name, model position), not on any global
  RNG state.
- Keep probabilities are computed in float64 and the whole merge in float32, whatever
  the input dtype (mergekit ranks in the input dtype on GPU/bf16, so bf16 ranks above
  256 are rounded there).
- A row of one element (m = 1, e.g. a one-element tensor or an [n, 1] weight) takes
  p = d; mergekit divides 0/0 there and torch.bernoulli raises.
- density, gamma must be in [0, 1] and epsilon in [0, 0.5) (mergekit accepts any float,
  treating density > 1 as 1 and density < 0 as 0).

On the CPU (storage dtypes) breadcrumbs and DELLA run without fp32 task vectors: the exact
magnitude cuts or packed DELLA masks, then the fused C++ merge reading the stored tensors
(``breadcrumbs_merge``, ``della_merge``); elsewhere the torch path below, a CHUNK at a time.
"""
from __future__ import annotations

from typing import Any

import torch

from ..._backend import DTYPE_CODES, cpp_kernels_for
from ...delta_rules import L1_EPS
from ...ops._library import deliver, kernel_output
from ...ops.delta_merge import delta_merge
from ...ops.random_bits import MASK64, random_bits
from ..native import band_merger  # (torch-free: the CPU merge's entries)
from . import Param, TensorInputs, TensorMethod, della_epsilon, is_bool, is_number, register, unit_interval

SUM_WEIGHT_EPS = 1e-8  # mergekit's |Σ w| guard without consensus
CHUNK = 1 << 22  # elements per step of the element-wise combines: their temporaries stay ~100 MB


# --- shared tensor helpers -----------------------------------------------------------------

def element_chunks(numel: int):
    """[start, end) ranges of at most CHUNK elements covering ``numel``: element-wise work done
    a range at a time gives the same bits with bounded temporaries."""
    return ((start, min(numel, start + CHUNK)) for start in range(0, numel, CHUNK))


def task_vectors(inputs: TensorInputs) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(base, fp32 stack of θᵢ − base over the non-base models, their input indices): ``delta_stack``."""
    others = [i for i in range(len(inputs.tensors)) if i != inputs.base_index]
    base, deltas = delta_stack(inputs.base, [inputs.tensors[i] for i in others])
    return base, deltas, others


def delta_stack(base: torch.Tensor, tuned: list[torch.Tensor], tuned_are_deltas: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, fp32 stack of the θᵢ − base, or of the θᵢ themselves when ``tuned_are_deltas``). The
    base stays in its dtype when that is fp32 or narrower (its values exactly: arithmetic with
    an fp32 tensor promotes it), and the deltas are computed a CHUNK at a time: no fp32 copy of
    a whole input besides the stack."""
    base = base if base.dtype in (torch.float32, torch.bfloat16, torch.float16) else base.float()
    deltas = torch.empty((len(tuned), *base.shape), dtype=torch.float32, device=base.device)
    flat_base = base.reshape(-1)
    for row, t in enumerate(tuned):
        flat, flat_delta = t.reshape(-1), deltas[row].view(-1)
        for start, end in element_chunks(base.numel()):
            if tuned_are_deltas:
                flat_delta[start:end].copy_(flat[start:end])
            else:
                torch.sub(flat[start:end].float(), flat_base[start:end].float(), out=flat_delta[start:end])
    return base, deltas


def l1_rescaled_(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """δ·keep scaled by ‖δ‖₁ / ‖δ·keep‖₁, unscaled when either norm is below 1e-7 (no sync),
    in place."""
    before = delta.abs().sum()
    after = delta.mul_(keep).abs().sum()
    small = (before < L1_EPS) | (after < L1_EPS)
    return delta.mul_(torch.where(small, torch.ones_like(before), before / after))


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES 'sum' election on the stack of weighted deltas: True where sign(uᵢ) equals the
    sign of Σ uᵢ (+1 when the sum is ≥ 0)."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == majority


def ascending_ranks(values: torch.Tensor, dim: int) -> torch.Tensor:
    """0-based rank of each element along ``dim`` in a stable ascending sort (equal values:
    lower index first)."""
    order = torch.sort(values, dim=dim, stable=True).indices
    positions = torch.arange(values.shape[dim], device=values.device)
    shape = [1] * values.dim()
    shape[dim] = -1
    return torch.empty_like(order).scatter_(dim, order, positions.reshape(shape).expand_as(order))


# --- sparsification ------------------------------------------------------------------------

def largest_masks(values: torch.Tensor, counts: list[int], lower_index_first: bool) -> list[torch.Tensor]:
    """For each c of ``counts``: the mask of the c largest |values| — among equal magnitudes the
    lower flat index counts as larger (``lower_index_first``) or the higher one — found by the
    exact O(n) magnitude selection of the TIES trim (``vfuse::magnitude_select``), no sort."""
    from ...ops.magnitude_threshold import magnitude_select_op

    flat = values.reshape(-1).float()
    n = flat.numel()
    picked = [c for c in counts if 0 < c < n]
    # the selection breaks ties towards the lower index: flipped, towards the higher original one
    source = flat if lower_index_first else flat.flip(0).contiguous()
    keys, cutoffs = magnitude_select_op(source, [source] * len(picked), picked, True) if picked else ([], [])
    key = flat.view(torch.int32) & 0x7FFFFFFF
    masks = []
    for c in counts:
        if c <= 0 or c >= n:
            masks.append(torch.full(values.shape, c >= n and n > 0, dtype=torch.bool, device=values.device))
            continue
        j = picked.index(c)
        threshold, cutoff = int(keys[j]), int(cutoffs[j])  # (one host read per count)
        tie = key == threshold
        if lower_index_first:
            tie[cutoff + 1:] = False
        else:
            tie[: n - 1 - cutoff] = False
        masks.append(((key > threshold) | tie).reshape(values.shape))
    return masks


def outlier_keep_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs mask: ranks [n_bot, n_bot + k) of |δ| ascending (see module docstring) = the
    min(n, k + n_top) largest without the (that − k) largest, the higher index counting as
    larger among equal magnitudes (the stable ascending order)."""
    n = delta.numel()
    k = int(density * n)
    top = min(n, k + int(gamma * n))
    keep, outliers = largest_masks(delta, [top, top - k], lower_index_first=False)
    return keep & ~outliers


def della_keep_probability(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """float64 p = (d − ε) + 2ε·r/(m − 1), r the rank of |δ| along dim 1 (1-D: the whole
    tensor), m that dim's size; m = 1 gives p = d."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    m = rows.shape[1]
    if m == 1:
        return torch.full(delta.shape, float(density), dtype=torch.float64, device=delta.device)
    ranks = ascending_ranks(rows.abs(), dim=1).to(torch.float64)
    p = (ranks / (m - 1)) * (2 * epsilon) + (density - epsilon)
    return p.reshape(delta.shape)


def della_keep_mask(delta: torch.Tensor, density: float, epsilon: float, seed: int, model: int) -> torch.Tensor:
    """Keep iff Philox bits < floor(p·2^32), bits of (seed, model) at the flat index. On the CPU
    (1-D and 2-D fp32 δ) one C++ pass per row — a radix sort for the ranks, then the same fp64
    arithmetic (csrc/cpu/della_mask.cpp); elsewhere torch, a block of rows at a time (ranks are
    per row: the same mask, bounded temporaries)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ext = cpp_kernels_for([delta]) if delta.dtype == torch.float32 and delta.dim() <= 2 else None
    if ext is not None and rows.shape[1] >= 2:
        keep = torch.empty(delta.shape, dtype=torch.bool)
        ext.della_keep_mask(keep.data_ptr(), delta.data_ptr(), rows.shape[0], rows.shape[1], float(density),
                            float(epsilon), seed & MASK64, model, 0)
        return keep
    bits = random_bits(delta.numel(), seed, model, delta.device).reshape(rows.shape)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
    step = max(1, CHUNK * rows.shape[0] // max(1, rows.numel()))
    for start in range(0, rows.shape[0], step):
        p = della_keep_probability(rows[start:start + step], density, epsilon)
        torch.lt(bits[start:start + step], torch.floor(p * 2.0**32).to(torch.int64), out=keep[start:start + step])
    return keep.reshape(delta.shape)


def breadcrumbs_merge(base: torch.Tensor, tuned: list[torch.Tensor], weights: list[float], densities: list[float],
                      gammas: list[float], *, consensus: bool, normalize: bool, scale: float, rescale: bool,
                      tuned_are_deltas: bool = False, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Model Breadcrumbs (``consensus``: breadcrumbs_ties) in C++ passes on the CPU
    (``merging/native.band_merger``: two magnitude cuts per model, then one merge pass keeping the
    band between them) — no fp32 task vectors, no masks: the stacked path's masks and bits (with
    the L1 rescale within fp32 rounding: its sums are fp64 here). None where it does not apply
    (not the CPU, a normalised non-consensus combine): the caller stacks."""
    ext = cpp_kernels_for([base, *tuned])
    if ext is None or not (consensus or not normalize):
        return None
    base, tuned = base.contiguous(), [t.contiguous() for t in tuned]
    target = kernel_output(out, base.shape)
    merge = band_merger(ext, DTYPE_CODES[target.dtype], base.data_ptr(), DTYPE_CODES[base.dtype],
                        [t.data_ptr() for t in tuned], base.numel(), [float(w) for w in weights], list(densities),
                        list(gammas), consensus=consensus, normalize=normalize, scale=scale, rescale=rescale,
                        tuned_are_deltas=tuned_are_deltas)
    merge(target.data_ptr(), 0, base.numel())
    return deliver(target, out)


def della_bit_masks(base: torch.Tensor, tuned: list[torch.Tensor], densities: list[float], epsilons: list[float],
                    seed: int, tuned_are_deltas: bool, ext) -> list[torch.Tensor | None]:
    """Each model's DELLA keep mask, one bit per element (``_cpp_kernels.MASK``; None keeps all:
    density ≥ 1), from the C++ mask pass over blocks of 8k rows of its fp32 deltas (the same
    values, ranks and Philox bits as ``della_keep_mask`` over the whole tensor: the same mask)
    — a block's deltas in memory at a time, never the tensor's. 1-D or 2-D contiguous inputs."""
    import numpy as np

    from ...ops._cpp_kernels import packed_mask_bytes

    rows = 1 if base.dim() < 2 else base.shape[0]
    cols = base.numel() // max(rows, 1)
    step = max(8, CHUNK // max(cols, 1) // 8 * 8)  # a multiple of 8 rows: every block starts on a byte
    base2 = base.reshape(rows, cols)
    masks = []
    for model, (t, density, epsilon) in enumerate(zip(tuned, densities, epsilons)):
        if density >= 1:
            masks.append(None)
            continue
        packed = torch.zeros(packed_mask_bytes(base.numel()), dtype=torch.uint8)
        if density > 0:
            t2 = t.reshape(rows, cols)
            keep = torch.empty(min(step, rows), cols, dtype=torch.uint8)
            scratch = torch.empty(2, min(step, rows), cols, dtype=torch.float32)  # reused: no allocator churn
            for start in range(0, rows, step):
                n = min(step, rows - start)
                delta = scratch[0, :n].copy_(t2[start:start + n])
                if not tuned_are_deltas:
                    torch.sub(delta, scratch[1, :n].copy_(base2[start:start + n]), out=delta)
                ext.della_keep_mask(keep.data_ptr(), delta.data_ptr(), n, cols, float(density), float(epsilon),
                                    seed & MASK64, model, start)
                bits = np.packbits(keep[:n].numpy().reshape(-1), bitorder="little")
                packed[start * cols // 8:start * cols // 8 + bits.size] = torch.from_numpy(bits)
        masks.append(packed)
    return masks


def della_merge(base: torch.Tensor, tuned: list[torch.Tensor], weights: list[float], densities: list[float],
                epsilons: list[float], *, consensus: bool, normalize: bool, scale: float, rescale: bool, seed: int,
                tuned_are_deltas: bool = False, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """DELLA (``consensus``) or DELLA-linear in fused C++ passes on the CPU — the keep masks
    (``della_bit_masks``), with ``rescale`` the L1 sums (fp64), then one merge pass reading
    the stored inputs — so no fp32 copy of a whole task vector exists; within fp32 rounding of
    the stacked path (the L1 factor is summed in fp64 here, in fp32 there; the factor and the
    weight are multiplied first). None where it does not apply (not the CPU, a 3-D or wider
    tensor, rows of one element, a normalised non-consensus combine): the caller stacks."""
    from ...ops import _cpp_kernels

    ext = cpp_kernels_for([base, *tuned])
    cols = base.shape[-1] if base.dim() == 2 else base.numel()
    if ext is None or base.dim() > 2 or cols < 2 or not (consensus or not normalize):
        return None
    base, tuned = base.contiguous(), [t.contiguous() for t in tuned]
    masks = della_bit_masks(base, tuned, densities, epsilons, seed, tuned_are_deltas, ext)
    coefs = [float(w) for w in weights]
    if rescale:
        sums = _cpp_kernels.sparse_l1(base, tuned, tuned_are_deltas, _cpp_kernels.MASK, [], None, seed, masks)
        for i, ((before, after), mask) in enumerate(zip(sums.tolist(), masks)):
            if mask is not None and before >= L1_EPS and after >= L1_EPS:
                coefs[i] = weights[i] * (before / after)
    target = kernel_output(out, base.shape)
    _cpp_kernels.merge(target, base, tuned, tuned_are_deltas, _cpp_kernels.MASK, 1 if consensus else 0, normalize,
                       scale, [float(w) for w in weights], coefs, [], None, seed, masks)
    return deliver(target, out)


def check_della(density: float, epsilon: float) -> None:
    if 0 < density < 1 and not (density + epsilon < 1 and density - epsilon > 0):
        raise ValueError(f"epsilon={epsilon} with density={density}: density ± epsilon must lie in (0, 1) "
                         "(DELLA keep probabilities)")


def sparsify_outliers(delta: torch.Tensor, params: dict[str, Any], rescale: bool, **_) -> torch.Tensor:
    """Breadcrumbs sparsification of δ, in place."""
    density = float(params["density"])
    if density >= 1:
        return delta
    keep = outlier_keep_mask(delta, density, float(params["gamma"]))
    return l1_rescaled_(delta, keep) if rescale else delta.mul_(keep)


def sparsify_della(delta: torch.Tensor, params: dict[str, Any], rescale: bool, seed: int, model: int) -> torch.Tensor:
    """DELLA sparsification of δ, in place."""
    density, epsilon = float(params["density"]), float(params["epsilon"])
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    keep = della_keep_mask(delta, density, epsilon, seed, model)
    return l1_rescaled_(delta, keep) if rescale else delta.mul_(keep)


# --- the combine ---------------------------------------------------------------------------

def gta_combine(base: torch.Tensor, deltas: torch.Tensor, weights: list[float], *, consensus: bool,
                normalize: bool, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """base + scale·(Σ wᵢδᵢ [/ divisor]) in fp32 over the stacked sparsified deltas (module
    docstring). On the CPU one pass of the fused C++ merge where it performs the same fp32
    operations in the same order: with consensus its untrimmed TIES (sum election), without
    consensus or normalisation its task arithmetic (the unconsensual divisor, Σ wᵢ, it sums in
    fp64: torch here); otherwise torch, a CHUNK of elements at a time. The result in ``out`` when
    given (the C++ pass stores it there, rounded once), else in a new fp32 tensor."""
    if (consensus or not normalize) and cpp_kernels_for([deltas]) is not None:
        return deliver(delta_merge(base, list(deltas), weights, method="ties" if consensus else "task_arithmetic",
                                   normalize=normalize, scale=scale, tuned_are_deltas=True,
                                   out=kernel_output(out, base.shape)), out)
    result = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)[:, None]
    flat_base, flat_deltas, flat_out = base.reshape(-1), deltas.reshape(len(deltas), -1), result.view(-1)
    for start, end in element_chunks(base.numel()):
        weighted = flat_deltas[:, start:end] * w
        if consensus:
            agree = sign_consensus(weighted)
            mixed = (weighted * agree).sum(dim=0)
            divisor = (w * agree).sum(dim=0)
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        else:
            mixed = weighted.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor = torch.where(divisor.abs() < SUM_WEIGHT_EPS, torch.ones_like(divisor), divisor)
        if normalize:
            mixed = mixed / divisor
        if scale != 1:
            mixed = mixed * scale
        torch.add(flat_base[start:end], mixed, out=flat_out[start:end])
    return deliver(result, out)


def make_gta_merge(sparsify, consensus: bool):
    def merge(inputs: TensorInputs) -> torch.Tensor:
        others = [i for i in range(len(inputs.tensors)) if i != inputs.base_index]
        shared = inputs.shared
        rescale = bool(shared["rescale"])
        if others:
            params = [inputs.params[i] for i in others]
            weights, densities = [float(p["weight"]) for p in params], [float(p["density"]) for p in params]
            options = dict(consensus=consensus, normalize=bool(shared["normalize"]), scale=float(shared["lambda"]),
                           rescale=rescale, out=inputs.out)
            tuned = [inputs.tensors[i] for i in others]
            if sparsify is sparsify_della:
                for p in params:
                    check_della(float(p["density"]), float(p["epsilon"]))
                fused = della_merge(inputs.base, tuned, weights, densities, [float(p["epsilon"]) for p in params],
                                    seed=inputs.seed, **options)
            else:
                fused = breadcrumbs_merge(inputs.base, tuned, weights, densities, [float(p["gamma"]) for p in params],
                                          **options)
            if fused is not None:
                return fused
        base, deltas, others = task_vectors(inputs)
        if not others:
            return base.float()
        for j, i in enumerate(others):
            sparsify(deltas[j], inputs.params[i], rescale=rescale, seed=inputs.seed, model=j)  # in place
        weights = [float(inputs.params[i]["weight"]) for i in others]
        return gta_combine(base, deltas, weights, consensus=consensus, normalize=bool(shared["normalize"]),
                           scale=float(shared["lambda"]), out=inputs.out)
    return merge


def gta_method(name: str, sparsify, consensus: bool, normalize: bool, rescale: bool) -> TensorMethod:
    model_params = {"weight": Param(check=is_number), "density": Param(1.0, unit_interval)}
    if sparsify is sparsify_outliers:
        model_params["gamma"] = Param(0.01, unit_interval)
    else:
        model_params["epsilon"] = Param(0.15, della_epsilon)
    return TensorMethod(
        name=name,
        merge=make_gta_merge(sparsify, consensus),
        model_params=model_params,
        global_params={"int8_mask": Param(False, is_bool), "normalize": Param(normalize, is_bool),
                       "rescale": Param(rescale, is_bool), "lambda": Param(1.0, is_number)},
        needs_base=True,
        min_models=1,  # mergekit: the base alone merges to the base
    )


BREADCRUMBS = register(gta_method("breadcrumbs", sparsify_outliers, consensus=False, normalize=False, rescale=False))
BREADCRUMBS_TIES = register(gta_method("breadcrumbs_ties", sparsify_outliers, consensus=True, normalize=False,
                                       rescale=False))
DELLA = register(gta_method("della", sparsify_della, consensus=True, normalize=True, rescale=True))
DELLA_LINEAR = register(gta_method("della_linear", sparsify_della, consensus=False, normalize=False, rescale=True))
