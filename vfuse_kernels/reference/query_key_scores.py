"""Plain-PyTorch fp64 oracle of ``query_key_scores`` and ``cls_attention`` (DESIGN.md §2.2).

Materialises the whole attention matrix ``softmax(q·kᵀ·scale)`` [B, Hq, Lq, Nk] in fp64:
the ground truth the tiled kernels (which never hold it) are tested against. q is
[B, Hq, Lq, d] and k [B, Hkv, Nk, d] with Hq a multiple of Hkv (grouped-query attention:
query head h uses key head h // (Hq/Hkv), HF's ``repeat_kv``); Lq and Nk are independent.
"""
from __future__ import annotations

import torch


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """fp64 ``softmax(q·kᵀ·scale)`` [B, Hq, Lq, Nk]; k may have fewer (grouped) heads than q."""
    q64, k64 = q.detach().double(), k.detach().double()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    groups = q.shape[1] // k.shape[1]
    k64 = k64.repeat_interleave(groups, dim=1)
    return torch.softmax(q64 @ k64.transpose(-1, -2) * scale, dim=-1)


def query_key_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """fp64 [B, Nk]: the mean over query heads and queries of the attention each key receives."""
    return attention_probs(q, k, scale).mean(dim=(1, 2))


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, cls_index: int = 0) -> torch.Tensor:
    """fp64 [B, Nk]: the attention of the [CLS] query (row ``cls_index``) on every key, mean over heads."""
    return attention_probs(q[:, :, cls_index:cls_index + 1], k, scale).mean(dim=(1, 2))
