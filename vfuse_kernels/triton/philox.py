"""Philox 4x32-10 in Triton: the same function as csrc/cpu/common.h and reference/philox.py."""
import torch
import triton
import triton.language as tl

ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten rounds on uint32 words (counter c0..c3, key k0, k1); returns the 4 output words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, ROUND_A)
        hi1 = tl.umulhi(c2, ROUND_B)
        lo0 = c0 * ROUND_A
        lo1 = c2 * ROUND_B
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + KEY_A
        k1 = k1 + KEY_B
    return c0, c1, c2, c3


@triton.jit
def dare_bits(k0, k1, model, start, BLOCK: tl.constexpr):
    """32 random bits for flat elements [start, start + BLOCK), start % 4 == 0: element e
    takes word e % 4 of Philox(counter=(e//4 low, e//4 high, model, 0), key=(k0, k1) uint32)."""
    group = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    c2 = tl.zeros([BLOCK // 4], dtype=tl.uint32) + model
    c3 = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # interleave so that word j of group g lands at flat position 4g + j
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])


BITS_BLOCK = 1024


@triton.jit
def _bits_kernel(out_ptr, numel, k0, k1, model, BLOCK: tl.constexpr):
    """out[e] = dare_bits of element e (int64), one block of BLOCK elements per program."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    bits = dare_bits(k0.to(tl.uint32), k1.to(tl.uint32), model.to(tl.uint32), start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, bits.to(tl.int64), mask=offs < numel)


def random_bits(numel: int, seed: int, model: int, device) -> torch.Tensor:
    """ops/random_bits.py's bits in one launch."""
    out = torch.empty(numel, dtype=torch.int64, device=device)
    if numel:
        _bits_kernel[(triton.cdiv(numel, BITS_BLOCK),)](out, numel, seed & 0xFFFFFFFF, seed >> 32, model,
                                                         BLOCK=BITS_BLOCK)
    return out
