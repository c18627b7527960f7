"""Plain-PyTorch oracle of ``select_tokens`` (DESIGN.md §2.2): a stable descending sort.

The k highest scores of each row, returned in ascending index order; equal scores go to
the lower index (the stable sort keeps them in index order); NaN counts as the lowest score.
"""
from __future__ import annotations

import torch


def select_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] int64 indices, ascending, of the k largest entries of each row of ``scores`` [B, N]."""
    s = scores.detach().double()
    s = torch.where(torch.isnan(s), float("-inf"), s)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values
