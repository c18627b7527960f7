"""MultiEncoderProjector, LlavaProjector, TokenPruner, MultiLayerFeatureFusion: loading HF weights
as they are, parity with the HF modules, pruning inputs, and the scores vs CLIP's eager attention."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device
from token_testing import tiny_llava_config

import vfuse_kernels as vk
from vfuse_kernels.nn import (LlavaProjector, MultiEncoderProjector, MultiLayerFeatureFusion, PrunedTokens,
                              TokenPruner, attention_qk)
from vfuse_kernels.reference import query_key_scores as ref_scores
from vfuse_kernels.reference import select_tokens as ref_select


def _hf_projector(seed, **config):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(seed)
    return LlavaMultiModalProjector(tiny_llava_config(**config)).eval()


def _hf_model(seed, **config):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(**config)).eval()


def test_llava_projector_loads_hf_state_dicts_as_they_are():
    hf = _hf_projector(0, projector_hidden_act="gelu_pytorch_tanh")
    mine = LlavaProjector(32, 32, act="gelu_pytorch_tanh")
    mine.load_state_dict(hf.state_dict())  # same parameter names
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), hf(x), rtol=1e-5, atol=1e-6)
        keep = torch.tensor([[8, 0, 3], [1, 1, 2]])
        torch.testing.assert_close(mine(x, keep=keep), hf(x[torch.arange(2)[:, None], keep]), rtol=1e-5, atol=1e-6)
    # from a whole-model checkpoint: the multi_modal_projector prefix is stripped
    model = _hf_model(1)
    loaded = LlavaProjector.from_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.model.multi_modal_projector(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one projector"):
        LlavaProjector.from_state_dict({"a.linear_1.weight": torch.zeros(2, 2), "b.linear_1.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="act='quick_gelu' is not one of"):
        LlavaProjector(4, 4, act="quick_gelu")


def test_multi_encoder_projector_equals_hf_projectors(backend):
    """Two HF projectors of different input widths (one on a two-layer concat), used as they are."""
    device = backend_device(backend)
    hf = [_hf_projector(2).to(device), _hf_projector(3, vision_feature_layer=[-2, -1],
                                                    projector_hidden_act="gelu_new").to(device)]
    module = MultiEncoderProjector(hf)
    feats = [torch.randn(2, 7, 32, device=device), [torch.randn(2, 5, 32, device=device) for _ in range(2)]]
    with torch.no_grad():
        eager = torch.cat([hf[0](feats[0]), hf[1](torch.cat(feats[1], dim=-1))], dim=1)
        out = module(feats)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert module.num_encoders == 2 and module.out_features == 32


def test_multi_encoder_projector_from_state_dicts_with_pruner():
    hf = [_hf_projector(4), _hf_projector(5, projector_hidden_act="gelu_pytorch_tanh")]
    pruner = TokenPruner(6, mode="proportional")
    module = MultiEncoderProjector.from_state_dicts(
        [{f"model.multi_modal_projector.{k}": v for k, v in hf[0].state_dict().items()}, hf[1].state_dict()],
        act=["gelu", "gelu_pytorch_tanh"], pruner=pruner)
    feats = [torch.randn(1, 8, 32), torch.randn(1, 4, 32)]
    scores = [torch.randn(1, 8), torch.randn(1, 4)]
    with torch.no_grad():
        out, positions = module(feats, scores=scores, offset=10, return_positions=True)
        keep = [ref_select.select_tokens(scores[0], 4), ref_select.select_tokens(scores[1], 2)]  # 6 ∝ (8, 4)
        eager = torch.cat([hf[j](feats[j][:, keep[j][0]]) for j in range(2)], dim=1)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(positions, torch.cat([keep[0] + 10, keep[1] + 18], dim=1))
    with pytest.raises(ValueError, match="no pruner"):
        MultiEncoderProjector(hf)(feats, scores=scores)


def test_token_pruner_sources():
    gen = torch.Generator().manual_seed(7)
    q = [torch.randn(2, 4, 10, 8, generator=gen), torch.randn(2, 4, 6, 8, generator=gen)]
    k = [torch.randn(2, 4, 10, 8, generator=gen), torch.randn(2, 4, 6, 8, generator=gen)]
    # VisionZip: [CLS] (index 0) attention, the [CLS] key dropped → 9 and 5 patch scores
    cls = TokenPruner(0.5, source="cls")
    scores = cls.scores(list(zip(q, k)))
    for s, qj, kj in zip(scores, q, k):
        torch.testing.assert_close(s.double(), ref_scores.cls_attention(qj, kj)[:, 1:], rtol=1e-5, atol=1e-7)
    result = cls(list(zip(q, k)))
    assert isinstance(result, PrunedTokens)
    assert [kp.shape for kp in result.keep] == [(2, 5), (2, 2)]  # 7 = int(0.5·14) split 9:5
    assert torch.equal(result.keep[0], ref_select.select_tokens(scores[0], 5))
    assert torch.equal(result.position_ids, torch.cat([result.keep[0], result.keep[1] + 9], dim=1))
    # FastV: mean attention received, sliced to the visual keys
    fastv = TokenPruner(3, source="query_key", mode="global")
    s = fastv.scores([(q[0], k[0], slice(2, 8))])
    torch.testing.assert_close(s[0].double(), ref_scores.query_key_scores(q[0], k[0])[:, 2:8], rtol=1e-5, atol=1e-7)
    assert fastv([(q[0], k[0], slice(2, 8))]).keep[0].shape == (2, 3)
    with pytest.raises(ValueError, match="source='attention' is not one of"):
        TokenPruner(3, source="attention")
    with pytest.raises(TypeError, match="keep must be an int"):
        TokenPruner("all")
    with pytest.raises(TypeError, match=r"inputs\[0\] must be \(q, k\)"):
        cls([torch.randn(2, 5)])


def test_multi_layer_feature_fusion():
    hidden = [torch.randn(2, 17, 32) for _ in range(3)]
    assert torch.equal(MultiLayerFeatureFusion(-2)(hidden), hidden[1][:, 1:])
    both = MultiLayerFeatureFusion([0, -1], "full")(hidden)
    assert isinstance(both, list) and all(torch.equal(a, b) for a, b in zip(both, [hidden[0], hidden[2]]))
    fusion = MultiLayerFeatureFusion.from_config(tiny_llava_config(vision_feature_layer=[-2, -1]))
    assert fusion.layers == [-2, -1] and fusion.select_strategy == "default"
    assert fusion.attention_layer(3) == 1 and MultiLayerFeatureFusion(-2).attention_layer(3) == 0
    with pytest.raises(ValueError, match="no attention layer"):
        MultiLayerFeatureFusion(0).attention_layer(3)
    with pytest.raises(ValueError, match="select_strategy='cls' is not one of"):
        MultiLayerFeatureFusion(-2, "cls")
    with pytest.raises(TypeError, match="layers must be an int or a non-empty list"):
        MultiLayerFeatureFusion([])


def test_scores_from_clip_qk_match_eager_attention_weights(backend):
    """cls_attention / query_key_scores on a CLIP layer's q/k equal the attention weights HF's
    eager attention returns for that layer (output_attentions=True)."""
    device = backend_device(backend)
    model = _hf_model(9)
    model.config.vision_config._attn_implementation = "eager"
    tower = model.model.vision_tower.to(device)
    tower.config._attn_implementation = "eager"
    encoder = getattr(tower, "vision_model", tower).encoder  # transformers 4.x wraps it in vision_model
    pixels = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        outputs = tower(pixels, output_hidden_states=True, output_attentions=True)
        for layer in range(2):
            q, k, scale = attention_qk(encoder.layers[layer], outputs.hidden_states[layer])
            weights = outputs.attentions[layer].double()  # [B, H, N, N]
            torch.testing.assert_close(vk.cls_attention(q, k, scale=scale).double(), weights[:, :, 0].mean(1),
                                       rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(vk.query_key_scores(q, k, scale=scale).double(), weights.mean((1, 2)),
                                       rtol=1e-5, atol=1e-7)
