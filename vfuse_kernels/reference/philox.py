"""Philox 4x32-10 in plain PyTorch (int64 arithmetic on 32-bit words).

The DARE mask stream shared by every backend: element ``e`` of model ``i`` takes word
``e % 4`` of ``philox4x32_10(counter=(e//4 low, e//4 high, i, 0), key=(seed low, seed high))``.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a·b, without int64 overflow."""
    lo_part = a * (b & 0xFFFF)  # < 2^48
    hi_part = a * (b >> 16)  # < 2^48
    low = lo_part + ((hi_part & 0xFFFF) << 16)  # < 2^49
    return (hi_part >> 16) + (low >> 32), low & _MASK32


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Ten Philox rounds on int64 tensors holding 32-bit words; returns the 4 output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_ROUND_A, c0)
        hi1, lo1 = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def dare_random_bits(numel: int, seed: int, model: int, device=None) -> torch.Tensor:
    """The 32 random bits of each of ``numel`` flat elements (int64 tensor in [0, 2^32))."""
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(groups)
    counter = [groups & _MASK32, groups >> 32, zeros + model, zeros]
    words = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    return torch.stack(words, dim=1).reshape(-1)[:numel]

