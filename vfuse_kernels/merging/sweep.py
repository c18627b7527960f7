"""``vfuse sweep``: evaluate many merge configurations in memory, without writing checkpoints.

A sweep file is a ``vfuse merge`` config plus two keys::

    merge_method: ties
    base_model: base
    models:
      - {model: ft0, parameters: {weight: 0.5, density: 0.5}}
    sweep:                                  # dotted path into the config → values
      models.0.parameters.weight: [0.4, 0.5, 0.6]
      merge_method: [task_arithmetic, ties]
      zip: false                            # true: pair the axes' values instead of their product
    eval:
      perplexity: text.txt                  # plain text, or jsonl with a "text" field
      context_length: 512                   # tokens per window (default 512)
      stride: 512                           # window step (default: context_length)
      callable: my_module:my_metrics        # function(model, tokenizer) -> {name: value}
      maximize: false                       # the best row: the first metric's lowest (highest)

The base model is loaded once (``AutoModelForCausalLM``, or ``AutoModelForImageTextToText``
for a VLM, in the checkpoint's dtype). For each configuration every output tensor of its
merge plan (merged or copied) is computed exactly as ``vfuse merge`` computes it — the same
plan, the same kernels, reading the sources tensor by tensor — and copied into the model's
parameter of that name; then the model is evaluated. Writing every tensor of the plan also
restores whatever an earlier configuration changed: nothing is reloaded. TIES thresholds
are computed once per (tensor, inputs, densities) and reused by later configurations that
change only weights.

Output in ``--out DIR``: ``results.csv`` (``config_id``, one column per axis, each metric,
``merge_s``, ``eval_s``, ``error``), ``results.png`` (each metric against each axis; needs
matplotlib), ``best.yml`` (the best configuration as a plain config for ``vfuse merge``,
model paths absolute); ``--save-best CKPT`` also writes that merge as a checkpoint.
``--resume`` keeps the rows already in results.csv. A metric that raises is recorded in
the row's ``error`` and the sweep goes on.
"""
from __future__ import annotations

import copy
import csv
import importlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from .checkpoint import HostReader, read_ahead, staged
from .config import ConfigError, MergeConfig, resolve_model_path, parse_config, read_yaml
from .engine import _BufferPool, _Runner, merge_checkpoints
from .plan import build_plan

EVAL_KEYS = {"perplexity", "context_length", "stride", "callable", "maximize"}


@dataclass
class Evaluation:
    perplexity: str | None = None
    context_length: int = 512
    stride: int | None = None
    function: Callable | None = None  # function(model, tokenizer) -> {name: value}
    maximize: bool = False

    def metrics(self, model, tokenizer) -> dict[str, float]:
        """Every metric of one configuration (perplexity first)."""
        values = {}
        if self.perplexity is not None:
            values["perplexity"] = perplexity(model, tokenizer, read_texts(self.perplexity), self.context_length,
                                              self.stride or self.context_length)
        if self.function is not None:
            result = self.function(model, tokenizer)
            if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
                raise TypeError(f"{self.function.__module__}:{self.function.__name__} must return "
                                f"{{metric name: number}}, got {type(result).__name__}")
            values.update({k: float(v) for k, v in result.items()})
        return values


@dataclass
class Sweep:
    config: dict  # the merge config (model paths absolute)
    axes: dict[str, list]
    zip: bool
    evaluation: Evaluation
    configurations: list[tuple[str, dict[str, Any], MergeConfig, dict]] = field(default_factory=list)


def read_texts(path: str) -> list[str]:
    """The texts of a perplexity file: a ``.jsonl`` file's ``text`` fields, else the whole file."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return [f.read()]
        texts = []
        for line_no, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{line_no}: a jsonl line needs a string 'text' field")
                texts.append(record["text"])
        return texts


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], context_length: int, stride: int) -> float:
    """exp(mean negative log-likelihood per predicted token) over the texts joined by blank
    lines, in windows of ``context_length`` tokens moved by ``stride``; a window scores only
    the tokens no earlier window scored (transformers' sliding-window recipe)."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids.to(model.device)
    length = ids.shape[1]
    if length < 2:
        raise ValueError("the perplexity text has fewer than 2 tokens")
    nll, counted, previous_end = 0.0, 0, 0
    for begin in range(0, length, stride):
        end = min(begin + context_length, length)
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - previous_end)] = -100
        scored = int((labels[:, 1:] != -100).sum())
        if scored:
            loss = model(input_ids=window, labels=labels).loss
            nll += float(loss) * scored
            counted += scored
        previous_end = end
        if end == length:
            break
    return math.exp(nll / counted)


def _path_parts(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _get(data, path: str):
    node = data
    for part in _path_parts(path):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            raise ConfigError(f"sweep: {path}: the config has no {part!r} there (set the axis's key in the config)")
    return node


def _set(data, path: str, value) -> None:
    *parents, last = _path_parts(path)
    node = data
    for part in parents:
        node = node[part]
    node[last] = copy.deepcopy(value)


def _absolute(data: dict, root: str) -> dict:
    """The config with every model path absolute (checked to exist), so it reads the same from any folder."""
    data = copy.deepcopy(data)
    if data.get("base_model") is not None:
        data["base_model"] = resolve_model_path(data["base_model"], "base_model", root)
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = resolve_model_path(entry["model"], f"models[{i}].model", root)
    for i, sl in enumerate(data.get("slices") or []):
        for j, src in enumerate((sl or {}).get("sources") or []):
            if isinstance(src, dict) and "model" in src:
                src["model"] = resolve_model_path(src["model"], f"slices[{i}].sources[{j}].model", root)
        if isinstance(sl, dict) and sl.get("base_model"):
            sl["base_model"] = resolve_model_path(sl["base_model"], f"slices[{i}].base_model", root)
    ext = data.get("vfuse") or {}
    for i, rule in enumerate(ext.get("keep") or []):
        if isinstance(rule, dict) and "model" in rule:
            rule["model"] = resolve_model_path(rule["model"], f"vfuse.keep[{i}].model", root)
    if isinstance(ext.get("name_map"), dict):
        ext["name_map"] = {resolve_model_path(k, f"vfuse.name_map[{k!r}]", root): v for k, v in ext["name_map"].items()}
    return data


def _function(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"eval.callable={spec!r} must be 'module:function'")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"eval.callable={spec!r} cannot be imported: {exc}") from None
    if not callable(function):
        raise ConfigError(f"eval.callable={spec!r} is not callable")
    return function


def _evaluation(raw, root: str) -> Evaluation:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("eval must be a mapping with perplexity and/or callable")
    unknown = set(raw) - EVAL_KEYS
    if unknown:
        raise ConfigError(f"eval.{sorted(unknown)[0]} is not a metric or eval option ({', '.join(sorted(EVAL_KEYS))})")
    if "perplexity" not in raw and "callable" not in raw:
        raise ConfigError("eval needs perplexity: FILE and/or callable: module:function")
    evaluation = Evaluation(maximize=bool(raw.get("maximize", False)))
    if "perplexity" in raw:
        path = raw["perplexity"]
        path = path if not isinstance(path, str) or os.path.isabs(path) or os.path.exists(path) else \
            os.path.join(root, path)
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ConfigError(f"eval.perplexity={raw['perplexity']!r}: no such file")
        evaluation.perplexity = os.path.abspath(path)
    for key in ("context_length", "stride"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise ConfigError(f"eval.{key}={value!r} must be an integer >= 2")
    evaluation.context_length = raw.get("context_length", 512)
    evaluation.stride = raw.get("stride")
    if evaluation.stride is not None and evaluation.stride > evaluation.context_length:
        raise ConfigError("eval.stride must not exceed eval.context_length")
    if "callable" in raw:
        evaluation.function = _function(str(raw["callable"]))
    return evaluation


def load_sweep(path: str) -> Sweep:
    """Reads and validates a sweep file: every configuration is checked as ``vfuse merge``
    would check it before any model is loaded."""
    data = read_yaml(path, "sweep")
    if not isinstance(data, dict):
        raise ConfigError("the sweep file must be a YAML mapping")
    root = os.path.dirname(os.path.abspath(path))
    axes_raw, eval_raw = data.pop("sweep", None), data.pop("eval", None)
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise ConfigError("sweep must map config paths to lists of values")
    axes_raw = dict(axes_raw)
    pair = axes_raw.pop("zip", False)
    if not isinstance(pair, bool):
        raise ConfigError("sweep.zip must be true or false")
    if not axes_raw:
        raise ConfigError("sweep has no axis")
    config = _absolute(data, root)
    for axis, values in axes_raw.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{axis} must be a non-empty list of values")
        _get(config, axis)
    if pair and len({len(v) for v in axes_raw.values()}) > 1:
        raise ConfigError("sweep.zip: true needs every axis to have the same number of values, got "
                          + ", ".join(f"{a}: {len(v)}" for a, v in axes_raw.items()))
    sweep = Sweep(config, axes_raw, pair, _evaluation(eval_raw, root))
    combos = zip(*axes_raw.values()) if pair else itertools.product(*axes_raw.values())
    for index, combo in enumerate(combos):
        values = dict(zip(axes_raw, combo))
        raw = copy.deepcopy(config)
        for axis, value in values.items():
            _set(raw, axis, value)
        try:
            merge_config = parse_config(raw, root)
        except ConfigError as exc:
            raise ConfigError(f"configuration c{index:03d} ({_describe(values)}): {exc}") from None
        if merge_config.base_model is None:
            raise ConfigError("a sweep needs base_model: the model loaded once and merged into")
        sweep.configurations.append((f"c{index:03d}", values, merge_config, raw))
    bases = {c.base_model for _, _, c, _ in sweep.configurations}
    if len(bases) > 1:
        raise ConfigError("every configuration of a sweep needs the same base_model")
    return sweep


def _describe(values: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def load_model(path: str, device):
    """The base model in its checkpoint's dtype, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind = AutoModelForCausalLM
    if type(AutoConfig.from_pretrained(path)) not in AutoModelForCausalLM._model_mapping:
        from transformers import AutoModelForImageTextToText as kind
    model = kind.from_pretrained(path, dtype="auto").to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


class _InMemory:
    """Applies merge configurations to a loaded model: every tensor of a configuration's plan,
    computed by the merge engine, copied into the parameter or buffer of that name."""

    def __init__(self, model, device):
        self.device = torch.device(device)
        self.targets = {name: t for name, t in model.state_dict(keep_vars=True).items()}
        self.thresholds: dict = {}  # TIES thresholds by (tensor, inputs, densities): reused across weights

    @torch.no_grad()
    def apply(self, config: MergeConfig) -> None:
        plan = build_plan(config)
        try:
            missing = [t.name for t in plan.tasks if t.name not in self.targets]
            if missing:
                raise ConfigError(f"the loaded model has no tensor {missing[0]!r} of the merge")
            for task in plan.tasks:
                target = self.targets[task.name]
                if tuple(target.shape) != tuple(task.shape):
                    raise ConfigError(f"{task.name}: the merge gives {tuple(task.shape)}, the model has "
                                      f"{tuple(target.shape)}")
            largest = max((t.nbytes for t in plan.tasks), default=0)
            runner = _Runner(plan, self.device, _BufferPool(2 * largest), staged(self.device),
                             thresholds=self.thresholds)
            try:
                tasks = plan.tasks
                loads = read_ahead([runner.reads(t) for t in tasks], lambda i: runner.reader(tasks[i]))
                for task, loaded in zip(tasks, loads):
                    result = runner.compute(task, loaded)
                    del loaded
                    self.targets[task.name].data.copy_(result.tensor(task))
                    HostReader.release(result.mapped)
                    if result.buffer is not None:
                        runner.pool.give(result.buffer)
            finally:
                runner.close()
        finally:
            plan.close()


def run_sweep(path: str, out_dir: str, *, device: str = "cpu", resume: bool = False, save_best: str | None = None,
              progress: bool = True) -> list[dict]:
    """Runs a sweep file (module docstring); returns the rows of results.csv."""
    sweep = load_sweep(path)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    rows = _previous_rows(csv_path, sweep) if resume else []
    done = {row["config_id"] for row in rows}
    todo = [c for c in sweep.configurations if c[0] not in done]
    if todo:
        model, tokenizer = load_model(sweep.configurations[0][2].base_model, device)
        memory = _InMemory(model, device)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="vfuse sweep", unit="config", dynamic_ncols=True)
        try:
            for config_id, values, config, _ in todo:
                start = time.perf_counter()
                memory.apply(config)
                if device != "cpu":
                    torch.cuda.synchronize(device)
                merge_s = time.perf_counter() - start
                start = time.perf_counter()
                row = {"config_id": config_id, **{a: _cell(v) for a, v in values.items()}}
                try:
                    row.update(sweep.evaluation.metrics(model, tokenizer))
                    row["error"] = ""
                except Exception as exc:  # noqa: BLE001 - recorded in the row; the sweep goes on
                    row["error"] = f"{type(exc).__name__}: {exc}"
                row.update(merge_s=round(merge_s, 4), eval_s=round(time.perf_counter() - start, 4))
                rows.append(row)
                _write_csv(csv_path, rows, sweep)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    _write_csv(csv_path, rows, sweep)
    best = _best(rows, sweep)
    if best is not None:
        raw = next(r for cid, _, _, r in sweep.configurations if cid == best["config_id"])
        with open(os.path.join(out_dir, "best.yml"), "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
        if save_best:
            merge_checkpoints(os.path.join(out_dir, "best.yml"), save_best, progress=progress)
    _plot(os.path.join(out_dir, "results.png"), rows, sweep)
    return rows


def _metric_names(rows: list[dict], sweep: Sweep) -> list[str]:
    fixed = {"config_id", "merge_s", "eval_s", "error", *sweep.axes}
    names = []
    for row in rows:
        names += [k for k in row if k not in fixed and k not in names]
    return names


def _write_csv(path: str, rows: list[dict], sweep: Sweep) -> None:
    columns = ["config_id", *sweep.axes, *_metric_names(rows, sweep), "merge_s", "eval_s", "error"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _previous_rows(path: str, sweep: Sweep) -> list[dict]:
    """The rows a previous run of the same sweep finished (each checked against this sweep's
    axis values for its config_id)."""
    if not os.path.exists(path):
        return []
    expected = {cid: {a: _cell(v) for a, v in values.items()} for cid, values, _, _ in sweep.configurations}
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            cid = row.get("config_id")
            if cid not in expected or any(row.get(a) != v for a, v in expected[cid].items()):
                raise ConfigError(f"{path}: row {cid!r} was written by another sweep; use another --out")
            for key, value in row.items():
                if key not in expected[cid] and key not in ("config_id", "error") and value != "":
                    row[key] = float(value)
            rows.append({k: v for k, v in row.items() if v != "" or k == "error"})
    return rows


def _best(rows: list[dict], sweep: Sweep) -> dict | None:
    metrics = _metric_names(rows, sweep)
    if not metrics:
        return None
    first = metrics[0]
    scored = [r for r in rows if isinstance(r.get(first), float) and math.isfinite(r[first])]
    if not scored:
        return None
    pick = max if sweep.evaluation.maximize else min
    return pick(scored, key=lambda r: r[first])


def _plot(path: str, rows: list[dict], sweep: Sweep) -> None:
    """Each metric against each axis (categorical axes by value order)."""
    metrics = _metric_names(rows, sweep)
    if not rows or not metrics:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("vfuse sweep: matplotlib is not installed; results.png not written")
        return
    axes = list(sweep.axes)
    fig, grid = plt.subplots(len(metrics), len(axes), figsize=(4 * len(axes), 3 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(axes):
            labels = [_cell(v) for v in sweep.axes[axis]]
            points = [(labels.index(r[axis]), r[metric]) for r in rows
                      if isinstance(r.get(metric), float) and r[axis] in labels]
            ax = grid[i][j]
            ax.scatter([x for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(labels)), [label[:16] for label in labels], rotation=30, fontsize=7)
            ax.set_xlabel(axis, fontsize=8)
            ax.set_ylabel(metric, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
