"""Plain-PyTorch statements of the magnitude selection's two gathers (vfuse_kernels/selection.py),
which the C++ and Triton kernels must match: the sample's keys, and the tie search's index."""
from __future__ import annotations

import torch

MAX_KEY = 0x7FFFFFFF


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """|x| of fp32 values as int32 keys (the fp32 bits without the sign; order-preserving)."""
    return values.contiguous().view(torch.int32) & MAX_KEY


def _deltas(base: torch.Tensor, t: torch.Tensor, tuned_are_deltas: bool) -> torch.Tensor:
    """Flat fp32 δ = θ − base (θ itself when the tuned tensors are deltas)."""
    return t.reshape(-1).float() if tuned_are_deltas else t.reshape(-1).float() - base.reshape(-1).float()


def sample_keys(base, tuned, runs, run, tuned_are_deltas) -> torch.Tensor:
    """[N, len(runs)·run] int32 keys of each model's deltas at the aligned runs ``runs`` of ``run``
    elements: keys[i, r·run + j] = key of δᵢ at element runs[r]·run + j."""
    idx = (runs.reshape(-1, 1).long() * run + torch.arange(run, device=runs.device)).reshape(-1)
    return torch.stack([magnitude_keys(_deltas(base, t, tuned_are_deltas)[idx]) for t in tuned])


def tie_index(base, t, key: int, rank: int, tuned_are_deltas: bool) -> int:
    """The flat index of the rank-th (1-based) element of δ = t − base whose key is ``key``."""
    return int(torch.nonzero(magnitude_keys(_deltas(base, t, tuned_are_deltas)) == key).flatten()[rank - 1])
