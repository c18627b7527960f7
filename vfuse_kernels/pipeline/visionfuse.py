"""Reference VisionFuse pipeline on HF transformers LLaVA-family models (arXiv 2412.01289).

M MLLMs that share a base LLM → one model: their language models merged into one (in
place, streaming the other checkpoints tensor by tensor: one LLM resident at a time),
every member's vision tower and projector kept. Members are LLaVA(-1.5) or LLaVA-NeXT
models, in any mix. An image goes through each member's own image processor (its
``AutoImageProcessor``) and tower with its feature layer(s); ``project_concat`` projects every
encoder's (optionally pruned) tokens straight into one ``[B, ΣTⱼ, H]`` sequence (a LLaVA-NeXT
member's packed as transformers does: ``anyres``), which replaces the prompt's ``<image>``
placeholder.

Documented choices:
- encoder order is ``model_paths`` order; the tokens of encoder j follow those of j − 1
  with no separator tokens, and positions are sequential (as LLaVA numbers image tokens);
- the prompt holds one ``<image>`` token (prepended when missing), expanded to ΣTⱼ
  placeholders;
- pruning (``keep``: tokens per image or a ratio of the scored tokens) scores each token by
  its crop's [CLS] attention in the tower layer that produces its last selected feature
  (VisionZip; without a [CLS] token, e.g. SigLIP: the mean attention it receives there) and
  splits the budget with ``TokenPruner`` (``prune_mode``); an anyres member's kept tokens keep
  their packed order and every grid row its ``image_newline`` token, which is not scored and
  not counted in the budget; a OneVision map that ``anyres_max_N`` resizes is projected whole
  first, its scores resized alike.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..merging.checkpoint import Checkpoint
from ..merging.inplace import merge_into_
from ..merging.plan import rewrite_prefix
from ..nn import MultiLayerFeatureFusion, TokenPruner, attention_qk
from ..ops import METHODS as FUSED_METHODS
from ..ops import project_concat
from ..ops.query_key_scores import cls_attention, query_key_scores
from ..patch import _encoder_layers, run_vision_tower
from .anyres import (NEWLINE, downscale, downscaled_size, grid_shape, insert_newlines, unpadded_grid,
                     with_newlines)

# where a LLaVA checkpoint keeps its language model (save_pretrained's layout differs across
# transformers versions: 5.17+, 4.x-5.16, 5.5), or a plain LLM
LM_PREFIXES = ("model.language_model.", "language_model.model.", "model.language_model.model.", "model.")
HEAD_PREFIXES = ("lm_head.", "language_model.lm_head.")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
FAMILY_KEYS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size")


class Packing(NamedTuple):
    """How an anyres member packs one image's tokens: ``layout`` [T] indexes the image's crop
    tokens (``NEWLINE`` for ``image_newline``) or, for a LLaVA-OneVision map resized to ``size``,
    the tokens ``downscale(…, grid, size)`` makes of them."""

    layout: torch.Tensor
    grid: torch.Tensor | None = None
    size: tuple[int, int] | None = None


class Encoder(nn.Module):
    """One member's visual path: its image processor, tower, feature-layer selection,
    projector and, for a LLaVA-NeXT / LLaVA-OneVision member, anyres packing (``grid_pinpoints``,
    ``image_newline``, OneVision's ``max_crops``)."""

    def __init__(self, name: str, tower: nn.Module, projector: nn.Module, fusion: MultiLayerFeatureFusion,
                 processor, *, grid_pinpoints=None, image_newline: torch.Tensor | None = None,
                 max_crops: int | None = None):
        super().__init__()
        self.name, self.tower, self.projector, self.fusion = name, tower, projector, fusion
        self.processor, self.grid_pinpoints, self.max_crops = processor, grid_pinpoints, max_crops
        self.register_buffer("image_newline", None if image_newline is None else image_newline.detach())

    @property
    def anyres(self) -> bool:
        return self.grid_pinpoints is not None

    @property
    def has_cls(self) -> bool:
        """Whether the tower prepends a [CLS] token (CLIP) or not (SigLIP)."""
        embeddings = getattr(getattr(self.tower, "vision_model", self.tower), "embeddings", None)
        return getattr(embeddings, "class_embedding", None) is not None

    @property
    def tokens_per_crop(self) -> int:
        """Visual tokens one crop yields (the "default" strategy drops the tower's first token)."""
        cfg = self.tower.config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        return patches + int(self.has_cls) - int(self.fusion.select_strategy == "default")

    def scores(self, hidden_states) -> torch.Tensor:
        """[B·P, Nⱼ] pruning scores of each crop's tokens, from the tower layer that produces the
        last selected feature: its [CLS] query's attention (VisionZip), or for a tower without
        [CLS] the mean attention each token receives."""
        layer = self.fusion.attention_layer(len(hidden_states))
        q, k, scale = attention_qk(_encoder_layers(self.tower)[layer], hidden_states[layer])
        s = cls_attention(q, k, scale=scale) if self.has_cls else query_key_scores(q, k, scale=scale)
        return s[:, 1:] if self.fusion.select_strategy == "default" else s

    def preprocess(self, images) -> dict[str, torch.Tensor]:
        """This member's processor outputs for ``images``: ``pixel_values`` (and ``image_sizes``)."""
        return dict(self.processor(images, return_tensors="pt"))

    def packing(self, image_size: tuple[int, int]) -> Packing:
        """An anyres member's ``Packing`` of an image of ``image_size`` (h, w)."""
        cfg = self.tower.config
        side = cfg.image_size // cfg.patch_size
        if self.tokens_per_crop != side * side:
            raise ValueError(f"{self.name}: anyres packing needs {side}x{side} tokens per crop, the "
                             f"{self.fusion.select_strategy!r} strategy gives {self.tokens_per_crop}")
        first = torch.arange(side * side)
        grid = unpadded_grid(image_size, self.grid_pinpoints, cfg.image_size, side)
        size = None if self.max_crops is None else downscaled_size(tuple(grid.shape), side, self.max_crops)
        if size is None:
            return Packing(with_newlines(first, grid))
        return Packing(with_newlines(first, len(first) + torch.arange(size[0] * size[1]).view(size)), grid, size)

    def downscale(self, values: torch.Tensor, packing: Packing) -> torch.Tensor:
        """[B, N + h'·w', C]: per-image crop-token ``values`` [B, P·N, C] as a OneVision ``packing`` resizes them."""
        return downscale(values, self.tokens_per_crop, packing.grid.to(values.device), packing.size)

    def num_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Visual tokens per image before pruning (anyres: for an image of ``image_size``, (h, w))."""
        return len(self.packing(image_size).layout) if self.anyres else self.tokens_per_crop

    def crops(self, inputs) -> tuple[torch.Tensor, Packing | None]:
        """(crops [B, P, 3, h, w], packing) for processor outputs ``inputs`` of B images of one
        size; a LLaVA member: ([B, 1, 3, h, w], None)."""
        if isinstance(inputs, torch.Tensor):
            inputs = {"pixel_values": inputs}
        pixels = inputs["pixel_values"]
        if not self.anyres:
            return pixels[:, None], None
        if "image_sizes" not in inputs:
            raise ValueError(f"{self.name} is an anyres (LLaVA-NeXT/OneVision) member: its inputs need image_sizes")
        if any(n != 1 for n in inputs.get("batch_num_images", [1])):
            raise ValueError(f"{self.name}: VisionFuse takes one image per prompt (batch_num_images "
                             f"{list(inputs['batch_num_images'])})")
        sizes = {tuple(s.tolist()) for s in inputs["image_sizes"]}
        if len(sizes) > 1:
            raise ValueError(f"{self.name}: the images have different sizes {sorted(sizes)}; pass them one at a time")
        size = self.tower.config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"{self.name}: its processor gives {tuple(pixels.shape[-2:])} crops, its vision "
                             f"tower takes {size}x{size}")
        image_size = sizes.pop()
        rows, cols = grid_shape(image_size, self.grid_pinpoints, size)
        if pixels.shape[1] < 1 + rows * cols:
            raise ValueError(f"{self.name}: {pixels.shape[1]} crops per image, its anyres grid needs "
                             f"{1 + rows * cols} (do the processor's image_grid_pinpoints match the model's?)")
        return pixels[:, :1 + rows * cols], self.packing(image_size)


@dataclass
class MergeStats:
    seconds: float = 0.0
    bytes_read: int = 0
    tensors: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    visual_tokens: list[tuple[int, int]]  # per encoder: (tokens, kept), image_newline tokens included
    prefill_seconds: float
    decode_seconds: float
    timings: dict = field(default_factory=dict)


MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def _config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def model_class(path: str):
    """The transformers class of the member at ``path`` (LLaVA, LLaVA-NeXT or LLaVA-OneVision)."""
    import transformers

    model_type = _config(path).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a supported member "
                         f"({', '.join(MODEL_CLASSES)})")
    return getattr(transformers, MODEL_CLASSES[model_type])


def image_processor(path: str):
    """The member's own image processor (``AutoImageProcessor``); raises naming the member when it has none."""
    from transformers import AutoImageProcessor

    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "preprocessor_config.json")):
        raise FileNotFoundError(f"member {path} has no image processor (preprocessor_config.json): save its "
                                "processor into its folder")
    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"member {path}: cannot load its image processor: {exc}") from exc


def check_family(paths: Sequence[str]) -> None:
    """All members must share the language model (architecture and shape) and the tokenizer's
    vocabulary; raises naming what differs."""
    configs = [_config(p).get_text_config() for p in paths]
    for key in FAMILY_KEYS:
        values = [getattr(c, key, None) for c in configs]
        if len(set(values)) > 1:
            shown = ", ".join(f"{v} ({p})" for v, p in zip(values, paths))
            raise ValueError(f"the models are not one family: text {key} differs: {shown}")
    vocabularies = [(p, t.get_vocab()) for p in paths if (t := _tokenizer(p)) is not None]
    for path, vocab in vocabularies[1:]:
        if vocab != vocabularies[0][1]:
            raise ValueError(f"the models are not one family: the tokenizer of {path} differs from that of "
                             f"{vocabularies[0][0]}")


def _prefix(checkpoint: Checkpoint, candidates: Sequence[str], probe: str) -> str | None:
    return next((p for p in candidates if p + probe in checkpoint.tensors), None)


def language_prefix_map(checkpoint: Checkpoint) -> dict[str, str]:
    """Maps the merged module's names ('lm.', 'head.') to the checkpoint's tensor names."""
    lm = _prefix(checkpoint, LM_PREFIXES, "embed_tokens.weight")
    if lm is None:
        raise ValueError(f"{checkpoint.path}: no language model found (no *embed_tokens.weight under "
                         f"{', '.join(LM_PREFIXES)})")
    head = _prefix(checkpoint, HEAD_PREFIXES, "weight") or "lm_head."
    return {"lm.": lm, "head.": head}


class VisionFuse(nn.Module):
    """The fused model: one language model, M visual encoders."""

    def __init__(self, host: nn.Module, encoders: Sequence[Encoder], tokenizer=None, *,
                 keep: int | float | None = None, prune_mode: str = "proportional"):
        super().__init__()
        self.host = host
        self.encoders = nn.ModuleList(encoders)
        self.tokenizer = tokenizer
        self.language_model = host.model.language_model
        self.lm_head = host.lm_head
        config = host.config
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = config.image_token_index
        self.pruner = TokenPruner(keep, source="scores", mode=prune_mode) if keep is not None else None
        self.merge_stats = MergeStats()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @classmethod
    def from_pretrained(cls, model_paths: Sequence[str], base_model: str | None = None,
                        weights: Sequence[float] | None = None, method: str = "task_arithmetic", *,
                        density: float | Sequence[float] = 1.0, keep: int | float | None = None,
                        prune_mode: str = "proportional", device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **merge_kwargs) -> "VisionFuse":
        """Loads M LLaVA-family checkpoints and merges their language models.

        ``weights`` default to 1/M each. With a ``base_model`` (an LLM or MLLM checkpoint
        of the shared base) the language model is ``base + combine(wᵢ·(θᵢ − base))``
        with ``method``; without one, ``method`` must be ``"linear"`` (the weighted
        average) or a per-tensor mergekit method (``merging.methods``), which then takes the
        first member's language model as its base and merges the others into it (slerp
        between two members: ``method="slerp", parameters={"t": 0.5}``; ``weights[1:]`` fill
        its per-model ``weight``). One model with weight 1 is used as is.
        """
        paths = list(model_paths)
        if not paths:
            raise ValueError("model_paths must name at least one LLaVA-family checkpoint")
        weights = [1.0 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
        if len(weights) != len(paths):
            raise ValueError(f"{len(paths)} models but {len(weights)} weights")
        check_family(paths + ([base_model] if base_model else []))
        classes = [model_class(p) for p in paths]
        processors = [image_processor(p) for p in paths]
        device = torch.device(device)
        host = classes[0].from_pretrained(paths[0], dtype=dtype).to(device).eval()
        encoders = [cls._encoder(paths[0], host, processors[0])]
        for path, member_class, processor in zip(paths[1:], classes[1:], processors[1:]):
            member = member_class.from_pretrained(path, dtype=dtype)
            encoders.append(cls._encoder(path, member, processor).to(device))
            del member
        tokenizer = _tokenizer(paths[0])
        model = cls(host, encoders, tokenizer, keep=keep, prune_mode=prune_mode)
        if not (len(paths) == 1 and weights == [1.0]):
            model.merge_stats = model._merge_language_models(paths, base_model, weights, method, density, merge_kwargs)
        return model

    @staticmethod
    def _encoder(path: str, member: nn.Module, processor) -> Encoder:
        """The visual path of a loaded LLaVA-family ``member`` with its image ``processor``."""
        inner, config = member.model, member.config
        anyres = getattr(inner, "image_newline", None) is not None
        pinpoints = getattr(processor, "image_grid_pinpoints", None)
        if anyres and [list(p) for p in pinpoints or []] != [list(p) for p in config.image_grid_pinpoints]:
            raise ValueError(f"member {path}: its image processor's image_grid_pinpoints {pinpoints} differ from "
                             f"the model's {config.image_grid_pinpoints}")
        return Encoder(path, inner.vision_tower.eval(), inner.multi_modal_projector.eval(),
                       MultiLayerFeatureFusion.from_config(config), processor,
                       grid_pinpoints=config.image_grid_pinpoints if anyres else None,
                       image_newline=inner.image_newline if anyres else None, max_crops=_max_crops(config))

    def _language_module(self) -> nn.Module:
        return nn.ModuleDict({"lm": self.language_model, "head": self.lm_head})

    def _merge_language_models(self, paths, base_model, weights, method, density, merge_kwargs) -> MergeStats:
        start = time.perf_counter()
        module = self._language_module()
        sources = [Checkpoint(p) for p in paths]
        prefix_map = language_prefix_map(sources[0])
        for ck in sources[1:]:
            if language_prefix_map(ck) != prefix_map:
                raise ValueError(f"{ck.path} names its language model differently from {sources[0].path}")
        per_tensor = method not in FUSED_METHODS
        if base_model is not None:
            base = Checkpoint(base_model)
            copied = _copy_into_(module, base, language_prefix_map(base))
            bytes_read = copied
        elif per_tensor:  # the host's language model (the first member's) is the base
            for ck in sources[:1]:
                ck.close()
            sources, weights = sources[1:], weights[1:]
            bytes_read = 0
        elif method != "linear":
            raise ValueError(f"method={method!r} needs a base_model (the shared base LLM); "
                             "without one use method='linear' or a per-tensor method (the first member as base)")
        else:
            bytes_read = 0
        counts = merge_into_(module, sources, weights, method=method, density=density, prefix_map=prefix_map,
                             **merge_kwargs)
        bytes_read += sum(info.nbytes for ck in sources for info in ck.tensors.values()
                          if any(info.name.startswith(p) for p in prefix_map.values()))
        for ck in sources:
            ck.close()
        return MergeStats(time.perf_counter() - start, bytes_read, counts["merged"])

    @torch.no_grad()
    def image_tokens(self, images=None, pixel_values: Sequence | None = None, stage=None):
        """[B, ΣTⱼ, H] visual tokens, and (Nⱼ, Kⱼ) per encoder: its tokens per image before and
        after pruning (``image_newline`` tokens included; pruning: see the module docstring).
        ``images``: B images (of one size when a member is anyres). ``pixel_values[j]``, encoder
        j's processor outputs (a mapping with ``pixel_values`` and, for an anyres member,
        ``image_sizes``; or a pixel tensor), replaces running its processor on ``images``.
        ``stage(name)``, when given, returns a context manager wrapped around each stage
        ("towers", "scoring", "pruning", "projection"; per encoder for the first two, and for
        the projection of a resized OneVision map): a profiling hook."""
        if pixel_values is not None and len(pixel_values) != len(self.encoders):
            raise ValueError(f"pixel_values has {len(pixel_values)} entries for {len(self.encoders)} encoders")
        stage = stage or (lambda name: contextlib.nullcontext())
        scored = self.pruner is not None
        features, projected, scores, layouts, counts, newlines = [], [], [], [], [], []
        for j, enc in enumerate(self.encoders):
            with stage("towers"):
                crops, packing = enc.crops(pixel_values[j] if pixel_values is not None else enc.preprocess(images))
                batch = crops.shape[0]
                indices = enc.fusion.hidden_state_indices(enc.tower.config.num_hidden_layers + 1 if scored else None)
                hidden = run_vision_tower(enc.tower, crops.flatten(0, 1).to(self.device, self.dtype),
                                          indices).hidden_states
                feature = _per_image(enc.fusion(hidden), batch)
            resize = packing is not None and packing.size is not None
            if resize:  # OneVision resizes the projected map: project all tokens now
                with stage("projection"):
                    feature = enc.downscale(project_concat([feature], [enc.projector]), packing)
            layout = None if packing is None else packing.layout  # on the host
            features.append(feature)
            projected.append(resize)
            layouts.append(layout)
            newlines.append(0 if layout is None else int((layout == NEWLINE).sum()))
            counts.append(_tokens(feature) if layout is None else len(layout))
            if scored:
                with stage("scoring"):
                    s = enc.scores(hidden).reshape(batch, -1)
                    if resize:
                        s = enc.downscale(s[..., None], packing)[..., 0]
                    scores.append(s if layout is None else s[:, _visual(layout).to(s.device)])
        with stage("pruning"):
            kept = self.pruner(scores).keep if scored else [None] * len(self.encoders)
        with stage("projection"):
            keep = [k if layout is None else _flat_indices(layout, k, batch, self.device)
                    for layout, k in zip(layouts, kept)]
            parts = self._project(features, keep, projected)
            tokens = torch.cat([part if layout is None else insert_newlines(part, layout, k, enc.image_newline)
                                for part, enc, layout, k in zip(parts, self.encoders, layouts, kept)], dim=1)
        kept_counts = [n if k is None else k.shape[1] + r for n, k, r in zip(counts, kept, newlines)]
        return tokens, list(zip(counts, kept_counts))

    def _project(self, features, keep, projected) -> list[torch.Tensor]:
        """Each encoder's kept tokens, projected: one ``project_concat`` for the encoders whose
        ``features`` are not ``projected`` yet, a gather for the others."""
        parts = [_gather(f, k) if done else None for f, k, done in zip(features, keep, projected)]
        todo = [j for j, done in enumerate(projected) if not done]
        if todo:
            tokens = project_concat([features[j] for j in todo], [self.encoders[j].projector for j in todo],
                                    keep=[keep[j] for j in todo])
            sizes = [_tokens(features[j]) if keep[j] is None else keep[j].shape[1] for j in todo]
            for j, part in zip(todo, tokens.split(sizes, dim=1)):
                parts[j] = part
        return parts

    def expand_prompt(self, prompt: str | Sequence[int], num_visual: int) -> torch.Tensor:
        """[1, L] input ids: the prompt with its one ``<image>`` token expanded to ``num_visual``."""
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer(prompt)["input_ids"]
        count = ids.count(self.image_token_id)
        if count == 0:
            ids = [self.image_token_id] + ids
        elif count > 1:
            raise ValueError(f"the prompt holds {count} <image> tokens; VisionFuse takes one image per prompt")
        at = ids.index(self.image_token_id)
        ids = ids[:at] + [self.image_token_id] * num_visual + ids[at + 1:]
        return torch.tensor([ids], device=self.device)

    def _embed(self, input_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        if int(mask.sum()) != tokens.shape[0] * tokens.shape[1]:
            raise ValueError(f"the prompt has {int(mask.sum())} image placeholders for "
                             f"{tokens.shape[0] * tokens.shape[1]} visual tokens")
        embeds[mask] = tokens.reshape(-1, tokens.shape[-1]).to(embeds.dtype)
        return embeds

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, images=None, pixel_values=None) -> torch.Tensor:
        """Logits [B, L, V] for ``input_ids`` that already hold ΣKⱼ image placeholders."""
        tokens, _ = self.image_tokens(images, pixel_values)
        hidden = self.language_model(inputs_embeds=self._embed(input_ids, tokens)).last_hidden_state
        return self.lm_head(hidden)

    @torch.no_grad()
    def generate(self, images, prompt: str | Sequence[int], max_new_tokens: int = 16) -> Generation:
        """Greedy decoding with a KV cache; returns the text, ids, token counts and timings."""
        start = time.perf_counter()
        tokens, counts = self.image_tokens(images)
        visual_seconds = time.perf_counter() - start
        input_ids = self.expand_prompt(prompt, tokens.shape[1])
        start = time.perf_counter()
        out = self.language_model(inputs_embeds=self._embed(input_ids, tokens), use_cache=True)
        next_id = self.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        prefill = time.perf_counter() - start
        generated = [int(next_id)]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        start = time.perf_counter()
        cache_arg = _cache_argument(self.language_model)
        past = getattr(out, cache_arg)
        while len(generated) < max_new_tokens and generated[-1] != eos:
            embeds = self.language_model.get_input_embeddings()(next_id[:, None])
            out = self.language_model(inputs_embeds=embeds, use_cache=True, **{cache_arg: past})
            past = getattr(out, cache_arg)
            next_id = self.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
            generated.append(int(next_id))
        decode = time.perf_counter() - start
        text = self.tokenizer.decode(generated, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Generation(text, generated, counts, prefill, decode,
                          {"visual_seconds": visual_seconds, "prompt_tokens": input_ids.shape[1]})


def _max_crops(config) -> int | None:
    """N of a LLaVA-OneVision config's ``vision_aspect_ratio`` "anyres_max_N"; None for other models."""
    ratio = getattr(config, "vision_aspect_ratio", None)
    return None if ratio is None else int(ratio.removeprefix("anyres_max_"))


def _per_image(features, batch: int):
    """Crop features [B·P, N, D] (or a list of layers) as [B, P·N, D]: each image's crop tokens in one row."""
    if isinstance(features, list):
        return [_per_image(f, batch) for f in features]
    return features.reshape(batch, -1, features.shape[-1])


def _tokens(features) -> int:
    """Tokens per image of one encoder's features (a tensor or a list of layers)."""
    return (features[0] if isinstance(features, list) else features).shape[1]


def _gather(tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[B, K, H]: ``tokens`` [B, N, H] at ``keep`` [B, K] (None: all)."""
    return tokens if keep is None else tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))


def _visual(layout: torch.Tensor) -> torch.Tensor:
    """The entries of ``layout`` that are visual tokens (crop-token indices), in packed order."""
    return layout[layout != NEWLINE]


def _flat_indices(layout: torch.Tensor, kept: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """[B, K]: crop-token indices of the kept visual tokens (``kept`` indexes ``_visual(layout)``; None: all)."""
    visual = _visual(layout).to(device)
    return visual.expand(batch, -1) if kept is None else visual[kept]


def _copy_into_(module: nn.Module, checkpoint: Checkpoint, prefix_map: dict[str, str]) -> int:
    """Overwrites ``module``'s tensors with the checkpoint's (renamed by prefix); returns bytes read."""
    read = 0
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            source = rewrite_prefix(name, prefix_map)
            if source not in checkpoint.tensors:
                continue
            value = checkpoint.read(source)
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"{checkpoint.path}: {source!r} has shape {tuple(value.shape)}, "
                                 f"the model's {name!r} has {tuple(tensor.shape)}")
            tensor.copy_(value)
            read += value.numel() * value.element_size()
    return read


def _cache_argument(model: nn.Module) -> str:
    """The KV-cache keyword of this transformers version ('cache' since 5.x, else 'past_key_values')."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _tokenizer(path: str):
    """The checkpoint's tokenizer; None for a local folder that has no tokenizer files."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
