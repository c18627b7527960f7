"""``vfuse sweep``'s merge step against one ``merge_into_`` pass of the same sources into the
same loaded model: TIES over a Llama-shaped base and two fine-tunes (bf16), the sweep's first
configuration (thresholds computed) and a second one that changes only the weights
(thresholds reused). ``ratio_vs_merge_into`` = sweep apply time / merge_into_ time.

    python -m vfuse_kernels.bench.sweep [--layers 4] [--device cpu|cuda] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from .checkpoint import write_family
from .common import environment, print_table, write_json
from .engine import llama_config, llama_shapes

COLUMNS = ["impl", "median_ms", "GB/s", "ratio_vs_merge_into"]


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(layers: int, device: str, reps: int, hidden: int = 1024, vocab: int = 32000) -> list[dict]:
    from transformers import LlamaForCausalLM

    from ..merging import merge_into_, parse_config
    from ..merging.sweep import _InMemory

    dims = dict(layers=layers, hidden=hidden, intermediate=4 * hidden, heads=16, kv_heads=8, vocab=vocab)
    with tempfile.TemporaryDirectory(prefix="vfuse-bench-sweep-") as root:
        base, tuned = write_family(os.path.join(root, "in"), llama_shapes(**dims), llama_config(**dims), 2)
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
        read_gb = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9

        def config(w0: float, w1: float):
            return parse_config({"merge_method": "ties", "base_model": base, "models": [
                {"model": tuned[0], "parameters": {"weight": w0, "density": 0.5}},
                {"model": tuned[1], "parameters": {"weight": w1, "density": 0.5}}]})

        memory = _InMemory(model, device)
        timings = {"merge_into_ (ties, one pass)": _median_s(
            lambda: merge_into_(model, tuned, [0.6, 0.4], method="ties", density=0.5), reps)}
        start = time.perf_counter()
        memory.apply(config(0.6, 0.4))
        timings["sweep apply, first configuration (thresholds computed)"] = time.perf_counter() - start
        weights = iter([(0.5, 0.5), (0.3, 0.7), (0.7, 0.3), (0.4, 0.6), (0.2, 0.8)])
        timings["sweep apply, weights changed (thresholds reused)"] = _median_s(
            lambda: memory.apply(config(*next(weights))), min(reps, 5))
    base_s = timings["merge_into_ (ties, one pass)"]
    return [{"op": "sweep", "impl": impl, "median_ms": 1e3 * s, "GB/s": read_gb / s, "ratio_vs_merge_into": s / base_s,
             "layers": layers, "device": device} for impl, s in timings.items()]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="write the rows (with device, versions, date, commit) here")
    args = parser.parse_args(argv)
    rows = run(args.layers, args.device, args.reps)
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, environment(torch.device(args.device)), rows)
    return rows


if __name__ == "__main__":
    main()
