"""``delta_merge_foreach``: ``delta_merge`` over many tensors, one kernel launch per dtype group on CUDA."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import select_backend
from .delta_merge import _sparse_coefficients, delta_merge_op, merge_arguments
from .magnitude_threshold import _kernels


def _per_tensor(name: str, value, count: int) -> list:
    """One value for every tensor, or a list of ``count`` lists/tuples (one per tensor)."""
    if isinstance(value, Sequence) and value and all(isinstance(v, (list, tuple)) for v in value):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} per-tensor entries for {count} tensors")
        return list(value)
    return [value] * count


def delta_merge_foreach(
    bases: Sequence[torch.Tensor],
    tuned: Sequence[Sequence[torch.Tensor]],
    weights,
    *,
    method: str = "task_arithmetic",
    density=1.0,
    normalize: bool | None = None,
    scale: float = 1.0,
    consensus: str = "sum",
    rescale: str | None = "density",
    seed: int | Sequence[int] = 0,
    tuned_are_deltas: bool = False,
    outs: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``[delta_merge(bases[j], tuned[j], weightsⱼ, …, seed=seedⱼ, out=outs[j]) for each j]``, fused.

    ``tuned[j]`` holds the N tensors merged into ``bases[j]``. ``weights`` and ``density`` are
    what ``delta_merge`` takes (one value or N values) for every tensor, or a list of one such
    list per tensor (layer gradients); ``seed`` is one int or one per tensor (DARE masks keyed
    per tensor). The results equal per-tensor ``delta_merge`` calls bit for bit. On CUDA the
    tensors that share dtypes run in one launch (a pointer table; each program finds its
    tensor by binary search), so a model's worth of small tensors streams at memory speed;
    TIES selects per tensor first. The L1 rescale and CPU tensors run tensor by tensor.

    >>> a, b = torch.zeros(3), torch.zeros(2, 2)
    >>> [t.tolist() for t in delta_merge_foreach([a, b], [[a + 1], [b + 2]], 0.5)]
    [[0.5, 0.5, 0.5], [[1.0, 1.0], [1.0, 1.0]]]
    """
    bases = list(bases)
    count = len(bases)
    if isinstance(tuned, torch.Tensor) or len(tuned) != count:
        raise ValueError(f"tuned must hold one list of tensors per base ({count} bases)")
    if outs is not None and len(outs) != count:
        raise ValueError(f"outs has {len(outs)} tensors for {count} bases")
    seeds = list(seed) if isinstance(seed, Sequence) else [seed] * count
    if len(seeds) != count:
        raise ValueError(f"seed has {len(seeds)} values for {count} tensors")
    weights, density = _per_tensor("weights", weights, count), _per_tensor("density", density, count)
    calls = []
    for j, base in enumerate(bases):
        out = outs[j] if outs is not None else None
        tuned_j, args = merge_arguments(base, tuned[j], weights[j], method=method, density=density[j],
                                        normalize=normalize, scale=scale, consensus=consensus, rescale=rescale,
                                        seed=seeds[j], tuned_are_deltas=tuned_are_deltas, out=out, thresholds=None)
        target = torch.empty_like(base, memory_format=torch.contiguous_format) if out is None else out
        calls.append((target, base, tuned_j, args))
    fused = (count > 0 and len({base.device for base in bases}) == 1 and rescale != "l1"
             and select_backend(bases[0].device) == "triton")
    with torch.no_grad():
        if not fused:
            for target, base, tuned_j, args in calls:
                delta_merge_op(target, base, tuned_j, *args)
        else:
            _launch_groups(calls)
    return [call[0] for call in calls]


def _launch_groups(calls) -> None:
    """Groups the calls by (dtypes, N) and merges each group in one launch."""
    groups: dict[tuple, list] = {}
    for call in calls:
        target, base, tuned_j, args = call
        dtypes = {t.dtype for t in tuned_j}
        if base.numel() == 0:
            continue
        if len(dtypes) != 1:  # mixed tuned dtypes: on their own
            delta_merge_op(target, base, tuned_j, *args)
            continue
        groups.setdefault((target.dtype, base.dtype, dtypes.pop(), len(tuned_j)), []).append(call)
    kernels = _kernels("triton")
    for members in groups.values():
        outs, bases, tuned, weights, coefs, dare, trims, seeds, copies = [], [], [], [], [], [], [], [], []
        _, _, sparsify, elect, normalize, scale, rescale, _, tuned_are_deltas, _, _ = members[0][3]
        rescale = None if rescale == "none" else rescale
        for target, base, tuned_j, args in members:
            w, densities, _, _, _, _, _, seed, _, keys, cutoffs = args
            base, tuned_j = base.contiguous(), [t.contiguous() for t in tuned_j]
            trim, dare_j, coefs_j = _sparse_coefficients(kernels, base, tuned_j, w, densities, sparsify, rescale, seed,
                                                         tuned_are_deltas, keys, cutoffs)
            out = target if target.is_contiguous() else torch.empty(target.shape, dtype=target.dtype,
                                                                     device=target.device)
            if out is not target:
                copies.append((target, out))
            outs.append(out)
            bases.append(base)
            tuned.append(tuned_j)
            weights.append(w)
            coefs.append(coefs_j)
            dare.append(dare_j)
            trims.append(trim)
            seeds.append(seed)
        kernels.merge_foreach(outs, bases, tuned, tuned_are_deltas, sparsify, elect, normalize, scale, weights,
                              coefs, dare, trims, seeds)
        for target, out in copies:
            target.copy_(out)
