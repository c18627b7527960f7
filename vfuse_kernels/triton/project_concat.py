"""Triton kernels of ``project_concat``: M projector MLPs as two grouped GEMM launches.

One kernel, ``_grouped_linear_kernel``, computes ``act(X·Wᵀ + bias)`` for every encoder of a
group in a single launch; each program finds its encoder from a table of tile starts and
reads everything else (pointers, strides, sizes) from per-encoder and per-layer tables, so one
compiled kernel serves any M, any per-encoder D, H and any number of layers:

- launch 1 (``linear_1`` + bias + GELU in the epilogue): the A operand is *gathered* — row
  r = (b, t) of encoder j reads token ``keep_j[b, t]`` of each layer tensor in place (any batch
  and token strides) — and the K loop runs over the layers' channel blocks one layer after the
  other against the matching column blocks of W1, so neither the gathered rows nor the
  multi-layer channel concat is ever materialised. The result [B·Kⱼ, H1ⱼ] goes to a scratch
  buffer in the I/O dtype (the rounding point of the eager projector).
- launch 2 (``linear_2`` + bias): reads that buffer and stores encoder j's rows straight into
  its token slice ``out[:, offⱼ:offⱼ+Kⱼ, :]`` of the one [B, ΣK, H] output — no torch.cat.

fp32 accumulation (tl.dot; ``ieee`` for fp32 inputs), bias and GELU in fp32, one rounding per
store. ``ALIGNED`` (checked on the host: 16-byte pointers, strides and channel counts that are
multiples of 8 elements, unit channel stride) adds divisibility hints so the loads vectorise;
other layouts run the same code without them. GELU: exact ``0.5·x·(1 + erf(x/√2))`` or the tanh
form, written as ``x·sigmoid(2u)``, u = √(2/π)(x + 0.044715x³), the same function as
``0.5·x·(1 + tanh u)`` without its cancellation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

ACT_NONE, ACT_GELU_ERF, ACT_GELU_TANH = 0, 1, 2
ENC_FIELDS = 17  # per-encoder table row, see _Group.add_encoder
LAYER_FIELDS = 8  # per-layer table row: x address, batch stride, token stride, channels, W column offset
MAX_START = 2**62
new_buffer = torch.empty  # scratch allocator (tests swap in a NaN-filled one to catch unwritten elements)


@triton.jit
def _grouped_linear_kernel(out_ptr, enc_ptr, layer_ptr, start_ptr,
                           G_PAD: tl.constexpr, E: tl.constexpr, LF: tl.constexpr, BM: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, ALIGNED: tl.constexpr,
                           UPCAST: tl.constexpr, PREC: tl.constexpr):
    dtype = out_ptr.dtype.element_ty
    if ALIGNED:
        out_ptr = tl.multiple_of(out_ptr, 16)
    pid = tl.program_id(0).to(tl.int64)
    starts = tl.load(start_ptr + tl.arange(0, G_PAD))
    enc = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
    local = pid - tl.load(start_ptr + enc)
    tab = enc_ptr + enc * E
    rows = tl.load(tab + 0)
    tokens = tl.load(tab + 1)
    n_out = tl.load(tab + 2)
    w_addr = tl.load(tab + 3)
    w_s0 = tl.load(tab + 4)
    w_s1 = tl.load(tab + 5)
    bias_addr = tl.load(tab + 6)
    keep_addr = tl.load(tab + 7)
    keep_sb = tl.load(tab + 8)
    keep_sn = tl.load(tab + 9)
    layer_start = tl.load(tab + 10)
    layer_end = tl.load(tab + 11)
    act = tl.load(tab + 12)
    o_off = tl.load(tab + 13)
    o_sb = tl.load(tab + 14)
    o_sn = tl.load(tab + 15)
    n_tokens = tl.load(tab + 16)
    if ALIGNED:
        w_s0 = tl.multiple_of(w_s0, 8)
        n_out = tl.multiple_of(n_out, 8)
        o_off = tl.multiple_of(o_off, 8)
        o_sb = tl.multiple_of(o_sb, 8)
        o_sn = tl.multiple_of(o_sn, 8)

    # grouped tile order inside the encoder: GROUP_M row tiles share W's column tiles in L2
    tiles_m = tl.cdiv(rows, BM)
    tiles_n = tl.cdiv(n_out, BN)
    width = GROUP_M * tiles_n
    first_m = (local // width) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (local % width) % size_m
    pid_n = (local % width) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    row_ok = rm < rows
    b = rm // tokens
    t = rm % tokens
    if keep_addr != 0:
        keep_ptr = keep_addr.to(tl.pointer_type(tl.int64))
        n = tl.load(keep_ptr + b * keep_sb + t * keep_sn, mask=row_ok, other=0)
        # the public op rejects out-of-range indices; reading one would fault, so mask it anyway
        x_row_ok = row_ok & (n >= 0) & (n < n_tokens)
    else:
        n = t
        x_row_ok = row_ok
    rn = pid_n * BN + tl.arange(0, BN)
    col_ok = rn < n_out
    w_ptr = w_addr.to(tl.pointer_type(dtype))
    if ALIGNED:  # (hints on the pointer: the int address's divisibility does not carry through the cast)
        w_ptr = tl.multiple_of(w_ptr, 16)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for layer in range(layer_start, layer_end):
        lt = layer_ptr + layer * LF
        x_addr = tl.load(lt + 0)
        x_sb = tl.load(lt + 1)
        x_sn = tl.load(lt + 2)
        channels = tl.load(lt + 3)
        col_off = tl.load(lt + 4)
        x_ptr = x_addr.to(tl.pointer_type(dtype))
        if ALIGNED:
            x_ptr = tl.multiple_of(x_ptr, 16)
            x_sb = tl.multiple_of(x_sb, 8)
            x_sn = tl.multiple_of(x_sn, 8)
            channels = tl.multiple_of(channels, 8)
            col_off = tl.multiple_of(col_off, 8)
        x_rows = x_ptr + (b * x_sb + n * x_sn)[:, None]
        if ALIGNED:
            w_cols = w_ptr + (rn * w_s0)[None, :] + col_off
        else:
            w_cols = w_ptr + (rn * w_s0)[None, :] + col_off * w_s1
        for k0 in range(0, channels, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < channels
            x = tl.load(x_rows + rk[None, :], mask=x_row_ok[:, None] & k_ok[None, :], other=0.0)
            if ALIGNED:
                w = tl.load(w_cols + rk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            else:
                w = tl.load(w_cols + rk[:, None] * w_s1, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PREC)

    if bias_addr != 0:
        bias_ptr = bias_addr.to(tl.pointer_type(dtype))
        if ALIGNED:
            bias_ptr = tl.multiple_of(bias_ptr, 16)
        bias = tl.load(bias_ptr + rn, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if act == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif act == 2:
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))  # e^80 already makes it −0
    out = out_ptr + o_off + (b * o_sb + t * o_sn)[:, None] + rn[None, :]
    tl.store(out, acc.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


def config(rows: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options. Hopper defaults (not autotuned: 128×128×64 bf16/fp16 tiles,
    3 stages = 96 KiB of shared memory; 64-row tiles when every encoder has few rows so more
    programs run); the interpreter gets 16³ tiles."""
    if triton_interpreted():
        return dict(BM=16, BN=16, BK=16, GROUP_M=2, launch={})
    bm = 64 if rows <= 512 else 128
    bk = 32 if dtype == torch.float32 else 64
    return dict(BM=bm, BN=128, BK=bk, GROUP_M=8,
                launch=dict(num_warps=4 if bm == 64 else 8, num_stages=3, enable_fp_fusion=True))


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or triton_interpreted() else "tf32"


def _aligned(values: list[int], addresses: list[int]) -> bool:
    return all(v % 8 == 0 for v in values) and all(a % 16 == 0 for a in addresses)


class _Group:
    """Tables of one grouped launch; ``keepalive`` holds the tensors behind raw addresses."""

    def __init__(self):
        self.encoders: list[list[int]] = []
        self.layers: list[list[int]] = []
        self.values: list[int] = []
        self.addresses: list[int] = []
        self.keepalive: list[torch.Tensor] = []

    def add_layer(self, x: torch.Tensor, col_off: int) -> None:
        if x.stride(-1) != 1:
            x = x.contiguous()
        self.keepalive.append(x)
        self.layers.append([x.data_ptr(), x.stride(0), x.stride(1), x.shape[2], col_off, 0, 0, 0])
        self.values += [x.stride(0), x.stride(1), x.shape[2], col_off]
        self.addresses.append(x.data_ptr())

    def add_encoder(self, rows, tokens, weight, bias, keep, act, o_off, o_sb, o_sn, first_layer, n_tokens) -> None:
        self.keepalive += [t for t in (weight, bias, keep) if t is not None]
        self.encoders.append([
            rows, tokens, weight.shape[0], weight.data_ptr(), weight.stride(0), weight.stride(1),
            0 if bias is None else bias.data_ptr(), 0 if keep is None else keep.data_ptr(),
            0 if keep is None else keep.stride(0), 0 if keep is None else keep.stride(1),
            first_layer, len(self.layers), act, o_off, o_sb, o_sn, n_tokens,
        ])
        self.values += [weight.shape[0], weight.stride(0), o_off, o_sb, o_sn]
        self.addresses += [weight.data_ptr()] + ([] if bias is None else [bias.data_ptr()])
        if weight.stride(1) != 1:
            self.values.append(1)  # not a multiple of 8: no hints

    def launch(self, out: torch.Tensor) -> None:
        total_rows = sum(e[0] for e in self.encoders)
        cfg = config(max((e[0] for e in self.encoders), default=0), out.dtype)
        bm, bn = cfg["BM"], cfg["BN"]
        tiles = [triton.cdiv(e[0], bm) * triton.cdiv(e[2], bn) for e in self.encoders]
        if total_rows == 0 or sum(tiles) == 0:
            return
        g_pad = triton.next_power_of_2(len(self.encoders))
        starts = [sum(tiles[:j]) for j in range(len(tiles))] + [MAX_START] * (g_pad - len(tiles))
        flat = [v for row in self.encoders for v in row] + [v for row in self.layers for v in row] + starts
        table = torch.tensor(flat, dtype=torch.int64)
        if out.device.type == "cuda":  # pinned + async: no host/device sync per launch
            table = table.pin_memory()
        table = table.to(out.device, non_blocking=True)
        n_enc, n_lay = len(self.encoders) * ENC_FIELDS, len(self.layers) * LAYER_FIELDS
        aligned = _aligned(self.values, self.addresses + [out.data_ptr()])
        _grouped_linear_kernel[(sum(tiles),)](
            out, table[:n_enc], table[n_enc:n_enc + n_lay] if n_lay else table[:1], table[n_enc + n_lay:],
            G_PAD=g_pad, E=ENC_FIELDS, LF=LAYER_FIELDS, BM=bm, BN=bn, BK=cfg["BK"], GROUP_M=cfg["GROUP_M"],
            ALIGNED=aligned, UPCAST=triton_interpreted(), PREC=precision(out.dtype), **cfg["launch"],
        )


def project_concat(out, layers, w1s, b1s, w2s, b2s, acts, keeps) -> None:
    """Writes ``torch.cat([proj_j(cat(layers[j])[b, keeps[j]]) for j], 1)`` into contiguous ``out``
    [B, ΣKⱼ, H]; ``keeps[j]`` is None or an int64 [B, Kⱼ] tensor, ``acts[j]`` an ACT_* code."""
    batch, total_k, hidden = out.shape
    ks = [layers[j][0].shape[1] if keeps[j] is None else keeps[j].shape[1] for j in range(len(layers))]
    hidden1 = [w.shape[0] for w in w1s]
    sizes = [batch * k * h1 for k, h1 in zip(ks, hidden1)]
    scratch = new_buffer(sum(sizes), dtype=out.dtype, device=out.device)
    first, second = _Group(), _Group()
    y_off = tok_off = 0
    elsize = out.element_size()
    for j, feats in enumerate(layers):
        k, h1 = ks[j], hidden1[j]
        first_layer, col = len(first.layers), 0
        for x in feats:
            first.add_layer(x, col)
            col += x.shape[2]
        first.add_encoder(batch * k, k, w1s[j], b1s[j], keeps[j], acts[j], y_off, k * h1, h1, first_layer,
                          feats[0].shape[1])
        y = scratch[y_off:y_off + sizes[j]].view(batch, k, h1)
        second.layers.append([scratch.data_ptr() + y_off * elsize, k * h1, h1, h1, 0, 0, 0, 0])
        second.values += [k * h1, h1, y_off]
        second.addresses.append(scratch.data_ptr())
        second.keepalive.append(y)
        second.add_encoder(batch * k, k, w2s[j], b2s[j], None, ACT_NONE, tok_off * hidden, out.stride(0),
                           out.stride(1), len(second.layers) - 1, k)
        y_off += sizes[j]
        tok_off += k
    first.launch(scratch)
    second.launch(out)
