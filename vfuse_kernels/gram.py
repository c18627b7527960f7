"""Scalar math on a Gram matrix's entries, in Python floats (fp64) and without torch: the
coefficients that Model Stock, nuslerp, multislerp and karcher take from the C++ Gram pass
before their combination pass (ops/model_stock.py, ops/nuslerp.py, ops/multislerp.py,
ops/karcher.py; the torch-free merge, merging/native.py)."""
from __future__ import annotations

import math

NORM_PRODUCT_MIN = 1e-6
SINGULAR_EPS = 1e-6
NUSLERP_EPS = 1e-8
UNIT_EPS = 1e-7  # a vector's norm is at least this when it is normalised
CANCELLING = ("multislerp: the weighted sum of the unit vectors is zero (antipodal inputs whose weights cancel); "
              "change the weights")


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


def nuslerp_coefficients(gram: list[float], t: float) -> list[float]:
    """[k₀, k₁] with nuslerp(a, b) = k₀·a + k₁·b over the flattened tensors, from their Gram
    matrix's upper triangle (⟨a, a⟩, ⟨a, b⟩, ⟨b, b⟩), in fp64: the linear blend where
    1 − cos²θ ≤ 1e-16."""
    g00, g01, g11 = gram
    cos = g01 / (max(math.sqrt(g00), UNIT_EPS) * max(math.sqrt(g11), UNIT_EPS))
    cos = max(-1.0, min(1.0, cos))
    if 1 - cos * cos <= NUSLERP_EPS**2:
        return [1 - t, t]
    theta = math.acos(cos)
    return [math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]


def multislerp_coefficients(gram: list[float], n: int, weights: list[float], normalize: bool, eps: float) -> list[float]:
    """k with multislerp(offsets) = Σ k_i x_i, from the offsets' Gram matrix (upper triangle,
    row-major), in fp64: the steps of ``multislerp_tensors`` on the coefficients."""
    g = gram_matrix(gram, n)
    w = [x / sum(weights) for x in weights] if normalize else list(weights)
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    mean = [w[i] / (norms[i] + eps) for i in range(n)]  # Σ w_i u_i
    mean_norm = gram_norm(g, mean)
    if mean_norm < eps:
        if n > 2:
            raise ValueError(CANCELLING)
        return w  # two inputs: the linear fallback Σ w_i x_i
    unit_mean = [c / mean_norm for c in mean]
    along = sum(w[i] * sum(unit_mean[j] * g[i][j] for j in range(n)) / (norms[i] + eps) for i in range(n))
    step = [mean[j] - along * unit_mean[j] for j in range(n)]  # Σ w_i (u_i − <u_i, m> m)
    length = gram_norm(g, step) + eps
    scale = sum(wi * ni for wi, ni in zip(w, norms))
    return [scale * (unit_mean[j] * math.cos(length) + step[j] * math.sin(length) / length) for j in range(n)]


def karcher_coefficients(gram: list[float], n: int, weights: list[float], max_iter: int, tol: float) -> list[float] | None:
    """k with the Karcher mean = Σ k_i x_i, from the inputs' Gram matrix (upper triangle,
    row-major): ``karcher_tensors``' steps on coefficient vectors, in fp64. None where every
    input's norm is <= tol (the torch path returns its zero)."""
    g = gram_matrix(gram, n)

    norms = [math.sqrt(g[i][i]) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return None
    total = sum(weights[i] for i in valid)
    units = {i: [1.0 / norms[i] if j == i else 0.0 for j in range(n)] for i in valid}
    alphas = {i: weights[i] / total for i in valid}
    mean = [sum(alphas[i] * units[i][j] for i in valid) for j in range(n)]
    mean_norm = gram_norm(g, mean)
    mean = list(units[valid[0]]) if mean_norm < tol else [c / mean_norm for c in mean]
    for _ in range(max_iter):
        step = [0.0] * n
        for i in valid:
            cos = max(-1.0, min(1.0, gram_inner(g, mean, units[i])))
            theta = math.acos(cos)
            coef = 0.0 if theta < tol else alphas[i] * theta / math.sin(theta)
            step = [s + coef * (u - cos * m) for s, u, m in zip(step, units[i], mean)]
        step_norm = gram_norm(g, step)
        if step_norm < tol:
            break
        mean = [math.cos(step_norm) * m + math.sin(step_norm) * s / step_norm for m, s in zip(mean, step)]
        mean_norm = gram_norm(g, mean)
        if mean_norm > tol:
            mean = [m / mean_norm for m in mean]
    scale = sum(w * r for w, r in zip(weights, norms))
    return [scale * m for m in mean]
