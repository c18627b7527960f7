"""Scalar math on a Gram matrix's entries, in Python floats (fp64) and without torch: Model
Stock's t, and the norms and inner products of combinations that multislerp and karcher
take from the C++ Gram passes (ops/model_stock.py, ops/multislerp.py, ops/karcher.py; the
torch-free merge, merging/native.py)."""
from __future__ import annotations

import math

NORM_PRODUCT_MIN = 1e-6
SINGULAR_EPS = 1e-6


def gram_matrix(upper: list[float], n: int) -> list[list[float]]:
    """The n × n symmetric matrix of the C++ Gram pass's upper triangle (row-major)."""
    entries, g = iter(upper), [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            g[i][j] = g[j][i] = next(entries)
    return g


def gram_inner(g: list[list[float]], c: list[float], d: list[float]) -> float:
    """⟨Σ cᵢxᵢ, Σ dⱼxⱼ⟩ from the Gram matrix g of the xᵢ."""
    n = len(g)
    return sum(c[i] * d[j] * g[i][j] for i in range(n) for j in range(n))


def gram_norm(g: list[list[float]], c: list[float]) -> float:
    """|Σ cᵢxᵢ| from the Gram matrix g of the xᵢ (rounding below 0 read as 0)."""
    return math.sqrt(max(0.0, gram_inner(g, c, c)))


def model_stock_t(gram: list[float], n: int) -> float:
    """t from the offsets' Gram matrix (upper triangle, row-major): mergekit's formula in fp64."""
    g = gram_matrix(gram, n)
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(max(-1.0, min(1.0, g[i][j] / max(norms[i] * norms[j], NORM_PRODUCT_MIN))) for i, j in pairs)
    cos /= len(pairs)
    denominator = 1 + (n - 1) * cos
    return 0.0 if abs(denominator) < SINGULAR_EPS else n * cos / denominator
