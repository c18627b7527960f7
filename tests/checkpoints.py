"""Tiny real checkpoints for the merge tests: random models from transformers configs, saved
with ``save_pretrained`` (sharded), and fine-tunes made by small seeded perturbations."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=99, tie_word_embeddings=False)


def llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TEXT))


def qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TEXT))


def qwen2_vl(seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2, spatial_merge_size=1,
                  temporal_patch_size=1, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=1, video_token_id=2,
                           vision_start_token_id=3, tie_word_embeddings=False)
    return Qwen2VLForConditionalGeneration(config)


def perturbed(model, seed: int, scale: float = 0.02):
    """A 'fine-tune': every floating tensor plus seeded Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def save(model, path: str, dtype=torch.float32, shard_size: str = "40KB") -> str:
    model.to(dtype).save_pretrained(path, max_shard_size=shard_size)
    return path


def save_state_dict(model, path: str, dtype=torch.float32) -> str:
    """Single-file checkpoint with the in-memory tensor names (e.g. VLMs' model.language_model.*)."""
    os.makedirs(path, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(os.path.join(path, "config.json"))
    return path


def family(root: str, make, n: int = 2, dtype=torch.float32) -> tuple[str, list[str]]:
    """A base checkpoint and n perturbed fine-tunes of it under root."""
    base = save(make(0), os.path.join(root, "base"), dtype)
    tuned = []
    for i in range(n):
        model = make(0)
        tuned.append(save(perturbed(model, 100 + i), os.path.join(root, f"ft{i}"), dtype))
    return base, tuned


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def write_yaml(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def index_of(path: str) -> dict:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)


def llava(seed: int, *, vision=None, text=None, feature_layer=-2, strategy="default", act="gelu", base_lm=None,
          image_token_id=0, grid_pinpoints=None, max_crops=None, siglip=False):
    """A tiny LLaVA model (LLaVA-NeXT with ``grid_pinpoints``, LLaVA-OneVision "anyres_max_N" with
    ``max_crops`` N too) with a CLIP (or SigLIP) tower; its language model copied (and perturbed)
    from ``base_lm`` if given."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, SiglipVisionConfig)

    torch.manual_seed(seed)
    vision = dict(dict(image_size=8, patch_size=2, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4), **(vision or {}))
    kwargs = dict(vision_config=(SiglipVisionConfig if siglip else CLIPVisionConfig)(**vision),
                  text_config=LlamaConfig(**dict(TEXT, **(text or {}))), image_token_id=image_token_id,
                  vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy, projector_hidden_act=act)
    if grid_pinpoints is None:
        model = LlavaForConditionalGeneration(LlavaConfig(**kwargs))
    elif max_crops is None:
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=grid_pinpoints, **kwargs))
    else:
        config = LlavaOnevisionConfig(image_grid_pinpoints=grid_pinpoints,
                                      vision_aspect_ratio=f"anyres_max_{max_crops}", **kwargs)
        model = LlavaOnevisionForConditionalGeneration(config)
    if base_lm is not None:
        gen = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for p, q in zip(model.model.language_model.parameters(), base_lm.model.parameters()):
                p.copy_(q + 0.05 * torch.randn(q.shape, generator=gen))
            model.lm_head.weight.copy_(base_lm.lm_head.weight + 0.05 * torch.randn(base_lm.lm_head.weight.shape,
                                                                                   generator=gen))
    return model


def as_bin(path: str, out: str, single: bool = False) -> str:
    """The safetensors checkpoint at ``path`` re-saved as PyTorch ``.bin`` the way older HF
    checkpoints ship: ``pytorch_model-0000i-of-0000n.bin`` shards and
    ``pytorch_model.bin.index.json`` (or one ``pytorch_model.bin``), each file's tensors in
    reverse name order (pickle order differs from safetensors' sorted layout)."""
    from safetensors.torch import load_file

    os.makedirs(out, exist_ok=True)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    groups = [load_file(os.path.join(path, f)) for f in shards]
    if single:
        groups = [{k: v for group in groups for k, v in group.items()}]
    names = ["pytorch_model.bin"] if single else [f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
                                                  for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups):
        torch.save({k: group[k] for k in sorted(group, reverse=True)}, os.path.join(out, name))
        weight_map.update({k: name for k in group})
    if not single:
        with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    for name in os.listdir(path):
        if name.endswith(".json") and "index" not in name:
            with open(os.path.join(path, name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
                dst.write(src.read())
    return out


def save_member(model, path: str, **processor) -> str:
    """``model`` and its image processor (``member_processor``) saved into ``path``."""
    from vfuse_kernels.pipeline.demo import member_processor

    model.save_pretrained(path)
    member_processor(model.config, **processor).save_pretrained(path)
    return path


def folder_bytes(folder: str) -> dict[str, bytes]:
    """Every file of ``folder`` by name: its bytes."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out
