"""``TokenPruner``: a score source + a token budget → each encoder's kept indices and positions.

Score sources (``source=``), one input per encoder:

- ``"scores"``: [B, Nⱼ] scores computed elsewhere;
- ``"cls"`` (VisionZip): ``(q, k)`` of a vision-tower layer, [B, H, N, d]; the [CLS] query's
  attention (``cls_attention``) on the keys, the [CLS] key itself dropped when ``drop_cls``
  (features without [CLS], HF's ``"default"`` strategy);
- ``"query_key"`` (FastV/PyramidDrop): ``(q, k)`` or ``(q, k, key_slice)``: the mean attention
  each key receives (``query_key_scores``), sliced to the encoder's visual keys.

Budget: ``keep`` tokens in total per row (int) or a ratio of ΣNⱼ (float), split ``"proportional"``
or ``"global"`` (``select_encoder_tokens``). The result's ``position_ids`` [B, ΣKⱼ] are the kept
tokens' positions in the *unpruned* concatenation (``offset`` + Σ_{i<j} Nᵢ + keepⱼ), for callers
that keep the original positions (FastV style); LLaVA's own path renumbers them sequentially.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops.query_key_scores import cls_attention, query_key_scores
from ..ops.select_tokens import BUDGET_MODES, select_encoder_tokens, token_budget

SOURCES = ("scores", "cls", "query_key")


class PrunedTokens(NamedTuple):
    keep: list[torch.Tensor]  # per encoder [B, Kⱼ] int64, ascending
    position_ids: torch.Tensor  # [B, ΣKⱼ] int64


def attention_qk(layer: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(q, k, scale) [B, H, N, d] of a CLIP/SigLIP-style encoder layer (``layer_norm1``,
    ``self_attn.q_proj``/``k_proj``) on its input ``hidden_states`` [B, N, D]."""
    attn = getattr(layer, "self_attn", None)
    norm = getattr(layer, "layer_norm1", None)
    if attn is None or norm is None or not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj"):
        raise TypeError(f"{type(layer).__name__} is not a CLIP/SigLIP-style encoder layer "
                        "(layer_norm1, self_attn.q_proj, self_attn.k_proj)")
    x = norm(hidden_states)
    batch, n = x.shape[:2]
    head_dim = getattr(attn, "head_dim", None) or attn.q_proj.weight.shape[0] // attn.num_heads
    q = attn.q_proj(x).view(batch, n, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, n, -1, head_dim).transpose(1, 2)
    return q, k, float(getattr(attn, "scale", head_dim**-0.5))


class TokenPruner(nn.Module):
    """Chooses which visual tokens to keep; see the module docstring."""

    def __init__(self, keep: int | float, *, source: str = "scores", mode: str = "proportional",
                 scale: float | None = None, cls_index: int = 0, drop_cls: bool = True):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not one of {', '.join(map(repr, SOURCES))}")
        if mode not in BUDGET_MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(map(repr, BUDGET_MODES))}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise TypeError(f"keep must be an int (tokens) or a float ratio, got {type(keep).__name__} {keep!r}")
        token_budget(keep, keep if isinstance(keep, int) and keep >= 0 else 1)  # range check
        self.keep, self.source, self.mode = keep, source, mode
        self.scale, self.cls_index, self.drop_cls = scale, cls_index, drop_cls

    def extra_repr(self) -> str:
        return f"keep={self.keep}, source={self.source!r}, mode={self.mode!r}"

    def scores(self, inputs) -> list[torch.Tensor]:
        """Per-encoder [B, Nⱼ] scores from this pruner's source."""
        if isinstance(inputs, torch.Tensor) or (isinstance(inputs, tuple) and self.source != "scores"
                                                and len(inputs) in (2, 3) and isinstance(inputs[0], torch.Tensor)
                                                and inputs[0].dim() == 4):
            inputs = [inputs]
        out = []
        for j, item in enumerate(inputs):
            if self.source == "scores":
                out.append(item)
                continue
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise TypeError(f"inputs[{j}] must be (q, k) or (q, k, key_slice) for source={self.source!r}")
            q, k = item[0], item[1]
            if self.source == "cls":
                s = cls_attention(q, k, scale=self.scale, cls_index=self.cls_index)
                if self.drop_cls:
                    s = torch.cat([s[:, :self.cls_index], s[:, self.cls_index + 1:]], dim=1)
            else:
                s = query_key_scores(q, k, scale=self.scale)
            if len(item) == 3:
                s = s[:, item[2]]
            out.append(s)
        return out

    @staticmethod
    def position_ids(keep, lengths, batch: int, offset: int, device) -> torch.Tensor:
        """[B, ΣKⱼ]: positions of the kept tokens in the unpruned concatenation, + ``offset``."""
        parts, start = [], offset
        for kp, n in zip(keep, lengths):
            if kp is None:
                kp = torch.arange(n, device=device).expand(batch, n)
            parts.append(kp.to(torch.int64) + start)
            start += n
        return torch.cat(parts, dim=1)

    def forward(self, inputs, *, offset: int = 0) -> PrunedTokens:
        scores = self.scores(inputs)
        keep = select_encoder_tokens(scores, self.keep, mode=self.mode)
        lengths = [s.shape[1] for s in scores]
        return PrunedTokens(keep, self.position_ids(keep, lengths, scores[0].shape[0], offset, scores[0].device))
