"""Streaming checkpoint merge: bounded memory, overlapped I/O, crash-safe output.

Pipeline: the inputs of the next tensor are requested ahead (on the CPU:
zero-copy views of the files' pages, populated ahead; on CUDA: ``preadv`` into pinned
buffers and copies on a side stream) — unless the two tensors' inputs together would
exceed the largest single tensor's, so two huge tensors (embeddings, lm_head) are never
in flight at once — while the main thread merges the current tensor
with ``delta_merge`` (C++ on CPU, Triton on CUDA) into a pooled output buffer, and a
writer thread streams finished tensors into the output shard being written. Used input
pages are dropped from the process (MADV_DONTNEED) and at most ``WRITE_QUEUE`` outputs
wait for the writer, so peak memory is a few of the largest tensors, not the model.
Shards are written as ``<name>.tmp`` and renamed when complete; the index is written last,
so a failed or killed run never leaves a complete-looking output, and
``resume=True`` keeps the shards a previous run finished (checked by CRC-32). ``_run`` can
be restricted to some of the shards (each rank of a distributed merge writes its own, with
its own state file), and ``_finish_out_dir`` publishes the folder once all shards exist.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import resource
import shutil
import threading
import time
from collections import deque
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import ops
from .checkpoint import INDEX_NAME, ShardWriter, file_crc32, parse_size, plan_shards
from .config import MergeConfig, load_config
from .plan import MergePlan, TensorTask, build_plan

WRITE_QUEUE = 1  # merged tensors waiting for the writer
STATE_PREFIX = ".vfuse-merge-state"
STATE_NAME = STATE_PREFIX + ".json"
# Linux ≥ 5.14: read the pages in and map them now, on the loading thread, so the merge
# takes no page faults; older kernels fall back to MADV_WILLNEED (read-ahead only).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
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


class _BufferPool:
    """Output buffers reused across tensors of one size: a fresh allocation costs a page
    fault (and a zeroed page) per 4 KiB, more than merging the tensor. Holds at most
    ``max_bytes`` of idle buffers."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._held = 0
        self._lock = threading.Lock()

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = dtype.itemsize * math.prod(shape)
        with self._lock:
            idle = self._idle.get(nbytes)
            raw = idle.pop() if idle else None
            if raw is not None:
                self._held -= nbytes
        if raw is None:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        return raw.view(dtype).view(shape)

    def give(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            if nbytes and self._held + nbytes <= self.max_bytes:
                self._idle.setdefault(nbytes, []).append(tensor.view(-1).view(torch.uint8))
                self._held += nbytes


@dataclass
class _Result:
    tensor: torch.Tensor
    pooled: bool  # return to the pool once written
    mapped: list[tuple[str, str]]  # input views to release once written


class _Runner:
    """Loads, merges and converts one task's tensors on ``device``. On the CPU the inputs
    are views of the files' pages (no copy; read ahead with MADV_WILLNEED, dropped with
    MADV_DONTNEED once used); on CUDA they are read into pinned buffers and copied on a
    side stream."""

    def __init__(self, plan: MergePlan, device: torch.device, pool: _BufferPool):
        self.plan = plan
        self.device = device
        self.pool = pool
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None

    @staticmethod
    def sources(task: TensorTask) -> list[tuple[str, str]]:
        if task.copy_from is not None:
            return [task.copy_from]
        return ([task.base] if task.base else []) + list(task.inputs)

    def load(self, task: TensorTask):
        ck = self.plan.checkpoints
        if not self.cuda:
            for model, name in self.sources(task):
                ck[model].advise(name, MADV_POPULATE_READ)
            return [ck[model].view(name) for model, name in self.sources(task)], None
        host = []
        for model, name in self.sources(task):
            info = ck[model].tensors[name]
            host.append(ck[model].read(name, out=torch.empty(info.shape, dtype=info.dtype, pin_memory=True)))
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            on_device = [t.to(self.device, non_blocking=True) for t in host]
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return on_device, (ready, host)  # host buffers stay referenced until the copy is done

    def input_bytes(self, task: TensorTask) -> int:
        return sum(self.plan.checkpoints[m].tensors[n].nbytes for m, n in self.sources(task))

    def release(self, mapped: list[tuple[str, str]]) -> None:
        for model, name in mapped:
            self.plan.checkpoints[model].advise(name, mmap.MADV_DONTNEED)

    def compute(self, task: TensorTask, loaded) -> _Result:
        tensors, pending = loaded
        if pending is not None:  # the inputs were copied on the side stream
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(pending[0])
            for t in tensors:
                t.record_stream(stream)
        mapped = [] if self.cuda else self.sources(task)
        if task.copy_from is not None:
            if tensors[0].dtype == task.out_dtype:
                result = _Result(tensors[0], False, mapped)  # written straight from the file's pages
            else:
                result = _Result(self._output(task).copy_(tensors[0]), not self.cuda, mapped)
        else:
            plan = self.plan
            if task.base is None:
                base, tuned = torch.zeros(task.shape, dtype=task.out_dtype, device=tensors[0].device), tensors
            else:
                base, tuned = tensors[0], tensors[1:]
            sparse = plan.method in ops.SPARSE_METHODS
            out = ops.delta_merge(
                base, tuned, task.weights, method=plan.method, density=task.densities if sparse else 1.0,
                normalize=plan.normalize, scale=plan.scale, rescale=plan.rescale, seed=task.seed,
                tuned_are_deltas=plan.tuned_are_deltas, out=self._output(task))
            result = _Result(out, not self.cuda, [])
            self.release(mapped)
        if self.cuda:
            result.tensor = result.tensor.to("cpu")
        return result

    def _output(self, task: TensorTask) -> torch.Tensor:
        if self.cuda:
            return torch.empty(task.shape, dtype=task.out_dtype, device=self.device)
        return self.pool.take(task.shape, task.out_dtype)


def rank_state_name(rank: int) -> str:
    """The state file one rank of a distributed merge records its finished shards in."""
    return f"{STATE_PREFIX}.rank{rank}.json"


def _state_files(out_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if n.startswith(STATE_PREFIX) and n.endswith(".json"))


def _prepare_out_dir(out_dir: str, fingerprint: str, resume: bool) -> dict[str, str]:
    """Creates the folder; returns the shards (name → CRC-32) a previous run completed and
    that resume may keep (from its state files: the single-process one and any per-rank
    ones, folded into one). Refuses to overwrite a complete merge."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, INDEX_NAME)):
        raise FileExistsError(f"{out_dir} already holds a complete merge ({INDEX_NAME}); choose another folder")
    for name in os.listdir(out_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    recorded: dict[str, str] = {}
    for name in _state_files(out_dir):
        if resume:
            with open(os.path.join(out_dir, name)) as f:
                state = json.load(f)
            if state.get("fingerprint") == fingerprint:
                recorded.update(state.get("shards", {}))
        os.remove(os.path.join(out_dir, name))
    done = {name: digest for name, digest in recorded.items()
            if os.path.exists(os.path.join(out_dir, name)) and file_crc32(os.path.join(out_dir, name)) == digest}
    if not done:
        for name in os.listdir(out_dir):
            if name.startswith("model-") and name.endswith(".safetensors"):
                os.remove(os.path.join(out_dir, name))
    _write_state(out_dir, fingerprint, done)
    return done


def _write_state(out_dir: str, fingerprint: str, shards: dict[str, str], name: str = STATE_NAME) -> None:
    tmp = os.path.join(out_dir, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "shards": shards}, f)
    os.replace(tmp, os.path.join(out_dir, name))


def _finish_out_dir(plan: MergePlan, out_dir: str, layouts) -> None:
    """Checks that every shard is in place, copies the reference model's config and
    tokenizer files, then writes the index and removes the state files."""
    for layout in layouts:
        path = os.path.join(out_dir, layout.filename)
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size != layout.size:
            found = "is missing" if size is None else f"has {size} bytes, expected {layout.size}"
            raise RuntimeError(f"{out_dir}: shard {layout.filename} {found}; not writing {INDEX_NAME}")
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
    tasks_by_name = {t.name: t for t in plan.tasks}
    total = sum(tasks_by_name[n].nbytes for layout in layouts for n in layout.names)
    index = {"metadata": {"total_size": total, "merged_by": "vfuse_kernels"},
             "weight_map": {n: layout.filename for layout in layouts for n in layout.names}}
    tmp = os.path.join(out_dir, INDEX_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, INDEX_NAME))
    for name in _state_files(out_dir):
        os.remove(os.path.join(out_dir, name))


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
        fingerprint = plan.fingerprint()
        done = _prepare_out_dir(out_dir, fingerprint, resume)
        summary = _run(plan, layouts, fingerprint, done, out_dir, device, progress, start)
        _finish_out_dir(plan, out_dir, layouts)
        return summary
    finally:
        plan.close()


def _run(plan: MergePlan, layouts, fingerprint: str, done: dict[str, str], out_dir: str, device, progress: bool,
         start: float, shards: Collection[str] | None = None, state_name: str = STATE_NAME) -> MergeSummary:
    """Writes the shards of ``layouts`` not in ``done`` (only those named in ``shards``, when
    given), recording each finished one in the state file ``state_name``."""
    tasks_by_name = {t.name: t for t in plan.tasks}
    mine = [layout for layout in layouts if shards is None or layout.filename in shards]
    todo = [(layout, tasks_by_name[n]) for layout in mine if layout.filename not in done for n in layout.names]
    skipped = sum(len(layout.names) for layout in mine if layout.filename in done)
    largest = max((t.nbytes for t in plan.tasks), default=0)
    runner = _Runner(plan, device, _BufferPool(max_bytes=(WRITE_QUEUE + 1) * largest))
    completed = dict(done)
    state = {"writer": None, "written": 0}

    def write(layout, task, result: _Result):
        writer = state["writer"]
        if writer is None or writer.layout is not layout:
            writer = state["writer"] = ShardWriter(out_dir, layout)
        writer.write(task.name, result.tensor)
        state["written"] += result.tensor.numel() * result.tensor.element_size()
        runner.release(result.mapped)
        if result.pooled:
            runner.pool.give(result.tensor)
        if writer.complete:
            completed[layout.filename] = writer.finish()
            state["writer"] = None
            _write_state(out_dir, fingerprint, completed, state_name)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(t.nbytes for _, t in todo), unit="B", unit_scale=True, desc="vfuse merge",
                   dynamic_ncols=True)
    merged = copied = 0
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="vfuse-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="vfuse-write") as writer_pool:
            inputs = [runner.input_bytes(task) for _, task in todo]
            budget = max(inputs, default=0)  # read ahead only within the largest tensor's inputs
            ahead = None  # the next task's load, when it was started early
            writes: deque = deque()
            for i, (layout, task) in enumerate(todo):
                loaded = (ahead or reader.submit(runner.load, task)).result()
                ahead = None
                if i + 1 < len(todo) and inputs[i] + inputs[i + 1] <= budget:
                    ahead = reader.submit(runner.load, todo[i + 1][1])
                result = runner.compute(task, loaded)
                del loaded
                merged, copied = (merged, copied + 1) if task.copy_from else (merged + 1, copied)
                writes.append(writer_pool.submit(write, layout, task, result))
                while len(writes) > WRITE_QUEUE:
                    writes.popleft().result()
                if bar is not None:
                    bar.update(task.nbytes)
                    rate = (i + 1) / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(tensors=f"{i + 1}/{len(todo)}", per_s=f"{rate:.0f}", refresh=False)
            while writes:
                writes.popleft().result()
    except BaseException:
        if state["writer"] is not None:
            state["writer"].abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return MergeSummary(out_dir, merged, copied, skipped, len(mine), state["written"], time.perf_counter() - start,
                        peak_rss_bytes())
