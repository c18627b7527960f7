"""Streaming checkpoint merge: bounded memory, overlapped I/O, crash-safe output.

Pipeline: two reader threads fetch the inputs of the next tensors (``os.preadv``, GIL
released) while the main thread merges the current one in place with ``delta_merge``
(C++ on CPU, Triton on CUDA) and a writer thread streams finished tensors into the
output shard being written. At most ``PREFETCH`` tensors' inputs and ``WRITE_QUEUE``
outputs are in memory at once, so peak memory is a few of the largest tensors, not the
model. Shards are written as ``<name>.tmp`` and renamed when complete; the index is
written last, so a failed or killed run never leaves a complete-looking output, and
``resume=True`` keeps the shards a previous run finished (checked by sha256).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import ops
from .checkpoint import INDEX_NAME, ShardWriter, file_sha256, parse_size, plan_shards
from .config import MergeConfig, load_config
from .plan import MergePlan, TensorTask, build_plan

PREFETCH = 2  # tensors whose inputs are read ahead
WRITE_QUEUE = 2  # merged tensors waiting for the writer
STATE_NAME = ".vfuse-merge-state.json"
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")


@dataclass
class MergeSummary:
    out_dir: str
    merged: int
    copied: int
    skipped: int  # tensors in shards kept from a previous run (resume)
    shards: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int

    def line(self) -> str:
        gbps = self.bytes_written / max(self.seconds, 1e-9) / 1e9
        resumed = f", {self.skipped} kept from the previous run" if self.skipped else ""
        return (f"merged {self.merged} tensors, copied {self.copied}{resumed} into {self.shards} shards "
                f"({self.bytes_written / 1e9:.2f} GB) in {self.seconds:.1f} s ({gbps:.2f} GB/s), "
                f"peak RSS {self.peak_rss_bytes / 1e9:.2f} GB -> {self.out_dir}")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Runner:
    """Reads, merges and converts one task's tensors on ``device``."""

    def __init__(self, plan: MergePlan, device: torch.device):
        self.plan = plan
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None

    def read(self, task: TensorTask):
        """Host tensors (pinned for CUDA), then their device copies issued on a side stream."""
        ck = self.plan.checkpoints

        def load(model: str, name: str) -> torch.Tensor:
            info = ck[model].tensors[name]
            buffer = torch.empty(info.shape, dtype=info.dtype, pin_memory=self.cuda)
            return ck[model].read(name, out=buffer)

        if task.copy_from is not None:
            host = [load(*task.copy_from)]
        else:
            host = ([load(*task.base)] if task.base else []) + [load(m, n) for m, n in task.inputs]
        if not self.cuda:
            return host, None
        with torch.cuda.stream(self.copy_stream):
            on_device = [t.to(self.device, non_blocking=True) for t in host]
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return on_device, (ready, host)  # host buffers stay referenced until the copy is done

    def compute(self, task: TensorTask, loaded) -> torch.Tensor:
        tensors, pending = loaded
        if pending is not None:
            torch.cuda.current_stream(self.device).wait_event(pending[0])
        if task.copy_from is not None:
            result = tensors[0].to(task.out_dtype)
        else:
            plan = self.plan
            if task.base is None:
                base, tuned = torch.zeros(task.shape, dtype=task.out_dtype, device=tensors[0].device), tensors
            else:
                base, tuned = tensors[0], tensors[1:]
            out = base if base.dtype == task.out_dtype else torch.empty(task.shape, dtype=task.out_dtype,
                                                                        device=base.device)
            sparse = plan.method in ("ties", "dare_linear", "dare_ties")
            result = ops.delta_merge(
                base, tuned, task.weights, method=plan.method, density=task.densities if sparse else 1.0,
                normalize=plan.normalize, scale=plan.scale, rescale=plan.rescale, seed=task.seed,
                tuned_are_deltas=plan.tuned_are_deltas, out=out)
        if self.cuda:
            return result.to("cpu")
        return result


def _prepare_out_dir(out_dir: str, fingerprint: str, resume: bool) -> dict[str, str]:
    """Creates the folder; returns the shards (name → sha256) a previous run completed and
    that resume may keep. Refuses to overwrite a complete merge."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, INDEX_NAME)):
        raise FileExistsError(f"{out_dir} already holds a complete merge ({INDEX_NAME}); choose another folder")
    for name in os.listdir(out_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    state_path = os.path.join(out_dir, STATE_NAME)
    done: dict[str, str] = {}
    if resume and os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state.get("fingerprint") == fingerprint:
            done = {name: digest for name, digest in state.get("shards", {}).items()
                    if os.path.exists(os.path.join(out_dir, name))
                    and file_sha256(os.path.join(out_dir, name)) == digest}
    if not done:
        for name in os.listdir(out_dir):
            if name.startswith("model-") and name.endswith(".safetensors"):
                os.remove(os.path.join(out_dir, name))
    _write_state(out_dir, fingerprint, done)
    return done


def _write_state(out_dir: str, fingerprint: str, shards: dict[str, str]) -> None:
    tmp = os.path.join(out_dir, STATE_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "shards": shards}, f)
    os.replace(tmp, os.path.join(out_dir, STATE_NAME))


def _finish_out_dir(plan: MergePlan, out_dir: str, layouts, tasks_by_name) -> None:
    """Copies the reference model's config and tokenizer files, then writes the index."""
    source = plan.checkpoints[plan.reference].folder
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name.endswith(COPIED_SUFFIXES) and name != INDEX_NAME:
            shutil.copyfile(path, os.path.join(out_dir, name))
    config_path = os.path.join(out_dir, "config.json")
    out_dtype = plan.config.out_dtype or plan.config.dtype
    if out_dtype and os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
            config[key] = out_dtype
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
    total = sum(tasks_by_name[n].nbytes for layout in layouts for n in layout.names)
    index = {"metadata": {"total_size": total, "merged_by": "vfuse_kernels"},
             "weight_map": {n: layout.filename for layout in layouts for n in layout.names}}
    tmp = os.path.join(out_dir, INDEX_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, INDEX_NAME))
    os.remove(os.path.join(out_dir, STATE_NAME))


def merge_checkpoints(
    config: MergeConfig | str,
    out_dir: str,
    *,
    device: str | torch.device = "cpu",
    out_shard_size: str | int = "5GB",
    resume: bool = False,
    progress: bool = True,
) -> MergeSummary:
    """Merges the checkpoints a config names into sharded safetensors in ``out_dir``.

    >>> merge_checkpoints("ties.yml", "merged/")  # doctest: +SKIP
    """
    start = time.perf_counter()
    config = load_config(config) if isinstance(config, str) else config
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    plan = build_plan(config)
    try:
        layouts = plan_shards([(t.name, t.out_dtype, t.shape) for t in plan.tasks], parse_size(out_shard_size))
        done = _prepare_out_dir(out_dir, plan.fingerprint(), resume)
        return _run(plan, layouts, done, out_dir, device, progress, start)
    finally:
        plan.close()


def _run(plan: MergePlan, layouts, done: dict[str, str], out_dir: str, device, progress: bool, start: float):
    tasks_by_name = {t.name: t for t in plan.tasks}
    todo = [(layout, tasks_by_name[n]) for layout in layouts if layout.filename not in done for n in layout.names]
    skipped = sum(len(layout.names) for layout in layouts if layout.filename in done)
    runner = _Runner(plan, device)
    fingerprint = plan.fingerprint()
    completed = dict(done)
    state = {"writer": None, "written": 0}

    def write(layout, task, tensor):
        writer = state["writer"]
        if writer is None or writer.layout is not layout:
            writer = state["writer"] = ShardWriter(out_dir, layout)
        writer.write(task.name, tensor)
        state["written"] += tensor.numel() * tensor.element_size()
        if writer.complete:
            completed[layout.filename] = writer.finish()
            state["writer"] = None
            _write_state(out_dir, fingerprint, completed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(t.nbytes for _, t in todo), unit="B", unit_scale=True, desc="vfuse merge",
                   dynamic_ncols=True)
    merged = copied = 0
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="vfuse-read") as readers, \
                ThreadPoolExecutor(1, thread_name_prefix="vfuse-write") as writer_pool:
            reads = deque(readers.submit(runner.read, task) for _, task in todo[:PREFETCH])
            writes: deque = deque()
            for i, (layout, task) in enumerate(todo):
                loaded = reads.popleft().result()
                if i + PREFETCH < len(todo):
                    reads.append(readers.submit(runner.read, todo[i + PREFETCH][1]))
                result = runner.compute(task, loaded)
                del loaded
                merged, copied = (merged, copied + 1) if task.copy_from else (merged + 1, copied)
                writes.append(writer_pool.submit(write, layout, task, result))
                while len(writes) > WRITE_QUEUE:
                    writes.popleft().result()
                if bar is not None:
                    bar.update(task.nbytes)
                    bar.set_postfix(tensors=f"{i + 1}/{len(todo)}", refresh=False)
            while writes:
                writes.popleft().result()
    except BaseException:
        if state["writer"] is not None:
            state["writer"].abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    _finish_out_dir(plan, out_dir, layouts, tasks_by_name)
    return MergeSummary(out_dir, merged, copied, skipped, len(layouts), state["written"], time.perf_counter() - start,
                        peak_rss_bytes())
