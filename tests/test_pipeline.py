"""The VisionFuse pipeline on tiny LLaVA-family checkpoints (CPU) and `vfuse demo`."""
from __future__ import annotations

import os

import pytest
import torch
from checkpoints import llama, llava, load_tensors

from vfuse_kernels.cli import main as cli_main
from vfuse_kernels.pipeline import VisionFuse

MEMBERS = [dict(feature_layer=-2, strategy="default", act="gelu"),
           dict(vision=dict(image_size=12, patch_size=3, hidden_size=24, num_attention_heads=2),
                feature_layer=[-3, -1], strategy="default", act="gelu_pytorch_tanh"),
           dict(vision=dict(image_size=10, patch_size=5, num_hidden_layers=3), feature_layer=-1, strategy="full")]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    base = llama(0)
    base.save_pretrained(str(root / "base"))
    paths = []
    for i, spec in enumerate(MEMBERS):
        path = str(root / f"m{i}")
        llava(10 + i, base_lm=base, **spec).save_pretrained(path)
        paths.append(path)
    return str(root / "base"), paths


def _image(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 20, 26), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("member", [0, 1, 2])
def test_single_model_equals_stock_llava(family, member):
    from transformers import LlavaForConditionalGeneration

    path = family[1][member]
    fused = VisionFuse.from_pretrained([path], weights=[1.0], method="linear")
    stock = LlavaForConditionalGeneration.from_pretrained(path).eval()
    pixel_values = fused.encoders[0].preprocess(_image())
    n = fused.encoders[0].num_tokens
    ids = fused.expand_prompt([5, 0, 7, 9, 11], n)
    with torch.no_grad():
        expected = stock(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(fused(ids, pixel_values=[pixel_values]), expected, rtol=1e-5, atol=1e-5)


def test_merged_language_model_is_task_arithmetic_of_the_members(family):
    base, paths = family
    weights = [0.5, 0.3, 0.2]
    fused = VisionFuse.from_pretrained(paths, base_model=base, weights=weights, method="task_arithmetic")
    base_t = load_tensors(base)
    members = [load_tensors(p) for p in paths]
    lm_key = next(k for k in members[0] if k.endswith("layers.1.mlp.down_proj.weight"))
    expected = base_t["model.layers.1.mlp.down_proj.weight"].double()
    expected = expected + sum(w * (m[lm_key].double() - expected) for w, m in zip(weights, members))
    got = fused.language_model.layers[1].mlp.down_proj.weight.double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert fused.merge_stats.tensors > 0 and fused.merge_stats.bytes_read > 0


def test_slerp_between_two_members_without_a_base(family):
    """A per-tensor method without a base model: the first member's language model is the base
    (slerp from it at t = 0 to the second member at t = 1; the formula in fp64 here)."""
    base, paths = family
    fused = VisionFuse.from_pretrained(paths[:2], method="slerp", parameters={"t": 0.3})
    m0, m1 = (load_tensors(p) for p in paths[:2])
    lm_key = next(k for k in m0 if k.endswith("layers.1.mlp.down_proj.weight"))
    a, b = m0[lm_key].double(), m1[lm_key].double()
    theta = torch.acos((a / a.norm() * (b / b.norm())).sum())
    expected = (torch.sin(0.7 * theta) * a + torch.sin(0.3 * theta) * b) / torch.sin(theta)
    got = fused.language_model.layers[1].mlp.down_proj.weight.double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [2, 3])
def test_generate_end_to_end(family, m):
    base, paths = family
    fused = VisionFuse.from_pretrained(paths[:m], base_model=base, method="ties", density=0.5)
    result = fused.generate(_image(1), [3, 0, 5, 6], max_new_tokens=5)
    assert len(result.visual_tokens) == m
    assert [n for n, _ in result.visual_tokens] == [e.num_tokens for e in fused.encoders]
    assert result.timings["prompt_tokens"] == 3 + sum(n for n, _ in result.visual_tokens)
    assert 1 <= len(result.token_ids) <= 5 and all(0 <= t < 99 for t in result.token_ids)


def test_pruning_shortens_the_sequence(family):
    base, paths = family
    full = VisionFuse.from_pretrained(paths, base_model=base)
    pruned = VisionFuse.from_pretrained(paths, base_model=base, keep=0.5)
    tokens, counts = full.image_tokens(_image(2))
    kept_tokens, kept_counts = pruned.image_tokens(_image(2))
    total = sum(n for n, _ in counts)
    assert [n for n, _ in kept_counts] == [n for n, _ in counts]
    assert sum(k for _, k in kept_counts) == round(0.5 * total) == kept_tokens.shape[1]
    assert tokens.shape[1] == total
    short = pruned.generate(_image(2), [3, 0, 5], max_new_tokens=2)
    assert short.timings["prompt_tokens"] == 2 + kept_tokens.shape[1]


def test_different_families_are_rejected(family, tmp_path):
    base, paths = family
    other = str(tmp_path / "wide")
    llava(5, text=dict(hidden_size=48, num_attention_heads=4)).save_pretrained(other)
    with pytest.raises(ValueError, match=r"not one family: text hidden_size differs: 32 .*, 48"):
        VisionFuse.from_pretrained([paths[0], other], base_model=base)
    vocab = str(tmp_path / "vocab")
    llava(6, text=dict(vocab_size=120)).save_pretrained(vocab)
    with pytest.raises(ValueError, match="vocab_size differs"):
        VisionFuse.from_pretrained([paths[0], vocab])


def test_bad_arguments(family):
    base, paths = family
    with pytest.raises(ValueError, match="needs a base_model"):
        VisionFuse.from_pretrained(paths[:2], method="ties")
    with pytest.raises(ValueError, match="2 models but 3 weights"):
        VisionFuse.from_pretrained(paths[:2], base_model=base, weights=[1, 2, 3])
    fused = VisionFuse.from_pretrained(paths[:1], weights=[1.0])
    with pytest.raises(ValueError, match="holds 2 <image> tokens"):
        fused.expand_prompt([0, 4, 0], 3)


def test_vfuse_demo_runs(tmp_path, capsys):
    assert cli_main(["demo", "--cache-dir", str(tmp_path / "demo"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "M=1 parity with LlavaForConditionalGeneration" in out and "PASS" in out
    assert "visual tokens: 193 -> 96 kept" in out and "generated:" in out
    assert os.path.exists(tmp_path / "demo" / "family.json")
