"""The checkpoint-merge engine on the device vs the CPU, and ``merge_into_`` into a model on
the device: the engine part of ``vfuse bench gpu``.

A Llama-shaped bf16 checkpoint family (a base and two fine-tunes, 1 GB shards) is written
once into a temporary folder (the page cache keeps it); then, in this process:

- ``merge_checkpoints`` with ``device`` and with the CPU, on the same YAML (ties,
  task_arithmetic): the median wall time of ``REPS`` runs after one warm-up (the warm-up
  compiles or loads the Triton kernels; its time is the row's ``first_ms``), and a check
  that both devices wrote the same bytes. The write limit, measured in the same run, is a
  ``ShardWriter`` writing the output's bytes from memory (write, CRC-32, fsync): no engine
  can beat it; the stage limit is a ``DeviceReader`` moving the three inputs onto the device.
- ``merge_into_`` of the two fine-tunes into the base model already on ``device``: GB/s of
  the fine-tunes' bytes (read from the page cache), checked equal to the engine's output.

Without a GPU the accelerated side is the engine's staged route with CPU tensors (the same
code, no GPU figure; quick mode in the tests), so every check, row and target name is
produced everywhere.

    python -m vfuse_kernels.bench.engine [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack

import torch

from ..merging.checkpoint import Checkpoint, DeviceReader, ShardWriter, plan_shards
from ..merging.engine import merge_checkpoints
from ..merging.inplace import merge_into_
from .checkpoint import write_config, write_family
from .common import environment, print_table

METHODS = ("ties", "task_arithmetic")
# Llama shapes, ~0.25B parameters (0.5 GB of bf16 per checkpoint): the whole part takes
# ~35 s on an H100 machine with 16 cores, writing the inputs included. quick: ~0.1 MB.
LLAMA = dict(layers=12, hidden=1024, intermediate=4096, heads=16, kv_heads=8, vocab=32000)
TINY = dict(layers=2, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=512)
REPS = 2  # timed runs of each merge (after a warm-up for the engine) and merge_into_ (quick: 1)
TARGETS = {"vfuse merge cuda speedup vs cpu": 1.5, "merge_into_ GB/s": 2.0}
CHECKS = {"merge": "engine: vfuse merge {method} --device cuda == --device cpu (bytes)",
          "into": "engine: merge_into_ {method} on the device == vfuse merge"}


def gpu_suite(device: torch.device, quick: bool) -> dict:
    """{"checks", "rows", "targets"} of the engine part (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="vfuse-bench-engine-") as root:
        return _suite(root, torch.device(device), quick)


def _suite(root: str, device: torch.device, quick: bool) -> dict:
    dims = TINY if quick else LLAMA
    shapes = llama_shapes(**dims)
    begin = time.perf_counter()
    base, tuned = write_family(os.path.join(root, "in"), shapes, llama_config(**dims), 2, device=device)
    write_s = time.perf_counter() - begin
    out_bytes = _tensor_bytes(base)
    read_bytes = sum(_tensor_bytes(path) for path in tuned)
    shape = {"models": 3, "params_M": out_bytes / 2e6, "out_GB": out_bytes / 1e9, "dtype": "bfloat16"}
    fast = "cuda" if device.type == "cuda" else "cpu (staged route)"
    reps = 1 if quick else REPS
    runs = {"cpu": (torch.device("cpu"), False), fast: (device, True)}  # (device, staged route)
    write_limit_s = _write_limit(root, base)
    stage_s = _stage_limit(device, [base, *tuned])
    stage_gbps = (out_bytes + read_bytes) / stage_s / 1e9
    rows = [dict(shape, op="write inputs", impl=f"randn on {device.type}, save_file", median_ms=1e3 * write_s),
            dict(shape, op="write limit", impl="ShardWriter (write, CRC-32, fsync)", median_ms=1e3 * write_limit_s,
                 **{"GB/s": out_bytes / write_limit_s / 1e9}),
            dict(shape, op="stage limit", impl=f"DeviceReader -> {device.type}", median_ms=1e3 * stage_s,
                 **{"GB/s": stage_gbps})]
    checks, speedups, rates = [], [], []
    for method in METHODS:
        config = write_config(root, method, base, tuned)
        merge_s, into_s, outputs, differ = {}, {}, {}, {}
        for label, (run_device, staging) in runs.items():  # the CPU first: its output is the reference
            outputs[label] = os.path.join(root, f"out-{method}-{'staged' if staging else 'cpu'}")
            first, merge_s[label] = _time_merge(config, outputs[label], run_device, staging, reps)
            rows.append(dict(shape, op="vfuse merge", impl=label, method=method, median_ms=1e3 * merge_s[label],
                             first_ms=1e3 * first, runs=reps, **{"GB/s": out_bytes / merge_s[label] / 1e9},
                             pct_of_write_limit=100 * write_limit_s / merge_s[label]))
        speedups.append(merge_s["cpu"] / merge_s[fast])
        rows[-1]["speedup_vs_cpu"] = speedups[-1]
        differ = _differences(outputs["cpu"], outputs[fast])
        checks.append({"name": CHECKS["merge"].format(method=method), "passed": not differ,
                       "detail": f"{fast} vs cpu: " + ("; ".join(differ[:3]) if differ else
                                                       f"{len(os.listdir(outputs['cpu']))} files byte-identical")})
        differ = []
        for label, (run_device, staging) in runs.items():
            into_s[label], wrong = _time_merge_into(method, shapes, base, tuned, outputs[label], run_device, staging,
                                                    reps)
            differ += [f"{label}: {wrong}"] if wrong else []
            rows.append(dict(shape, op="merge_into_", impl=label, method=method, median_ms=1e3 * into_s[label],
                             runs=reps, **{"GB/s": read_bytes / into_s[label] / 1e9}))
        rates.append(read_bytes / into_s[fast] / 1e9)
        rows[-1].update(speedup_vs_cpu=into_s["cpu"] / into_s[fast], pct_of_stage_limit=100 * rates[-1] / stage_gbps)
        checks.append({"name": CHECKS["into"].format(method=method), "passed": not differ,
                       "detail": "; ".join(differ) or f"{fast} and cpu: every merged tensor equal to vfuse merge's"})
        for out in outputs.values():
            shutil.rmtree(out)
    if device.type != "cuda":
        for check in checks:
            check["detail"] += " (no CUDA device: the staged route ran on the CPU; no GPU figure)"
    targets = [_target("vfuse merge cuda speedup vs cpu", min(speedups)), _target("merge_into_ GB/s", min(rates))]
    return {"checks": checks, "rows": [dict(r, suite="engine") for r in rows], "targets": targets}


def _tensor_bytes(path: str) -> int:
    with Checkpoint(path) as ck:
        return sum(info.nbytes for info in ck.tensors.values())


def llama_shapes(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """The tensor shapes of a LlamaForCausalLM (untied head), by name, in state-dict order."""
    kv = hidden // heads * kv_heads
    layer = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
             "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
             "mlp.down_proj.weight": (hidden, intermediate), "input_layernorm.weight": (hidden,),
             "post_attention_layernorm.weight": (hidden,)}
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """Its config.json."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
            "hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


class _Weights(torch.nn.Module):
    """A model holding parameters of ``shapes`` under their names (a module per dot)."""

    def __init__(self, shapes: dict, device: torch.device):
        super().__init__()
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            data = torch.empty(shape, dtype=torch.bfloat16, device=device)
            module.register_parameter(leaf, torch.nn.Parameter(data, requires_grad=False))


def _target(name: str, value: float) -> dict:
    limit = TARGETS[name]
    return {"area": "merge", "name": name, "value": value, "target": f">= {limit:g}", "met": value >= limit}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_merge(config: str, out: str, device, staging: bool, reps: int) -> tuple[float, float]:
    """(first run, median of the next ``reps``) seconds of ``merge_checkpoints``; the last
    run's output stays in ``out``."""
    seconds = []
    for _ in range(1 + reps):
        shutil.rmtree(out, ignore_errors=True)
        begin = time.perf_counter()
        merge_checkpoints(config, out, device=device, progress=False, staging=staging)
        seconds.append(time.perf_counter() - begin)
    return seconds[0], statistics.median(seconds[1:])


def _load(model: torch.nn.Module, path: str) -> None:
    with Checkpoint(path) as ck, torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(ck.read(name))


def _time_merge_into(method: str, shapes: dict, base: str, tuned: list[str], expected: str, device: torch.device,
                     staging: bool, reps: int) -> tuple[float, str | None]:
    """(median seconds of ``reps`` runs of ``merge_into_`` of ``tuned`` into the base model
    freshly loaded on ``device``; the first tensor that differs from the engine's output in
    ``expected`` after the first run, or None)."""
    model = _Weights(shapes, device)
    kwargs = dict(method=method, density=0.5) if method == "ties" else dict(method=method)
    seconds, differ = [], None
    for rep in range(reps):
        _load(model, base)
        _sync(device)
        begin = time.perf_counter()
        merge_into_(model, tuned, 0.5, staging=staging, **kwargs)
        _sync(device)
        seconds.append(time.perf_counter() - begin)
        if rep == 0:
            with Checkpoint(expected) as ck:
                differ = next((f"{name} differs" for name, tensor in model.state_dict().items()
                               if not torch.equal(tensor, ck.read(name).to(tensor.device))), None)
    return statistics.median(seconds), differ


def _write_limit(root: str, like: str) -> float:
    """Seconds a ShardWriter takes to write one shard of ``like``'s tensors from memory."""
    with Checkpoint(like) as ck:
        tensors = [(name, info.dtype, info.shape) for name, info in ck.tensors.items()]
        data = {name: ck.read(name) for name, _, _ in tensors}
    folder = os.path.join(root, "write-limit")
    os.makedirs(folder)
    (layout,) = plan_shards(tensors, 1 << 62)
    begin = time.perf_counter()
    writer = ShardWriter(folder, layout)
    for name in layout.names:
        writer.write(name, data[name])
    writer.finish()
    seconds = time.perf_counter() - begin
    shutil.rmtree(folder)
    return seconds


def _stage_limit(device: torch.device, paths: list[str]) -> float:
    """Seconds a DeviceReader takes to move every tensor of ``paths`` onto ``device``, all
    requested at once."""
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(Checkpoint(p)) for p in paths]
        reader = DeviceReader(device)
        stack.callback(reader.close)
        begin = time.perf_counter()
        loads = [reader.submit([(ck, name)]) for ck in checkpoints for name in ck.tensors]
        for load in loads:
            load.result()
        _sync(device)
        return time.perf_counter() - begin


def _differences(expected: str, got: str) -> list[str]:
    """Files that differ between two output folders (names, then bytes)."""
    a, b = set(os.listdir(expected)), set(os.listdir(got))
    differ = [f"only in one output: {sorted(a ^ b)}"] if a ^ b else []
    for name in sorted(a & b):
        with open(os.path.join(expected, name), "rb") as x, open(os.path.join(got, name), "rb") as y:
            if x.read() != y.read():
                differ.append(f"{name} differs")
    return differ


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model (seconds, on a CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = gpu_suite(device, args.quick)
    env = environment(device)
    print(f"# {env['device']} | torch {env['torch']} | engine part of vfuse bench gpu")
    print_table(result["rows"], ["op", "impl", "method", "median_ms", "first_ms", "GB/s", "speedup_vs_cpu",
                                 "pct_of_write_limit", "pct_of_stage_limit"])
    for check in result["checks"]:
        print(("PASS " if check["passed"] else "FAIL ") + f"{check['name']}: {check['detail']}")
    for target in result["targets"]:
        met = "met" if target["met"] else "NOT met"
        print(f"target {target['name']}: {target['value']:.3g} ({target['target']}) {met}")
    return result


if __name__ == "__main__":
    main()
