"""fp32/fp64 plain-PyTorch oracles: the ground truth for tests, benchmarks and fallback."""
from . import delta_merge, philox

__all__ = ["delta_merge", "philox"]
