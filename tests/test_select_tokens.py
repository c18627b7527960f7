"""select_tokens against the stable-sort reference (tie-heavy scores, NaN/±inf/±0), on both paths —
the Triton kernel (CUDA; here under the interpreter) and the torch path (CPU, fp64) — and the
per-encoder budget helper's two modes."""
from __future__ import annotations

import importlib

import pytest
import torch
from conftest import backend_device

import vfuse_kernels as vk
import vfuse_kernels.ops  # noqa: F401 - registers torch.ops.vfuse (the package imports lazily)
from vfuse_kernels.reference import select_tokens as ref



def _kernels():
    pytest.importorskip("triton")
    return importlib.import_module("vfuse_kernels.triton.select_tokens")

SHAPES = [(1, 1), (1, 7), (3, 13), (2, 577), (2, 2880), (0, 5)]
SCORE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _scores(shape, dtype, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: most selections cut through a run of equal scores
        return torch.randint(0, 4, shape, generator=gen).to(dtype) * 0.5 - 0.75
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(backend, shape, dtype, ties):
    scores = _scores(shape, dtype, seed=hash((shape, str(dtype), ties)) % 10**6, ties=ties)
    scores = scores.to(backend_device(backend))
    n = shape[1]
    for k in sorted({0, 1, n // 3, n // 2 + 1, n - 1, n} - {-1}):
        out = vk.select_tokens(scores, k)
        assert out.dtype == torch.int64 and out.shape == (shape[0], k)
        assert torch.equal(out.cpu(), ref.select_tokens(scores, k).cpu()), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_on_long_rows_in_chunks(dtype, monkeypatch):
    """Rows longer than MAX_BLOCK are searched chunk by chunk, ties counted across chunk borders."""
    kernels = _kernels()
    monkeypatch.setattr(kernels, "MAX_BLOCK", 32)
    scores = _scores((2, 83), dtype, seed=11, ties=True).to(backend_device("triton"))
    scores[1, 5], scores[0, 40], scores[0, 70] = float("nan"), float("inf"), -0.0
    for k in (1, 33, 82):
        assert torch.equal(kernels.select_tokens(scores, k).cpu(), ref.select_tokens(scores, k).cpu()), k


def test_kernel_keys_order_the_whole_float_range():
    """The integer keys order bf16/fp16 values as the floats do across every exponent (subnormals,
    ±0, ±inf, NaN lowest): every 23rd bit pattern of the type, shuffled, ties from ±0."""
    kernels = _kernels()
    device = backend_device("triton")
    for dtype in (torch.bfloat16, torch.float16):
        patterns = torch.arange(-(1 << 15), 1 << 15, 23, dtype=torch.int32).to(torch.int16)
        specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")], dtype=dtype)
        values = torch.cat([patterns.view(dtype), specials])
        n = values.numel()
        scores = values[torch.randperm(n, generator=torch.Generator().manual_seed(5))][None].to(device)
        for k in (1, n // 7, n // 2, n - 1):
            assert torch.equal(kernels.select_tokens(scores, k).cpu(), ref.select_tokens(scores, k).cpu()), (dtype, k)



def test_ties_go_to_the_lower_index_and_order_is_kept():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert vk.select_tokens(scores, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert vk.select_tokens(scores, 5).tolist() == [[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]]


def test_nan_counts_as_lowest_and_inf_as_highest():
    scores = torch.tensor([[float("nan"), 0.5, float("-inf"), float("inf"), float("nan"), -2.0]])
    assert vk.select_tokens(scores, 3).tolist() == [[1, 3, 5]]
    assert vk.select_tokens(scores, 5).tolist() == [[0, 1, 2, 3, 5]]  # then -inf, then NaNs by index
    assert torch.equal(vk.select_tokens(scores, 5), ref.select_tokens(scores, 5))


def test_noncontiguous_scores():
    full = torch.randn(577, 6)
    scores = full.t()  # [6, 577], stride (1, 6)
    assert not scores.is_contiguous()
    assert torch.equal(vk.select_tokens(scores, 100), ref.select_tokens(scores.contiguous(), 100))


def test_selected_are_the_top_k():
    """A property check independent of the reference: every kept score ≥ every dropped score."""
    scores = torch.randn(4, 301)
    idx = vk.select_tokens(scores, 57)
    assert (idx.diff(dim=1) > 0).all()
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    assert (scores.masked_fill(~kept, float("inf")).amin(1) >= scores.masked_fill(kept, float("-inf")).amax(1)).all()


@pytest.mark.parametrize("k, exc, match", [(-1, ValueError, r"k=-1 is outside \[0, 10\]"),
                                           (11, ValueError, r"k=11 is outside"), (True, TypeError, "k must be an int"),
                                           (2.0, TypeError, "k must be an int")])
def test_bad_k(k, exc, match):
    with pytest.raises(exc, match=match):
        vk.select_tokens(torch.randn(2, 10), k)


def test_bad_scores():
    with pytest.raises(ValueError, match=r"scores must have 2 dimensions, got shape \(10,\)"):
        vk.select_tokens(torch.randn(10), 3)
    with pytest.raises(TypeError, match="scores has dtype torch.int64"):
        vk.select_tokens(torch.arange(10).view(1, 10), 3)


def test_opcheck_and_compile():
    scores = torch.randn(3, 29)
    torch.library.opcheck(torch.ops.vfuse.select_tokens.default, (scores, 11))
    compiled = torch.compile(lambda s: vk.select_tokens(s, 11), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(scores), ref.select_tokens(scores, 11))


# --- per-encoder budgets -------------------------------------------------------------------------

def test_encoder_budgets_proportional_counts():
    assert vk.encoder_budgets([576, 2880], 0.25) == [144, 720]
    assert vk.encoder_budgets([576, 2880], 1.0) == [576, 2880]
    for lengths in ([7, 577], [1, 1, 1], [577, 2880, 13], [0, 9]):
        total_n = sum(lengths)
        for keep in (1, 2, total_n // 3, total_n - 1, 0.5, 0.01):
            counts = vk.encoder_budgets(lengths, keep)
            k = keep if isinstance(keep, int) else max(1, int(keep * total_n))
            assert sum(counts) == k
            for c, n in zip(counts, lengths):  # each within one of its exact share, never above N
                share = k * n / total_n
                assert share - 1 < c < share + 1 and 0 <= c <= n


def test_encoder_budgets_remainder_ties_go_to_the_first_encoder():
    assert vk.encoder_budgets([5, 5, 5], 1) == [1, 0, 0]
    assert vk.encoder_budgets([5, 5, 5], 2) == [1, 1, 0]


def test_select_encoder_tokens_proportional():
    scores = [torch.randn(2, 577), torch.randn(2, 2880)]
    keep = vk.select_encoder_tokens(scores, 0.25)
    assert [k.shape for k in keep] == [(2, 144), (2, 720)]
    for s, k in zip(scores, keep):
        assert torch.equal(k, ref.select_tokens(s, k.shape[1]))


def test_select_encoder_tokens_global_single_row_is_the_global_top_k():
    scores = [torch.randn(1, 7), torch.randn(1, 577) * 2, torch.randn(1, 30) - 1]
    keep = vk.select_encoder_tokens(scores, 100, mode="global")
    joint = ref.select_tokens(torch.cat(scores, dim=1), 100)[0]
    offsets = [0, 7, 584, 614]
    for j, k in enumerate(keep):
        in_j = joint[(joint >= offsets[j]) & (joint < offsets[j + 1])] - offsets[j]
        assert torch.equal(k[0], in_j)


def test_select_encoder_tokens_global_batch_averages_counts():
    gen = torch.Generator().manual_seed(3)
    scores = [torch.randn(3, 40, generator=gen) + 1.0, torch.randn(3, 60, generator=gen)]
    keep = vk.select_encoder_tokens(scores, 50, mode="global")
    # per-row global counts, from the reference selection of the concatenation
    joint = ref.select_tokens(torch.cat(scores, dim=1), 50)
    first = (joint < 40).sum(1).double().mean().item()
    assert sum(k.shape[1] for k in keep) == 50
    assert abs(keep[0].shape[1] - first) < 1
    for s, k in zip(scores, keep):
        assert torch.equal(k, ref.select_tokens(s, k.shape[1]))


@pytest.mark.parametrize("mode", ["proportional", "global"])
@pytest.mark.parametrize("mixed", [False, True], ids=["one dtype", "mixed dtypes"])
def test_select_encoder_tokens_in_one_launch_for_every_encoder(mode, mixed, monkeypatch):
    """On the Triton backend every encoder that needs a search goes in one launch (scores of one
    dtype; mixed dtypes: one launch each): tie-heavy rows of different lengths, one non-contiguous
    (and ranked first by the global mode), in proportional mode one encoder left with no
    token — each the reference's selection."""
    kernels = _kernels()
    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    launches = []
    many = kernels.select_tokens_many
    monkeypatch.setattr(kernels, "select_tokens_many", lambda scores, ks: launches.append(list(ks)) or many(scores, ks))
    device = backend_device("triton")
    scores = [_scores((3, 4), torch.bfloat16, seed=1, ties=True), _scores((3, 577), torch.bfloat16, seed=2, ties=True),
              (_scores((130, 3), torch.float32 if mixed else torch.bfloat16, seed=3, ties=True) + 1.0).t()]
    scores = [s.to(device) for s in scores]
    assert not scores[2].is_contiguous()
    keep = vk.select_encoder_tokens(scores, 60, mode=mode)
    counts = [k.shape[1] for k in keep]
    assert sum(counts) == 60 and (mode == "global" or counts[0] == 0)
    for s, k in zip(scores, keep):
        assert torch.equal(k.cpu(), ref.select_tokens(s.cpu(), k.shape[1]))
    searched = [(c, s.dtype) for s, c in zip(scores, counts) if 0 < c < s.shape[1]]
    assert len(searched) >= 2 and len({dtype for _, dtype in searched}) == (2 if mixed else 1)
    per_call = [[c] for c, _ in searched] if mixed else [[c for c, _ in searched]]
    assert launches[-len(per_call):] == per_call


def test_select_encoder_tokens_errors():
    scores = [torch.randn(2, 5), torch.randn(2, 6)]
    with pytest.raises(ValueError, match="mode='best' is not one of"):
        vk.select_encoder_tokens(scores, 3, mode="best")
    with pytest.raises(ValueError, match=r"keep=12 is outside \[0, 11\]"):
        vk.select_encoder_tokens(scores, 12)
    with pytest.raises(ValueError, match=r"keep ratio 1.5 is outside \(0, 1\]"):
        vk.select_encoder_tokens(scores, 1.5)
    with pytest.raises(ValueError, match=r"scores\[1\] has shape \(3, 6\)"):
        vk.select_encoder_tokens([scores[0], torch.randn(3, 6)], 3)
    with pytest.raises(TypeError, match="scores must be a non-empty list"):
        vk.select_encoder_tokens(scores[0], 3)
    with pytest.raises(TypeError, match="keep must be an int"):
        vk.select_encoder_tokens(scores, "half")
