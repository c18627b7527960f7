"""``MultiLayerFeatureFusion``: picks a vision tower's feature layer(s) the way HF LLaVA does.

``vision_feature_layer`` an int → that hidden state; a list → those layers, whose channel
concat is the projector input — returned as a *list* of views, which ``project_concat``
consumes without ever materialising the concat. ``select_strategy="default"`` drops the
[CLS] token (``[:, 1:]``, a view), ``"full"`` keeps every token.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

STRATEGIES = ("default", "full")


class MultiLayerFeatureFusion(nn.Module):
    def __init__(self, layers: int | Sequence[int] = -2, select_strategy: str = "default"):
        super().__init__()
        if isinstance(layers, bool) or not (isinstance(layers, int) or (
                isinstance(layers, Sequence) and layers and all(isinstance(i, int) for i in layers))):
            raise TypeError(f"layers must be an int or a non-empty list of ints, got {layers!r}")
        if select_strategy not in STRATEGIES:
            raise ValueError(f"select_strategy={select_strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}")
        self.layers = layers if isinstance(layers, int) else list(layers)
        self.select_strategy = select_strategy

    @classmethod
    def from_config(cls, config) -> "MultiLayerFeatureFusion":
        """From an HF LLaVA config's ``vision_feature_layer`` and ``vision_feature_select_strategy``."""
        return cls(config.vision_feature_layer, getattr(config, "vision_feature_select_strategy", "default"))

    def extra_repr(self) -> str:
        return f"layers={self.layers}, select_strategy={self.select_strategy!r}"

    @property
    def layer_list(self) -> list[int]:
        return [self.layers] if isinstance(self.layers, int) else list(self.layers)

    def attention_layer(self, num_hidden_states: int) -> int:
        """The index of the encoder layer whose output is the last selected hidden state (its
        input is ``hidden_states[index]``): where VisionZip-style [CLS] attention is read."""
        index = self.layer_list[-1] % num_hidden_states
        if index == 0:
            raise ValueError("the selected feature layer is the embedding output: no attention layer precedes it")
        return index - 1

    def hidden_state_indices(self, num_hidden_states: int | None = None) -> list[int]:
        """The hidden states ``forward`` reads and, given the tower's ``num_hidden_states``
        (layers + 1), the input of ``attention_layer`` that [CLS]-attention scores read."""
        indices = self.layer_list
        return indices if num_hidden_states is None else indices + [self.attention_layer(num_hidden_states)]

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """A [B, N, D] view (int layer) or a list of them (list of layers)."""
        start = 1 if self.select_strategy == "default" else 0
        missing = [i for i in self.layer_list if hidden_states[i] is None]
        if missing:
            raise ValueError(f"the vision tower did not return hidden state(s) {missing} (of {len(hidden_states)}): "
                             "ask for them with output_hidden_states")
        picked = [hidden_states[i][:, start:] for i in self.layer_list]
        return picked[0] if isinstance(self.layers, int) else picked
