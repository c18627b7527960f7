"""``delta_merge``: θ = base + scale · combine(wᵢ · sparsify(θᵢ − base)) (DESIGN.md §2.1).

Orchestration shared by the backends (C++ on CPU, Triton on CUDA):
1. TIES only: exact per-model magnitude selection (or the ``thresholds`` passed in);
2. ``rescale="l1"`` only: one pass for Σ|δᵢ| and Σ kept |δᵢ|;
3. one fused pass reading base and every tuned tensor once and writing ``out`` once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import host_to_device, select_backend
from ..delta_rules import ELECT_CODES, L1_EPS, METHODS, SPARSIFY_CODES, dare_keep_threshold, trim_count
from ..reference import delta_merge as ref
from ._library import define
from ._checks import check_choice, check_like, check_merge_inputs, check_real, check_tensor, per_model
from .magnitude_threshold import MagnitudeThresholds, _kernels, check_trim_size, magnitude_select_op

SPARSE_METHODS = tuple(m for m, (sparsify, _, _) in METHODS.items() if sparsify != "none")  # take a density
# mergekit's generalized task arithmetic with magnitude-ranked sparsification: method → (sign
# consensus, default normalize, default L1 rescale, its parameter and that parameter's default).
# The sparsification and combine are the merge methods' (merging/methods/gta.py, which builds on
# this module: imported on first use); they run as torch ops plus the C++ passes on the CPU.
GTA_METHODS = {
    "breadcrumbs": (False, False, False, "gamma", 0.01),
    "breadcrumbs_ties": (True, False, False, "gamma", 0.01),
    "della": (True, True, True, "epsilon", 0.15),
    "della_linear": (False, False, True, "epsilon", 0.15),
}
SPARSIFY_NAMES = {code: name for name, code in SPARSIFY_CODES.items()}
ELECT_NAMES = {code: name for name, code in ELECT_CODES.items()}
RESCALES = ("density", "l1", None)
MAX_SEED = 2**63


def _sparse_coefficients(kernels, base, tuned, weights, densities, sparsify, rescale, seed, tuned_are_deltas,
                         trim_keys, trim_cutoffs):
    """(trim, DARE thresholds, coefficients) of one merge on contiguous inputs: the TIES
    selection (unless thresholds are given), the DARE keep thresholds, and cᵢ = wᵢ · rescaleᵢ
    (host floats, or a device tensor for the L1 rescale — computed there, without a sync)."""
    sparsify_name = SPARSIFY_NAMES[sparsify]
    device, n = base.device, len(tuned)
    trim, dare_thresholds = None, [0] * n
    if sparsify_name == "trim":
        if trim_keys is None:
            ks = [trim_count(p, base.numel()) for p in densities]
            trim_keys, trim_cutoffs = magnitude_select_op(base, tuned, ks, tuned_are_deltas)
        trim = trim_keys.to(device), trim_cutoffs.to(device)
    elif sparsify_name == "drop":
        dare_thresholds = [dare_keep_threshold(p) for p in densities]
    if sparsify_name != "none" and rescale == "l1":
        sums = kernels.sparse_l1(base, tuned, tuned_are_deltas, sparsify, dare_thresholds, trim, seed).to(device)
        before, after = sums[:, 0], sums[:, 1]
        small = (before < L1_EPS) | (after < L1_EPS)
        factors = torch.where(small, 1.0, before / torch.where(small, 1.0, after))
        coefs = factors * host_to_device(weights, torch.float64, device)
    elif sparsify_name == "drop" and rescale == "density":
        coefs = [w * (1.0 / p) for w, p in zip(weights, densities)]
    else:
        coefs = [float(w) for w in weights]
    return trim, dare_thresholds, coefs


def _merge_into(
    out: torch.Tensor,
    base: torch.Tensor,
    tuned: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    sparsify: int,
    elect: int,
    normalize: bool,
    scale: float,
    rescale: str,
    seed: int,
    tuned_are_deltas: bool,
    trim_keys: torch.Tensor | None,
    trim_cutoffs: torch.Tensor | None,
) -> None:
    backend = select_backend(base.device)
    rescale = None if rescale == "none" else rescale
    if backend == "reference":
        merged = ref.delta_merge(
            base, tuned, weights, sparsify=SPARSIFY_NAMES[sparsify], densities=densities, elect=ELECT_NAMES[elect],
            normalize=normalize, scale=scale, rescale=rescale, seed=seed, tuned_are_deltas=tuned_are_deltas,
        )
        out.copy_(merged)
        return
    if base.numel() == 0:
        return
    kernels = _kernels(backend)
    base = base.contiguous()
    tuned = [t.contiguous() for t in tuned]
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=base.device)
    if (SPARSIFY_NAMES[sparsify] == "trim" and trim_keys is None and rescale != "l1"
            and hasattr(kernels, "select_then_merge")):  # the GPU: the merge queued before the selection's wait
        kernels.select_then_merge(target, base, tuned, tuned_are_deltas, elect, normalize, scale, weights,
                                  [trim_count(p, base.numel()) for p in densities], seed)
    else:
        trim, dare_thresholds, coefs = _sparse_coefficients(kernels, base, tuned, weights, densities, sparsify,
                                                            rescale, seed, tuned_are_deltas, trim_keys, trim_cutoffs)
        kernels.merge(target, base, tuned, tuned_are_deltas, sparsify, elect, normalize, scale, weights, coefs,
                      dare_thresholds, trim, seed)
    if target is not out:
        out.copy_(target)


def _delta_merge_fake(out, base, tuned, *args) -> None:
    return None


define(
    "delta_merge_(Tensor(a!) out, Tensor base, Tensor[] tuned, float[] weights, float[] densities, int sparsify, "
    "int elect, bool normalize, float scale, str rescale, int seed, bool tuned_are_deltas, Tensor? trim_keys, "
    "Tensor? trim_cutoffs) -> ()",
    _merge_into,
    _delta_merge_fake,
)
delta_merge_op = torch.ops.vfuse.delta_merge_


def delta_merge(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    weights: float | Sequence[float],
    *,
    method: str = "task_arithmetic",
    density: float | Sequence[float] = 1.0,
    normalize: bool | None = None,
    scale: float = 1.0,
    consensus: str = "sum",
    rescale: str | None = "density",
    seed: int = 0,
    tuned_are_deltas: bool = False,
    out: torch.Tensor | None = None,
    thresholds: MagnitudeThresholds | None = None,
    gamma: float | None = None,
    epsilon: float | None = None,
) -> torch.Tensor:
    """Merge fine-tuned tensors into ``base``: ``base + scale · combine(wᵢ · sparsify(θᵢ − base))``.

    Methods (mergekit's): ``task_arithmetic`` (Σ wᵢδᵢ), ``linear`` (weighted average),
    ``ties`` (trim to the top ``density`` by |δᵢ|, sign election, disjoint mean),
    ``dare_linear`` / ``dare_ties`` (drop with probability 1 − density, rescale),
    ``breadcrumbs`` / ``breadcrumbs_ties`` (keep the ``density`` share of |δᵢ| below the top
    ``gamma`` share, default 0.01; without / with sign consensus), ``della`` / ``della_linear``
    (drop with a probability ranked by |δᵢ| in density ± ``epsilon``, default 0.15, drawn from
    DARE's stream; with / without sign consensus). For these four the default ``rescale`` means
    mergekit's default for the method (``"l1"`` for DELLA, none for breadcrumbs), ``consensus``
    is "sum" only, and ``merging/methods/gta.py`` states the semantics.
    Arithmetic is fp32 whatever the storage dtype; the result is rounded once to
    ``out``'s dtype (``base``'s when ``out`` is None). ``out=base`` merges in place.
    ``rescale``: ``"density"`` (DARE: ×1/densityᵢ), ``"l1"`` (keep each sparsified delta's
    L1 norm; mergekit's ``rescale: true``), or None; TIES honours ``"l1"`` only.
    ``thresholds`` (TIES) reuses ``ties_thresholds(base, tuned, density)`` across merges.

    >>> base = torch.zeros(4)
    >>> delta_merge(base, [torch.ones(4), 3 * torch.ones(4)], [0.5, 0.5], method="linear")
    tensor([2., 2., 2., 2.])
    >>> delta_merge(base, [torch.tensor([4.0, -1.0, 2.0, 3.0])], 1.0, method="breadcrumbs", density=0.5, gamma=0.25)
    tensor([0., 0., 2., 3.])
    """
    check_choice("method", method, (*METHODS, *GTA_METHODS))
    if method in GTA_METHODS:
        return _gta_delta_merge(base, tuned, weights, method=method, density=density, normalize=normalize,
                                scale=scale, consensus=consensus, rescale=rescale, seed=seed,
                                tuned_are_deltas=tuned_are_deltas, out=out, thresholds=thresholds, gamma=gamma,
                                epsilon=epsilon)
    for name, value in (("gamma", gamma), ("epsilon", epsilon)):
        if value is not None:
            raise ValueError(f"{name} has no effect with method={method!r}; it is a parameter of breadcrumbs / della")
    tuned, args = merge_arguments(base, tuned, weights, method=method, density=density, normalize=normalize,
                                  scale=scale, consensus=consensus, rescale=rescale, seed=seed,
                                  tuned_are_deltas=tuned_are_deltas, out=out, thresholds=thresholds)
    target = torch.empty_like(base, memory_format=torch.contiguous_format) if out is None else out
    with torch.no_grad():
        delta_merge_op(target, base, tuned, *args)
    return target


def _shared_arguments(base, out, normalize, default_normalize, scale, rescale, seed) -> tuple[bool, float]:
    """Checks the arguments every method takes; returns (normalize, scale) resolved."""
    if normalize is None:
        normalize = default_normalize
    elif not isinstance(normalize, bool):
        raise TypeError(f"normalize must be None or a bool, got {type(normalize).__name__}")
    scale = check_real("scale", scale)
    check_choice("rescale", rescale, RESCALES)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    if out is not None:
        check_tensor("out", out)
        check_like("out", out, base)
    return normalize, scale


def _gta_delta_merge(base, tuned, weights, *, method, density, normalize, scale, consensus, rescale, seed,
                     tuned_are_deltas, out, thresholds, gamma, epsilon) -> torch.Tensor:
    """``delta_merge`` for GTA_METHODS: fp32 deltas, each sparsified in place (model i keyed like
    DARE's i-th model), then the merge methods' combine, rounded once into the target."""
    from ..merging.methods import gta

    consensus_vote, default_normalize, default_l1, param, default = GTA_METHODS[method]
    tuned, densities = check_merge_inputs(base, tuned, density, tuned_are_deltas)
    weights = per_model("weights", weights, len(tuned))
    given = {"gamma": gamma, "epsilon": epsilon}
    other = next(name for name in given if name != param)
    if given[other] is not None:
        raise ValueError(f"{other} has no effect with method={method!r}; it takes {param}")
    value = check_real(param, default if given[param] is None else given[param])
    error = gta.unit_interval(value) if param == "gamma" else gta.della_epsilon(value)
    if error:
        raise ValueError(f"{param}={value} {error}")
    if param == "epsilon":
        for p in densities:
            gta.check_della(p, value)
    normalize, scale = _shared_arguments(base, out, normalize, default_normalize, scale, rescale, seed)
    if consensus != "sum":
        raise ValueError(f"consensus={consensus!r}: {method} elects signs by their sum only")
    if thresholds is not None:
        raise ValueError(f"thresholds apply to method='ties' only, got method={method!r}")
    l1 = default_l1 if rescale == "density" else rescale == "l1"
    sparsify = gta.sparsify_outliers if param == "gamma" else gta.sparsify_della
    with torch.no_grad():
        target = torch.empty_like(base, memory_format=torch.contiguous_format) if out is None else out
        options = dict(consensus=consensus_vote, normalize=normalize, scale=scale, rescale=l1,
                       tuned_are_deltas=tuned_are_deltas, out=target)
        if param == "epsilon":
            fused = gta.della_merge(base, tuned, weights, densities, [value] * len(densities), seed=seed, **options)
        else:
            fused = gta.breadcrumbs_merge(base, tuned, weights, densities, [value] * len(densities), **options)
        if fused is not None:
            return fused
        _, deltas = gta.delta_stack(base, tuned, tuned_are_deltas)
        for i, p in enumerate(densities):
            sparsify(deltas[i], {"density": p, param: value}, rescale=l1, seed=seed, model=i)
        return gta.gta_combine(base, deltas, weights, consensus=consensus_vote, normalize=normalize, scale=scale,
                               out=target)


def merge_arguments(base, tuned, weights, *, method, density, normalize, scale, consensus, rescale, seed,
                    tuned_are_deltas, out, thresholds) -> tuple[list[torch.Tensor], tuple]:
    """Checks ``delta_merge``'s arguments (nothing is written when one is rejected); returns the
    tuned list and the ``vfuse::delta_merge_`` arguments after (out, base, tuned)."""
    check_choice("method", method, METHODS)
    sparsify, elects, default_normalize = METHODS[method]
    tuned, densities = check_merge_inputs(base, tuned, density, tuned_are_deltas)
    if sparsify == "trim":
        check_trim_size(base)
    n = len(tuned)
    weights = per_model("weights", weights, n)
    if sparsify == "none" and any(p != 1.0 for p in densities):
        raise ValueError(f"density={density!r} has no effect with method={method!r}; use ties or dare_*")
    normalize, scale = _shared_arguments(base, out, normalize, default_normalize, scale, rescale, seed)
    check_choice("consensus", consensus, ("sum", "count"))
    trim_keys = trim_cutoffs = None
    if thresholds is not None:
        if sparsify != "trim":
            raise ValueError(f"thresholds apply to method='ties' only, got method={method!r}")
        trim_keys, trim_cutoffs = (torch.as_tensor(x, dtype=torch.int64, device=base.device) for x in thresholds)
        if trim_keys.shape != (n,) or trim_cutoffs.shape != (n,):
            raise ValueError(f"thresholds must hold {n} keys and {n} cutoffs, got {tuple(trim_keys.shape)} "
                             f"and {tuple(trim_cutoffs.shape)}")
    return tuned, (weights, densities, SPARSIFY_CODES[sparsify], ELECT_CODES[consensus if elects else None],
                   normalize, scale, str(rescale).lower(), seed, tuned_are_deltas, trim_keys, trim_cutoffs)
