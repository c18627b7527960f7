"""``query_key_scores`` (FastV/PyramidDrop key importance) and ``cls_attention`` (VisionZip).

``query_key_scores(q [B, Hq, Lq, d], k [B, Hkv, Nk, d])`` → [B, Nk] fp32: the mean over query
heads and queries of ``softmax(q·kᵀ·scale)`` (DESIGN.md §2.2), the attention each key receives.
The softmax runs over *all* keys passed (no causal mask). ``scale`` defaults to d^-0.5.

- Query subset: Lq and Nk are independent — FastV scores the image keys by the last text
  queries: pass ``q[:, :, -n:]`` and every key their softmax should see, then slice the visual
  keys out of the result.
- Grouped-query attention is inferred from the shapes: ``Hq % Hkv == 0`` and query head h uses
  key head ``h // (Hq/Hkv)`` (HF ``repeat_kv``), as in every current LLM; no repeated k is made.

The [B, Hq, Lq, Nk] matrix is never held. CUDA: two Triton sweeps of q·kᵀ — the per-query
log-sum-exp, then the per-key sums of exp(s − lse) (``triton/query_key_scores.py``); extra
memory 4·B·Hq·Lq + 4·B·S·Nk bytes (S ≤ Hq head splits). CPU: PyTorch matmuls over query
chunks of at most ``CHUNK_ELEMENTS`` logits.

``cls_attention(q, k)`` → [B, Nk]: the VisionZip signal, the attention of the [CLS] query
(``cls_index``, 0 for CLIP) on every key averaged over heads, from a vision-tower layer's q/k.
"""
from __future__ import annotations

import torch

from .._backend import select_backend
from ._checks import check_count, check_float_tensor, check_real
from ._library import define

CHUNK_ELEMENTS = 1 << 22  # CPU path: logits per chunk (16 MiB fp32)


def _torch_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, lq, d = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, nk, dtype=torch.float32, device=q.device)
    if nk == 0 or batch == 0:
        return out
    kt = k.float().transpose(-1, -2).unsqueeze(2)  # [B, Hk, 1, d, Nk]
    chunk = max(1, CHUNK_ELEMENTS // (batch * heads * nk))
    for start in range(0, lq, chunk):
        qc = q[:, :, start:start + chunk].float()
        qc = qc.reshape(batch, kv_heads, group, qc.shape[2], d)  # head h = hk·G + g
        logits = torch.matmul(qc, kt).mul_(scale)
        out += torch.softmax(logits, dim=-1).sum(dim=(1, 2, 3))
    return out.div_(heads * lq)


def _query_key_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    if q.shape[0] and k.shape[2] and select_backend(q.device) == "triton":
        from ..triton import query_key_scores as kernels

        return kernels.query_key_scores(q, k, scale)
    return _torch_scores(q, k, scale)


def _query_key_scores_fake(q, k, scale):
    return q.new_empty(q.shape[0], k.shape[2], dtype=torch.float32)


define("query_key_scores(Tensor q, Tensor k, float scale) -> Tensor", _query_key_scores, _query_key_scores_fake)
query_key_scores_op = torch.ops.vfuse.query_key_scores


def check_qk(q, k, scale) -> float:
    """Validates q/k/scale; returns the scale."""
    check_float_tensor("q", q, ndim=4)
    check_float_tensor("k", k, ndim=4)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    qs, ks = tuple(q.shape), tuple(k.shape)
    if ks[0] != qs[0] or ks[3] != qs[3]:
        raise ValueError(f"q [B, Hq, Lq, d] has shape {qs} and k [B, Hkv, Nk, d] has shape {ks}: B and d must match")
    if ks[1] == 0 or qs[1] % ks[1]:
        raise ValueError(f"q has {qs[1]} heads and k has {ks[1]}: the query heads must be a multiple of the key heads "
                         "(grouped-query attention)")
    if qs[2] == 0 or qs[3] == 0:
        raise ValueError(f"q has shape {qs}: the mean over queries needs Lq ≥ 1 and d ≥ 1")
    if scale is None:
        return q.shape[3] ** -0.5
    return check_real("scale", scale)


def query_key_scores(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """[B, Nk] fp32: the mean over query heads and queries of ``softmax(q·kᵀ·scale)`` over all keys.

    ``q`` [B, Hq, Lq, d], ``k`` [B, Hkv, Nk, d] with Hq a multiple of Hkv (grouped-query
    attention); Lq ≠ Nk is fine (a query subset).

    >>> q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)  # 4 query heads on 2 key heads
    >>> s = query_key_scores(q, k)
    >>> s.shape, torch.allclose(s.sum(dim=1), torch.ones(2))
    (torch.Size([2, 5]), True)
    """
    scale = check_qk(q, k, scale)
    with torch.no_grad():
        return query_key_scores_op(q, k, scale)


def cls_attention(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, cls_index: int = 0) -> torch.Tensor:
    """[B, Nk] fp32: the [CLS] query's attention on every key, averaged over heads (VisionZip).

    ``q``/``k`` are a vision-tower layer's [B, H, N, d] queries and keys; the result includes
    the [CLS] key itself (drop column ``cls_index`` to score the patches only).
    """
    check_float_tensor("q", q, ndim=4)
    cls_index = check_count("cls_index", cls_index, 0, max(q.shape[2] - 1, 0))
    return query_key_scores(q[:, :, cls_index:cls_index + 1], k, scale=scale)
