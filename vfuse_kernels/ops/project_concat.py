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

Backends: CUDA tensors → two grouped Triton GEMM launches (``triton/project_concat.py``);
CPU tensors → PyTorch/oneDNN matmuls on the gathered rows (``VFUSE_BACKEND=triton`` with
``TRITON_INTERPRET=1`` runs the Triton kernels on CPU). Features and weights share one dtype
(fp32/bf16/fp16); accumulation is fp32 and, like the eager projector, the ``linear_1`` + GELU
result is rounded once to that dtype before ``linear_2``. Inference op: when autograd needs it
(grad mode on and an input requiring grad) the same computation runs as differentiable PyTorch.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._backend import select_backend
from ._checks import check_float_tensor
from ._library import define

ACT_GELU_ERF, ACT_GELU_TANH = 1, 2  # codes shared with triton/project_concat.py
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


def projector_parts(name: str, projector):
    """(w1, b1, w2, b2, act code) of a LLaVA-style projector module."""
    parts = []
    for attr in ("linear_1", "linear_2"):
        linear = getattr(projector, attr, None)
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{name} has no {attr} with a weight (a LLaVA projector has linear_1, act, linear_2), "
                            f"got {type(projector).__name__}")
        check_float_tensor(f"{name}.{attr}.weight", weight, ndim=2)
        bias = getattr(linear, "bias", None)
        if bias is not None:
            check_float_tensor(f"{name}.{attr}.bias", bias, ndim=1)
            if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype or bias.device != weight.device:
                raise ValueError(f"{name}.{attr}.bias {tuple(bias.shape)} {bias.dtype} on {bias.device} does not "
                                 f"match its weight {tuple(weight.shape)} {weight.dtype} on {weight.device}")
        parts += [weight, bias]
    act = next((getattr(projector, a) for a in ("act", "act_fn", "activation") if hasattr(projector, a)), None)
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
    batch = ref.shape[0]
    parts = []
    hidden = None
    for j, (feats, projector) in enumerate(zip(layers, projectors)):
        for i, t in enumerate(feats):
            where = f"features[{j}]" + (f"[{i}]" if len(feats) > 1 else "")
            if t.dtype != ref.dtype:
                raise TypeError(f"{where} has dtype {t.dtype} but features[0] has {ref.dtype}")
            if t.device != ref.device:
                raise ValueError(f"{where} is on {t.device} but features[0] is on {ref.device}")
            if t.shape[0] != batch:
                raise ValueError(f"{where} has shape {tuple(t.shape)}: batch {t.shape[0]}, features[0] has {batch}")
        w1, b1, w2, b2, act = projector_parts(f"projectors[{j}]", projector)
        d = sum(t.shape[2] for t in feats)
        for wname, w in (("linear_1", w1), ("linear_2", w2)):
            if w.dtype != ref.dtype:
                raise TypeError(f"projectors[{j}].{wname}.weight has dtype {w.dtype} but the features have "
                                f"{ref.dtype}; cast the projector or the features")
            if w.device != ref.device:
                raise ValueError(f"projectors[{j}].{wname}.weight is on {w.device} but the features are on "
                                 f"{ref.device}")
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
    keeps = _check_keep(keep, layers, batch, ref.device)
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
        if kp.numel():
            checks.append(((kp < 0) | (kp >= n)).any())
        keeps.append(kp)
    if checks and not torch.compiler.is_compiling() and not _is_fake(keeps):
        bad = torch.stack(checks).tolist()  # one device sync for all encoders
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
    """The matmul dtype of the PyTorch path: bf16/fp16 matmuls on a CPU without native support run
    ~8× slower than fp32 ones (measured: AVX2 EPYC), so there they run in fp32 on the upcast rows
    and weights (the storage dtype's values exactly; the result is rounded at the same two points)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_has_native(dtype):
        return torch.float32
    return dtype


def _torch_project(layers, parts, keeps, out=None) -> torch.Tensor:
    """PyTorch path: gather the kept rows of each layer, concat channels, Linear → GELU → Linear."""
    batch = layers[0][0].shape[0]
    ks = [feats[0].shape[1] if kp is None else kp.shape[1] for feats, kp in zip(layers, keeps)]
    dtype = layers[0][0].dtype
    work = dtype if out is None else compute_dtype(dtype, layers[0][0].device)  # autograd path: as stored
    results = []
    for feats, (w1, b1, w2, b2, act), kp in zip(layers, parts, keeps):
        if kp is not None:
            rows = torch.arange(batch, device=kp.device)[:, None]
            feats = [x[rows, kp] for x in feats]  # gather first: pruned tokens cost nothing
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        if work != dtype:
            x, w1, w2 = x.to(work), w1.to(work), w2.to(work)
            b1, b2 = (None if b is None else b.to(work) for b in (b1, b2))
        h = F.gelu(F.linear(x, w1, b1), approximate="tanh" if act == ACT_GELU_TANH else "none")
        if work != dtype:
            h = h.to(dtype).to(work)  # the intermediate's rounding point, as in the eager projector
        results.append(F.linear(h, w2, b2))
    if out is None:
        return results[0] if len(results) == 1 else torch.cat(results, dim=1)
    offset = 0
    for k, y in zip(ks, results):
        out[:, offset:offset + k].copy_(y)
        offset += k
    return out


new_buffer = torch.empty  # output allocator (tests swap in a NaN-filled one to catch unwritten elements)


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
    if out.numel() == 0:
        return out
    parts = list(zip(w1s, b1s, w2s, b2s, acts))
    if select_backend(ref.device) == "triton":
        from ..triton import project_concat as kernels

        keeps = [None if kp is None else kp.to(torch.int64) for kp in keeps]
        kernels.project_concat(out, layers, list(w1s), list(b1s), list(w2s), list(b2s), list(acts), keeps)
        return out
    return _torch_project(layers, parts, keeps, out)


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
        return _torch_project(layers, parts, keeps)
    w1s, b1s, w2s, b2s, acts = (list(x) for x in zip(*parts))
    with torch.no_grad():
        return project_concat_op([t for feats in layers for t in feats], [len(f) for f in layers], w1s, b1s, w2s,
                                 b2s, acts, keeps)


__all__ = ["ACT_GELU_ERF", "ACT_GELU_TANH", "activation_kind", "project_concat", "projector_parts"]
