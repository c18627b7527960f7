"""Helpers shared by the token-op tests (project_concat, query_key_scores, select_tokens, modules)."""
from __future__ import annotations

import importlib
import math

import torch
from torch import nn

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
       torch.float16: torch.finfo(torch.float16).eps}
# per-dtype tolerance in units of the output dtype's eps: one rounding of the linear_1+GELU
# intermediate and one of the output (≤ 1 ulp each, also under the interpreter's truncating bf16 stores)
ULPS = {torch.float32: 1.0, torch.bfloat16: 2.0, torch.float16: 2.0}
FP32_EPS = torch.finfo(torch.float32).eps


def assert_close_scaled(out: torch.Tensor, expected64: torch.Tensor, reduction: int) -> None:
    """``out`` vs an fp64 reference: |err| ≤ rtol·|ref| + atol, rtol = ULPS·eps(dtype) and
    atol = (ULPS·eps(dtype) + 4·√reduction·eps(fp32))·max|ref| (fp32 accumulation over ``reduction`` terms)."""
    assert out.shape == expected64.shape, (out.shape, expected64.shape)
    assert not torch.isnan(out).any(), "unwritten (poisoned) or NaN elements in the output"
    scale = expected64.abs().max().item() if expected64.numel() else 1.0
    rtol = ULPS[out.dtype] * EPS[out.dtype]
    atol = (rtol + 4 * math.sqrt(max(reduction, 1)) * FP32_EPS) * scale
    torch.testing.assert_close(out.double().cpu(), expected64.cpu(), rtol=rtol, atol=atol)


class Projector(nn.Module):
    """A LLaVA-style projector (linear_1, act, linear_2) — the duck type project_concat accepts."""

    def __init__(self, d, h1, h, act=None, bias=True, dtype=torch.float32, generator=None):
        super().__init__()
        self.linear_1 = nn.Linear(d, h1, bias=bias)
        self.act = nn.GELU() if act is None else act
        self.linear_2 = nn.Linear(h1, h, bias=bias)
        with torch.no_grad():
            for p in self.parameters():  # fresh random values (bias not zero), fan-in scaled
                fan_in = p.shape[-1] if p.dim() == 2 else 4
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        self.to(dtype).requires_grad_(False)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def parts(projector, kind=1):
    """(w1, b1, w2, b2, GELU kind) for the reference."""
    l1, l2 = projector.linear_1, projector.linear_2
    return (l1.weight, l1.bias, l2.weight, l2.bias, kind)


def poison_buffers(monkeypatch) -> None:
    """Makes project_concat's output buffer start as NaN, so unwritten elements show."""
    op = importlib.import_module("vfuse_kernels.ops.project_concat")

    def nan_empty(size, dtype=None, device=None):
        return torch.full(tuple(size), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(op, "new_buffer", nan_empty)


def tiny_llava_config(**overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=8, patch_size=2, hidden_size=32, intermediate_size=37,
                                       num_hidden_layers=2, num_attention_heads=4),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=99),
        image_token_index=0, **overrides)
