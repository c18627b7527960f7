"""patch_llava on tiny random HF LLaVA models: logits equal the unpatched model's when nothing is
pruned (single and multi-layer features), pruning yields K image tokens chosen by [CLS] attention."""
from __future__ import annotations

import copy

import pytest
import torch
from token_testing import tiny_llava_config

import vfuse_kernels as vk
import vfuse_kernels.patch as patch_module
from vfuse_kernels.reference import select_tokens as ref_select


def _model(seed=0, **config):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(**config)).eval()


def _inputs(batch, image_tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((batch, 1), 5), torch.zeros(batch, image_tokens, dtype=torch.long),
                     torch.randint(1, 99, (batch, 6), generator=gen)], dim=1)  # image token id is 0
    return ids, torch.randn(batch, 3, 8, 8, generator=gen)


def _image_features(model, pixels) -> list[torch.Tensor]:
    """The projected features per image: what get_image_features returns (transformers 4.x) or
    its pooler_output (5.x)."""
    out = model.model.get_image_features(pixel_values=pixels)
    return out if isinstance(out, list) else out.pooler_output


def _spy(monkeypatch):
    calls = []
    original = patch_module.project_concat

    def spy(*args, **kwargs):
        calls.append(kwargs.get("keep"))
        return original(*args, **kwargs)

    monkeypatch.setattr(patch_module, "project_concat", spy)
    return calls


@pytest.mark.parametrize("layer, strategy, act", [(-2, "default", "gelu"), ([0, -1], "default", "gelu"),
                                                  ([-1, 1], "full", "gelu_pytorch_tanh"), (-1, "full", "gelu_new")])
def test_logits_equal_unpatched(layer, strategy, act, monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    model = _model(vision_feature_layer=layer, vision_feature_select_strategy=strategy, projector_hidden_act=act)
    ids, pixels = _inputs(2, 16 if strategy == "default" else 17)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        calls = _spy(monkeypatch)
        assert vk.patch_llava(model) is model
        out = model(input_ids=ids, pixel_values=pixels).logits
    assert calls == [None]  # the fused path ran, without pruning
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    vk.unpatch_llava(model)
    assert "get_image_features" not in vars(model.model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a GPU")
@pytest.mark.parametrize("layer, act, keep", [(-2, "gelu", None), ([-2, -1], "gelu_pytorch_tanh", None),
                                              ([-2, -1], "gelu", 5)])
def test_cuda_path(layer, act, keep, monkeypatch):
    """On CUDA (cuBLAS projection, Triton scores and selection): logits equal the unpatched
    model's on CUDA; pruned features equal the patched CPU model's."""
    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    model = _model(3, vision_feature_layer=layer, projector_hidden_act=act)
    ids, pixels = _inputs(2, 16 if keep is None else keep, seed=3)
    cuda = copy.deepcopy(model).cuda()
    with torch.no_grad():
        if keep is None:
            expected = cuda(input_ids=ids.cuda(), pixel_values=pixels.cuda()).logits
        else:
            expected = _image_features(vk.patch_llava(model, keep=keep), pixels)
        calls = _spy(monkeypatch)
        vk.patch_llava(cuda, keep=keep)
        if keep is None:
            got = cuda(input_ids=ids.cuda(), pixel_values=pixels.cuda()).logits
        else:
            got = _image_features(cuda, pixels.cuda())
    assert len(calls) == 1 and (calls[0] is None) == (keep is None)  # the fused path ran
    torch.testing.assert_close(got, expected if keep is None else [f.cuda() for f in expected],
                               rtol=1e-4, atol=1e-4)


def test_generate_matches_unpatched(monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    model = _model(4)
    ids, pixels = _inputs(1, 16, seed=4)
    kwargs = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    expected = model.generate(**kwargs)
    out = vk.patch_llava(model).generate(**kwargs)
    assert torch.equal(out, expected)


def _eager_cls_attention(model, pixels, layer_index):
    """The [CLS] row of HF's eager attention weights in the given vision-tower layer, mean over heads."""
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = tower(pixels, output_attentions=True).attentions
    tower.config._attn_implementation = "sdpa"
    return attentions[layer_index][:, :, 0].mean(1)


@pytest.mark.parametrize("keep, expected_tokens", [(5, 5), (0.25, 4)])
def test_pruning_keeps_the_top_cls_attention_tokens(keep, expected_tokens, monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    model = _model(5)  # feature layer -2 of 2 encoder layers (+ embeddings) → attention of layer 0
    ids, pixels = _inputs(2, expected_tokens, seed=5)
    assert vk.patch.pruned_image_tokens(16, keep) == expected_tokens
    with torch.no_grad():
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            model(input_ids=ids, pixel_values=pixels)  # unpatched: 16 features for K placeholders
        vk.patch_llava(model, keep=keep)
        features = _image_features(model, pixels)
        logits = model(input_ids=ids, pixel_values=pixels).logits
        # expected: HF's own features for layer -2 without [CLS], top-K by eager [CLS] attention of layer 0
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        scores = _eager_cls_attention(model, pixels, 0)[:, 1:]
        keep_idx = ref_select.select_tokens(scores, expected_tokens)
        projector = model.model.multi_modal_projector
        expected = [projector(hidden[b, keep_idx[b]]) for b in range(2)]
    assert logits.shape == (2, 1 + expected_tokens + 6, 99) and torch.isfinite(logits).all()
    assert len(features) == 2
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pruning_with_mean_scores_and_a_callable(monkeypatch):
    monkeypatch.setenv("VFUSE_BACKEND", "cpp")
    model = _model(6, vision_feature_layer=[-2, -1])
    _, pixels = _inputs(1, 16, seed=6)
    with torch.no_grad():
        given = []

        def scores(hidden, feats):
            given.append([h is not None for h in hidden])
            return -torch.arange(16.0).expand(1, 16)

        vk.patch_llava(model, keep=3, scores=scores)
        calls = _spy(monkeypatch)
        model.model.get_image_features(pixel_values=pixels)
        assert calls[0][0].tolist() == [[0, 1, 2]]  # the callable's scores decide
        assert given == [[True] * 3]  # given every hidden state (embeddings + 2 layers)
        vk.patch_llava(model, keep=3, scores="mean")
        feats = _image_features(model, pixels)
    assert feats[0].shape == (3, 32)


@pytest.mark.parametrize("indices", [[-2], [0, -1], [1, -3]])
def test_vision_tower_returns_the_selected_hidden_states(indices):
    """All num_hidden_layers + 1 positions; the selected ones equal HF's full output, the others are
    None where transformers selects by index (>= 5.23), else computed too."""
    tower = _model(9).model.vision_tower  # 2 layers: embeddings + 2 outputs
    pixels = _inputs(2, 16, seed=9)[1]
    with torch.no_grad():
        full = tower(pixels, output_hidden_states=True).hidden_states
        got = vk.patch.run_vision_tower(tower, pixels, indices).hidden_states
    assert len(got) == len(full) == 3
    selected = {i % 3 for i in indices}
    for i in range(3):
        if i in selected or not vk.patch._towers_select_hidden_states():
            assert torch.equal(got[i], full[i]), i
        else:
            assert got[i] is None, i


def test_bad_arguments():
    model = _model(7)
    with pytest.raises(TypeError, match="expects a LlavaForConditionalGeneration or LlavaModel"):
        vk.patch_llava(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scores='random' is not one of"):
        vk.patch_llava(model, keep=4, scores="random")
    with pytest.raises(ValueError, match=r"keep ratio 2.0 is outside \(0, 1\]"):
        vk.patch_llava(model, keep=2.0)
    with pytest.raises(TypeError, match="unsupported projector activation"):
        vk.patch_llava(_model(8, projector_hidden_act="quick_gelu"))
    assert "get_image_features" not in vars(model.model)  # nothing patched by the rejected calls
