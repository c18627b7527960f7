"""The two passes of ``ops/slerp.py`` in Triton: per-block fp64 sums Σa², Σb², Σab (added in
fp64 by torch: a fixed order, no atomics), then ``ca·a + cb·b`` in fp32 with the coefficients
read from device memory (no host sync between the passes)."""
import torch
import triton
import triton.language as tl

SUM_BLOCK = 4096
COMBINE_BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _pair_sums_kernel(partial_ptr, a_ptr, b_ptr, numel, BLOCK: tl.constexpr):
    """partial[pid] = (Σa², Σb², Σab) over this program's block, in fp64."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    y = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    tl.store(partial_ptr + pid * 3, tl.sum(x * x, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(y * y, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(x * y, axis=0))


@triton.jit
def _pair_combine_kernel(out_ptr, a_ptr, b_ptr, coef_ptr, numel, BLOCK: tl.constexpr):
    """out = ca·a + cb·b (fp32, two roundings: no FMA), (ca, cb) = coef[0], coef[1]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ca = tl.load(coef_ptr)
    cb = tl.load(coef_ptr + 1)
    x = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (ca * x + cb * y).to(out_ptr.dtype.element_ty), mask=mask)


def pair_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp64 [3] on the device: Σa², Σb², Σab of contiguous a and b."""
    grid = triton.cdiv(a.numel(), SUM_BLOCK)
    if grid == 0:
        return torch.zeros(3, dtype=torch.float64, device=a.device)
    partial = torch.empty(grid, 3, dtype=torch.float64, device=a.device)
    _pair_sums_kernel[(grid,)](partial, a, b, a.numel(), BLOCK=SUM_BLOCK, num_warps=NUM_WARPS,
                               enable_fp_fusion=False)
    return partial.sum(dim=0)


def pair_combine(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coefs: torch.Tensor) -> None:
    """Writes ``coefs[0]·a + coefs[1]·b`` (fp32 coefs on the device) into contiguous ``out``."""
    grid = triton.cdiv(a.numel(), COMBINE_BLOCK)
    if grid:
        _pair_combine_kernel[(grid,)](out, a, b, coefs, a.numel(), BLOCK=COMBINE_BLOCK, num_warps=NUM_WARPS,
                                      enable_fp_fusion=False)
