"""``project_concat``: M encoders' tokens → their projector MLPs → one [B, ΣKⱼ, H] sequence.

``project_concat(features, projectors, keep=None)`` equals
``torch.cat([proj_j(cat(layers_j)[b, keep_j]) for j], dim=1)`` (DESIGN.md §2.2):

- ``features[j]``: a [B, Nⱼ, Dⱼ] tensor, or a list of layer tensors [B, Nⱼ, D_l] whose channel
  concat is the projector input (HF ``vision_feature_layer=[...]``); any batch/token strides
  (e.g. ``hidden_states[l][:, 1:]``). Encoders are concatenated in list order.
- ``projectors[j]``: a module with ``linear_1`` and ``linear_2`` (``nn.Linear``-like: ``weight``,
  optional ``bias``) and a GELU activation ``act`` (HF ``LlavaMultiModalProjector`` as is).
  Exact-erf and tanh GELU are recognised by type (``nn.GELU``/``approximate``, transformers'
  ``GELUActivation``, ``GELUTanh``/``PytorchGELUTanh``, ``NewGELUActivation``,
  ``FastGELUActivation``, ``AccurateGELUActivation``, ``F.gelu`` partials) and any other callable
  by evaluating it on a probe grid against both formulas; anything else raises ``TypeError``.
- ``keep[j]``: None (all Nⱼ tokens) or [B, Kⱼ] integer indices (``select_tokens``), gathered
  before projecting, so pruned tokens cost nothing; the output keeps ``keep``'s order.

Computation (the GEMMs on every device are the vendor's — they are the work and the limit —
whatever ``VFUSE_BACKEND`` says): per encoder, the kept rows of its layers are gathered into one
[B·K, ΣD] matrix (one pass over the kept rows of each layer; no copy at all for one unpruned
layer whose strides allow a [B·N, D] view), then ``linear_1`` + bias (GEMM epilogue) + GELU, then
``linear_2`` + bias written into the encoder's token slice of the one [B, ΣK, H] output:

- CUDA: the kept rows of every encoder and layer by one Triton launch (whole rows by 16-byte
  loads; ``torch.gather`` reads an index per element), then cuBLAS through ``torch.addmm``.
  Tanh-GELU bf16 projectors use cuBLASLt's bias + GELU epilogue (``torch._addmm_activation``,
  which computes the tanh form on CUDA — and the exact erf one on CPU, so it is used on CUDA
  only); the others get a separate GELU pass (no cuBLAS epilogue computes erf). The second GEMM
  writes the encoder's output slice itself when it is one matrix (batch 1 or one encoder);
  otherwise every encoder's [B·K, H] result goes into the output through one ``torch.cat``: a
  slice ``out[:, off:off+K]`` of a [B, ΣK, H] tensor is not one matrix when B > 1, and per-batch
  GEMMs of K rows would pad cuBLAS tiles. (Encoders on side streams were measured slower on an
  H100 and removed.) No host sync: indices are range-checked by the gather on the device (an
  asynchronous device assert, as for any out-of-range torch indexing; an index outside the
  tokens is never read), not on the host.
- CPU: ``torch.gather`` (the Triton gather under ``VFUSE_BACKEND=triton`` and the interpreter),
  PyTorch/oneDNN GEMMs in the same order; bf16/fp16 ones run in fp32 on the exact upcast
  values where the CPU has no native support (``compute_dtype``); indices are range-checked
  on the host (``ValueError``).

Multi-layer input with ``keep``: only the kept rows are concatenated (B·K·ΣD elements, written
once by the gathers); without ``keep`` the layers are concatenated whole (``torch.cat``) — cheaper
than splitting ``linear_1`` by columns and accumulating per-layer GEMMs, which would read and
write the [B·N, H1] result once per extra layer (H1 ≥ ΣD/2 in LLaVA projectors) and round it
between layers. Features and weights share one dtype (fp32/bf16/fp16); GEMMs accumulate in fp32
and, like the eager projector, ``linear_1``'s output is rounded to that dtype before GELU and
GELU's before ``linear_2`` (only the latter where GELU is fused into the GEMM — cuBLASLt, tanh,
bf16 — or the GEMMs run in fp32 on a CPU). Inference op: when autograd needs it (grad mode on
and an input requiring grad) the same computation runs as differentiable PyTorch.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._backend import select_backend
from ._checks import check_float_tensor
from ._library import define

ACT_GELU_ERF, ACT_GELU_TANH = 1, 2  # codes shared with reference/project_concat.py
ACT_NAMES = {ACT_GELU_ERF: "gelu (erf)", ACT_GELU_TANH: "gelu (tanh)"}
_ERF_TYPES = ("GELUActivation",)
_TANH_TYPES = ("GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh", "NewGELUActivation", "FastGELUActivation",
               "AccurateGELUActivation")
_UNSUPPORTED_TYPES = ("ClippedGELUActivation", "QuickGELUActivation", "QuickGELU")
_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _gelu_probe(act) -> int | None:
    """Evaluates ``act`` on a grid and matches it to the erf or tanh GELU, or returns None."""
    x = torch.cat([torch.linspace(-12.0, 12.0, 193), torch.tensor([-3.7, -1.9, -0.6, 0.3, 1.2, 2.1, 4.4])])
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:  # noqa: BLE001 - anything that cannot run on a CPU probe is unsupported
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    y = y.double()
    x = x.double()
    erf = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    tanh = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    for kind, ref in ((ACT_GELU_ERF, erf), (ACT_GELU_TANH, tanh)):
        if torch.allclose(y, ref, rtol=2e-6, atol=2e-6):  # the two forms differ by up to 2e-4
            return kind
    return None


def activation_kind(act) -> int:
    """``ACT_GELU_ERF`` or ``ACT_GELU_TANH`` for a projector activation; TypeError otherwise."""
    if isinstance(act, torch.nn.GELU):
        return ACT_GELU_TANH if act.approximate == "tanh" else ACT_GELU_ERF
    name = type(act).__name__
    if name in _UNSUPPORTED_TYPES:
        kind = None
    elif name in _ERF_TYPES:
        return ACT_GELU_ERF
    elif name in _TANH_TYPES:
        return ACT_GELU_TANH
    elif act is F.gelu:
        return ACT_GELU_ERF
    elif isinstance(act, functools.partial) and act.func is F.gelu and not act.args:
        return ACT_GELU_TANH if act.keywords.get("approximate", "none") == "tanh" else ACT_GELU_ERF
    else:
        try:
            kind = _probed[act]
        except (TypeError, KeyError):
            kind = _gelu_probe(act) if callable(act) else None
            try:
                _probed[act] = kind
            except TypeError:
                pass
    if kind is None:
        raise TypeError(
            f"unsupported projector activation {act!r}: project_concat fuses GELU only — exact (nn.GELU(), "
            "transformers GELUActivation, 'gelu') or tanh (nn.GELU(approximate='tanh'), GELUTanh, "
            "NewGELUActivation, FastGELUActivation, 'gelu_pytorch_tanh', 'gelu_new')"
        )
    return kind


def _attr(obj, name: str):
    """``getattr(obj, name, None)``, reading an ``nn.Module``'s parameter and submodule tables
    directly (``Module.__getattr__``, where getattr ends up for them, is a Python call of ~1 µs,
    and a projector's parts take eight per call). Properties (e.g. parametrised weights) are not
    in the tables: getattr finds them."""
    if isinstance(obj, torch.nn.Module):
        for table in (obj._parameters, obj._modules):
            if name in table:
                return table[name]
    return getattr(obj, name, None)


def projector_parts(name: str, projector):
    """(w1, b1, w2, b2, act code) of a LLaVA-style projector module."""
    parts = []
    for attr in ("linear_1", "linear_2"):
        linear = _attr(projector, attr)
        weight = _attr(linear, "weight")
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{name} has no {attr} with a weight (a LLaVA projector has linear_1, act, linear_2), "
                            f"got {type(projector).__name__}")
        check_float_tensor(f"{name}.{attr}.weight", weight, ndim=2)
        bias = _attr(linear, "bias")
        if bias is not None:
            check_float_tensor(f"{name}.{attr}.bias", bias, ndim=1)
            if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype or bias.device != weight.device:
                raise ValueError(f"{name}.{attr}.bias {tuple(bias.shape)} {bias.dtype} on {bias.device} does not "
                                 f"match its weight {tuple(weight.shape)} {weight.dtype} on {weight.device}")
        parts += [weight, bias]
    act = next((x for x in (_attr(projector, a) for a in ("act", "act_fn", "activation")) if x is not None), None)
    if act is None:
        raise TypeError(f"{name} has no activation attribute 'act'")
    return (*parts, activation_kind(act))


def _layers(name: str, value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [check_float_tensor(name, value, ndim=3)]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value:
        layers = [check_float_tensor(f"{name}[{i}]", t, ndim=3) for i, t in enumerate(value)]
        for i, t in enumerate(layers):
            if t.shape[:2] != layers[0].shape[:2]:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but {name}[0] has shape "
                                 f"{tuple(layers[0].shape)}: a layer list needs one [B, N] for all layers")
        return layers
    raise TypeError(f"{name} must be a [B, N, D] tensor or a non-empty list of them, got {type(value).__name__}")


def check_inputs(features, projectors, keep):
    """Validates the arguments; returns (layers per encoder, parts per encoder, keep per encoder)."""
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence) or not features:
        raise TypeError("features must be a non-empty list or tuple (one entry per encoder)")
    layers = [_layers(f"features[{j}]", f) for j, f in enumerate(features)]
    if isinstance(projectors, torch.nn.Module) and not isinstance(projectors, (torch.nn.ModuleList, Sequence)):
        projectors = [projectors]
    if not isinstance(projectors, (Sequence, torch.nn.ModuleList)) or len(projectors) != len(layers):
        n = len(projectors) if isinstance(projectors, (Sequence, torch.nn.ModuleList)) else type(projectors).__name__
        raise ValueError(f"projectors must hold one projector per encoder: {len(layers)} features, got {n}")
    ref = layers[0][0]
    batch, dtype, device = ref.shape[0], ref.dtype, ref.device  # (each .device access builds an object)
    parts = []
    hidden = None
    for j, (feats, projector) in enumerate(zip(layers, projectors)):
        for i, t in enumerate(feats):
            where = f"features[{j}]" + (f"[{i}]" if len(feats) > 1 else "")
            if t.dtype != dtype:
                raise TypeError(f"{where} has dtype {t.dtype} but features[0] has {dtype}")
            if t.device != device:
                raise ValueError(f"{where} is on {t.device} but features[0] is on {device}")
            if t.shape[0] != batch:
                raise ValueError(f"{where} has shape {tuple(t.shape)}: batch {t.shape[0]}, features[0] has {batch}")
        w1, b1, w2, b2, act = projector_parts(f"projectors[{j}]", projector)
        d = sum(t.shape[2] for t in feats)
        for wname, w in (("linear_1", w1), ("linear_2", w2)):
            if w.dtype != dtype:
                raise TypeError(f"projectors[{j}].{wname}.weight has dtype {w.dtype} but the features have "
                                f"{dtype}; cast the projector or the features")
            if w.device != device:
                raise ValueError(f"projectors[{j}].{wname}.weight is on {w.device} but the features are on "
                                 f"{device}")
        if w1.shape[1] != d:
            raise ValueError(f"projectors[{j}].linear_1.weight has shape {tuple(w1.shape)}: expects "
                             f"{w1.shape[1]} input channels, features[{j}] has {d}")
        if w2.shape[1] != w1.shape[0]:
            raise ValueError(f"projectors[{j}].linear_2.weight has shape {tuple(w2.shape)} after linear_1 "
                             f"{tuple(w1.shape)}: expects {w2.shape[1]} inputs, linear_1 gives {w1.shape[0]}")
        if hidden is None:
            hidden = w2.shape[0]
        elif w2.shape[0] != hidden:
            raise ValueError(f"projectors[{j}].linear_2 outputs {w2.shape[0]} channels but projectors[0] "
                             f"outputs {hidden}: the encoders' tokens must share one width")
        parts.append((w1, b1, w2, b2, act))
    keeps = _check_keep(keep, layers, batch, device)
    return layers, parts, keeps


def _check_keep(keep, layers, batch, device) -> list[torch.Tensor | None]:
    if keep is None:
        return [None] * len(layers)
    if isinstance(keep, torch.Tensor) or not isinstance(keep, Sequence) or len(keep) != len(layers):
        got = type(keep).__name__ if not isinstance(keep, Sequence) else f"{len(keep)} entries"
        raise ValueError(f"keep must be None or a list with one entry (None or [B, K] indices) per encoder: "
                         f"{len(layers)} encoders, got {got}")
    keeps = []
    checks = []
    for j, kp in enumerate(keep):
        if kp is None:
            keeps.append(None)
            continue
        if not isinstance(kp, torch.Tensor):
            raise TypeError(f"keep[{j}] must be None or a tensor of indices, got {type(kp).__name__}")
        if kp.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"keep[{j}] has dtype {kp.dtype}; indices must be int64 or int32")
        if kp.dim() != 2 or kp.shape[0] != batch:
            raise ValueError(f"keep[{j}] has shape {tuple(kp.shape)}; expected [B={batch}, K]")
        if kp.device != device:
            raise ValueError(f"keep[{j}] is on {kp.device} but the features are on {device}")
        n = layers[j][0].shape[1]
        if kp.numel() and device.type == "cpu":  # on CUDA the gather checks on the device: no host sync
            checks.append(((kp < 0) | (kp >= n)).any())
        keeps.append(kp)
    if checks and not torch.compiler.is_compiling() and not _is_fake(keeps):
        bad = torch.stack(checks).tolist()
        if any(bad):
            idx = [j for j, kp in enumerate(keeps) if kp is not None and kp.numel()]
            j = idx[bad.index(True)]
            raise ValueError(f"keep[{j}] holds indices outside [0, {layers[j][0].shape[1]}) "
                             f"(features[{j}] has {layers[j][0].shape[1]} tokens)")
    return keeps


def _is_fake(tensors) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(t is not None and is_fake(t) for t in tensors)


@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs ``dtype`` matmuls natively on this CPU (AVX512-BF16/AMX/FP16)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The GEMM dtype for ``dtype`` storage on ``device``: bf16/fp16 matmuls on a CPU without native support run
    ~8× slower than fp32 ones (measured: AVX2 EPYC), so there they run in fp32 on the upcast rows
    and weights (the storage dtype's values exactly; the result is rounded at the same two points)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_has_native(dtype):
        return torch.float32
    return dtype


def _differentiable_project(layers, parts, keeps) -> torch.Tensor:
    """The autograd path: gather, channel concat, Linear → GELU → Linear, token concat."""
    results = []
    for feats, (w1, b1, w2, b2, act), kp in zip(layers, parts, keeps):
        if kp is not None:
            rows = torch.arange(kp.shape[0], device=kp.device)[:, None]
            feats = [x[rows, kp] for x in feats]
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        h = F.gelu(F.linear(x, w1, b1), approximate="tanh" if act == ACT_GELU_TANH else "none")
        results.append(F.linear(h, w2, b2))
    return results[0] if len(results) == 1 else torch.cat(results, dim=1)


def gather_rows(feats: list[torch.Tensor], keep: torch.Tensor | None) -> torch.Tensor:
    """[B·K, ΣD]: rows ``keep[b]`` of every layer [B, N, D_l], layers side by side along channels
    (``keep=None``: all N rows). A view of the features for one unpruned layer whose strides
    allow it; otherwise one gather (or concat) pass writes a new matrix."""
    x0 = feats[0]
    if keep is None:
        return (x0 if len(feats) == 1 else torch.cat(feats, dim=-1)).flatten(0, 1)
    index = keep.to(torch.int64).unsqueeze(-1)
    if len(feats) == 1:
        return torch.gather(x0, 1, index.expand(-1, -1, x0.shape[2])).flatten(0, 1)
    rows = torch.empty(*keep.shape, sum(x.shape[2] for x in feats), dtype=x0.dtype, device=x0.device)
    col = 0
    for x in feats:
        torch.gather(x, 1, index.expand(-1, -1, x.shape[2]), out=rows[:, :, col:col + x.shape[2]])
        col += x.shape[2]
    return rows.flatten(0, 1)


def _linear_gelu(x, w, b, act) -> torch.Tensor:
    """GELU(x·wᵀ + b) in x's dtype: cuBLASLt's bias + GELU epilogue where it is the projector's GELU
    (the tanh form, on CUDA) and the dtype is bf16 — the epilogue's accuracy is not documented,
    bf16's 2^-8 rounding dwarfs any fast-tanh error, fp16's and fp32's would not — else the GEMM
    (bias in its epilogue), then GELU out of place (the same traffic as in place; the CPU's in-place
    kernel took 1 ms instead of 12 µs on small tensors of a busy 2-core machine)."""
    if act == ACT_GELU_TANH and b is not None and x.is_cuda and x.dtype == torch.bfloat16:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    h = torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())
    return F.gelu(h, approximate="tanh" if act == ACT_GELU_TANH else "none")


def _linear(h, w, b, out=None) -> torch.Tensor:
    """h·wᵀ + b (bias in the GEMM epilogue), into ``out`` when given."""
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)


def _projector_inputs(jobs) -> list[torch.Tensor]:
    """Each job's projector input [B·K, ΣD] (``gather_rows``). On the Triton backend (CUDA) the
    kept rows of every pruned encoder and layer are gathered by one launch
    (``triton/project_concat.py``: whole rows, where ``torch.gather`` reads an index per element)."""
    x0 = jobs[0][0][0]
    if select_backend(x0.device) != "triton" or all(job[-1] is None for job in jobs):
        return [gather_rows(job[0], job[-1]) for job in jobs]
    from ..triton import project_concat as kernels

    inputs, entries = [], []
    for feats, *_, keep in jobs:
        if keep is None:
            inputs.append(gather_rows(feats, None))
            continue
        keep = keep.contiguous()
        rows = new_buffer((keep.numel(), sum(x.shape[2] for x in feats)), dtype=x0.dtype, device=x0.device)
        col = 0
        for x in feats:
            entries.append((x, keep, rows[:, col:col + x.shape[2]]))
            col += x.shape[2]
        inputs.append(rows)
    kernels.gather_rows_into(entries)
    return inputs


def _project_encoder(x, w1, b1, w2, b2, act, work, dst=None) -> torch.Tensor:
    """One encoder's projector input [B·K, ΣD] through its projector: [B·K, H], written into ``dst``
    (a contiguous [B·K, H] view of the output) when given."""
    dtype = x.dtype
    if work != dtype:  # fp32 GEMMs on the exact upcast values (CPU without native bf16/fp16)
        x, w1, w2 = x.to(work), w1.to(work), w2.to(work)
        b1, b2 = (None if b is None else b.to(work) for b in (b1, b2))
    h = _linear_gelu(x, w1, b1, act)
    if work != dtype:
        h = h.to(dtype).to(work)  # the intermediate's rounding point, as in the eager projector
        return _linear(h, w2, b2).to(dtype) if dst is None else dst.copy_(_linear(h, w2, b2))
    return _linear(h, w2, b2, out=dst)


def _project_into(out, layers, parts, keeps) -> torch.Tensor:
    """Each encoder's second GEMM writes its token slice of ``out`` [B, ΣK, H] itself when that
    slice is one matrix (B = 1 or a single encoder with tokens); otherwise the encoders' results
    are concatenated into it by one ``torch.cat`` (one vectorised copy: measured faster on an H100
    than a strided copy per encoder, and per-batch GEMMs of K rows would pad cuBLAS tiles)."""
    jobs = [(feats, *part, kp) for feats, part, kp in zip(layers, parts, keeps)
            if out.shape[0] and (feats[0].shape[1] if kp is None else kp.shape[1])]
    if not jobs:
        return out
    work = compute_dtype(out.dtype, out.device)
    batch, hidden = out.shape[0], out.shape[2]
    inputs = _projector_inputs(jobs)
    if batch == 1 or len(jobs) == 1:
        offset = 0
        for x, job in zip(inputs, jobs):
            rows = x.shape[0] // batch
            # (narrow: less host time than tensor indexing)
            _project_encoder(x, *job[1:-1], work, dst=out.narrow(1, offset, rows).view(-1, hidden))
            offset += rows
    else:
        torch.cat([_project_encoder(x, *job[1:-1], work).view(batch, -1, hidden) for x, job in zip(inputs, jobs)],
                  dim=1, out=out)
    return out


new_buffer = torch.empty  # output and gathered rows' allocator (tests swap in a NaN-filled one: unwritten ones show)


def _group(flat, layer_counts):
    layers, start = [], 0
    for c in layer_counts:
        layers.append(list(flat[start:start + c]))
        start += c
    return layers


def _output_shape(layers, w2s, keeps):
    total = sum(f[0].shape[1] if kp is None else kp.shape[1] for f, kp in zip(layers, keeps))
    return layers[0][0].shape[0], total, w2s[0].shape[0]


def _project_concat(features, layer_counts, w1s, b1s, w2s, b2s, acts, keeps) -> torch.Tensor:
    layers = _group(features, layer_counts)
    ref = layers[0][0]
    out = new_buffer(_output_shape(layers, w2s, keeps), dtype=ref.dtype, device=ref.device)
    return _project_into(out, layers, list(zip(w1s, b1s, w2s, b2s, acts)), keeps)


def _project_concat_fake(features, layer_counts, w1s, b1s, w2s, b2s, acts, keeps):
    layers = _group(features, layer_counts)
    return layers[0][0].new_empty(_output_shape(layers, w2s, keeps))


define(
    "project_concat(Tensor[] features, int[] layer_counts, Tensor[] w1, Tensor?[] b1, Tensor[] w2, Tensor?[] b2, "
    "int[] acts, Tensor?[] keep) -> Tensor",
    _project_concat,
    _project_concat_fake,
)
project_concat_op = torch.ops.vfuse.project_concat


def project_concat(features, projectors, *, keep=None) -> torch.Tensor:
    """[B, ΣKⱼ, H]: every encoder's (kept) tokens through its projector, concatenated in order.

    Equals ``torch.cat([proj_j(cat(layers_j)[b, keep_j]) for j], dim=1)``; see the module
    docstring for the argument forms.

    >>> proj = torch.nn.Sequential()
    >>> proj.linear_1, proj.act, proj.linear_2 = torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 6)
    >>> x = torch.randn(2, 5, 4)
    >>> project_concat([x, x[:, :3]], [proj, proj], keep=[torch.tensor([[0, 4], [1, 2]]), None]).shape
    torch.Size([2, 5, 6])
    """
    layers, parts, keeps = check_inputs(features, projectors, keep)
    tensors = [t for feats in layers for t in feats] + [p for part in parts for p in part[:4] if p is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _differentiable_project(layers, parts, keeps)
    w1s, b1s, w2s, b2s, acts = (list(x) for x in zip(*parts))
    args = ([t for feats in layers for t in feats], [len(f) for f in layers], w1s, b1s, w2s, b2s, acts, keeps)
    with torch.no_grad():
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return project_concat_op(*args)  # traced (torch.compile, export, fake tensors): the registered op
        # eager: the same function without the dispatcher's round trip of 8 tensor lists (~10 µs of host
        # time, which small calls are bound by)
        return _project_concat(*args)


__all__ = ["ACT_GELU_ERF", "ACT_GELU_TANH", "activation_kind", "project_concat", "projector_parts"]
