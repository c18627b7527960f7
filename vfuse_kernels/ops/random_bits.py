"""``random_bits(numel, seed, model, device)``: the 32 random bits of each flat element of
DARE's Philox stream (element e takes word e % 4 of Philox4x32-10 with counter
(e // 4, model, 0) and key ``seed``), as int64 in [0, 2^32) — the draws DARE's kernels make,
for methods that need them per element with a probability of their own (DELLA).

Backends: C++ on the CPU (OpenMP), one Triton launch on CUDA, else the plain-PyTorch reference
(``reference/philox.py``); all three give the same bits.
"""
from __future__ import annotations

import torch

from .._backend import select_backend

MASK64 = (1 << 64) - 1


def random_bits(numel: int, seed: int, model: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """int64 [numel]: the stream's 32 random bits of elements 0 … numel − 1 for (seed, model).

    >>> random_bits(6, seed=7, model=1).tolist() == random_bits(8, seed=7, model=1)[:6].tolist()
    True
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if not 0 <= model < 2**32:
        raise ValueError(f"model must be in [0, 2^32), got {model}")
    device = torch.device(device)
    seed &= MASK64
    backend = select_backend(device)
    if backend == "cpp":
        from .._backend import cpu_extension

        out = torch.empty(numel, dtype=torch.int64)
        cpu_extension().random_bits(seed, model, numel, out.data_ptr())
        return out
    if backend == "triton":
        from ..triton.philox import random_bits as triton_bits

        return triton_bits(numel, seed, model, device)
    from ..reference.philox import dare_random_bits

    return dare_random_bits(numel, seed, model, device=device)
