"""``LlavaProjector`` and ``MultiEncoderProjector``: thin modules over ``project_concat``.

``LlavaProjector`` has HF ``LlavaMultiModalProjector``'s layout (``linear_1``, ``act``,
``linear_2``), so its state dict is the HF one as is; ``MultiEncoderProjector`` holds one
projector per encoder (HF projectors themselves, or ``LlavaProjector``s) and an optional
``TokenPruner``, and projects all encoders' (kept) tokens into one sequence with one call.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..ops.project_concat import project_concat, projector_parts
from .pruner import TokenPruner

# HF ``projector_hidden_act`` names → approximate= of nn.GELU (what project_concat fuses)
ACTIVATIONS = {
    "gelu": "none", "gelu_python": "none",
    "gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh",
    "gelu_accurate": "tanh",
}


def make_activation(act: str | nn.Module) -> nn.Module:
    """An ``nn.GELU`` for an HF activation name (``"gelu"``, ``"gelu_pytorch_tanh"``, ...) or a module."""
    if isinstance(act, nn.Module):
        return act
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not one of {', '.join(map(repr, ACTIVATIONS))} (GELU variants only)")
    return nn.GELU(approximate=ACTIVATIONS[act])


def projector_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``linear_1.*``/``linear_2.*`` entries of a projector's state dict, with any prefix
    (``multi_modal_projector.``, ``model.multi_modal_projector.``, ...) removed."""
    prefixes = {k[: -len("linear_1.weight")] for k in state_dict if k.endswith("linear_1.weight")}
    if len(prefixes) != 1:
        found = sorted(prefixes) if prefixes else "none"
        raise ValueError(f"state_dict must hold exactly one projector (a '...linear_1.weight' key), found {found}")
    prefix = prefixes.pop()
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix) and k[len(prefix):].split(".")[0] in ("linear_1", "linear_2")}


class LlavaProjector(nn.Module):
    """Linear → GELU → Linear with HF ``LlavaMultiModalProjector``'s parameter names."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int | None = None, *,
                 act: str | nn.Module = "gelu", bias: bool = True, device=None, dtype=None):
        super().__init__()
        out_features = hidden_size if out_features is None else out_features
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias, device=device, dtype=dtype)
        self.act = make_activation(act)
        self.linear_2 = nn.Linear(hidden_size, out_features, bias=bias, device=device, dtype=dtype)
        projector_parts("projector", self)  # rejects activations project_concat cannot fuse

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, act: str | nn.Module = "gelu"):
        """A projector shaped and loaded from an HF projector (or whole-model) state dict."""
        sd = projector_state_dict(state_dict)
        w1, w2 = sd["linear_1.weight"], sd["linear_2.weight"]
        module = cls(w1.shape[1], w1.shape[0], w2.shape[0], act=act, bias="linear_1.bias" in sd,
                     device=w1.device, dtype=w1.dtype)
        module.load_state_dict(sd)
        return module

    def forward(self, features, *, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K, H]: one encoder's features (tensor or list of layers), kept rows only."""
        return project_concat([features], [self], keep=None if keep is None else [keep])


class MultiEncoderProjector(nn.Module):
    """M projectors (+ optional pruner) → one [B, ΣKⱼ, H] token sequence via ``project_concat``.

    ``projectors``: modules with ``linear_1``, ``act``, ``linear_2`` (HF ``LlavaMultiModalProjector``
    as is, or ``LlavaProjector``); encoders' tokens are concatenated in this order.
    """

    def __init__(self, projectors: Sequence[nn.Module], pruner: TokenPruner | None = None):
        super().__init__()
        if isinstance(projectors, nn.Module) and not isinstance(projectors, nn.ModuleList):
            projectors = [projectors]
        if len(projectors) == 0:
            raise ValueError("MultiEncoderProjector needs at least one projector")
        for j, p in enumerate(projectors):
            projector_parts(f"projectors[{j}]", p)
        self.projectors = nn.ModuleList(projectors)
        self.pruner = pruner

    @classmethod
    def from_state_dicts(cls, state_dicts: Sequence[Mapping[str, torch.Tensor]], *, act="gelu",
                         pruner: TokenPruner | None = None) -> "MultiEncoderProjector":
        """One ``LlavaProjector`` per HF projector / LLaVA checkpoint state dict (prefixes stripped);
        ``act``: one name/module for all, or one per encoder."""
        acts = list(act) if isinstance(act, (list, tuple)) else [act] * len(state_dicts)
        if len(acts) != len(state_dicts):
            raise ValueError(f"act has {len(acts)} entries for {len(state_dicts)} state dicts")
        return cls([LlavaProjector.from_state_dict(sd, act=a) for sd, a in zip(state_dicts, acts)], pruner)

    @property
    def num_encoders(self) -> int:
        return len(self.projectors)

    @property
    def out_features(self) -> int:
        return self.projectors[0].linear_2.weight.shape[0]

    def forward(self, features, *, keep=None, scores=None, offset: int = 0, return_positions: bool = False):
        """``project_concat(features, projectors, keep=keep)``. With a pruner and no ``keep``,
        ``scores`` (the pruner's inputs, one per encoder) choose the kept tokens first;
        ``return_positions=True`` also returns their position ids (see ``TokenPruner``)."""
        positions = None
        if keep is None and scores is not None:
            if self.pruner is None:
                raise ValueError("scores were given but this MultiEncoderProjector has no pruner")
            keep, positions = self.pruner(scores, offset=offset)
        out = project_concat(features, list(self.projectors), keep=keep)
        if not return_positions:
            return out
        if positions is None:
            lengths = [(f if isinstance(f, torch.Tensor) else f[0]).shape[1] for f in features]
            positions = TokenPruner.position_ids(keep, lengths, out.shape[0], offset, out.device)
        return out, positions
