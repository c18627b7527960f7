"""The merge plan: for every output tensor, what to read and how to combine it — all
parameters resolved and every input checked (presence, shape) before any data is read."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint, CheckpointError
from .config import METHOD_DEFAULTS, MergeConfig, ModelEntry, filter_matches, layer_index, resolve

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TensorTask:
    name: str  # output name (the base model's)
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    copy_from: tuple[str, str] | None = None  # (model path, source name) for untouched tensors
    base: tuple[str, str] | None = None  # (model path, source name); None: a zero base (linear)
    inputs: list[tuple[str, str]] = field(default_factory=list)  # tuned (model path, source name)
    weights: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    seed: int = 0

    @property
    def nbytes(self) -> int:
        n = self.out_dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass
class MergePlan:
    config: MergeConfig
    checkpoints: dict[str, Checkpoint]
    reference: str  # the checkpoint whose tensor names and config the output takes
    tasks: list[TensorTask]
    method: str  # delta_merge method
    normalize: bool
    scale: float
    rescale: str | None
    tuned_are_deltas: bool  # linear: a zero base and the tuned tensors themselves

    def fingerprint(self) -> str:
        """Changes whenever the output would: config, plan, and the inputs' files."""
        files = sorted({info.file for ck in self.checkpoints.values() for info in ck.tensors.values()})
        stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        tasks = [(t.name, t.shape, str(t.out_dtype), t.copy_from, t.base, t.inputs, t.weights, t.densities, t.seed)
                 for t in self.tasks]
        blob = json.dumps([self.method, self.normalize, self.scale, self.rescale, self.tuned_are_deltas, tasks, stats],
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def close(self) -> None:
        for ck in self.checkpoints.values():
            ck.close()


def tensor_seed(seed: int, name: str) -> int:
    """The DARE stream of one tensor: keyed by the config seed and the tensor's name."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def num_layers(checkpoint: Checkpoint) -> int:
    """Decoder layers: the config's num_hidden_layers (text_config's for VLMs), else the
    highest ``layers.<i>.`` index in the tensor names + 1."""
    config = checkpoint.config or {}
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("num_hidden_layers"), int):
            return section["num_hidden_layers"]
    indices = [i for i in (layer_index(n) for n in checkpoint.tensors) if i is not None]
    return max(indices) + 1 if indices else 1


def layer_position(name: str, layers: int) -> float:
    """mergekit's t: layer / (L − 1) inside the layers (1 when L == 1), 0 outside."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (layers - 1) if layers > 1 else 1.0


def rewrite_prefix(name: str, prefixes: dict[str, str]) -> str:
    """``name`` with its longest matching key prefix replaced by that key's value
    (unchanged when no key is a prefix of it)."""
    for old, new in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def source_name(config: MergeConfig, model: str, name: str) -> str:
    """The name of output tensor ``name`` in ``model`` (through its name map)."""
    prefixes = config.name_map.get(model)
    if not prefixes:
        return name
    return rewrite_prefix(name, {out: src for src, out in prefixes.items()})


def build_plan(config: MergeConfig) -> MergePlan:
    checkpoints = {}
    try:
        for path in config.model_paths:
            checkpoints[path] = Checkpoint(path)
        return _build(config, checkpoints)
    except BaseException:
        for ck in checkpoints.values():
            ck.close()
        raise


def _build(config: MergeConfig, checkpoints: dict[str, Checkpoint]) -> MergePlan:
    method = config.method
    linear = method == "linear"
    reference = config.base_model or config.models[0].path
    ref = checkpoints[reference]
    layers = num_layers(ref)
    tuned_entries: list[ModelEntry] = [m for m in config.models if linear or m.path != config.base_model]
    default_normalize, default_rescale = METHOD_DEFAULTS[method]
    normalize = resolve(config, None, "normalize", "", 0.0)
    rescale = resolve(config, None, "rescale", "", 0.0)
    scale = resolve(config, None, "lambda", "", 0.0)
    normalize = default_normalize if normalize is None else bool(normalize)
    rescale = default_rescale if rescale is None else bool(rescale)
    out_override = OUT_DTYPES.get(config.out_dtype or config.dtype or "")

    tasks = []
    for name, info in sorted(ref.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset)):
        t = layer_position(name, layers)
        out_dtype = out_override if (out_override and info.dtype in FLOAT_DTYPES) else info.dtype
        task = TensorTask(name, info.shape, out_dtype)
        keep = next((rule for rule in config.keep if filter_matches(rule.filter, name)), None)
        if keep is not None or info.dtype not in FLOAT_DTYPES:
            model = keep.model if keep is not None else reference
            task.copy_from = (model, _find(config, checkpoints, model, name, info.shape, required=True))
            if keep is None:
                task.out_dtype = info.dtype
            tasks.append(task)
            continue
        for entry in tuned_entries:
            src = _find(config, checkpoints, entry.path, name, info.shape, required=entry.path not in config.name_map)
            if src is None:
                continue
            weight = resolve(config, entry, "weight", name, t)
            if weight is None:
                raise ValueError(f"{entry.path}: no weight for tensor {name!r} (no filter matched it)")
            density = resolve(config, entry, "density", name, t)
            density = 1.0 if density is None else float(density)
            if not 0.0 < density <= 1.0:
                raise ValueError(f"{entry.path}: density {density} for tensor {name!r} is outside (0, 1]")
            task.inputs.append((entry.path, src))
            task.weights.append(float(weight))
            task.densities.append(density)
        if not task.inputs:  # only the base has it (e.g. a vision tower in a VLM↔LLM merge)
            task.copy_from = (reference, name)
        elif linear and normalize and len(task.inputs) == 1:  # an average of one tensor is that tensor
            task.copy_from = task.inputs[0]
            task.inputs, task.weights, task.densities = [], [], []
        else:
            task.base = None if linear else (reference, name)
            task.seed = tensor_seed(config.seed, name)
        tasks.append(task)
    for entry in tuned_entries:  # tensors a same-architecture model has beyond the base's
        if entry.path in config.name_map:
            continue
        extra = set(checkpoints[entry.path].tensors) - set(ref.tensors)
        if extra:
            raise CheckpointError(f"{entry.path} has tensor {sorted(extra)[0]!r} that {reference} lacks "
                                  "(add a vfuse.name_map for models of another architecture)")
    if linear:
        merge_method = "linear" if normalize else "task_arithmetic"
    else:
        merge_method = method
    return MergePlan(config, checkpoints, reference, tasks, merge_method, normalize, float(1.0 if scale is None else scale),
                     "l1" if rescale else None, linear)


def _find(config, checkpoints, model: str, name: str, shape, required: bool) -> str | None:
    src = source_name(config, model, name)
    info = checkpoints[model].tensors.get(src)
    if info is None:
        if required:
            raise CheckpointError(f"{model} has no tensor {src!r}" + (f" (for {name!r})" if src != name else ""))
        return None
    if info.shape != tuple(shape):
        raise CheckpointError(f"{model}: tensor {src!r} has shape {info.shape}, the base has {tuple(shape)}")
    return src
