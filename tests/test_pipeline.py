"""The VisionFuse pipeline on tiny LLaVA-family checkpoints (CPU) and `vfuse demo`."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from torch import nn
from checkpoints import llama, llava, load_tensors, save_member

from vfuse_kernels.cli import main as cli_main
from vfuse_kernels.pipeline import VisionFuse
from vfuse_kernels.pipeline.demo import parity_check
from vfuse_kernels.pipeline.anyres import grid_shape

PINPOINTS = [[8, 16], [16, 8], [16, 16], [8, 24], [24, 8]]
MEMBERS = [dict(feature_layer=-2, strategy="default", act="gelu"),
           dict(vision=dict(image_size=12, patch_size=3, hidden_size=24, num_attention_heads=2),
                feature_layer=[-3, -1], strategy="default", act="gelu_pytorch_tanh"),
           dict(vision=dict(image_size=10, patch_size=5, num_hidden_layers=3), feature_layer=-1, strategy="full",
                siglip=True),
           dict(feature_layer=[-2, -1], grid_pinpoints=PINPOINTS),  # LLaVA-NeXT
           dict(feature_layer=-1, strategy="full", grid_pinpoints=PINPOINTS + [[24, 24]], max_crops=4,
                siglip=True)]  # LLaVA-OneVision
NEXT, ONEVISION = 3, 4
# (height, width): anyres grids 2x2, 1x2, 2x1, 1x3 and 3x1, with and without unpadding
SIZES = [(16, 16), (20, 26), (8, 16), (16, 8), (7, 30), (50, 20), (9, 23)]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    base = llama(0)
    base.save_pretrained(str(root / "base"))
    paths = [save_member(llava(10 + i, base_lm=base, **spec), str(root / f"m{i}"), mean=(0.5, 0.4, (3 + i) / 10),
                         pad=i == 1)  # LLaVA-1.5's pad to square
             for i, spec in enumerate(MEMBERS)]
    return str(root / "base"), paths


def _image(seed=0, size=(20, 26)):
    """A PIL image of ``size`` (height, width): colour gradients plus noise."""
    from PIL import Image

    height, width = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin((x + y) / 3)], axis=-1)
    pixels = pixels + rng.normal(0, 25, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("member", [0, 1, 2])
def test_single_model_equals_stock_llava(family, member):
    class_name, error = parity_check(family[1][member], "cpu", _image(), prompt=[5, 0, 7, 9, 11])
    assert class_name == "LlavaForConditionalGeneration" and error < 1e-5


@pytest.mark.parametrize("member, class_name", [(NEXT, "LlavaNextForConditionalGeneration"),
                                                (ONEVISION, "LlavaOnevisionForConditionalGeneration")])
def test_single_anyres_member_equals_stock(family, member, class_name):
    """LLaVA-NeXT and LLaVA-OneVision members, images of several sizes and aspect ratios (SIZES)."""
    for i, size in enumerate(SIZES):
        name, error = parity_check(family[1][member], "cpu", _image(i, size), prompt=[5, 0, 7, 9, 11])
        assert name == class_name and error < 1e-5, size
    assert {grid_shape(size, PINPOINTS, 8) for size in SIZES} == {(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)}


def test_onevision_resizes_the_map_for_some_sizes(family):
    """anyres_max_4: SIZES include images whose unpadded map OneVision resizes and some it keeps."""
    encoder = VisionFuse.from_pretrained([family[1][ONEVISION]], weights=[1.0], method="linear").encoders[0]
    assert {encoder.packing(size).size is None for size in SIZES} == {True, False}


@pytest.mark.parametrize("keep", [None, 0.5])
def test_next_batches_equal_single_images(family, keep):
    """A batch of same-size images gives each image's own tokens; images of different sizes
    are an error naming the member."""
    path = family[1][NEXT]
    fused = VisionFuse.from_pretrained([family[1][0], path], method="linear", keep=keep)
    images = [_image(7, (20, 26)), _image(8, (20, 26))]
    tokens, counts = fused.image_tokens(images)
    for i, image in enumerate(images):
        single, single_counts = fused.image_tokens(image)
        assert single_counts == counts
        torch.testing.assert_close(tokens[i:i + 1], single, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=f"{re.escape(path)}: the images have different sizes"):
        fused.image_tokens([images[0], _image(9, (16, 8))])


def test_next_token_counts_at_real_sizes_equal_the_hf_processors():
    """At LLaVA-1.6's sizes (336 px / 14 CLIP crops, its default pinpoints, 576 tokens a crop) a
    LLaVA-NeXT member packs as many tokens as LlavaNextProcessor expands ``<image>`` to."""
    from PIL import Image
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlavaNextConfig, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    from vfuse_kernels.nn import MultiLayerFeatureFusion
    from vfuse_kernels.pipeline.demo import _tokenizer
    from vfuse_kernels.pipeline.visionfuse import Encoder

    pinpoints, tokenizer = LlavaNextConfig().image_grid_pinpoints, _tokenizer()
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=8, intermediate_size=8,
                                             num_hidden_layers=1, num_attention_heads=1))
    encoder = Encoder("llava-v1.6", tower, nn.Identity(), MultiLayerFeatureFusion(-2, "default"), image_processor,
                      grid_pinpoints=pinpoints)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    counts = []
    for size in [(480, 640), (300, 1000), (1000, 300), (224, 224), (1080, 1920), (333, 777)]:
        ids = processor(images=Image.new("RGB", size[::-1]), text="<image>", return_tensors="pt")["input_ids"]
        counts.append(encoder.num_tokens(size))
        assert counts[-1] == int((ids == image_token).sum()), size
    assert counts[0] == 2340 and len(set(counts)) == 6


def test_processor_outputs_equal_the_hf_processors(family):
    """Each member preprocesses with its own processor: the one saved in its folder, whose
    outputs equal a freshly built transformers processor's, and which image_tokens runs."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaNextImageProcessor

    paths = family[1]
    fused = VisionFuse.from_pretrained([paths[0], paths[1], paths[NEXT]], method="linear")
    images = [_image(3, (20, 26)), _image(4, (20, 26))]
    std = dict(image_std=[0.26862954, 0.26130258, 0.27577711])
    size = dict(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, **std)
    hf = [CLIPImageProcessor(image_mean=[0.5, 0.4, 0.3], **size),
          LlavaImageProcessor(do_pad=True, size={"shortest_edge": 12}, crop_size={"height": 12, "width": 12},
                              image_mean=[0.5, 0.4, 0.4], **std),
          LlavaNextImageProcessor(image_mean=[0.5, 0.4, 0.6], image_grid_pinpoints=PINPOINTS, **size)]
    expected = [dict(p(images, return_tensors="pt")) for p in hf]
    for enc, want in zip(fused.encoders, expected):
        got = enc.preprocess(images)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    tokens, _ = fused.image_tokens(images)
    torch.testing.assert_close(tokens, fused.image_tokens(pixel_values=expected)[0], rtol=0, atol=0)
    assert not torch.allclose(expected[0]["pixel_values"], expected[2]["pixel_values"][:, 0])  # not one processor


def test_merged_language_model_is_task_arithmetic_of_the_members(family):
    base, paths = family
    weights = [0.3, 0.3, 0.2, 0.1, 0.1]  # the last two LLaVA-NeXT and LLaVA-OneVision
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
    assert [n for n, _ in result.visual_tokens] == [e.num_tokens() for e in fused.encoders]
    assert result.timings["prompt_tokens"] == 3 + sum(n for n, _ in result.visual_tokens)
    assert 1 <= len(result.token_ids) <= 5 and all(0 <= t < 99 for t in result.token_ids)


def test_pruning_shortens_the_sequence(family):
    base, paths = family
    full = VisionFuse.from_pretrained(paths[:NEXT], base_model=base)
    pruned = VisionFuse.from_pretrained(paths[:NEXT], base_model=base, keep=0.5)
    tokens, counts = full.image_tokens(_image(2))
    kept_tokens, kept_counts = pruned.image_tokens(_image(2))
    total = sum(n for n, _ in counts)
    assert [n for n, _ in kept_counts] == [n for n, _ in counts]
    assert sum(k for _, k in kept_counts) == round(0.5 * total) == kept_tokens.shape[1]
    assert tokens.shape[1] == total
    short = pruned.generate(_image(2), [3, 0, 5], max_new_tokens=2)
    assert short.timings["prompt_tokens"] == 2 + kept_tokens.shape[1]


@pytest.mark.parametrize("keep, mode", [(None, "proportional"), (0.5, "proportional"), (0.3, "global")])
def test_llava_and_llava_next_members_generate(family, keep, mode):
    """M=2, a LLaVA-1.5 and a LLaVA-NeXT member: token counts, budget (image_newline tokens
    outside it, all kept) and greedy decoding end to end."""
    base, paths = family
    fused = VisionFuse.from_pretrained([paths[0], paths[NEXT]], base_model=base, method="ties", density=0.5,
                                       keep=keep, prune_mode=mode)
    size = (20, 26)
    rows = int((fused.encoders[1].packing(size).layout == -1).sum())
    assert rows == 6
    result = fused.generate(_image(5, size), [3, 0, 5, 6], max_new_tokens=5)
    assert [n for n, _ in result.visual_tokens] == [16, 70]
    kept = [k for _, k in result.visual_tokens]
    if keep is None:
        assert kept == [16, 70]
    else:
        assert sum(kept) - rows == int(keep * (16 + 70 - rows)) and kept[1] > rows
    assert result.timings["prompt_tokens"] == 3 + sum(kept)
    assert 1 <= len(result.token_ids) <= 5 and all(0 <= t < 99 for t in result.token_ids)


def test_three_model_classes_generate_with_pruning(family):
    """M=3: LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision members with a global budget."""
    base, paths = family
    fused = VisionFuse.from_pretrained([paths[0], paths[NEXT], paths[ONEVISION]], base_model=base, keep=0.5,
                                       prune_mode="global")
    result = fused.generate(_image(5, (20, 26)), [3, 0, 5, 6], max_new_tokens=3)
    rows = [0, 6, 7]
    assert [n for n, _ in result.visual_tokens] == [16, 70, 79]
    kept = [k for _, k in result.visual_tokens]
    assert sum(kept) - sum(rows) == int(0.5 * (16 + 70 + 79 - sum(rows)))
    assert result.timings["prompt_tokens"] == 3 + sum(kept) and 1 <= len(result.token_ids) <= 3


@pytest.mark.parametrize("mode", ["proportional", "global"])
def test_pruning_576_and_2340_tokens(tmp_path_factory, mode):
    """LLaVA-1.5 (576 tokens) and LLaVA-NeXT (2,340 for a 640x480 image: 576 + 36 rows of 48 + 36
    image_newline) at their real crop sizes (336 px / 14; narrow towers): a quarter of the 2,880
    scored tokens kept, split proportionally (144 + 576) or globally; all 36 rows keep their newline."""
    from transformers import LlavaNextConfig

    root = tmp_path_factory.mktemp("real-sizes")
    vision = dict(image_size=336, patch_size=14, hidden_size=8, intermediate_size=8, num_attention_heads=1)
    paths = [save_member(llava(30, vision=vision), str(root / "llava")),
             save_member(llava(31, vision=vision, grid_pinpoints=LlavaNextConfig().image_grid_pinpoints),
                         str(root / "next"))]
    fused = VisionFuse.from_pretrained(paths, method="linear", keep=0.25, prune_mode=mode)
    tokens, counts = fused.image_tokens(_image(10, (480, 640)))
    assert [n for n, _ in counts] == [576, 2340]
    kept = [k for _, k in counts]
    assert sum(kept) - 36 == 720 == tokens.shape[1] - 36
    if mode == "proportional":
        assert kept == [144, 576 + 36]
    assert (tokens[0] == fused.encoders[1].image_newline).all(-1).sum() == 36


@pytest.mark.parametrize("member, rows", [(NEXT, 6), (ONEVISION, 7)])  # OneVision: 10x12 resized to 7x8
def test_pruned_anyres_tokens_keep_the_grid_layout(family, member, rows):
    """Pruned anyres tokens are the unpruned ones with some removed: in their order, each in
    its row of the (unpadded, resized) grid, every row's image_newline kept; the budget counts
    the others."""
    full = VisionFuse.from_pretrained([family[1][member]], weights=[1.0], method="linear")
    pruned = VisionFuse(full.host, list(full.encoders), keep=0.4)
    image = _image(6, (20, 26))
    tokens, kept = full.image_tokens(image)[0][0], pruned.image_tokens(image)[0][0]
    newline = full.encoders[0].image_newline
    newline_full, newline_kept = (tokens == newline).all(-1), (kept == newline).all(-1)
    assert int(newline_full.sum()) == int(newline_kept.sum()) == rows
    visual_full, visual_kept = tokens[~newline_full], kept[~newline_kept]
    assert len(visual_kept) == int(0.4 * len(visual_full))
    match = (visual_kept[:, None] - visual_full[None]).abs().amax(-1).argmin(dim=1)
    torch.testing.assert_close(visual_kept, visual_full[match], rtol=1e-5, atol=1e-6)
    assert bool((match.diff() > 0).all())
    row_full, row_kept = newline_full.cumsum(0)[~newline_full], newline_kept.cumsum(0)[~newline_kept]
    assert torch.equal(row_kept, row_full[match])
    assert 0 < int((row_kept == 0).sum()) < 16  # some of the whole-image crop's tokens pruned, some kept


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


def test_bad_members_are_named(family, tmp_path):
    """A member without an image processor, with a processor for another grid, of an unsupported
    class, or whose LLM or tokenizer differs: an error naming it."""
    import shutil

    from checkpoints import TEXT, qwen2
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextImageProcessor, VipLlavaConfig,
                              VipLlavaForConditionalGeneration)

    from vfuse_kernels.pipeline.demo import _tokenizer

    base, paths = family
    bare = str(tmp_path / "bare")
    llava(7, grid_pinpoints=PINPOINTS).save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match=f"member {re.escape(bare)} has no image processor"):
        VisionFuse.from_pretrained([paths[0], bare], method="linear")
    LlavaNextImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8},
                            image_grid_pinpoints=[[8, 16], [16, 8]]).save_pretrained(bare)
    with pytest.raises(ValueError, match=f"member {re.escape(bare)}: its image processor's image_grid_pinpoints"):
        VisionFuse.from_pretrained([paths[0], bare], method="linear")
    wide = save_member(llava(8, grid_pinpoints=PINPOINTS, text=dict(hidden_size=48, num_attention_heads=4)),
                       str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=rf"text hidden_size differs: 32 \(.*m0\), 48 \({re.escape(wide)}\)"):
        VisionFuse.from_pretrained([paths[0], wide], method="linear")
    other_base = str(tmp_path / "qwen")
    qwen2(0).save_pretrained(other_base)
    with pytest.raises(ValueError, match=rf"text model_type differs: llama .*, qwen2 \({re.escape(other_base)}\)"):
        VisionFuse.from_pretrained([paths[0], paths[NEXT]], base_model=other_base)
    vip = str(tmp_path / "vip")
    VipLlavaForConditionalGeneration(VipLlavaConfig(vision_config=CLIPVisionConfig(image_size=8, patch_size=2),
                                                    text_config=LlamaConfig(**TEXT))).save_pretrained(vip)
    with pytest.raises(ValueError, match=f"{re.escape(vip)}: model_type 'vipllava' is not a supported member"):
        VisionFuse.from_pretrained([paths[0], vip], method="linear")
    fused = VisionFuse.from_pretrained([paths[0], paths[NEXT]], method="linear")
    with pytest.raises(ValueError, match="pixel_values has 1 entries for 2 encoders"):
        fused.image_tokens(pixel_values=[fused.encoders[0].preprocess(_image())])
    first, second = shutil.copytree(paths[0], tmp_path / "a"), shutil.copytree(paths[NEXT], tmp_path / "b")
    _tokenizer().save_pretrained(first)
    tokenizer = _tokenizer()
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(second)
    with pytest.raises(ValueError, match=f"the tokenizer of {re.escape(str(second))} differs from that of "
                                         f"{re.escape(str(first))}"):
        VisionFuse.from_pretrained([str(first), str(second)], method="linear")


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
    parity = [line for line in out.splitlines() if "M=1 parity with" in line]
    assert [line.split("M=1 parity with ")[1].split(":")[0] for line in parity] == \
        ["LlavaForConditionalGeneration"] * 3 + ["LlavaNextForConditionalGeneration",
                                                  "LlavaOnevisionForConditionalGeneration"]
    assert all(line.endswith("(PASS)") for line in parity)
    assert "visual tokens: 772 -> 398 kept" in out and "generated:" in out  # 25 image_newline tokens among them
    assert os.path.exists(tmp_path / "demo" / "family.json")
