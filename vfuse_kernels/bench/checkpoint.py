"""Whole-checkpoint merge: ``vfuse merge`` vs ``mergekit-yaml`` on the same synthetic
checkpoints and YAML, in one run: wall time and peak RSS of each command.

Checkpoints are Qwen2-shaped (a ~0.5B configuration by default: hidden 896, 24 layers,
vocab 151936), written as sharded bf16 safetensors: a base and fine-tunes made by small
seeded perturbations. Each command runs in its own process; peak RSS is that process's.
Floor rows per size: ``python -c 'import torch'`` and ``python -c 'import numpy'`` as processes,
and writing the output's bytes from memory as ``vfuse merge`` writes them; each ``vfuse merge``
row carries the start-up its method needs (torch's, or numpy's for the methods that merge
without torch: ``merging/native.py``) plus the write.

    python -m vfuse_kernels.bench.checkpoint                       # 0.5B × 3, ties + task_arithmetic
    python -m vfuse_kernels.bench.checkpoint --layers 12 24        # RSS as the model grows
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from ..merging.native import NATIVE_METHODS
from .common import environment, print_table, write_json  # noqa: E402

WRITE_FLOOR = "write the output's bytes (direct I/O, fsync)"
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=False)
HEADERS = {  # method → (YAML without models, the model line for a fine-tune; {t}: its path, {w}: 1/N)
    "ties": ("merge_method: ties\nbase_model: {base}\nparameters: {{normalize: true}}\n",
             "  - {{model: {t}, parameters: {{weight: {w:.4f}, density: 0.5}}}}"),
    "task_arithmetic": ("merge_method: task_arithmetic\nbase_model: {base}\n", "  - {{model: {t}, parameters: {{weight: 0.5}}}}"),
    "dare_ties": ("merge_method: dare_ties\nbase_model: {base}\n",
                  "  - {{model: {t}, parameters: {{weight: {w:.4f}, density: 0.5}}}}"),
    "breadcrumbs_ties": ("merge_method: breadcrumbs_ties\nbase_model: {base}\n",
                         "  - {{model: {t}, parameters: {{weight: {w:.4f}, density: 0.5, gamma: 0.01}}}}"),
    "breadcrumbs": ("merge_method: breadcrumbs\nbase_model: {base}\n",
                    "  - {{model: {t}, parameters: {{weight: {w:.4f}, density: 0.5, gamma: 0.01}}}}"),
    "della": ("merge_method: della\nbase_model: {base}\n",
              "  - {{model: {t}, parameters: {{weight: {w:.4f}, density: 0.5, epsilon: 0.1}}}}"),
    "della_linear": ("merge_method: della_linear\nbase_model: {base}\n",
                     "  - {{model: {t}, parameters: {{weight: {w:.4f}, density: 0.5, epsilon: 0.1}}}}"),
    "sce": ("merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.5}}\n", "  - {{model: {t}}}"),
    "model_stock": ("merge_method: model_stock\nbase_model: {base}\n", "  - {{model: {t}}}"),
    "slerp": ("merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.4}}\n", "  - {{model: {t}}}"),
    "nuslerp": ("merge_method: nuslerp\nbase_model: {base}\n", "  - {{model: {t}, parameters: {{weight: {w:.4f}}}}}"),
    "multislerp": ("merge_method: multislerp\nbase_model: {base}\n",
                   "  - {{model: {t}, parameters: {{weight: {w:.4f}}}}}"),
    "nearswap": ("merge_method: nearswap\nbase_model: {base}\nparameters: {{t: 0.001}}\n", "  - {{model: {t}}}"),
    "karcher": ("merge_method: karcher\n", "  - {{model: {t}}}"),
    "arcee_fusion": ("merge_method: arcee_fusion\nbase_model: {base}\n", "  - {{model: {t}}}"),
    "ram": ("merge_method: ram\nbase_model: {base}\n", "  - {{model: {t}}}"),
    "ramplus_tl": ("merge_method: ramplus_tl\nbase_model: {base}\n", "  - {{model: {t}}}"),
}
CONFIGS = list(HEADERS)
PAIR_METHODS = ("slerp", "nearswap", "arcee_fusion")  # the base and exactly one other model
BASE_LISTED = (*PAIR_METHODS, "karcher")  # the base is one of the models in the list
def write_checkpoints(root: str, layers: int, tuned: int, shard_bytes: int = 1 << 30) -> tuple[str, list[str]]:
    """A Qwen2-shaped base (``QWEN2_05B`` with ``layers`` layers) and ``tuned`` fine-tunes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(num_hidden_layers=layers, architectures=["Qwen2ForCausalLM"], **QWEN2_05B)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(config).state_dict().items()}
    return write_family(root, shapes, json.loads(config.to_json_string()), tuned, shard_bytes)


def write_family(root: str, shapes: dict[str, tuple[int, ...]], config: dict, tuned: int, shard_bytes: int = 1 << 30,
                 device: str | torch.device = "cpu") -> tuple[str, list[str]]:
    """A base with tensors of ``shapes`` and ``tuned`` fine-tunes (the base plus small seeded
    noise), bf16, in shards of about ``shard_bytes``, with ``config`` as config.json; written
    tensor by tensor (never a whole model in memory). The random numbers are drawn on
    ``device`` (a GPU draws them ~100× faster than a CPU core)."""
    from safetensors.torch import save_file

    device = torch.device(device)
    paths = [os.path.join(root, name) for name in ["base"] + [f"ft{i}" for i in range(tuned)]]
    for model_index, path in enumerate(paths):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        shard, used, count, weight_map = {}, 0, 0, {}

        def flush():
            nonlocal shard, used, count
            if shard:
                count += 1
                name = f"model-{count:05d}.safetensors"
                save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
                shard, used = {}, 0

        for i, (name, shape) in enumerate(shapes.items()):
            gen = torch.Generator(device).manual_seed(i)
            tensor = torch.randn(shape, generator=gen, device=device) * 0.02
            if model_index:
                noise = torch.Generator(device).manual_seed(1000 * model_index + i)
                tensor += 0.002 * torch.randn(shape, generator=noise, device=device)
            shard[name] = tensor.to(torch.bfloat16).cpu()
            used += shard[name].numel() * 2
            if used >= shard_bytes:
                flush()
        flush()
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return paths[0], paths[1:]


def write_config(root: str, method: str, base: str, tuned: list[str]) -> str:
    """The ``HEADERS[method]`` YAML for these checkpoints in bf16 (PAIR_METHODS: the base and the
    first fine-tune; the others: the base and every fine-tune, equal weights)."""
    header, line = HEADERS[method]
    models = tuned[:1] if method in PAIR_METHODS else tuned
    body = "\n".join(line.format(t=t, w=1 / len(models)) for t in models)
    if method in BASE_LISTED:
        body = f"  - {{model: {base}}}\n" + body
    path = os.path.join(root, f"{method}.yml")
    with open(path, "w") as f:
        f.write(header.format(base=base) + "models:\n" + body + "\ndtype: bfloat16\n")
    return path


MEASURE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
           "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, "
           "'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")


def measure(command: list[str]) -> dict:
    """Wall time and peak RSS of one process. The dirty pages of earlier writes (the checkpoints,
    the previous tool's output) reach the disk first, so that no run pays for another's writeback."""
    os.sync()
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result['rc']}")
    return result


def write_seconds(folder: str, nbytes: int) -> float:
    """Seconds to write ``nbytes`` from memory into a new file as ``vfuse merge`` writes a shard
    (``OutputFile``: direct I/O where the file system takes it, then fsync): the disk's share of
    the floor."""
    from ..merging.output import OutputFile

    chunk = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = memoryview(chunk.numpy())
    path = os.path.join(folder, "write-floor.tmp")
    os.sync()
    start = time.perf_counter()
    out = OutputFile(path)
    for offset in range(0, nbytes, len(raw)):
        out.write(raw[:min(len(raw), nbytes - offset)])
    out.finish()
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[24], help="decoder layers (24: ~0.5B params)")
    parser.add_argument("--tuned", type=int, default=2, help="fine-tunes besides the base")
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"], choices=CONFIGS)
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--workdir", help="where checkpoints go (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="write rows (with device, versions, date, commit) here")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vfuse-bench-")
    vfuse = shutil.which("vfuse") or sys.executable
    rows = []
    try:
        for layers in args.layers:
            root = os.path.join(workdir, f"L{layers}")
            base, tuned = write_checkpoints(root, layers, args.tuned)
            size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
            # the floor of a merge process: start-up (with torch, or without), and writing the output's bytes
            floor = {f"python -c 'import {module}'": measure([sys.executable, "-c", f"import {module}"])["seconds"]
                     for module in ("torch", "numpy")}
            floor[WRITE_FLOOR] = write_seconds(root, size)
            rows += [{"op": "floor", "method": "-", "tool": tool, "layers": layers, "checkpoint_GB": size / 1e9,
                      "seconds": seconds} for tool, seconds in floor.items()]
            for method in args.methods:
                config = write_config(root, method, base, tuned)
                tools = {"vfuse merge": ([vfuse] if vfuse != sys.executable else [vfuse, "-m", "vfuse_kernels.cli"])
                         + ["merge", config, os.path.join(root, f"vfuse-{method}"), "--quiet"]}
                mergekit = shutil.which("mergekit-yaml") or shutil.which("mergekit-yaml", path=os.path.dirname(
                    sys.executable))  # the environment's own, when its bin/ is not on PATH
                if not args.no_mergekit and mergekit:
                    tools["mergekit-yaml"] = [mergekit, config, os.path.join(root, f"mergekit-{method}"),
                                              "--no-write-model-card", "--no-copy-tokenizer"]
                results = {tool: measure(cmd) for tool, cmd in tools.items()}
                for tool, r in results.items():
                    row = {"op": "merge_checkpoint", "method": method, "tool": tool, "layers": layers,
                           "models": 1 + len(tuned), "checkpoint_GB": size / 1e9, "seconds": r["seconds"],
                           "peak_rss_GB": r["peak_rss_bytes"] / 1e9}
                    if tool == "vfuse merge":
                        start_up = "numpy" if method in NATIVE_METHODS else "torch"
                        row["floor_seconds"] = floor[f"python -c 'import {start_up}'"] + floor[WRITE_FLOOR]
                    if tool == "vfuse merge" and "mergekit-yaml" in results:
                        row["speedup_vs_mergekit"] = results["mergekit-yaml"]["seconds"] / r["seconds"]
                        row["rss_ratio_vs_mergekit"] = r["peak_rss_bytes"] / results["mergekit-yaml"]["peak_rss_bytes"]
                    rows.append(row)
                for tool in tools:
                    shutil.rmtree(os.path.join(root, ("vfuse-" if tool == "vfuse merge" else "mergekit-") + method),
                                  ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    env = environment(torch.device("cpu"))
    print(f"# {env['device']} | torch {env['torch']} | {args.tuned + 1} bf16 checkpoints per merge")
    print_table(rows, ["method", "tool", "layers", "checkpoint_GB", "seconds", "floor_seconds", "peak_rss_GB",
                       "speedup_vs_mergekit", "rss_ratio_vs_mergekit"])
    if args.json:
        write_json(args.json, env, rows)
    return rows


if __name__ == "__main__":
    main()
