"""fp32/fp64 plain-PyTorch oracles: the ground truth for tests, benchmarks and fallback."""
from . import delta_merge, philox, project_concat, query_key_scores, select_tokens, slerp

__all__ = ["delta_merge", "philox", "project_concat", "query_key_scores", "select_tokens", "slerp"]
