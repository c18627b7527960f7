"""``vfuse demo``: a small LLaVA-family model family built offline, fused with VisionFuse.

Builds (once, into a cache folder) a shared random base LLM, a word-level tokenizer, three
LLaVA-1.5-style members, a LLaVA-NeXT and a LLaVA-OneVision member (anyres), whose language
models are the base plus small deterministic perturbations and whose vision towers, feature
layers, projectors and image processors differ; saves them as real checkpoints with their image processors; then
merges the members' language models, runs every member's processor and tower on a generated
image, prunes and concatenates the visual tokens, generates text, and checks for every member
that VisionFuse with that member alone equals its stock transformers class.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch

from .visionfuse import VisionFuse

SPEC_VERSION = 4
WORDS = ("a the of and in on with is are to this that image picture photo shows there red green blue yellow "
         "black white small large round square circle line sky sun tree house car dog cat person water light "
         "dark left right top bottom center near far bright soft sharp color shape pattern corner edge gradient "
         "scene view object two three many one describe what see answer question looks like very some").split()
TEXT = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            max_position_embeddings=1024, tie_word_embeddings=False)
MEMBERS = (
    dict(name="member-a", seed=1, vision=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256,
                                              num_hidden_layers=4, num_attention_heads=4),
         feature_layer=-2, strategy="default", act="gelu", mean=(0.48145466, 0.4578275, 0.40821073)),
    dict(name="member-b", seed=2, vision=dict(image_size=56, patch_size=7, hidden_size=96, intermediate_size=192,
                                              num_hidden_layers=4, num_attention_heads=4),
         feature_layer=[-3, -1], strategy="default", act="gelu", mean=(0.5, 0.5, 0.5), pad=True),
    dict(name="member-c", seed=3, vision=dict(image_size=48, patch_size=6, hidden_size=112, intermediate_size=224,
                                              num_hidden_layers=3, num_attention_heads=4),
         feature_layer=-1, strategy="full", act="gelu_pytorch_tanh", mean=(0.5, 0.5, 0.5)),
    dict(name="member-next", seed=4, vision=dict(image_size=32, patch_size=4, hidden_size=96, intermediate_size=192,
                                                 num_hidden_layers=3, num_attention_heads=4),
         feature_layer=-2, strategy="default", act="gelu", mean=(0.48145466, 0.4578275, 0.40821073),
         grid_pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]),
    dict(name="member-onevision", seed=5,  # a SigLIP tower (no [CLS]) as in LLaVA-OneVision
         vision=dict(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4),
         feature_layer=-1, strategy="full", act="gelu", mean=(0.5, 0.5, 0.5),
         grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 96]], max_crops=4, siglip=True),
)
STD = (0.26, 0.26, 0.27)


def default_cache_dir() -> str:
    return os.environ.get("VFUSE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vfuse", "demo"))


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


def member_processor(config, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                     pad: bool = False):
    """An image processor for a LLaVA (``CLIPImageProcessor``; with ``pad``, LLaVA-1.5's pad to
    square: ``LlavaImageProcessor``), LLaVA-NeXT (``LlavaNextImageProcessor``) or LLaVA-OneVision
    (``LlavaOnevisionImageProcessor``) config at its vision tower's image size (anyres: with the
    model's ``image_grid_pinpoints``)."""
    import transformers

    size = config.vision_config.image_size
    kwargs = dict(image_mean=list(mean), image_std=list(std))
    if config.model_type == "llava_onevision":
        return transformers.LlavaOnevisionImageProcessor(size={"height": size, "width": size},
                                                         image_grid_pinpoints=config.image_grid_pinpoints, **kwargs)
    kwargs.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if config.model_type == "llava_next":
        return transformers.LlavaNextImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints, **kwargs)
    if pad:
        return transformers.LlavaImageProcessor(do_pad=True, **kwargs)
    return transformers.CLIPImageProcessor(**kwargs)


def build_family(root: str, log=print) -> tuple[str, list[str]]:
    """Writes base/ (LlamaForCausalLM) and the members (LLaVA / LLaVA-NeXT / LLaVA-OneVision, each
    with its tokenizer and image processor) under root."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, SiglipVisionConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration)

    marker = os.path.join(root, "family.json")
    members = [os.path.join(root, m["name"]) for m in MEMBERS]
    base_dir = os.path.join(root, "base")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("version") == SPEC_VERSION:
                return base_dir, members
    start = time.perf_counter()
    tokenizer = _tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT)
    torch.manual_seed(0)
    base = LlamaForCausalLM(text)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    for spec, path in zip(MEMBERS, members):
        torch.manual_seed(spec["seed"])
        vision = (SiglipVisionConfig if spec.get("siglip") else CLIPVisionConfig)(**spec["vision"])
        kwargs = dict(vision_config=vision, text_config=text, image_token_id=image_token,
                      vision_feature_layer=spec["feature_layer"], vision_feature_select_strategy=spec["strategy"],
                      projector_hidden_act=spec["act"])
        if "max_crops" in spec:
            member = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
                image_grid_pinpoints=spec["grid_pinpoints"], vision_aspect_ratio=f"anyres_max_{spec['max_crops']}",
                **kwargs))
        elif "grid_pinpoints" in spec:
            member = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=spec["grid_pinpoints"],
                                                                       **kwargs))
        else:
            member = LlavaForConditionalGeneration(LlavaConfig(**kwargs))
        gen = torch.Generator().manual_seed(100 + spec["seed"])
        with torch.no_grad():  # the language model: base + a small "fine-tuning" perturbation
            for (name, p), (_, q) in zip(member.model.language_model.named_parameters(),
                                         base.model.named_parameters()):
                p.copy_(q + 0.02 * q.std() * torch.randn(q.shape, generator=gen))
            member.lm_head.weight.copy_(base.lm_head.weight + 0.002 * torch.randn(base.lm_head.weight.shape,
                                                                                   generator=gen))
        member.save_pretrained(path)
        tokenizer.save_pretrained(path)
        member_processor(member.config, spec["mean"], STD, pad=spec.get("pad", False)).save_pretrained(path)
    with open(marker, "w") as f:
        json.dump({"version": SPEC_VERSION}, f)
    log(f"built the demo family in {time.perf_counter() - start:.1f} s -> {root}")
    return base_dir, members


def demo_image(height: int = 96, width: int = 128):
    """A PIL picture: a sky-to-ground gradient, a sun and a square."""
    from PIL import Image

    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    image = torch.stack([0.3 + 0.5 * y, 0.5 + 0.3 * (1 - y), 0.9 - 0.6 * y])
    sun = ((x - 0.75) ** 2 + (y - 0.25) ** 2) < 0.01
    image[:, sun] = torch.tensor([1.0, 0.85, 0.2])[:, None]
    square = (x > 0.15) & (x < 0.4) & (y > 0.55) & (y < 0.85)
    image[:, square] = torch.tensor([0.8, 0.1, 0.1])[:, None]
    return Image.fromarray((image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def parity_check(member: str, device, image, prompt="<image> what is in the picture") -> tuple[str, float]:
    """(the member's transformers class, max |Δlogits| between VisionFuse([member], weight 1) and
    that class) on the member's processor output for the PIL ``image`` and ``prompt`` (text or ids)."""
    from .visionfuse import model_class

    fused = VisionFuse.from_pretrained([member], weights=[1.0], method="linear", device=device)
    stock_class = model_class(member)
    stock = stock_class.from_pretrained(member).to(device).eval()
    encoder = fused.encoders[0]
    inputs = {k: v.to(device) for k, v in encoder.preprocess(image).items()}
    ids = fused.expand_prompt(prompt, encoder.num_tokens((image.height, image.width)))
    with torch.no_grad():
        expected = stock(input_ids=ids, **inputs).logits
        got = fused(ids, pixel_values=[inputs])
    return stock_class.__name__, (got - expected).abs().max().item()


def run_demo(device: str = "cpu", cache_dir: str | None = None, keep: float | None = 0.5,
             max_new_tokens: int = 12, log=print) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    root = cache_dir or default_cache_dir()
    base, members = build_family(root, log=log)
    image = demo_image()
    fused = VisionFuse.from_pretrained(members, base_model=base, method="task_arithmetic",
                                       weights=[1.0 / len(members)] * len(members), keep=keep, device=device)
    result = fused.generate(image, "<image> describe the picture", max_new_tokens=max_new_tokens)
    parity = [parity_check(member, device, image) for member in members]
    stats = fused.merge_stats
    new_tokens = len(result.token_ids)
    log(f"VisionFuse demo on {device} ({root})")
    log(f"  models: {len(members)} LLaVA-style members sharing base {os.path.basename(base)}; language model "
        f"{sum(p.numel() for p in fused.language_model.parameters()) / 1e6:.1f}M parameters")
    for enc, (n, k) in zip(fused.encoders, result.visual_tokens):
        cfg = enc.tower.config
        anyres = f"anyres {enc.grid_pinpoints}, " if enc.anyres else ""
        log(f"  {os.path.basename(enc.name)}: {type(enc.tower).__name__} {cfg.image_size}px/{cfg.patch_size} "
            f"x{cfg.num_hidden_layers} "
            f"layers, {anyres}feature layer {enc.fusion.layers}, '{enc.fusion.select_strategy}', visual tokens {n}, "
            f"kept {k}")
    total = sum(n for n, _ in result.visual_tokens)
    kept = sum(k for _, k in result.visual_tokens)
    log(f"  visual tokens: {total} -> {kept} kept ({'keep ' + str(keep) if keep is not None else 'no pruning'})")
    log(f"  merge (task arithmetic, in place): {stats.tensors} tensors, {stats.bytes_read / 1e6:.1f} MB read in "
        f"{stats.seconds:.2f} s ({stats.gbps:.2f} GB/s)")
    log(f"  prefill {result.timings['prompt_tokens']} tokens: {result.prefill_seconds * 1e3:.1f} ms; "
        f"decode {new_tokens} tokens: {result.decode_seconds * 1e3:.1f} ms "
        f"({new_tokens / max(result.decode_seconds, 1e-9):.0f} tokens/s)")
    log(f"  generated: {result.text!r}")
    for member, (class_name, error) in zip(members, parity):
        log(f"  {os.path.basename(member)}: M=1 parity with {class_name}: max |dlogits| = {error:.2e} "
            f"({'PASS' if _passes(error) else 'FAIL'})")
    log(f"  total {time.perf_counter() - start:.1f} s")
    errors = [error for _, error in parity]
    return {"text": result.text, "visual_tokens": result.visual_tokens, "parity_errors": errors,
            "parity": all(map(_passes, errors)), "merge_seconds": stats.seconds}


def _passes(error: float) -> bool:
    return math.isfinite(error) and error <= 1e-4
