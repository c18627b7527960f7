"""query_key_scores / cls_attention against the fp64 materialised-softmax reference and eager attention:
dtypes, grouped-query heads, query subsets (Lq ≠ Nk), strides, partial and full key tiles."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from conftest import DTYPES, backend_device

import vfuse_kernels as vk
import vfuse_kernels.ops  # noqa: F401 - registers torch.ops.vfuse (the package imports lazily)
from vfuse_kernels.reference import query_key_scores as ref

FP32_EPS = torch.finfo(torch.float32).eps
qk_op = importlib.import_module("vfuse_kernels.ops.query_key_scores")  # the module (the package exports the function)


def _assert_scores_close(out, expected64, d, nk):
    """fp32 scores of the same (rounded) inputs: logit error ~ d·eps32, then the softmax/mean sums."""
    assert out.dtype == torch.float32 and out.shape == expected64.shape
    assert torch.isfinite(out).all()
    rtol = 8 * (d + math.sqrt(nk)) * FP32_EPS
    torch.testing.assert_close(out.double().cpu(), expected64.cpu(), rtol=rtol, atol=rtol / max(nk, 1))


def _qk(b, h, lq, nk, d, dtype, device, seed, kv_heads=None, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, lq, d, generator=gen) * scale).to(dtype).to(device)
    k = (torch.randn(b, kv_heads or h, nk, d, generator=gen) * scale).to(dtype).to(device)
    return q, k


CPU_CASES = [(1, 1, 1, 1, 8), (2, 3, 5, 7, 20), (1, 4, 33, 577, 64), (2, 2, 17, 2880, 16), (3, 2, 1, 13, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_matches_reference_cpu(case, dtype, monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    b, h, lq, nk, d = case
    q, k = _qk(b, h, lq, nk, d, dtype, "cpu", seed=hash((case, str(dtype))) % 10**6)
    _assert_scores_close(vk.query_key_scores(q, k), ref.query_key_scores(q, k), d, nk)


# (B, H, Lq, Nk, d[, Hkv]); the interpreter's tiles are 16 wide: Nk = 32 is two full key tiles (no masks)
TRITON_CASES = [(1, 1, 1, 1, 8), (2, 3, 5, 7, 20), (1, 2, 19, 37, 16), (1, 2, 17, 32, 16), (2, 6, 3, 48, 16, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_matches_reference_triton(case, dtype, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    b, h, lq, nk, d, *kv = case
    q, k = _qk(b, h, lq, nk, d, dtype, backend_device("triton"), seed=hash((case, str(dtype))) % 10**6,
               kv_heads=kv[0] if kv else None)
    _assert_scores_close(vk.query_key_scores(q, k), ref.query_key_scores(q, k), d, nk)


def test_grouped_query_heads_scale_and_strides(backend):
    """GQA (6 query heads on 2 key heads), a custom scale, q/k as transposed [B, L, H, d] views."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 6, 16, generator=gen).to(device).transpose(1, 2)  # [B, H, L, d], non-contiguous
    k = torch.randn(2, 21, 2, 16, generator=gen).to(device).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = vk.query_key_scores(q, k, scale=0.3)
    _assert_scores_close(out, ref.query_key_scores(q, k, 0.3), 16, 21)
    assert not torch.allclose(out, vk.query_key_scores(q, k))  # the scale matters


def test_fastv_query_subset_with_grouped_heads(backend):
    """FastV: the last text queries of a GQA layer (8 query heads on 2 key heads) score every key;
    the result is the softmax over all keys, then sliced to the image keys by the caller."""
    device = backend_device(backend)
    q, k = _qk(2, 8, 40, 40, 16, torch.bfloat16, device, seed=6, kv_heads=2)
    text = q[:, :, -3:]  # a view: Lq = 3 ≠ Nk = 40
    out = vk.query_key_scores(text, k)
    _assert_scores_close(out, ref.query_key_scores(text, k), 16, 40)
    expected = ref.attention_probs(q, k)[:, :, -3:].mean(dim=(1, 2))  # the full matrix, then the rows
    _assert_scores_close(out[:, 5:29], expected[:, 5:29], 16, 40)


def test_row_lse_pass_triton():
    """Pass 1 alone: the base-2 log-sum-exp of every row of q·kᵀ·scale, GQA heads."""
    pytest.importorskip("triton")
    kernels = importlib.import_module("vfuse_kernels.triton.query_key_scores")
    q, k = _qk(2, 4, 21, 35, 16, torch.float32, backend_device("triton"), seed=3, kv_heads=2)
    logits = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    expected = torch.logsumexp(logits, dim=-1) / math.log(2)
    torch.testing.assert_close(kernels.row_lse(q, k, 0.3).double(), expected, rtol=1e-6, atol=1e-5)


def test_large_logits_are_stable(backend):
    """Logits of ±hundreds: the online softmax must not overflow."""
    q, k = _qk(1, 2, 7, 45, 16, torch.float32, backend_device(backend), seed=9, scale=6.0)
    out = vk.query_key_scores(q, k)
    _assert_scores_close(out, ref.query_key_scores(q, k), 16 * 36, 45)


def test_rows_sum_to_one_and_empty_keys(backend):
    q, k = _qk(3, 2, 4, 23, 8, torch.bfloat16, backend_device(backend), seed=2)
    torch.testing.assert_close(vk.query_key_scores(q, k).sum(dim=1).cpu(), torch.ones(3), rtol=1e-5, atol=1e-5)
    assert vk.query_key_scores(q, k[:, :, :0]).shape == (3, 0)


def test_cpu_path_chunks_queries(monkeypatch):
    """With a tiny chunk the CPU path walks many query chunks; the result must not change."""
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    q, k = _qk(2, 3, 50, 31, 8, torch.float32, "cpu", seed=4)
    whole = vk.query_key_scores(q, k)
    monkeypatch.setattr(qk_op, "CHUNK_ELEMENTS", 2 * 3 * 31 * 7)  # 7 queries per chunk
    chunked = vk.query_key_scores(q, k)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    _assert_scores_close(chunked, ref.query_key_scores(q, k), 8, 31)


def test_matches_eager_attention_weights(backend):
    """Same as averaging the attention weights an eager attention layer returns."""
    device = backend_device(backend)
    q, k = _qk(2, 4, 11, 29, 16, torch.float32, device, seed=12)
    v = torch.randn(2, 4, 29, 16, device=device)
    from transformers.models.clip.modeling_clip import eager_attention_forward

    module = torch.nn.Module()
    module.training = False
    _, weights = eager_attention_forward(module, q, k, v, None, scaling=16**-0.5)
    expected = weights.double().mean(dim=(1, 2))
    _assert_scores_close(vk.query_key_scores(q, k), expected, 16, 29)


def test_cls_attention(backend):
    q, k = _qk(2, 3, 17, 17, 8, torch.float16, backend_device(backend), seed=7)
    out = vk.cls_attention(q, k)
    _assert_scores_close(out, ref.cls_attention(q, k), 8, 17)
    _assert_scores_close(vk.cls_attention(q, k, cls_index=4), ref.cls_attention(q, k, cls_index=4), 8, 17)
    with pytest.raises(ValueError, match=r"cls_index=17 is outside \[0, 16\]"):
        vk.cls_attention(q, k, cls_index=17)


def test_opcheck_and_compile():
    q, k = _qk(2, 2, 3, 9, 8, torch.float32, "cpu", seed=1)
    torch.library.opcheck(torch.ops.vfuse.query_key_scores.default, (q, k, 0.35))
    compiled = torch.compile(lambda a, b: vk.query_key_scores(a, b), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), vk.query_key_scores(q, k))


@pytest.mark.parametrize("q_shape, k_shape, kwargs, exc, match", [
    ((2, 4, 3, 8), (2, 4, 5, 7), {}, ValueError, r"B and d must match"),
    ((2, 4, 3, 8), (1, 4, 5, 8), {}, ValueError, r"k \[B, Hkv, Nk, d\] has shape \(1, 4, 5, 8\)"),
    ((2, 4, 3, 8), (2, 3, 5, 8), {}, ValueError, r"multiple of the key heads \(grouped-query attention\)"),
    ((2, 4, 0, 8), (2, 4, 5, 8), {}, ValueError, "Lq ≥ 1"),
    ((2, 4, 3), (2, 4, 5, 8), {}, ValueError, r"q must have 4 dimensions, got shape \(2, 4, 3\)"),
    ((2, 4, 3, 8), (2, 4, 5, 8), {"scale": float("nan")}, ValueError, "scale must be finite"),
    ((2, 4, 3, 8), (2, 4, 5, 8), {"scale": "x"}, TypeError, "scale must be a real number"),
])
def test_bad_arguments(q_shape, k_shape, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vk.query_key_scores(torch.randn(q_shape), torch.randn(k_shape), **kwargs)


def test_bad_dtypes_and_devices():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        vk.query_key_scores(q, q.half())
    with pytest.raises(TypeError, match="q has dtype torch.int64"):
        vk.query_key_scores(q.long(), q)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        vk.query_key_scores(q, q.to("meta"))
