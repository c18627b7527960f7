"""Thin nn.Modules over the ops: they hold parameters and call one op."""
from .feature_fusion import MultiLayerFeatureFusion
from .projector import LlavaProjector, MultiEncoderProjector
from .pruner import PrunedTokens, TokenPruner, attention_qk

__all__ = ["LlavaProjector", "MultiEncoderProjector", "MultiLayerFeatureFusion", "PrunedTokens", "TokenPruner",
           "attention_qk"]
