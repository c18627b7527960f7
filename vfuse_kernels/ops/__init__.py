"""Public functional ops: argument checks, backend dispatch, torch.library registration."""
from .delta_merge import METHODS, SPARSE_METHODS, delta_merge
from .delta_merge_foreach import delta_merge_foreach
from .magnitude_threshold import MagnitudeThresholds, magnitude_threshold, ties_thresholds
from .project_concat import project_concat
from .query_key_scores import cls_attention, query_key_scores
from .select_tokens import encoder_budgets, select_encoder_tokens, select_tokens
from .karcher import karcher_mean
from .model_stock import model_stock
from .multislerp import multislerp
from .nearswap import nearswap
from .nuslerp import nuslerp
from .slerp import slerp

__all__ = ["METHODS", "SPARSE_METHODS", "MagnitudeThresholds", "delta_merge", "delta_merge_foreach",
           "magnitude_threshold", "ties_thresholds", "project_concat", "query_key_scores", "cls_attention", "select_tokens", "select_encoder_tokens",
           "encoder_budgets", "slerp", "nuslerp", "multislerp", "nearswap", "karcher_mean", "model_stock"]
