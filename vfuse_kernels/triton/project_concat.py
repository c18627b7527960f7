"""Triton kernel of project_concat's row gather: every encoder's kept rows in one launch.

Entry e (one layer of one encoder) copies row keep[b, i] of its [B, N, D] features into row
b·K + i, columns [col, col + D), of its encoder's [B·K, ΣD] matrix, for every b < B and i < K.
Each program copies ROWS whole rows of one entry (16-byte loads where the channel stride is 1,
which the launch specialises), so the copy runs at memory speed where ``torch.gather`` reads an
index per element. An index outside [0, N) is never read: its row is masked, and the launch's
debug assertion stops the kernel there (a device assert, as torch's own indexing raises).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEMENTS = 4096  # per program: ROWS rows of the widest entry's BLOCK_D columns


@triton.jit
def _gather_kernel(srcs, keeps, dsts, ns, widths, ks, strides_b, strides_n, strides_d, dst_strides, batch,
                   ENTRIES: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """Program (g, e): rows [g·ROWS, (g + 1)·ROWS) of entry e's B·K destination rows."""
    which = tl.program_id(1)
    for e in tl.static_range(ENTRIES):
        if which == e:
            k = ks[e]
            row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            valid = row < batch * k
            index = tl.load(keeps[e] + row, mask=valid, other=0).to(tl.int64)  # keep [B, K] contiguous
            inside = (index >= 0) & (index < ns[e])
            tl.device_assert(inside | ~valid, "project_concat: a keep index is outside [0, N)")
            b = row // k
            column = tl.arange(0, BLOCK_D)
            mask = (valid & inside)[:, None] & (column < widths[e])[None, :]
            src = srcs[e] + (b * strides_b[e] + index * strides_n[e])[:, None] + column[None, :] * strides_d[e]
            tl.store(dsts[e] + row[:, None] * dst_strides[e] + column[None, :], tl.load(src, mask=mask), mask=mask)


def gather_rows_into(entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """For each entry (features [B, N, D], keep [B, K] contiguous int32/int64, destination [B·K, D]
    view with channel stride 1) of one device and dtype, one batch B: destination[b·K + i] =
    features[b, keep[b, i]] — every entry in one launch."""
    srcs, keeps, dsts = zip(*entries)
    batch = srcs[0].shape[0]
    block_d = triton.next_power_of_2(max(s.shape[2] for s in srcs))
    rows = max(1, ELEMENTS // block_d)
    grid = (triton.cdiv(batch * max(k.shape[1] for k in keeps), rows), len(entries))
    _gather_kernel[grid](
        srcs, keeps, dsts, tuple(s.shape[1] for s in srcs), tuple(s.shape[2] for s in srcs),
        tuple(k.shape[1] for k in keeps), tuple(s.stride(0) for s in srcs), tuple(s.stride(1) for s in srcs),
        tuple(s.stride(2) for s in srcs), tuple(d.stride(0) for d in dsts), batch,
        ENTRIES=len(entries), BLOCK_D=block_d, ROWS=rows, num_warps=4, debug=True, sanitize_overflow=False,
    )
