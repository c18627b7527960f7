"""Philox 4x32-10: the reference against the published known-answer vectors of Random123,
and the CPU and Triton DARE masks against the reference, bit for bit."""
import pytest
import torch
from conftest import backend_device, needs_avx512, with_and_without_avx512

import vfuse_kernels as vk
from vfuse_kernels.delta_rules import dare_keep_threshold
from vfuse_kernels.reference.philox import dare_random_bits, philox4x32_10

# (counter, key) -> output, from Random123's kat_vectors (philox4x32, 10 rounds)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_philox_known_answers(counter, key, expected):
    words = philox4x32_10([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def test_dare_bits_layout():
    """Element e takes word e % 4 of the counter (e // 4, 0, model, 0)."""
    bits = dare_random_bits(10, seed=(7 << 32) | 3, model=2)
    for e in range(10):
        words = philox4x32_10([torch.tensor([v]) for v in (e // 4, 0, 2, 0)], (3, 7))
        assert int(bits[e]) == int(words[e % 4])


@pytest.mark.parametrize("numel", [1, 5, 4099])
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 17])
def test_dare_mask_matches_reference_bits(backend, numel, seed):
    """With base 0, deltas given, weight 1 and no rescale, the output is δ where kept and 0
    elsewhere: the kept set must be exactly bits < floor(p · 2^32) of the reference stream."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(seed % 1000)
    deltas = [(torch.randn(numel, generator=gen).abs() + 0.5).to(device) for _ in range(3)]
    base = torch.zeros(numel, device=device)
    p = 0.37
    for i in range(3):  # model index i keys the stream: merge model i alone at position i
        weights = [1.0 if j == i else 0.0 for j in range(3)]
        out = vk.delta_merge(base, deltas, weights, method="dare_linear", density=p, rescale=None, seed=seed,
                             tuned_are_deltas=True)
        expected_keep = dare_random_bits(numel, seed, i) < dare_keep_threshold(p)
        assert torch.equal((out != 0).cpu(), expected_keep)


@pytest.mark.parametrize("numel", [0, 1, 5, 4099, 10_007])
@pytest.mark.parametrize("seed,model", [(0, 0), (2**40 + 17, 3), (2**64 - 1, 2**32 - 1)])
def test_random_bits_op_is_the_reference_stream(backend, numel, seed, model):
    """ops.random_bits (C++ / Triton) gives the reference stream's bits, element for element."""
    from vfuse_kernels.ops.random_bits import random_bits

    got = random_bits(numel, seed, model, backend_device(backend))
    assert got.dtype == torch.int64 and got.shape == (numel,)
    assert torch.equal(got.cpu(), dare_random_bits(numel, seed, model))


RANDOM_BITS = """
import json, sys, torch
from vfuse_kernels.ops.random_bits import random_bits
print(json.dumps([random_bits(n, s, m, torch.device("cpu")).tolist() for n in (3, 33, 4156, 4099) for s in (0, 2**63 + 5)
                  for m in (0, 3)]))
"""


@needs_avx512
def test_the_avx512_philox_gives_the_portable_loops_bits():
    """Eight groups per vector through vpmuludq (tails of 1–7 groups and a partial group left to
    the portable loop): the same words as with VFUSE_NO_AVX512, and as the reference stream."""
    avx512, portable = with_and_without_avx512(RANDOM_BITS)
    assert avx512 == portable
    assert avx512[-1] == dare_random_bits(4099, 2**63 + 5, 3).tolist()
