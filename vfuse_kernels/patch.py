"""``patch_llava``: the fused image-feature path for a loaded HF LLaVA model, in one call.

Liger-style drop-in: ``patch_llava(model)`` replaces the model's ``get_image_features`` (on
the instance; the class and other models are untouched) with one that

1. runs the vision tower asking only for the hidden states it needs (transformers ≥ 5.23; every
   hidden state before, as HF does there);
2. selects ``vision_feature_layer`` (int, or a list whose channel concat is *not* built) and
   drops [CLS] under the ``"default"`` strategy (``MultiLayerFeatureFusion``);
3. optionally prunes each image to ``keep`` tokens (``TokenPruner`` + ``select_tokens``);
4. projects the kept tokens with the model's own ``multi_modal_projector`` through
   ``project_concat`` (fused Triton GEMMs with bias + GELU on CUDA).

Everything else — ``forward``, ``generate``, the placeholder merge — is HF's. With ``keep=None``
the outputs equal the unpatched model's (same weights, same GEMM semantics; on CUDA within
bf16/fp16 rounding of the fused epilogue). With ``keep`` set every image yields K tokens instead
of N (K = keep, or max(1, int(keep·N)) for a float ratio; ``pruned_image_tokens``): the prompt
must hold K image placeholder tokens per image (e.g. set the processor's ``num_image_tokens`` /
expand ``<image>`` K times); kept tokens keep their original order and the language model
numbers positions sequentially, as VisionZip does.

Scores for pruning (``scores=``): ``"cls"`` (VisionZip: the [CLS] query's attention in the
layer that produces the last selected feature layer, from its q/k — no attention weights
needed, works with SDPA/FlashAttention), ``"mean"`` (the mean attention each token receives in
that layer, ``query_key_scores``), or a callable ``scores(hidden_states, features) -> [B, N]``
(given every hidden state of the tower).

Inference only: the fused projection does not carry gradients (with grad enabled and
trainable projector weights ``project_concat`` falls back to its differentiable PyTorch path).
"""
from __future__ import annotations

import functools
import types

import torch

from .nn.feature_fusion import MultiLayerFeatureFusion
from .nn.pruner import attention_qk
from .ops.project_concat import project_concat, projector_parts
from .ops.query_key_scores import cls_attention, query_key_scores
from .ops.select_tokens import select_tokens, token_budget

SCORE_SOURCES = ("cls", "mean")


def _llava_model(model):
    """The ``LlavaModel`` inside ``model`` (itself, or ``model.model``)."""
    try:
        from transformers.models.llava.modeling_llava import LlavaModel
    except ImportError as exc:  # pragma: no cover - transformers is a test dependency
        raise ImportError("patch_llava needs transformers") from exc
    inner = model if isinstance(model, LlavaModel) else getattr(model, "model", None)
    if not isinstance(inner, LlavaModel):
        raise TypeError(f"patch_llava expects a LlavaForConditionalGeneration or LlavaModel, "
                        f"got {type(model).__name__}")
    if type(inner).get_image_features is not LlavaModel.get_image_features:
        raise TypeError(f"{type(inner).__name__} has its own get_image_features (a different LLaVA variant): "
                        "patch_llava supports the plain LLaVA image path only")
    return inner


def _encoder_layers(vision_tower):
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        layers = getattr(getattr(owner, "encoder", None), "layers", None)
        if layers is not None:
            return layers
    raise TypeError(f"cannot find encoder.layers in {type(vision_tower).__name__} for attention-based scores")


@functools.cache
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@functools.cache
def _towers_select_hidden_states() -> bool:
    """Whether vision towers take ``output_hidden_states=[indices]`` as indices into (embeddings,
    layer 1, …, layer L), negative allowed, and return only those (others None): transformers ≥ 5.23.
    Before, a list meant layer outputs counted without the embeddings (5.17–5.22) or just "true"."""
    try:
        from transformers.utils.output_capturing import resolve_hidden_states_indices  # noqa: F401
    except ImportError:
        return False
    return True


def run_vision_tower(tower, pixel_values: torch.Tensor, indices: list[int], **kwargs):
    """``tower``'s output with ``hidden_states`` (embeddings + every layer's output, a full-length
    tuple) holding at least those at ``indices``; where transformers can (≥ 5.23), only those
    are kept, the others are None. A true ``output_hidden_states`` in ``kwargs`` is passed on there
    (as HF's own ``get_image_features`` does); older versions always get every hidden state."""
    if not _towers_select_hidden_states():
        kwargs["output_hidden_states"] = True
    elif not kwargs.get("output_hidden_states"):
        kwargs["output_hidden_states"] = list(indices)
    return tower(pixel_values, return_dict=True, **kwargs)


def pruned_image_tokens(num_tokens: int, keep) -> int:
    """Image tokens per image after pruning N = ``num_tokens`` with ``keep`` (None: N)."""
    return num_tokens if keep is None else token_budget(keep, num_tokens)


def patch_llava(model, keep: int | float | None = None, scores="cls"):
    """Swap ``model``'s image-feature path (layer selection + projector) for the fused one.

    ``keep``: None (no pruning), tokens per image (int) or a ratio (float in (0, 1]);
    ``scores``: ``"cls"``, ``"mean"`` or a callable ``(hidden_states, features) -> [B, N]``.
    Returns ``model`` (patched in place); ``unpatch_llava`` restores it.
    """
    inner = _llava_model(model)
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise TypeError(f"keep must be None, an int or a float ratio, got {type(keep).__name__} {keep!r}")
        token_budget(keep, keep if isinstance(keep, int) and keep >= 0 else 1)  # range check
    if not callable(scores) and scores not in SCORE_SOURCES:
        raise ValueError(f"scores={scores!r} is not one of {', '.join(map(repr, SCORE_SOURCES))} or a callable")
    if keep is not None and not callable(scores):
        _encoder_layers(inner.vision_tower)
    projector_parts("multi_modal_projector", inner.multi_modal_projector)  # an activation we can fuse
    inner._vfuse_patch = {"keep": keep, "scores": scores}
    inner.get_image_features = types.MethodType(_fused_get_image_features, inner)
    return model


def unpatch_llava(model):
    """Undo ``patch_llava``; returns ``model``."""
    inner = _llava_model(model)
    inner.__dict__.pop("get_image_features", None)
    inner.__dict__.pop("_vfuse_patch", None)
    return model


def _scores(self, source, hidden_states, features, fusion: MultiLayerFeatureFusion) -> torch.Tensor:
    if callable(source):
        return source(hidden_states, features)
    layer = fusion.attention_layer(len(hidden_states))
    q, k, scale = attention_qk(_encoder_layers(self.vision_tower)[layer], hidden_states[layer])
    s = cls_attention(q, k, scale=scale) if source == "cls" else query_key_scores(q, k, scale=scale)
    return s[:, 1:] if fusion.select_strategy == "default" else s


def _fused_get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                              image_sizes=None, **kwargs):
    settings = self._vfuse_patch
    layer = vision_feature_layer if vision_feature_layer is not None else self.config.vision_feature_layer
    strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
    fusion = MultiLayerFeatureFusion(layer, strategy)
    keep_budget, source = settings["keep"], settings["scores"]
    return_dict = kwargs.pop("return_dict", True)
    if image_sizes is not None:
        if keep_budget is not None:
            raise ValueError("patch_llava: pruning with image_sizes (per-image token splits) is not supported")
        kwargs["image_sizes"] = image_sizes
    if keep_budget is not None and callable(source):
        kwargs["output_hidden_states"] = True  # the callable may read any layer
    scored = keep_budget is not None and not callable(source)
    indices = fusion.hidden_state_indices(self.config.vision_config.num_hidden_layers + 1 if scored else None)
    image_outputs = run_vision_tower(self.vision_tower, pixel_values, indices,
                                     **{k: v for k, v in kwargs.items() if v is not None})
    hidden_states = image_outputs.hidden_states
    features = fusion(hidden_states)
    keep = None
    if keep_budget is not None:
        tokens = (features if isinstance(features, torch.Tensor) else features[0]).shape[1]
        scores = _scores(self, source, hidden_states, features, fusion)
        keep = [select_tokens(scores, pruned_image_tokens(tokens, keep_budget))]
    image_features = project_concat([features], [self.multi_modal_projector], keep=keep)
    if image_sizes is not None:
        split_sizes = ((torch.as_tensor(image_sizes, device=image_features.device) // self.vision_tower.patch_size)
                       .prod(dim=-1).tolist())
        image_features = torch.split(image_features.squeeze(0), split_sizes)
    else:
        image_features = list(image_features)
    if _transformers_major() < 5:  # 4.x: the features themselves
        return image_features
    image_outputs.pooler_output = image_features
    return image_outputs if return_dict else image_outputs.to_tuple()
