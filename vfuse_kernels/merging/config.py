"""Merge configuration: mergekit YAML (the supported subset, same semantics) plus the
``vfuse:`` extension for selective / layer-wise and VLM↔LLM merges.

mergekit subset::

    merge_method: ties            # linear | task_arithmetic | ties | dare_linear | dare_ties
    base_model: path/to/base      # required except for linear
    models:
      - model: path/to/a
        parameters: {weight: 0.5, density: 0.6}
    parameters: {normalize: true, lambda: 1.0, rescale: false, int8_mask: true}
    dtype: float32                # accepted; vfuse computes in fp32 whatever it says
    out_dtype: bfloat16           # output dtype (default: dtype, else each tensor's own)

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

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "vfuse"}
MODEL_KEYS = {"model", "parameters"}
PER_MODEL_PARAMS = {"weight", "density"}
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

    @property
    def model_paths(self) -> list[str]:
        """Every referenced checkpoint, base first, without repeats."""
        paths = [self.base_model] if self.base_model else []
        return paths + [m.path for m in self.models if m.path not in paths]


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


def _model_path(value: Any, where: str, root: str) -> str:
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


def parse_config(data: dict, root: str = ".") -> MergeConfig:
    """Validates a parsed YAML mapping; relative paths resolve against the working
    directory, then against ``root`` (the config file's folder)."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping")
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        key = sorted(unknown)[0]
        hint = " (slices, modules and tokenizer options are not supported)" if key in (
            "slices", "modules", "tokenizer_source", "tokenizer", "chat_template") else ""
        raise ConfigError(f"unsupported key {key!r}{hint}")
    method = data.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"merge_method={method!r} is not supported; use one of {', '.join(METHODS)}")
    allowed = METHOD_PARAMS[method]
    base = data.get("base_model")
    base = _model_path(base, "base_model", root) if base is not None else None
    if base is None and method != "linear":
        raise ConfigError(f"base_model is required for merge_method {method!r}")
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError("models must be a non-empty list")
    models = []
    for i, entry in enumerate(raw_models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"models[{i}] must be a mapping with a 'model' key")
        extra = set(entry) - MODEL_KEYS
        if extra:
            raise ConfigError(f"models[{i}].{sorted(extra)[0]} is not supported")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"models[{i}].parameters must be a mapping")
        for key, value in params.items():
            if key not in allowed:
                raise ConfigError(f"models[{i}].parameters.{key} is not a parameter of {method}")
            _check_setting(value, f"models[{i}].parameters.{key}")
        models.append(ModelEntry(_model_path(entry["model"], f"models[{i}].model", root), dict(params)))
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConfigError("parameters must be a mapping")
    for key, value in parameters.items():
        if key not in allowed:
            raise ConfigError(f"parameters.{key} is not a parameter of {method}")
        _check_setting(value, f"parameters.{key}")
    dtype = _dtype(data.get("dtype"), "dtype")
    out_dtype = _dtype(data.get("out_dtype"), "out_dtype")
    config = MergeConfig(method, base, models, dict(parameters), dtype, out_dtype)
    _parse_extension(data.get("vfuse") or {}, config, root)
    for i, model in enumerate(config.models):
        if model.path == base or method == "linear":
            continue
        if _lookup(model.parameters, parameters, "weight") is None:
            raise ConfigError(f"models[{i}] ({model.path}) has no weight (models[{i}].parameters.weight "
                              "or parameters.weight)")
    if method == "linear":
        for i, model in enumerate(config.models):
            if _lookup(model.parameters, parameters, "weight") is None:
                raise ConfigError(f"models[{i}] ({model.path}) has no weight")
    return config


def _lookup(model_params: dict, shared: dict, key: str):
    return model_params.get(key, shared.get(key))


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
            model = _model_path(rule["model"], f"vfuse.keep[{i}].model", root)
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
        model = _model_path(key, f"vfuse.name_map[{key!r}]", root)
        if model not in known:
            raise ConfigError(f"vfuse.name_map[{key!r}] is not one of the merged models")
        if model == config.base_model:
            raise ConfigError(f"vfuse.name_map[{key!r}]: the base model defines the output names; map the others")
        if not isinstance(prefixes, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in prefixes.items()):
            raise ConfigError(f"vfuse.name_map[{key!r}] must be {{source prefix: output prefix}}")
        config.name_map[model] = dict(prefixes)


def load_config(path: str) -> MergeConfig:
    """Reads and validates a YAML merge config."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, root=os.path.dirname(os.path.abspath(path)))


def resolve(config: MergeConfig, model: ModelEntry | None, key: str, name: str, t: float) -> Any:
    """A parameter for one tensor: the model's own setting, then the global one (mergekit's
    precedence; shared parameters are read from the global section only)."""
    scopes = [] if model is None else [("models", model.parameters)]
    scopes.append(("parameters", config.parameters))
    for scope_name, scope in scopes:
        if key in scope:
            value = evaluate(scope[key], name, t, f"{scope_name}.{key}")
            if value is not None:
                return value
    return None
