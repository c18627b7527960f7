"""Merge configuration: mergekit YAML (the supported subset, same semantics) plus the
``vfuse:`` extension for selective / layer-wise and VLM↔LLM merges.

mergekit syntax::

    merge_method: ties            # every method mergekit 0.1.5 registers (see below)
    base_model: path/to/base      # required where mergekit requires it
    models:
      - model: path/to/a
        parameters: {weight: 0.5, density: 0.6}
    parameters: {normalize: true, lambda: 1.0, rescale: false, int8_mask: true}
    dtype: float32                # accepted; vfuse computes in fp32 whatever it says
    out_dtype: bfloat16           # output dtype (default: dtype, else each tensor's own)
    tokenizer_source: base        # optional; only "base" (the base model's tokenizer files)

Methods: linear, task_arithmetic, ties, dare_linear and dare_ties run fused (``delta_merge``);
every other mergekit method runs per tensor (``merging.methods``), with mergekit's parameter
names, scopes and defaults. Instead of ``models:``, ``slices:`` (mergekit's syntax) builds the
output's layers from layer ranges of the sources::

    slices:
      - sources:
          - {model: path/to/a, layer_range: [0, 16], parameters: {weight: 0.3}}
          - {model: path/to/b, layer_range: [0, 16]}
        parameters: {t: 0.5}      # per slice, between the sources' and the global ones
        base_model: path/to/a     # optional per-slice base

Every source of a slice has the same number of layers; the output's layers are the slices'
in order, renumbered from 0, and its config's ``num_hidden_layers`` is their count. Inside a
slice a layer's ``t`` (for gradients) is its offset / (slice length − 1); the tensors
outside the layers take theirs from the first slice's sources (embeddings) or the last
slice's (every other non-layer tensor), at t = 0, as mergekit does.

Parameter values, anywhere a value goes (mergekit's rules):
- a number;
- a gradient: a list of numbers interpolated over the layers, ``t = layer / (L − 1)``,
  ``value = (1 − f)·v[i] + f·v[i+1]`` at ``i + f = t·(len − 1)``; tensors outside the
  layers (embeddings, final norm, lm_head) take ``t = 0``, the first value;
- conditional: a list of ``{filter: <substring>, value: <value>}``; the first entry whose
  filter is in the tensor name (or is missing / ``"*"``) wins;
- vfuse extension: a filter ``"re:<regex>"`` matches by ``re.search``, and a schedule
  ``{schedule: constant|linear|loglinear, start: a, end: b}`` (constant: ``value: c``)
  gives, at ``x = t``: constant ``c``; linear ``a + (b − a)·x``; loglinear
  ``exp(ln a + (ln b − ln a)·x)`` (a, b > 0) — the same ``t`` as gradients.

Component filters for selective merging are plain substrings of HF tensor names:
``self_attn``, ``mlp``, ``embed_tokens``, ``norm``, ``lm_head`` (or any ``re:`` pattern).

vfuse extension (top-level ``vfuse:`` key)::

    vfuse:
      seed: 0                     # DARE: each tensor's stream is keyed by (seed, tensor name)
      keep:                       # tensors copied untouched from one model; first match wins
        - filter: embed_tokens
          model: path/to/vlm      # default: base_model
      name_map:                   # VLM↔LLM: source-name prefix → output-name prefix, per model
        path/to/llm: {"model.": "model.language_model."}

Output tensor names are the base model's. A model with a ``name_map`` contributes to the
tensors it has after renaming; tensors it lacks are merged from the others (or pass
through from the base). A model without one must have every tensor the base has.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

FUSED_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "vfuse"}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
SHARED_PARAMS = {"normalize", "lambda", "rescale", "int8_mask"}
METHOD_PARAMS = {
    "linear": {"weight", "normalize"},
    "task_arithmetic": {"weight", "normalize", "lambda", "int8_mask"},
    "ties": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
    "dare_linear": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
    "dare_ties": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
}
# mergekit's defaults: (normalize, rescale)
METHOD_DEFAULTS = {
    "linear": (True, False),
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_linear": (False, True),
    "dare_ties": (False, True),
}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
SCHEDULES = ("constant", "linear", "loglinear")
LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ConfigError(ValueError):
    """A configuration that cannot be merged; the message names the key."""


@dataclass(frozen=True)
class ModelEntry:
    path: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    path: str
    start: int  # layer_range [start, end)
    end: int
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSpec:
    sources: list[SliceSource]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass(frozen=True)
class KeepRule:
    filter: str
    model: str


@dataclass
class MergeConfig:
    method: str
    base_model: str | None
    models: list[ModelEntry]
    parameters: dict[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int = 0
    keep: list[KeepRule] = field(default_factory=list)
    name_map: dict[str, dict[str, str]] = field(default_factory=dict)
    slices: list[SliceSpec] = field(default_factory=list)  # instead of models
    tokenizer_source: str | None = None  # "base"

    @property
    def fused(self) -> bool:
        """Whether the method runs through ``delta_merge`` (else ``merging.methods``)."""
        return self.method in FUSED_METHODS

    @property
    def model_paths(self) -> list[str]:
        """Every referenced checkpoint, base first, without repeats."""
        paths = [self.base_model] if self.base_model else []
        for path in [m.path for m in self.models] + [src.path for sl in self.slices for src in sl.sources] + [
                sl.base_model for sl in self.slices if sl.base_model]:
            if path not in paths:
                paths.append(path)
        return paths


def filter_matches(pattern: str | None, name: str) -> bool:
    """mergekit's filter rule (substring, ``None`` / ``"*"`` match all) plus ``re:<regex>``."""
    if pattern is None or pattern == "*":
        return True
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return pattern in name


def layer_index(name: str) -> int | None:
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def evaluate(setting: Any, name: str, t: float, where: str) -> Any:
    """The value of a parameter setting for tensor ``name`` at layer position ``t`` ∈ [0, 1]."""
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, dict):
        return _schedule(setting, t, where)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(v, dict) and "value" in v for v in setting):
            for cond in setting:
                if filter_matches(cond.get("filter"), name):
                    return evaluate(cond["value"], name, t, where)
            return None
    raise ConfigError(f"{where}: cannot read {setting!r} (a number, a list of numbers, a list of "
                      f"{{filter, value}} or a {{schedule, start, end}} mapping)")


def _schedule(spec: dict, t: float, where: str) -> float:
    kind = spec.get("schedule")
    if kind not in SCHEDULES:
        raise ConfigError(f"{where}.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")
    if kind == "constant":
        return float(spec["value"])
    start, end = float(spec["start"]), float(spec["end"])
    if kind == "linear":
        return start + (end - start) * t
    return math.exp(math.log(start) + (math.log(end) - math.log(start)) * t)


def _check_setting(setting: Any, where: str) -> None:
    """Validates a setting's structure once, before any tensor is read."""
    if isinstance(setting, bool) or isinstance(setting, (int, float)):
        return
    if isinstance(setting, dict):
        unknown = set(setting) - {"schedule", "start", "end", "value"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} in a schedule")
        kind = setting.get("schedule")
        if kind not in SCHEDULES:
            raise ConfigError(f"{where}.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")
        needed = ("value",) if kind == "constant" else ("start", "end")
        for key in needed:
            if not isinstance(setting.get(key), (int, float)) or isinstance(setting.get(key), bool):
                raise ConfigError(f"{where}.{key} must be a number for schedule {kind!r}")
        if kind == "loglinear" and (setting["start"] <= 0 or setting["end"] <= 0):
            raise ConfigError(f"{where}: loglinear needs start > 0 and end > 0")
        return
    if isinstance(setting, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return
        for i, cond in enumerate(setting):
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise ConfigError(f"{where}[{i}] must be {{filter: ..., value: ...}}")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ConfigError(f"{where}[{i}].filter must be a string")
            if isinstance(cond.get("filter"), str) and cond["filter"].startswith("re:"):
                try:
                    re.compile(cond["filter"][3:])
                except re.error as exc:
                    raise ConfigError(f"{where}[{i}].filter: bad regex: {exc}") from None
            _check_setting(cond["value"], f"{where}[{i}].value")
        return
    raise ConfigError(f"{where}: cannot read {setting!r}")


def resolve_model_path(value: Any, where: str, root: str) -> str:
    if isinstance(value, dict):  # mergekit's {model: {path: ...}} form
        unknown = set(value) - {"path"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: LoRA and revision references are not supported")
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a checkpoint path")
    if "+" in value and not os.path.exists(value):
        raise ConfigError(f"{where}={value!r}: model+LoRA references are not supported")
    path = value if os.path.isabs(value) or os.path.exists(value) else os.path.join(root, value)
    if not os.path.exists(path):
        raise ConfigError(f"{where}={value!r}: no such checkpoint (hub downloads are not supported)")
    return os.path.abspath(path)


def method_spec(method: str):
    """The per-tensor ``TensorMethod`` of a non-fused method (None for the fused ones)."""
    if method in FUSED_METHODS:
        return None
    from .methods import METHODS

    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"merge_method={method!r} is not supported; use one of {', '.join(_method_names())}")
    return METHODS[method]


def _method_names() -> list[str]:
    from .methods import METHODS

    return [*FUSED_METHODS, *sorted(METHODS)]


def parse_config(data: dict, root: str = ".") -> MergeConfig:
    """Validates a parsed YAML mapping; relative paths resolve against the working
    directory, then against ``root`` (the config file's folder)."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping")
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        key = sorted(unknown)[0]
        hint = " (modules, tokenizer and chat_template options are not supported)" if key in (
            "modules", "tokenizer", "chat_template") else ""
        raise ConfigError(f"unsupported key {key!r}{hint}")
    method = data.get("merge_method")
    spec = method_spec(method)
    base = data.get("base_model")
    base = resolve_model_path(base, "base_model", root) if base is not None else None
    if ("models" in data) == ("slices" in data):
        raise ConfigError("give exactly one of models and slices")
    models, slices = [], []
    if "models" in data:
        raw_models = data.get("models")
        if not isinstance(raw_models, list) or not raw_models:
            raise ConfigError("models must be a non-empty list")
        for i, entry in enumerate(raw_models):
            if not isinstance(entry, dict) or "model" not in entry:
                raise ConfigError(f"models[{i}] must be a mapping with a 'model' key")
            extra = set(entry) - MODEL_KEYS
            if extra:
                raise ConfigError(f"models[{i}].{sorted(extra)[0]} is not supported")
            params = _parameters(entry.get("parameters"), f"models[{i}].parameters", method, spec, per_model=True)
            models.append(ModelEntry(resolve_model_path(entry["model"], f"models[{i}].model", root), params))
    else:
        slices = _parse_slices(data.get("slices"), root, method, spec)
    parameters = _parameters(data.get("parameters"), "parameters", method, spec, per_model=False)
    dtype = _dtype(data.get("dtype"), "dtype")
    out_dtype = _dtype(data.get("out_dtype"), "out_dtype")
    config = MergeConfig(method, base, models, parameters, dtype, out_dtype, slices=slices)
    tokenizer = data.get("tokenizer_source")
    if tokenizer is not None:
        if tokenizer != "base":
            raise ConfigError(f"tokenizer_source={tokenizer!r} is not supported (only 'base': the base model's "
                              "tokenizer files)")
        if base is None:
            raise ConfigError("tokenizer_source: base needs a base_model")
        config.tokenizer_source = tokenizer
    _parse_extension(data.get("vfuse") or {}, config, root)
    if slices and (config.keep or config.name_map):
        raise ConfigError("vfuse.keep and vfuse.name_map work with models:, not with slices:")
    for where, group_base, inputs in input_groups(config):
        _check_group(config, spec, where, group_base, inputs)
    return config


def _parameters(raw, where: str, method: str, spec, per_model: bool) -> dict:
    """A ``parameters`` mapping checked against the method: known names (a global-only
    parameter in a model's or source's mapping is an error) and well-formed settings."""
    params = raw or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where} must be a mapping")
    for key, value in params.items():
        if spec is None:
            if key not in METHOD_PARAMS[method]:
                raise ConfigError(f"{where}.{key} is not a parameter of {method}")
        elif key in spec.global_params and per_model:
            raise ConfigError(f"{where}.{key} is a global parameter of {method}: set it under parameters")
        elif key not in spec.model_params and key not in spec.global_params:
            known = sorted({*spec.model_params, *spec.global_params})
            raise ConfigError(f"{where}.{key} is not a parameter of {method} "
                              f"({', '.join(known) if known else 'it takes none'})")
        _check_setting(value, f"{where}.{key}")
        if spec is not None:
            _check_values((spec.model_params.get(key) or spec.global_params[key]).check, value, f"{where}.{key}")
        elif key == "density":
            _check_values(_density_problem, value, f"{where}.{key}")
    return dict(params)


def _density_problem(value) -> str | None:
    return None if 0.0 < float(value) <= 1.0 else "a density must be in (0, 1]"


def _check_values(check, setting, where: str) -> None:
    """Runs a parameter's value check (value → problem text or None) on every value a setting can take."""
    if check is None:
        return
    if isinstance(setting, dict):
        values = [setting[k] for k in ("value", "start", "end") if k in setting]
    elif isinstance(setting, list):
        values = [c["value"] if isinstance(c, dict) else c for c in setting]
    else:
        values = [setting]
    for value in values:
        if isinstance(value, (dict, list)):
            _check_values(check, value, where)
            continue
        try:
            problem = check(value)
        except (TypeError, ValueError):
            problem = f"cannot read {value!r}"
        if problem:
            raise ConfigError(f"{where}={value!r}: {problem}")


def _parse_slices(raw, root: str, method: str, spec) -> list[SliceSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices must be a non-empty list")
    slices = []
    for i, entry in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise ConfigError(f"{where} must be a mapping with a non-empty 'sources' list")
        extra = set(entry) - SLICE_KEYS
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]} is not supported")
        sources = []
        for j, src in enumerate(entry["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{at} must be a mapping with 'model' and 'layer_range'")
            extra = set(src) - SOURCE_KEYS
            if extra:
                raise ConfigError(f"{at}.{sorted(extra)[0]} is not supported")
            layer_range = src["layer_range"]
            if (not isinstance(layer_range, list) or len(layer_range) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)
                    or not 0 <= layer_range[0] < layer_range[1]):
                raise ConfigError(f"{at}.layer_range={layer_range!r} must be [start, end) with 0 <= start < end")
            params = _parameters(src.get("parameters"), f"{at}.parameters", method, spec, per_model=True)
            sources.append(SliceSource(resolve_model_path(src["model"], f"{at}.model", root), *layer_range, params))
        lengths = {s.end - s.start for s in sources}
        if len(lengths) > 1:
            raise ConfigError(f"{where}: every source must have the same number of layers, got "
                              f"{', '.join(str(s.end - s.start) for s in sources)}")
        params = _parameters(entry.get("parameters"), f"{where}.parameters", method, spec, per_model=False)
        if spec is None and set(params) & SHARED_PARAMS:
            raise ConfigError(f"{where}.parameters.{sorted(set(params) & SHARED_PARAMS)[0]}: set {method}'s "
                              "normalize, lambda, rescale and int8_mask under the global parameters")
        base = resolve_model_path(entry["base_model"], f"{where}.base_model", root) if entry.get("base_model") else None
        slices.append(SliceSpec(sources, params, base))
    return slices


def input_groups(config: MergeConfig):
    """(group, base model, [(label, model path)]) of each group of inputs merged together:
    the models (with the base added when it is not listed, as mergekit does), or each
    slice's sources."""
    if config.models:
        inputs = [(f"models[{i}]", m.path) for i, m in enumerate(config.models)]
        base = config.base_model
        if base and base not in [p for _, p in inputs]:
            inputs.append(("base_model", base))
        yield "models", base, inputs
    for i, sl in enumerate(config.slices):
        inputs = [(f"slices[{i}].sources[{j}]", s.path) for j, s in enumerate(sl.sources)]
        yield f"slices[{i}]", sl.base_model or config.base_model, inputs


def _check_group(config: MergeConfig, spec, group: str, base: str | None, inputs: list[tuple[str, str]]) -> None:
    """Base, model count and required parameters of one input group, before any tensor is read."""
    method, paths = config.method, [p for _, p in inputs]
    needs_base = spec.needs_base if spec is not None else method != "linear"
    if needs_base and base is None:
        raise ConfigError(f"base_model is required for merge_method {method!r}")
    if needs_base and base not in paths:
        raise ConfigError(f"{group}: the base model {base} is not one of its sources")
    if spec is None:
        for label, path in inputs:
            if (path != base or method == "linear") and _setting(config, group, path, "weight") is None:
                raise ConfigError(f"{label} ({path}) has no weight ({label}.parameters.weight or parameters.weight)")
        return
    problem = spec.count_problem(len(inputs), base is not None and base in paths)
    if problem:
        raise ConfigError(f"{group}: {problem}")
    from .methods import REQUIRED

    for key, param in spec.global_params.items():
        if param.default is REQUIRED and _setting(config, group, None, key) is None:
            raise ConfigError(f"parameters.{key} is required by merge_method {method}")
    for key, param in spec.model_params.items():
        if param.default is not REQUIRED:
            continue
        for label, path in inputs:
            if (path != base or param.scope == "input") and _setting(config, group, path, key) is None:
                raise ConfigError(f"{label} ({path}) has no {key} ({label}.parameters.{key} or parameters.{key}), "
                                  f"required by merge_method {method}")


def _setting(config: MergeConfig, where: str, path: str | None, key: str):
    """The first setting of ``key`` in precedence order for a model of a group (None: a
    global-only lookup)."""
    for scope in parameter_scopes(config, where, path):
        if key in scope:
            return scope[key]
    return None


def slice_of(config: MergeConfig, group: str) -> SliceSpec:
    """The slice of input group ``"slices[i]"`` (``input_groups``' names)."""
    return config.slices[int(group[len("slices["):-1])]


def parameter_scopes(config: MergeConfig, where: str, path: str | None) -> list[dict]:
    """mergekit's precedence for a parameter of model ``path`` (None: a global parameter) in
    group ``where``: the model's (or slice source's) own, the slice's, then the global ones."""
    scopes = []
    if where == "models":
        if path is not None:
            scopes += [m.parameters for m in config.models if m.path == path][:1]
    else:
        sl = slice_of(config, where)
        if path is not None:
            scopes += [s.parameters for s in sl.sources if s.path == path][:1]
        scopes.append(sl.parameters)
    scopes.append(config.parameters)
    return scopes


def _dtype(value, key: str) -> str | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{key}={value!r} is not one of float32, bfloat16, float16")
    return DTYPES[value]


def _parse_extension(ext: Any, config: MergeConfig, root: str) -> None:
    if not isinstance(ext, dict):
        raise ConfigError("vfuse must be a mapping")
    unknown = set(ext) - {"seed", "keep", "name_map"}
    if unknown:
        raise ConfigError(f"vfuse.{sorted(unknown)[0]} is not a vfuse option (seed, keep, name_map)")
    seed = ext.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError("vfuse.seed must be an integer in [0, 2^63)")
    config.seed = seed
    known = set(config.model_paths)
    for i, rule in enumerate(ext.get("keep") or []):
        if not isinstance(rule, dict) or not isinstance(rule.get("filter"), str) or set(rule) - {"filter", "model"}:
            raise ConfigError(f"vfuse.keep[{i}] must be {{filter: <pattern>, model: <path>}}")
        if "model" in rule:
            model = resolve_model_path(rule["model"], f"vfuse.keep[{i}].model", root)
        elif config.base_model:
            model = config.base_model
        else:
            raise ConfigError(f"vfuse.keep[{i}].model is required without a base_model")
        if model not in known:
            raise ConfigError(f"vfuse.keep[{i}].model={rule.get('model')!r} is not one of the merged models")
        config.keep.append(KeepRule(rule["filter"], model))
    name_map = ext.get("name_map") or {}
    if not isinstance(name_map, dict):
        raise ConfigError("vfuse.name_map must map model paths to {source prefix: output prefix}")
    for key, prefixes in name_map.items():
        model = resolve_model_path(key, f"vfuse.name_map[{key!r}]", root)
        if model not in known:
            raise ConfigError(f"vfuse.name_map[{key!r}] is not one of the merged models")
        if model == config.base_model:
            raise ConfigError(f"vfuse.name_map[{key!r}]: the base model defines the output names; map the others")
        if not isinstance(prefixes, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in prefixes.items()):
            raise ConfigError(f"vfuse.name_map[{key!r}] must be {{source prefix: output prefix}}")
        config.name_map[model] = dict(prefixes)


def read_yaml(path: str, what: str = "config"):
    """A YAML file's content; ConfigError naming the file when it cannot be read or parsed."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def load_config(path: str) -> MergeConfig:
    """Reads and validates a YAML merge config."""
    return parse_config(read_yaml(path), root=os.path.dirname(os.path.abspath(path)))


def resolve(config: MergeConfig, group: str, path: str | None, key: str, name: str, t: float) -> Any:
    """A parameter for one tensor of model ``path`` in input group ``group`` (None: a global
    parameter): the first scope in mergekit's precedence (``parameter_scopes``) whose setting
    gives a value for ``name`` at ``t``."""
    for scope in parameter_scopes(config, group, path):
        if key in scope:
            value = evaluate(scope[key], name, t, f"parameters.{key}")
            if value is not None:
                return value
    return None
