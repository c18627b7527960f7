"""The merge plan: for every output tensor, what to read and how to combine it — all
parameters resolved and every input checked (presence, shape) before any data is read."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from .._extension import KERNEL_DTYPES
from .checkpoint import Checkpoint, CheckpointError, itemsize
from .config import (LAYER_PATTERN, METHOD_DEFAULTS, MergeConfig, filter_matches, input_groups, layer_index, method_spec,
                     resolve, slice_of)

FLOAT_DTYPES = tuple(KERNEL_DTYPES)  # safetensors names of the dtypes a merge computes in
OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class TensorTask:
    name: str  # output name (the base model's)
    shape: tuple[int, ...]
    out_dtype: str  # safetensors name
    copy_from: tuple[str, str] | None = None  # (model path, source name) for untouched tensors
    base: tuple[str, str] | None = None  # (model path, source name); None: a zero base (linear)
    inputs: list[tuple[str, str]] = field(default_factory=list)  # tuned (model path, source name)
    weights: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    seed: int = 0
    # a per-tensor (non-fused) method: its inputs (model path, source name), the base first when
    # there is one, and their resolved parameters (``merging.methods.TensorInputs``)
    method_inputs: list[tuple[str, str]] | None = None
    base_index: int | None = None
    params: list[dict] = field(default_factory=list)
    shared: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        n = itemsize(self.out_dtype)
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
    layers_out: int | None = None  # slices: the output's decoder layers (written into config.json)

    def fingerprint(self) -> str:
        """Changes whenever the output would: config, plan, and the inputs' files."""
        files = sorted({info.file for ck in self.checkpoints.values() for info in ck.tensors.values()})
        stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        tasks = [(t.name, t.shape, str(t.out_dtype), t.copy_from, t.base, t.inputs, t.weights, t.densities, t.seed,
                  t.method_inputs, t.base_index, t.params, t.shared) for t in self.tasks]
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
    reference = config.base_model or (config.models[0].path if config.models else config.slices[0].sources[0].path)
    normalize, rescale, scale = (resolve(config, "models", None, key, "", 0.0) if config.fused else None
                                 for key in ("normalize", "rescale", "lambda"))
    if config.fused:
        default_normalize, default_rescale = METHOD_DEFAULTS[method]
        normalize = default_normalize if normalize is None else bool(normalize)
        rescale = default_rescale if rescale is None else bool(rescale)
    out_override = OUT_DTYPES.get(config.out_dtype or config.dtype or "")
    builder = _TaskBuilder(config, checkpoints, reference, out_override, normalize)
    tasks = builder.model_tasks() if config.models else builder.slice_tasks()
    merge_method = method
    if linear:
        merge_method = "linear" if normalize else "task_arithmetic"
    return MergePlan(config, checkpoints, reference, tasks, merge_method, bool(normalize),
                     float(1.0 if scale is None else scale), "l1" if rescale else None, linear,
                     None if config.models else sum(sl.length for sl in config.slices))


class _TaskBuilder:
    """Turns the config into tensor tasks: every output tensor's inputs found and checked and
    its parameters resolved."""

    def __init__(self, config: MergeConfig, checkpoints, reference: str, out_override, normalize):
        self.config, self.checkpoints, self.reference = config, checkpoints, reference
        self.out_override, self.normalize = out_override, normalize
        self.spec = method_spec(config.method)
        self.groups = {group: (base, [path for _, path in inputs]) for group, base, inputs in input_groups(config)}

    def _task(self, name: str, info) -> TensorTask:
        out_dtype = self.out_override if (self.out_override and info.dtype in FLOAT_DTYPES) else info.dtype
        return TensorTask(name, info.shape, out_dtype)

    def model_tasks(self) -> list[TensorTask]:
        """``models:`` — the output has the reference's tensors; each merges the same-named
        tensor of every model (through its name map)."""
        config, checkpoints, reference = self.config, self.checkpoints, self.reference
        ref = checkpoints[reference]
        layers = num_layers(ref)
        base, paths = self.groups["models"]
        tasks = []
        for name, info in sorted(ref.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset)):
            task = self._task(name, info)
            keep = next((rule for rule in config.keep if filter_matches(rule.filter, name)), None)
            if keep is not None or info.dtype not in FLOAT_DTYPES:
                model = keep.model if keep is not None else reference
                task.copy_from = (model, _find(config, checkpoints, model, name, info.shape, required=True))
                if keep is None:
                    task.out_dtype = info.dtype
            else:
                sources = [(path, _find(config, checkpoints, path, name, info.shape,
                                        required=path not in config.name_map)) for path in paths]
                self._merge(task, "models", base, [(p, src) for p, src in sources if src is not None],
                            layer_position(name, layers))
            tasks.append(task)
        for path in paths:  # tensors a same-architecture model has beyond the reference's
            if path in config.name_map or path == reference:
                continue
            extra = set(checkpoints[path].tensors) - set(ref.tensors)
            if extra:
                raise CheckpointError(f"{path} has tensor {sorted(extra)[0]!r} that {reference} lacks "
                                      "(add a vfuse.name_map for models of another architecture)")
        return tasks

    def slice_tasks(self) -> list[TensorTask]:
        """``slices:`` — the output's layers are the slices' layers in order, renumbered; each
        merges its sources' layer at the same offset. The tensors outside the layers come from
        the first slice's sources (embeddings) or the last slice's (the rest), at t = 0."""
        config, checkpoints = self.config, self.checkpoints
        ref = checkpoints[self.reference]
        first, last = "slices[0]", f"slices[{len(config.slices) - 1}]"
        pre, post = [], []
        for name, info in sorted(ref.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset)):
            if layer_index(name) is None:
                embedding = "embed" in name
                (pre if embedding else post).append(self._slice_task(name, info, first if embedding else last,
                                                                     name, 0.0))
        layer_tasks, out_layer = [], 0
        for i, sl in enumerate(config.slices):
            head = sl.sources[0]
            for offset in range(sl.length):
                source_layer = head.start + offset
                names = [n for n in checkpoints[head.path].tensors if layer_index(n) == source_layer]
                if not names:
                    raise CheckpointError(f"slices[{i}].sources[0] ({head.path}) has no layer {source_layer} "
                                          f"(layer_range {[head.start, head.end]})")
                t = offset / (sl.length - 1) if sl.length > 1 else 1.0
                for src_name in sorted(names):
                    info = checkpoints[head.path].tensors[src_name]
                    out_name = _renumber(src_name, out_layer)
                    layer_tasks.append(self._slice_task(out_name, info, f"slices[{i}]", src_name, t, offset))
                out_layer += 1
        return pre + layer_tasks + post

    def _slice_task(self, name: str, info, group: str, head_name: str, t: float, offset: int | None = None):
        """One output tensor of a slice group: each source's tensor at the same layer offset."""
        sl = slice_of(self.config, group)
        task = self._task(name, info)
        if info.dtype not in FLOAT_DTYPES:
            task.copy_from, task.out_dtype = (sl.sources[0].path, head_name), info.dtype
            return task
        sources = []
        for j, src in enumerate(sl.sources):
            src_name = head_name if offset is None else _renumber(head_name, src.start + offset)
            if offset is not None and src.start + offset >= src.end:
                raise CheckpointError(f"{group}.sources[{j}]: layer {src.start + offset} is outside its layer_range")
            found = _find(self.config, self.checkpoints, src.path, src_name, info.shape, required=True)
            sources.append((src.path, found))
        self._merge(task, group, self.groups[group][0], sources, t)
        return task

    def _merge(self, task: TensorTask, group: str, base: str | None, sources: list[tuple[str, str]], t: float):
        """Fills ``task`` to merge ``sources`` (model path, source name) of one input group."""
        config, name = self.config, task.name
        linear = config.method == "linear"
        base_source = next(((p, s) for p, s in sources if p == base), None) if base else None
        others = [(p, s) for p, s in sources if (p, s) != base_source]
        if self.spec is not None:
            self._method_task(task, group, base_source, others, t)
            return
        if linear:
            others, base_source = sources, None
        for path, src in others:
            weight = resolve(config, group, path, "weight", src, t)
            if weight is None:
                raise ValueError(f"{path}: no weight for tensor {src!r} (no filter matched it)")
            density = resolve(config, group, path, "density", src, t)
            density = 1.0 if density is None else float(density)
            if not 0.0 < density <= 1.0:
                raise ValueError(f"{path}: density {density} for tensor {src!r} is outside (0, 1]")
            task.inputs.append((path, src))
            task.weights.append(float(weight))
            task.densities.append(density)
        if not task.inputs:  # only the base has it (e.g. a vision tower in a VLM↔LLM merge)
            task.copy_from = base_source or (self.reference, name)
        elif linear and self.normalize and len(task.inputs) == 1:  # an average of one tensor is that tensor
            task.copy_from = task.inputs[0]
            task.inputs, task.weights, task.densities = [], [], []
        else:
            task.base = None if linear else base_source
            task.seed = tensor_seed(config.seed, name)

    def _method_task(self, task: TensorTask, group: str, base_source, others, t: float) -> None:
        """A per-tensor method's inputs (the base first) and parameters, mergekit's way: per-model
        parameters for every input but the base (and for the base those of scope "input"),
        resolved against the input's own tensor name; global ones against the output's."""
        from .methods import REQUIRED

        config, spec = self.config, self.spec
        if not others and base_source is not None and len(self.groups[group][1]) > 1:  # only the base has it
            task.copy_from = base_source
            return
        inputs = ([base_source] if base_source else []) + others
        task.method_inputs, task.base_index = inputs, (0 if base_source else None)
        def value(key, param, path, tensor):
            found = resolve(config, group, path, key, tensor, t)
            if found is None and param.default is REQUIRED:
                raise ValueError(f"{path + ': ' if path else ''}no {key} for tensor {tensor!r} (no filter matched it)")
            return param.default if found is None else found

        task.params = [{key: value(key, param, path, src) for key, param in spec.model_params.items()
                        if k != task.base_index or param.scope == "input"} for k, (path, src) in enumerate(inputs)]
        task.shared = {key: value(key, param, None, task.name) for key, param in spec.global_params.items()}
        task.seed = tensor_seed(config.seed, task.name)


def _renumber(name: str, layer: int) -> str:
    """``name`` with its decoder-layer index replaced by ``layer``."""
    match = LAYER_PATTERN.search(name)
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


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
