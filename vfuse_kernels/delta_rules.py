"""The fused delta-merge methods' table and scalar rules, without torch: ``ops.delta_merge``,
the references (``reference/``) and the torch-free CPU merge (``merging/native.py``) read them
here, so each is stated once.
"""
from __future__ import annotations

# method → (sparsification, sign election, default normalize), as mergekit defines them
METHODS = {
    "task_arithmetic": ("none", False, False),
    "linear": ("none", False, True),
    "ties": ("trim", True, True),
    "dare_linear": ("drop", False, False),
    "dare_ties": ("drop", True, False),
}
# the kernels' codes (csrc/cpu/delta_merge.h, triton/delta_merge.py)
SPARSIFY_CODES = {"none": 0, "trim": 1, "drop": 2}
ELECT_CODES = {None: 0, "sum": 1, "count": 2}
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor leaves a delta alone below this L1 norm


def trim_count(density: float, numel: int) -> int:
    """TIES keeps k = max(1, int(density · numel)) elements, at most numel."""
    return min(numel, max(1, int(density * numel)))


def dare_keep_threshold(density: float) -> int:
    """DARE keeps an element when its 32 random bits are below ``floor(density · 2^32)``."""
    return int(density * 2**32)
