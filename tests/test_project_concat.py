"""project_concat against the fp64 reference: token counts, per-encoder widths, layer lists, keep,
dtypes, GELU variants, errors. Tests taking ``backend`` run on ``backend_device(backend)``: the CUDA
path (cuBLAS) on a GPU machine, the CPU path here."""
from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, backend_device
from token_testing import Projector, assert_close_scaled, parts, poison_buffers
from torch import nn

import vfuse_kernels as vk
from vfuse_kernels.ops.project_concat import ACT_GELU_ERF, ACT_GELU_TANH, activation_kind, gather_rows
from vfuse_kernels.reference import project_concat as ref

op = importlib.import_module("vfuse_kernels.ops.project_concat")  # the module (the package exports the function)


def make_case(batch, encoders, dtype, device, seed, keep_fraction=None, cls_view=False):
    """``encoders``: list of (N, [D per layer], H1); all project to H = 24. Returns features,
    projectors, keep, reference parts."""
    gen = torch.Generator().manual_seed(seed)
    feats, projs, keeps, kinds = [], [], [], []
    for j, (n, dims, h1) in enumerate(encoders):
        if cls_view:  # hidden_states[l][:, 1:]: batch stride (N+1)·D, not contiguous
            layers = [torch.randn(batch, n + 1, d, generator=gen).to(dtype)[:, 1:].to(device) for d in dims]
        else:
            layers = [torch.randn(batch, n, d, generator=gen).to(dtype).to(device) for d in dims]
        feats.append(layers[0] if len(layers) == 1 else layers)
        kind = ACT_GELU_TANH if j % 2 else ACT_GELU_ERF
        act = nn.GELU(approximate="tanh" if kind == ACT_GELU_TANH else "none")
        projs.append(Projector(sum(dims), h1, 24, act, dtype=dtype, generator=gen).to(device))
        kinds.append(kind)
        if keep_fraction is None:
            keeps.append(None)
        else:  # random, unsorted, with repeats: the output follows keep's order
            k = max(1, int(keep_fraction * n))
            keeps.append(torch.randint(0, n, (batch, k), generator=gen).to(device))
    return feats, projs, (None if keep_fraction is None else keeps), [parts(p, kd) for p, kd in zip(projs, kinds)]


def reduction(encoders):
    return max(sum(dims) + h1 for _, dims, h1 in encoders)


def check(feats, projs, keep, ref_parts, encoders):
    out = vk.project_concat(feats, projs, keep=keep)
    expected = ref.project_concat(feats, ref_parts, keep)
    assert_close_scaled(out, expected, reduction(encoders))
    return out


CPU_ENCODERS = {
    "one-token": [(1, [24], 16)],
    "odd": [(7, [40], 48), (13, [24], 32)],
    "clip-336": [(577, [40], 48)],
    "three-widths": [(577, [40], 48), (7, [24], 16), (2880, [16], 32)],
    "layers": [(577, [16, 24], 32), (13, [8, 8, 8], 16)],
}


@pytest.mark.parametrize("keep_fraction", [None, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CPU_ENCODERS))
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_reference_cpu(name, batch, dtype, keep_fraction, monkeypatch):
    poison_buffers(monkeypatch)
    encoders = CPU_ENCODERS[name]
    case = make_case(batch, encoders, dtype, "cpu", hash((name, batch, str(dtype), keep_fraction)) % 10**6,
                     keep_fraction)
    check(*case, encoders)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_native_half_matmuls(dtype, monkeypatch):
    """bf16/fp16 GEMMs as stored (CPUs with native support, and every GPU), not upcast."""
    poison_buffers(monkeypatch)
    monkeypatch.setattr(op, "compute_dtype", lambda dtype, device: dtype)
    encoders = [(13, [16, 8], 32), (7, [40], 16)]
    check(*make_case(2, encoders, dtype, "cpu", 17, 0.5), encoders)


DEVICE_ENCODERS = {
    "odd": [(7, [5], 19), (1, [12], 20)],  # odd widths, a one-token encoder
    "aligned": [(20, [24], 32), (3, [16], 16)],
    "layers": [(9, [8, 16], 16), (5, [7, 3], 24)],  # multi-layer input (channel concat of kept rows)
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DEVICE_ENCODERS))
def test_matches_reference_on_device(backend, name, dtype, monkeypatch):
    """Batch 1 (the GEMM writes the output slice), batch 3 (a temporary copied into the slice) and
    one encoder (its slice is the whole output), with and without keep."""
    poison_buffers(monkeypatch)
    encoders = DEVICE_ENCODERS[name]
    device = backend_device(backend)
    for batch, keep_fraction, m in ((1, 0.6, 2), (3, None, 2), (3, 0.6, 2), (3, 0.6, 1)):
        feats, projs, keep, ref_parts = make_case(batch, encoders[:m], dtype, device,
                                                  hash((name, str(dtype), batch, m)) % 10**6, keep_fraction)
        check(feats, projs, keep, ref_parts, encoders[:m])


def test_feature_views_and_strides(backend, monkeypatch):
    """CLS-cropped views (batch stride ≠ N·D), a layer with a channel stride ≠ 1, transposed weights."""
    poison_buffers(monkeypatch)
    device = backend_device(backend)
    encoders = [(9, [16, 8], 16), (6, [8], 24)]
    feats, projs, keep, ref_parts = make_case(2, encoders, torch.float32, device, 21, 0.7, cls_view=True)
    wide = torch.randn(2, 9, 16, 2, device=device)[..., 0]  # stride (288, 32, 2)
    feats[0] = [wide, feats[0][1]]
    with torch.no_grad():  # a linear_1 weight stored transposed (stride (1, D))
        w = projs[1].linear_1.weight
        projs[1].linear_1.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=False)
    assert not projs[1].linear_1.weight.is_contiguous()
    check(feats, projs, keep, [parts(p, k) for p, k in zip(projs, (ACT_GELU_ERF, ACT_GELU_TANH))], encoders)


def test_keep_selection_and_none_mix(backend, monkeypatch):
    """keep from select_tokens for one encoder, None for the other; keep=None equals keep=all."""
    poison_buffers(monkeypatch)
    device = backend_device(backend)
    encoders = [(11, [16], 16), (5, [8], 16)]
    feats, projs, _, ref_parts = make_case(1, encoders, torch.bfloat16, device, 8)
    keep0 = vk.select_tokens(torch.randn(1, 11, device=device), 4)
    out = check(feats, projs, [keep0, None], ref_parts, encoders)
    assert out.shape == (1, 4 + 5, 24)
    full = vk.project_concat(feats, projs, keep=[torch.arange(11, device=device)[None], None])
    assert torch.equal(full, vk.project_concat(feats, projs))


def test_bias_free_projectors(backend, monkeypatch):
    poison_buffers(monkeypatch)
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(4)
    projs = [Projector(16, 16, 24, bias=False, generator=gen).to(device),
             Projector(8, 32, 24, nn.GELU(approximate="tanh"), bias=False, generator=gen).to(device)]
    feats = [torch.randn(2, 5, 16, generator=gen).to(device), torch.randn(2, 3, 8, generator=gen).to(device)]
    out = vk.project_concat(feats, projs)
    expected = ref.project_concat(feats, [parts(projs[0], ACT_GELU_ERF), parts(projs[1], ACT_GELU_TANH)])
    assert_close_scaled(out, expected, 48)


def test_empty_shapes(backend):
    device = backend_device(backend)
    encoders = [(6, [8], 16), (4, [8], 16)]
    feats, projs, _, _ = make_case(2, encoders, torch.float32, device, 3)
    out = vk.project_concat(feats, projs, keep=[torch.zeros(2, 0, dtype=torch.long, device=device), None])
    assert out.shape == (2, 4, 24)
    expected = ref.project_concat([feats[1]], [parts(projs[1], ACT_GELU_TANH)])
    assert_close_scaled(out, expected, 24)
    empty = vk.project_concat([f[:0] for f in feats], projs)
    assert empty.shape == (0, 10, 24)


def test_hf_llava_projector_as_is(backend):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    from token_testing import tiny_llava_config

    device = backend_device(backend)
    torch.manual_seed(0)
    projs = [LlavaMultiModalProjector(tiny_llava_config(projector_hidden_act=act, vision_feature_layer=layers))
             for act, layers in (("gelu", -2), ("gelu_pytorch_tanh", [-2, -1]))]
    projs = [p.to(device).eval() for p in projs]
    x = [torch.randn(2, 16, 32, device=device), [torch.randn(2, 9, 32, device=device) for _ in range(2)]]
    with torch.no_grad():
        out = vk.project_concat(x, projs)
        eager = torch.cat([projs[0](x[0]), projs[1](torch.cat(x[1], dim=-1))], dim=1)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_parametrised_weights_are_read_through_their_property():
    """A weight under torch.nn.utils.parametrize is a class property, not a parameter-table entry:
    project_concat reads what the module computes, as the projector's own forward does."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    gen = torch.Generator().manual_seed(7)
    proj = Projector(12, 20, 16, nn.GELU(), dtype=torch.float32, generator=gen)
    parametrize.register_parametrization(proj.linear_1, "weight", Doubled())
    x = torch.randn(2, 5, 12, generator=gen)
    with torch.no_grad():
        out = vk.project_concat([x], [proj])
        eager = proj.linear_2(proj.act(proj.linear_1(x)))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_gradients_fall_back_to_a_differentiable_path():
    gen = torch.Generator().manual_seed(6)
    proj = Projector(8, 16, 24, generator=gen).requires_grad_(True)
    x = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    keep = [torch.tensor([[0, 3], [4, 4]])]
    out = vk.project_concat([x], [proj], keep=keep)
    assert out.requires_grad
    out.square().sum().backward()
    expected = ref.project_concat([x], [parts(proj)], keep)
    assert_close_scaled(out.detach(), expected, 24)
    assert x.grad[0, 1].abs().sum() == 0 and x.grad[1, 4].abs().sum() > 0  # only kept rows get gradient
    with torch.no_grad():
        assert not vk.project_concat([x], [proj], keep=keep).requires_grad


# --- activations ---------------------------------------------------------------------------------

def _hf_activations():
    from transformers import activations as A

    return [(A.GELUActivation(), ACT_GELU_ERF), (A.GELUActivation(use_gelu_python=True), ACT_GELU_ERF),
            (A.GELUTanh(), ACT_GELU_TANH), (A.PytorchGELUTanh(), ACT_GELU_TANH),
            (A.NewGELUActivation(), ACT_GELU_TANH), (A.FastGELUActivation(), ACT_GELU_TANH),
            (A.AccurateGELUActivation(), ACT_GELU_TANH), (A.ACT2FN["gelu_python_tanh"], ACT_GELU_TANH)]


class _ErfByHand(nn.Module):  # unknown type: recognised by probing
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_gelu_variants_are_detected():
    known = [(nn.GELU(), ACT_GELU_ERF), (nn.GELU(approximate="tanh"), ACT_GELU_TANH), (F.gelu, ACT_GELU_ERF),
             (functools.partial(F.gelu, approximate="tanh"), ACT_GELU_TANH), (_ErfByHand(), ACT_GELU_ERF),
             (lambda x: F.gelu(x, approximate="tanh"), ACT_GELU_TANH)]
    for act, kind in known + _hf_activations():
        assert activation_kind(act) == kind, act


def test_unsupported_activations_are_rejected():
    from transformers import activations as A

    for act in (nn.SiLU(), nn.ReLU(), nn.Identity(), A.QuickGELUActivation(), A.ACT2FN["gelu_10"], nn.Tanh(),
                "gelu", lambda x: 1.702 * x):
        with pytest.raises(TypeError, match="unsupported projector activation"):
            activation_kind(act)
    proj = Projector(8, 8, 24, act=A.QuickGELUActivation())
    with pytest.raises(TypeError, match="unsupported projector activation"):
        vk.project_concat([torch.randn(1, 3, 8)], [proj])


@pytest.mark.parametrize("variant", ["erf", "tanh"])
def test_variant_changes_the_result(backend, variant):
    """fp32 tolerances resolve erf vs tanh GELU (they differ by ~1e-4): the right one is applied."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(13)
    kind = ACT_GELU_TANH if variant == "tanh" else ACT_GELU_ERF
    proj = Projector(16, 16, 24, nn.GELU(approximate="tanh" if variant == "tanh" else "none"), generator=gen)
    with torch.no_grad():  # inputs where the two forms differ most (|h| ≈ 2)
        proj.linear_1.weight.mul_(6.0)
    proj = proj.to(device)
    x = torch.randn(1, 7, 16, generator=gen).to(device)
    out = vk.project_concat([x], [proj])
    assert_close_scaled(out, ref.project_concat([x], [parts(proj, kind)]), 32)
    other = ref.project_concat([x], [parts(proj, ACT_GELU_ERF + ACT_GELU_TANH - kind)])
    assert (out.double() - other).abs().max() > 1e-5


# --- errors, opcheck, compile --------------------------------------------------------------------

def _valid():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, 5, 8, generator=gen), torch.randn(2, 3, 4, generator=gen)], \
        [Projector(8, 16, 24, generator=gen), Projector(4, 16, 24, generator=gen)]


def test_bad_arguments_name_what_is_wrong():
    feats, projs = _valid()
    cases = [
        (dict(features=feats[0]), TypeError, "features must be a non-empty list"),
        (dict(features=[feats[0], feats[1][0]]), ValueError,
         r"features\[1\] must have 3 dimensions, got shape \(3, 4\)"),
        (dict(features=[feats[0], feats[1].double()]), TypeError, r"features\[1\] has dtype torch.float64"),
        (dict(features=[feats[0], feats[1].half()]), TypeError, r"features\[1\] has dtype torch.float16 but"),
        (dict(features=[feats[0], feats[1][:1]]), ValueError, r"features\[1\] has shape \(1, 3, 4\): batch 1"),
        (dict(features=[feats[0], torch.randn(2, 3, 5)]), ValueError,
         r"projectors\[1\].linear_1.weight has shape \(16, 4\): expects 4 input channels, features\[1\] has 5"),
        (dict(features=[feats[0], [torch.randn(2, 3, 2), torch.randn(2, 4, 2)]]), ValueError,
         r"features\[1\]\[1\] has shape \(2, 4, 2\)"),
        (dict(projectors=projs[:1]), ValueError, "one projector per encoder: 2 features, got 1"),
        (dict(projectors=[projs[0], nn.Linear(4, 24)]), TypeError, r"projectors\[1\] has no linear_1"),
        (dict(projectors=[projs[0], Projector(4, 16, 12)]), ValueError, r"projectors\[1\].linear_2 outputs 12"),
        (dict(projectors=[projs[0], Projector(4, 16, 24, dtype=torch.bfloat16)]), TypeError,
         r"projectors\[1\].linear_1.weight has dtype torch.bfloat16"),
        (dict(keep=[None]), ValueError, "one entry .* per encoder: 2 encoders, got 1 entries"),
        (dict(keep=torch.zeros(2, 1, dtype=torch.long)), ValueError, "keep must be None or a list"),
        (dict(keep=[None, torch.zeros(2, 1)]), TypeError, r"keep\[1\] has dtype torch.float32"),
        (dict(keep=[None, torch.zeros(1, 2, dtype=torch.long)]), ValueError, r"keep\[1\] has shape \(1, 2\)"),
        (dict(keep=[torch.tensor([[0, 5], [1, 2]]), None]), ValueError, r"keep\[0\] holds indices outside \[0, 5\)"),
        (dict(keep=[None, torch.tensor([[0], [-1]])]), ValueError, r"keep\[1\] holds indices outside \[0, 3\)"),
    ]
    for override, exc, match in cases:
        kwargs = dict(features=feats, projectors=projs, keep=None)
        kwargs.update(override)
        with pytest.raises(exc, match=match):
            vk.project_concat(kwargs["features"], kwargs["projectors"], keep=kwargs["keep"])


def test_raw_op_rejects_out_of_range_indices_on_cpu():
    """The registered op (no argument checks) never reads outside the features: the gather checks
    every index (on CUDA as a device-side assert, without a host sync)."""
    proj = Projector(8, 16, 24, generator=torch.Generator().manual_seed(2))
    w = parts(proj)
    for bad in (1 << 40, -3, 4):
        keep = torch.tensor([[1, bad, 2]])
        with pytest.raises(RuntimeError, match="out of bounds"):
            torch.ops.vfuse.project_concat([torch.randn(1, 4, 8)], [1], [w[0]], [w[1]], [w[2]], [w[3]],
                                           [ACT_GELU_ERF], [keep])


def test_keep_is_range_checked_on_the_host_only_for_cpu_tensors():
    """A host check of device indices would need a device sync: off the CPU (meta stands in for
    CUDA here; reading a meta tensor raises) the indices are left to the gather."""
    layers = [[torch.empty(2, 5, 8, device="meta")]]
    keeps = op._check_keep([torch.full((2, 3), 7, device="meta")], layers, 2, torch.device("meta"))
    assert keeps[0].shape == (2, 3)
    with pytest.raises(ValueError, match=r"keep\[0\] holds indices outside \[0, 5\)"):
        op._check_keep([torch.full((2, 3), 7)], [[torch.empty(2, 5, 8)]], 2, torch.device("cpu"))


def test_gather_rows_copies_only_what_it_must():
    x = torch.randn(2, 5, 8)
    assert gather_rows([x], None).data_ptr() == x.data_ptr()  # unpruned, one layer: a [B·N, D] view
    cropped = torch.randn(2, 6, 8)[:, 1:]  # batch stride 48 ≠ 5·8: no view exists
    torch.testing.assert_close(gather_rows([cropped], None), cropped.reshape(10, 8))
    keep = torch.tensor([[4, 0, 4], [1, 2, 3]], dtype=torch.int32)
    layers = [x, torch.randn(2, 5, 3).transpose(1, 2).contiguous().transpose(1, 2)]  # token stride 1
    rows = gather_rows(layers, keep)
    expected = torch.cat([t[torch.arange(2)[:, None], keep.long()] for t in layers], dim=-1).reshape(6, 11)
    assert torch.equal(rows, expected)


def test_triton_gather_takes_every_encoder_s_kept_rows_in_one_launch(monkeypatch):
    """On the Triton backend project_concat gathers the kept rows of every pruned encoder and layer
    in one launch (NaN-poisoned buffers: every element written), from CLS-cropped views and a layer
    of channel stride 2, with int32 and int64 indices in any order, with repeats."""
    pytest.importorskip("triton")
    kernels = importlib.import_module("vfuse_kernels.triton.project_concat")
    poison_buffers(monkeypatch)
    monkeypatch.setenv("VFUSE_BACKEND", "triton")
    launches = []
    gather = kernels.gather_rows_into
    monkeypatch.setattr(kernels, "gather_rows_into", lambda entries: launches.append(len(entries)) or gather(entries))
    device = backend_device("triton")
    encoders = [(9, [16, 8], 16), (6, [8], 24), (5, [8], 16)]
    feats, projs, keep, ref_parts = make_case(2, encoders, torch.float32, device, 23, 0.7, cls_view=True)
    feats[0] = [torch.randn(2, 9, 16, 2, device=device)[..., 0], feats[0][1]]  # channel stride 2
    keep = [keep[0].int(), keep[1], None]
    check(feats, projs, keep, ref_parts, encoders)
    assert launches == [3]  # encoder 0's two layers and encoder 1's one


def test_triton_gather_never_reads_an_index_outside_the_tokens():
    """An index outside [0, N) is masked, never read (on a GPU the launch's debug assertion stops
    it there; the interpreter has no device assertions): its row is left as it was, the others
    are the features' rows."""
    pytest.importorskip("triton")
    kernels = importlib.import_module("vfuse_kernels.triton.project_concat")
    device = backend_device("triton")
    x = torch.randn(2, 5, 8, device=device)
    keep = torch.tensor([[4, -1, 0], [5, 2, 1 << 40]], device=device)
    rows = torch.full((6, 8), float("nan"), device=device)
    kernels.gather_rows_into([(x, keep, rows)])
    inside = torch.tensor([0, 2, 4])
    assert torch.equal(rows[inside].cpu(), x.cpu().reshape(10, 8)[torch.tensor([4, 0, 7])])
    assert rows[torch.tensor([1, 3, 5])].isnan().all()


def test_opcheck():
    feats, projs = _valid()
    flat = [feats[0], feats[1][..., :2], feats[1][..., 2:]]
    w1s = [p.linear_1.weight for p in projs]
    w2s = [p.linear_2.weight for p in projs]
    for keep, b1s in (([torch.tensor([[4, 0], [1, 1]]), None], [p.linear_1.bias for p in projs]),
                      ([None, torch.tensor([[2], [0]])], [None, projs[1].linear_1.bias])):
        args = (flat, [1, 2], w1s, b1s, w2s, [p.linear_2.bias for p in projs], [ACT_GELU_ERF, ACT_GELU_TANH], keep)
        torch.library.opcheck(torch.ops.vfuse.project_concat.default, args)


def test_compiled_fullgraph():
    feats, projs = _valid()
    keep = [torch.tensor([[4, 0], [1, 1]]), None]
    compiled = torch.compile(lambda a, b, k: vk.project_concat([a, b], projs, keep=[k, None]), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(*feats, keep[0]), vk.project_concat(feats, projs, keep=keep))
