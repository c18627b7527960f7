"""``merge_into_``: merge checkpoints into a model that is already loaded (on any device),
streaming the other checkpoints tensor by tensor so that only one copy of the model is
ever resident — the VisionFuse pipeline merges its M language models this way."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .. import ops
from .checkpoint import Checkpoint, CheckpointError
from .plan import FLOAT_DTYPES, rewrite_prefix, tensor_seed


def merge_into_(
    model: torch.nn.Module,
    sources: Sequence[str | Checkpoint],
    weights: float | Sequence[float],
    *,
    method: str = "task_arithmetic",
    density: float | Sequence[float] = 1.0,
    prefix_map: Mapping[str, str] | None = None,
    skip: Sequence[str] = (),
    seed: int = 0,
    **merge_kwargs,
) -> dict[str, int]:
    """θ ← θ + scale · combine(wᵢ · sparsify(θᵢ − θ)) for every floating tensor of
    ``model.state_dict()``, in place, with ``θᵢ`` read from ``sources`` one tensor at a time.

    ``prefix_map`` rewrites the model's tensor names into the sources' (e.g.
    ``{"model.language_model.": "model."}`` to merge an LLM checkpoint into a VLM); tensors
    no source has, and names containing any string in ``skip``, stay untouched. Tied
    tensors are merged once. ``merge_kwargs`` go to ``delta_merge`` (normalize, scale,
    consensus, rescale). Returns counts of merged and untouched tensors.
    """
    checkpoints = [s if isinstance(s, Checkpoint) else Checkpoint(s) for s in sources]
    if not checkpoints:
        raise ValueError("sources must name at least one checkpoint")
    n = len(checkpoints)
    weights = list(weights) if isinstance(weights, Sequence) else [float(weights)] * n
    densities = list(density) if isinstance(density, Sequence) else [float(density)] * n
    if len(weights) != n or len(densities) != n:
        raise ValueError(f"{n} sources but {len(weights)} weights and {len(densities)} densities")
    prefix_map = dict(prefix_map or {})
    seen: set[int] = set()
    counts = {"merged": 0, "untouched": 0}
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
            if data.dtype not in FLOAT_DTYPES or any(s in name for s in skip) or data.data_ptr() in seen:
                counts["untouched"] += 1
                continue
            seen.add(data.data_ptr())
            src = rewrite_prefix(name, prefix_map)
            present = [(i, ck) for i, ck in enumerate(checkpoints) if src in ck.tensors]
            if not present:
                counts["untouched"] += 1
                continue
            tuned = []
            for i, ck in present:
                info = ck.tensors[src]
                if info.shape != tuple(data.shape):
                    raise CheckpointError(f"{ck.path}: tensor {src!r} has shape {info.shape}, "
                                          f"the model's {name!r} has {tuple(data.shape)}")
                tuned.append(ck.read(src).to(data.device, non_blocking=True))
            ops.delta_merge(data, tuned, [weights[i] for i, _ in present], method=method,
                            density=[densities[i] for i, _ in present] if method in ops.SPARSE_METHODS else 1.0,
                            seed=tensor_seed(seed, name), out=data, **merge_kwargs)
            counts["merged"] += 1
    return counts

