"""``select_tokens`` (order-preserving top-k, DESIGN.md §2.2) and the per-encoder budget helper.

``select_tokens(scores, k)``: per row the k highest scores, returned as ascending indices
(the original token order is kept); among equal scores the lower index wins; NaN counts as
the lowest score. No device sync and no data-dependent shapes on any path:

- CUDA (fp32/bf16/fp16 scores): one Triton launch, one program per row — an exact k-th-key
  search on order-preserving integer keys, then a prefix count that resolves ties by index
  and writes the indices in order (``triton/select_tokens.py``); ``select_encoder_tokens``
  selects every encoder's rows in that one launch (scores of one dtype). ``torch.topk`` cannot
  be used as is: its choice among equal scores is unspecified;
- CPU, and fp64 scores: ``torch.topk``'s k-th value as a threshold, then one O(N) pass — a
  cumulative count of the ties keeps the first ones — and a second ``topk`` on −index keys
  that returns the kept indices in ascending order.

``select_encoder_tokens(scores, keep, mode=...)`` splits a token budget over M encoders:

- ``"proportional"``: encoder j gets its share ``K·Nⱼ/ΣN`` of the total K, rounded by largest
  remainder (ties → lower encoder index), so the counts add up to exactly K;
- ``"global"``: the top K of each row over *all* encoders' tokens (scores must be comparable
  across encoders). ``keep[j]`` must be a rectangular [B, Kⱼ], so Kⱼ is the number of encoder-j
  tokens in that global top K averaged over the batch (largest remainder again); with B = 1
  this is exactly the global top K. Needs one device sync (the counts become shapes).

``keep`` is a total per row: an int (tokens) or a float ratio in (0, 1] (K = max(1, int(ratio·ΣN))).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._backend import select_backend
from ._checks import FLOAT_DTYPES, check_count, check_float_tensor, check_same_device
from ._library import define

BUDGET_MODES = ("proportional", "global")


def _select(scores: torch.Tensor, k: int) -> torch.Tensor:
    b, n = scores.shape
    if k == 0 or b == 0:
        return torch.empty(b, k, dtype=torch.int64, device=scores.device)
    if k == n:
        return torch.arange(n, device=scores.device).expand(b, n).contiguous()
    if scores.dtype != torch.float64 and select_backend(scores.device) == "triton":
        from ..triton import select_tokens as kernels

        return kernels.select_tokens(scores, k)
    s = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    s = torch.where(torch.isnan(s), float("-inf"), s)
    kth = torch.topk(s, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = s > kth
    tie = s == kth
    # keep every score above the k-th, then the first (k − #above) of those equal to it
    mask = above | (tie & (tie.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True)))
    # exactly k kept per row; their distinct keys −index make topk return them in ascending order
    positions = torch.arange(n, device=s.device).expand(b, n)
    keys = torch.where(mask, -positions, torch.full_like(positions, -n - 1))
    return (-torch.topk(keys, k, dim=1, sorted=True).values).contiguous()


def _select_many(scores: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """``_select`` of every (scores[j], ks[j]) (one device); on the Triton backend the tensors that
    need a search (1 ≤ kⱼ < Nⱼ, B ≥ 1), where they share one dtype, go in one launch."""
    search = [j for j, (s, k) in enumerate(zip(scores, ks)) if 0 < k < s.shape[1] and s.shape[0]]
    dtypes = {scores[j].dtype for j in search}
    if len(search) < 2 or len(dtypes) > 1 or torch.float64 in dtypes or select_backend(scores[0].device) != "triton":
        return [_select(s, k) for s, k in zip(scores, ks)]
    from ..triton import select_tokens as kernels

    found = dict(zip(search, kernels.select_tokens_many([scores[j] for j in search], [ks[j] for j in search])))
    return [found[j] if j in found else _select(s, k) for j, (s, k) in enumerate(zip(scores, ks))]


def _select_fake(scores, k):
    return scores.new_empty(scores.shape[0], k, dtype=torch.int64)


define("select_tokens(Tensor scores, int k) -> Tensor", _select, _select_fake)
select_tokens_op = torch.ops.vfuse.select_tokens


def select_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] (int64) of the k highest ``scores`` [B, N] per row, in ascending order.

    Ties go to the lower index; NaN scores count as the lowest.

    >>> select_tokens(torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.2]]), 3)
    tensor([[1, 2, 3]])
    """
    check_float_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES)
    k = check_count("k", k, 0, scores.shape[1])
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        with torch.no_grad():
            return select_tokens_op(scores, k)  # traced (torch.compile, export, fake tensors): the registered op
    return _select(scores.detach(), k)  # eager: no dispatcher round trip (host time bounds small calls)


def token_budget(keep, total: int) -> int:
    """The number of tokens kept out of ``total``: ``keep`` itself (an int ≤ total) or, for a
    float ratio in (0, 1], ``max(1, int(ratio · total))`` (0 when total is 0)."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be an int (tokens) or a float ratio, got {type(keep).__name__} {keep!r}")
    if isinstance(keep, numbers.Integral):
        return check_count("keep", keep, 0, total)
    ratio = float(keep)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio {ratio} is outside (0, 1]")
    return min(total, max(1, int(ratio * total))) if total else 0


def _largest_remainder(numerators: list[int], denominator: int, total: int) -> list[int]:
    """Integer counts cⱼ ≈ numeratorⱼ / denominator adding up to ``total`` (Σ numerators =
    total · denominator): floors, then +1 for the largest remainders (ties → lower j)."""
    counts = [x // denominator for x in numerators]
    order = sorted(range(len(numerators)), key=lambda j: (-(numerators[j] % denominator), j))
    for j in order[: total - sum(counts)]:
        counts[j] += 1
    return counts


def encoder_budgets(lengths: Sequence[int], keep) -> list[int]:
    """Proportional split of the budget ``keep`` (tokens or ratio of ΣN) over encoders of
    ``lengths`` tokens: Kⱼ ≈ K·Nⱼ/ΣN by largest remainder, ΣKⱼ = K exactly.

    >>> encoder_budgets([576, 2880], 0.25)
    [144, 720]
    """
    lengths = [check_count(f"lengths[{j}]", n, 0, 2**62) for j, n in enumerate(lengths)]
    total_n = sum(lengths)
    k = token_budget(keep, total_n)
    if total_n == 0:
        return [0] * len(lengths)
    return _largest_remainder([k * n for n in lengths], total_n, k)


def select_encoder_tokens(scores: Sequence[torch.Tensor], keep, *, mode: str = "proportional") -> list[torch.Tensor]:
    """Each encoder's kept indices [B, Kⱼ] (ascending) under a total budget ``keep`` per row.

    ``scores[j]``: [B, Nⱼ]; ``keep``: tokens (int) or a ratio of ΣNⱼ (float in (0, 1]);
    ``mode``: ``"proportional"`` (Kⱼ ∝ Nⱼ) or ``"global"`` (top K over all encoders' tokens,
    Kⱼ averaged over the batch) — see the module docstring.

    >>> s = [torch.tensor([[0.9, 0.1, 0.8]]), torch.tensor([[0.7, 0.2, 0.3, 0.95]])]
    >>> select_encoder_tokens(s, 4, mode="global")
    [tensor([[0, 2]]), tensor([[0, 3]])]
    """
    if isinstance(scores, torch.Tensor) or not isinstance(scores, Sequence) or not scores:
        raise TypeError("scores must be a non-empty list or tuple of [B, N] tensors, one per encoder")
    if mode not in BUDGET_MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(repr(m) for m in BUDGET_MODES)}")
    for j, s in enumerate(scores):
        check_float_tensor(f"scores[{j}]", s, ndim=2, dtypes=FLOAT_DTYPES)
        if s.shape[0] != scores[0].shape[0]:
            raise ValueError(f"scores[{j}] has shape {tuple(s.shape)} but scores[0] has batch {scores[0].shape[0]}")
        check_same_device(f"scores[{j}]", s, "scores[0]", scores[0])
    lengths = [s.shape[1] for s in scores]
    if mode == "proportional":
        counts = encoder_budgets(lengths, keep)
    else:
        total = token_budget(keep, sum(lengths))
        batch = scores[0].shape[0]
        if batch == 0 or total == 0:
            counts = encoder_budgets(lengths, total)
        else:
            joint = torch.cat([s.float() if s.dtype != torch.float64 else s for s in scores], dim=1)
            chosen = select_tokens(joint, total)  # ties → lower encoder, then lower token
            bounds = torch.tensor(lengths, device=joint.device).cumsum(0)
            encoder = torch.bucketize(chosen, bounds, right=True)
            per_encoder = torch.bincount(encoder.reshape(-1), minlength=len(lengths)).tolist()  # Σ = B·K
            counts = _largest_remainder(per_encoder, batch, total)
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return [select_tokens(s, kj) for s, kj in zip(scores, counts)]  # traced: the registered op per encoder
    return _select_many([s.detach() for s in scores], counts)  # eager: one launch for every encoder (CUDA)
