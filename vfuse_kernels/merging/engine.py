"""Streaming checkpoint merge: bounded memory, overlapped I/O, crash-safe output.

Pipeline: the inputs of the next tensors are requested ahead, as long as the inputs in
flight stay within the largest single tensor's (so two huge tensors, embeddings and
lm_head, are never in flight at once), while the main thread merges the current tensor
with ``delta_merge`` (C++ on CPU, Triton on CUDA) and a writer thread streams finished
tensors into the output shard being written. On the host an output is computed only once the
outputs still waiting for the writer leave room for it within ``WRITE_AHEAD_BYTES`` (a larger
one waits until none is left; its buffer then comes back from the pool); a large output of a
merge whose last pass goes element by element is merged and written in parts of ``PART_BYTES``.
So peak memory is the largest tensor's inputs plus about one output, not the model; and the
writer, fed several outputs ahead, keeps writing while a TIES selection runs. On a device, at
most ``WRITE_QUEUE`` outputs wait for the writer.

- CPU: the inputs are zero-copy views of the files' pages, populated ahead by a reader
  thread and dropped from the process (MADV_DONTNEED) once used; outputs come from a pool.
- CUDA (any accelerator): a ``DeviceReader`` reads the inputs through a ring of pinned
  buffers and copies them on its own stream; the merge waits on that load's event on the
  main stream; the writer copies each output off the device in chunks into a second ring
  of pinned buffers on a third stream and writes a chunk once its copy's event completes,
  so the reads, copies, kernels and file writes of successive tensors overlap. No
  device-wide synchronisation: the host waits only on the event of a staging buffer's
  last copy before reusing it. Copied (unmerged) tensors go from the files' pages straight
  to the output, as on the CPU.

One merge at a time writes into a folder (``OutLock``). Shards are written as
``<name>.tmp`` and renamed when complete; the index is written last,
so a failed or killed run never leaves a complete-looking output, and ``resume=True`` keeps
the shards a previous run finished (checked by CRC-32; a run's last shard is followed only
by publishing the folder, so it gets no CRC and a resume rewrites it). ``_run`` can be
restricted to some of the shards (each rank of a distributed merge writes its own, with its
own state file), and ``_finish_out_dir`` publishes the folder once all shards exist.
"""
from __future__ import annotations

import errno
import gc
import importlib
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass

import numpy

from .checkpoint import (BIN_INDEX_NAME, INDEX_NAME, CheckpointError, DeviceReader, HostReader, ShardWriter, as_tensor,
                         file_crc32, host_buffers, itemsize, parse_size, plan_shards, read_ahead, staged,
                         staging_bytes, torch_dtype)
from .config import MergeConfig, load_config
from .lock import OutLock
from .native import kernel_takes, native_merge, range_merger
from .output import ALIGN, address
from .plan import MergePlan, TensorTask, build_plan

WRITE_QUEUE = 1  # staged route: merged tensors waiting for the writer (their device memory)
WRITE_AHEAD_BYTES = 64 << 20  # host route: output bytes that may wait for the writer
# host merges whose last pass goes element by element (native.range_merger) and whose output is larger than
# this are merged and written in parts of this size (a multiple of 4 · the extension's MERGE_ALIGN)
PART_BYTES = 16 << 20
WRITE_SLOTS = 4  # pinned buffers the writer copies device outputs into
STATE_PREFIX = ".vfuse-merge-state"
STATE_NAME = STATE_PREFIX + ".json"
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")


class Interrupted(KeyboardInterrupt):
    """A signal (``signum``: SIGINT, SIGTERM) stopped the merge; ``vfuse merge`` raises it
    from its handlers."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class MergeStopped(Exception):
    """A merge stopped part-way by a fault (ENOSPC, EIO, an input that became unreadable) or
    a signal (``signum``, else None): the partial shard is removed, the finished ones are
    kept for ``resume``, no index is written. The message is one line."""

    def __init__(self, cause: BaseException, finished: int, total: int):
        self.signum = getattr(cause, "signum", signal.SIGINT) if isinstance(cause, KeyboardInterrupt) else None
        what = "interrupted" if self.signum else describe_error(cause)
        super().__init__(f"{what}: {finished} of {total} shards finished; rerun with --resume")


def describe_error(exc: BaseException) -> str:
    """One line: 'FILE: cause' for an OSError from the system, else the message."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.2f} MB"


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
    """Output buffers (uint8 arrays) reused across tensors of one size: a fresh allocation
    costs a page fault (and a zeroed page) per 4 KiB, more than merging the tensor. Holds at
    most ``max_bytes`` of idle buffers. A buffer taken for file offset ``offset`` starts at
    an address equal to it modulo ``ALIGN``, so that direct I/O writes it from where it is
    (``merging/output.py``)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._idle: dict[int, list[numpy.ndarray]] = {}
        self._held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, offset: int = 0) -> numpy.ndarray:
        with self._lock:
            idle = self._idle.get(nbytes)
            raw = idle.pop() if idle else None
            if raw is not None:
                self._held -= nbytes
        if raw is None:
            raw = numpy.empty(nbytes + ALIGN, dtype=numpy.uint8)
        start = (offset - address(raw)) % ALIGN
        return raw[start:start + nbytes]

    def give(self, buffer: numpy.ndarray) -> None:
        """Returns a buffer ``take`` gave."""
        nbytes = buffer.nbytes
        with self._lock:
            if nbytes and self._held + nbytes <= self.max_bytes:
                self._idle.setdefault(nbytes, []).append(buffer.base)
                self._held += nbytes


@dataclass
class _Result:
    data: object  # what to write: a host uint8 array (the output's bytes) or a torch tensor
    buffer: numpy.ndarray | None  # the pool buffer under it, returned to the pool once written
    mapped: list[tuple]  # (checkpoint, name) of input views to release once written
    staged: bool = False  # on the device: copied off through the writer's staging buffers
    ready: object = None  # staged on CUDA: a torch.cuda.Event recorded after the merge
    first: bool = True  # starts the task's output (a part of it: ``_Runner.parts``)
    last: bool = True  # ends it

    def tensor(self, task: TensorTask):
        """The result as a torch tensor of the task's dtype and shape (a view: no copy)."""
        return as_tensor(self.data, task.out_dtype, task.shape) if isinstance(self.data, numpy.ndarray) else self.data


class _Runner:
    """Loads, merges and converts one task's tensors on ``device``. Host route (the CPU,
    and copied tensors on any device): the inputs are views of the files' pages (a
    ``HostReader``; dropped from the process once used). Staged route (merges on an
    accelerator, or on the CPU when forced, to test it): the inputs come from a
    ``DeviceReader`` and the merge runs on the current stream once their copies landed."""

    def __init__(self, plan: MergePlan, device, pool: _BufferPool, staged: bool, thresholds: dict | None = None):
        self.plan = plan
        self.pool = pool
        self.staged = staged
        self.thresholds = thresholds  # given: TIES thresholds kept by (tensor, inputs, densities) and reused
        self.host_reader = HostReader()
        self.device_reader = None
        if staged:
            largest = max((ck.tensors[name].nbytes for task in plan.tasks for ck, name in self.reads(task)), default=1)
            self.device_reader = DeviceReader(_torch_device(device), slot_bytes=staging_bytes(largest))

    def reads(self, task: TensorTask) -> list[tuple]:
        """(checkpoint, tensor name) of the task's inputs: the copied tensor, or base then tuned."""
        if task.copy_from is not None:
            sources = [task.copy_from]
        elif task.method_inputs is not None:
            sources = task.method_inputs
        else:
            sources = ([task.base] if task.base else []) + task.inputs
        return [(self.plan.checkpoints[model], name) for model, name in sources]

    def infos(self, task: TensorTask) -> list:
        """The records (``TensorInfo``) of the task's inputs, in ``reads`` order."""
        return [ck.tensors[name] for ck, name in self.reads(task)]

    def needs_torch(self, tasks: list[TensorTask]) -> bool:
        """Whether any of ``tasks`` runs through torch (``compute``): all but copies and the
        merges ``kernel_takes`` on the host."""
        for task in tasks:
            infos = self.infos(task)
            if task.copy_from is not None:
                if infos[0].dtype != task.out_dtype:
                    return True
            elif not self.on_host(task) or not self.native(task, infos):
                return True
        return False

    def native(self, task: TensorTask, infos: list) -> bool:
        """Whether ``native_merge`` may take ``task`` on the host: ``kernel_takes`` it, and it is not
        a TIES merge whose thresholds this merger keeps for reuse (a sweep's: torch tensors)."""
        return kernel_takes(self.plan, task, infos) and not (self.thresholds is not None and self.plan.method == "ties")

    def on_host(self, task: TensorTask) -> bool:
        return not self.staged or task.copy_from is not None

    def reader(self, task: TensorTask):
        return self.host_reader if self.on_host(task) else self.device_reader

    def compute(self, task: TensorTask, loaded: list, offset: int = 0) -> _Result:
        """Merges (or copies) one task. ``loaded``: its inputs, as ``reader(task)`` gives them
        (host: uint8 arrays over the files' pages; staged: torch tensors on the device).
        ``offset``: where the output goes in its file (host outputs line up with it, for direct I/O)."""
        host = self.on_host(task)
        mapped = self.reads(task) if host else []
        infos = self.infos(task)
        if task.copy_from is not None:
            if infos[0].dtype == task.out_dtype:
                return _Result(loaded[0], None, mapped)  # written straight from the file's pages
            buffer = self.pool.take(task.nbytes, offset)
            as_tensor(buffer, task.out_dtype, task.shape).copy_(as_tensor(loaded[0], infos[0].dtype, infos[0].shape))
            return _Result(buffer, buffer, mapped)
        # host outputs (and the staged route's with CPU tensors: tests, benchmarks) in a pool buffer
        buffer = self.pool.take(task.nbytes, offset) if host or loaded[0].device.type == "cpu" else None
        if host:
            if self.native(task, infos) and native_merge(self.plan, task, infos, loaded, buffer):
                HostReader.release(mapped)
                return _Result(buffer, buffer, [])
            load_torch()  # (a no-op unless a native merge handed its task over)
            loaded = [as_tensor(raw, info.dtype, info.shape) for raw, info in zip(loaded, infos)]
        if buffer is not None:
            out = as_tensor(buffer, task.out_dtype, task.shape)
        else:
            import torch

            out = torch.empty(task.shape, dtype=torch_dtype(task.out_dtype), device=loaded[0].device)
        self._merge(task, loaded, out)
        HostReader.release(mapped)
        if host:
            return _Result(buffer, buffer, [])
        merged = None
        if buffer is None:
            import torch

            merged = torch.cuda.Event()
            merged.record(torch.cuda.current_stream(out.device))
        return _Result(out, buffer, [], staged=True, ready=merged)

    def parts(self, task: TensorTask, loaded: list, offset: int, make_room) -> Iterator[_Result]:
        """``compute``'s result, once ``make_room(bytes)`` has returned (it waits for outputs
        in flight to leave room for one of that size). A host merge whose last pass goes
        element by element (``range_merger``) with an output over ``PART_BYTES`` comes in
        parts instead, each merged into a pool buffer of that size: the writer streams a part
        while the next one merges, and the output never exists whole. Its fresh pages were
        the largest cost of such a merge on the 2-vCPU dev VM (first touch, 0.04–0.66 s for
        272 MB, at random)."""
        infos = self.infos(task)
        merge = None
        if task.nbytes > PART_BYTES and task.copy_from is None and self.on_host(task) and self.native(task, infos):
            merge = range_merger(self.plan, task, infos, loaded)
        if merge is None:
            make_room(task.nbytes)
            yield self.compute(task, loaded, offset)
            return
        size = itemsize(task.out_dtype)
        numel, step = task.nbytes // size, PART_BYTES // size
        for first in range(0, numel, step):
            count = min(step, numel - first)
            make_room(PART_BYTES)
            buffer = self.pool.take(PART_BYTES, offset + first * size)
            merge(address(buffer), first, count)
            last = first + count == numel
            if last:
                HostReader.release(self.reads(task))
            yield _Result(buffer[:count * size], buffer, [], first=first == 0, last=last)

    def _merge(self, task: TensorTask, loaded: list, out) -> None:
        """The torch route of a merge: ``loaded`` and ``out`` are torch tensors."""
        import torch

        from .. import ops
        from .methods import METHODS, TensorInputs

        plan = self.plan
        if task.method_inputs is not None:
            result = METHODS[plan.config.method].merge(TensorInputs(
                task.name, list(loaded), task.base_index, task.params, task.shared, task.seed, out))
            if result is not out:
                out.copy_(result)
            return
        if task.base is None:
            base, tuned = torch.zeros(task.shape, dtype=out.dtype, device=out.device), loaded
        else:
            base, tuned = loaded[0], loaded[1:]
        sparse = plan.method in ops.SPARSE_METHODS
        thresholds = None
        if self.thresholds is not None and plan.method == "ties":
            key = (task.name, task.base, tuple(task.inputs), tuple(task.densities))
            if key not in self.thresholds:
                self.thresholds[key] = ops.ties_thresholds(base, tuned, task.densities)
            thresholds = self.thresholds[key]
        ops.delta_merge(
            base, tuned, task.weights, method=plan.method, density=task.densities if sparse else 1.0,
            normalize=plan.normalize, scale=plan.scale, rescale=plan.rescale, seed=task.seed,
            tuned_are_deltas=plan.tuned_are_deltas, out=out, thresholds=thresholds)

    def close(self) -> None:
        self.host_reader.close()
        if self.device_reader is not None:
            self.device_reader.close()


class _DeviceToFile:
    """The writer's side of the staged route: copies each merged tensor off the device in
    chunks into ``slots`` pinned buffers (allocated once) on its own stream, after
    the merge's event, and writes a chunk into its shard once the event recorded after its
    copy completes — a buffer is refilled only after its chunk was written, and the file
    write of one chunk overlaps the copies of the next ones, across tensors. A chunk lands
    at an address in line with its file offset (for direct I/O). With CPU tensors the
    copies are synchronous."""

    def __init__(self, device, slot_bytes: int, slots: int = WRITE_SLOTS):
        import torch

        device = _torch_device(device)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slot_bytes = slot_bytes
        self._free = host_buffers(slots, slot_bytes + ALIGN, device)
        self._pending: deque = deque()  # (shard writer, buffer, chunk of it, event), in file order

    def put(self, writer: ShardWriter, name: str, tensor, ready) -> None:
        import torch

        offset = writer.start(name)
        if ready is not None:
            self.stream.wait_event(ready)
        raw = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor
        for start in range(0, raw.numel(), self.slot_bytes):
            if not self._free:
                self._write_oldest()
            slot = self._free.pop()
            n = min(self.slot_bytes, raw.numel() - start)
            shift = (offset + start - slot.data_ptr()) % ALIGN
            buffer = slot[shift:shift + n]
            copied = None
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    buffer.copy_(raw[start:start + n], non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            else:
                buffer.copy_(raw[start:start + n])
            self._pending.append((writer, slot, buffer, copied))
        if self.cuda:
            tensor.record_stream(self.stream)  # its memory is reused only after these copies

    def _write_oldest(self) -> None:
        writer, slot, buffer, copied = self._pending.popleft()
        if copied is not None:
            copied.synchronize()
        writer.append(memoryview(buffer.numpy()))
        self._free.append(slot)

    def flush(self) -> None:
        """Writes every chunk copied so far."""
        while self._pending:
            self._write_oldest()


# set by the console script, which ends the process without freeing anything after a merge
FREEZE_TORCH = False


def load_torch() -> None:
    """Imports torch (and the ops) when a merge needs them; with ``FREEZE_TORCH``, with the cyclic
    garbage collector off, then frozen for it: importing torch ran ~380 collections (0.12 s on
    a 2-vCPU Xeon) that freed nothing, and each full collection during the merge walked torch's
    ~170k objects (85 ms)."""
    if "vfuse_kernels.ops" in sys.modules:
        return
    if FREEZE_TORCH:
        gc.disable()
    try:
        importlib.import_module("..ops", __package__)
    finally:
        if FREEZE_TORCH:
            gc.freeze()
            gc.enable()


def _device(device):
    """``device`` (a name or a torch device): "cpu" for the CPU (no torch needed), else a
    torch device, checked to exist."""
    if str(device) == "cpu":
        return "cpu"
    import torch

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    return device


def _torch_device(device):
    import torch

    return torch.device(device)


def _current_device(device):
    """Makes a CUDA ``device`` the current one (else nothing)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.device(device)
    return nullcontext()


def rank_state_name(rank: int) -> str:
    """The state file one rank of a distributed merge records its finished shards in."""
    return f"{STATE_PREFIX}.rank{rank}.json"


def _state_files(out_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if n.startswith(STATE_PREFIX) and n.endswith(".json"))


def _prepare_out_dir(out_dir: str, plan: MergePlan, layouts, fingerprint: str, resume: bool) -> dict[str, str]:
    """Returns the shards (name → CRC-32) a previous run completed and that resume may keep
    (from its state files: the single-process one and any per-rank ones, folded into one),
    removes everything else a previous run left and records them in a fresh state file.
    Refuses, before changing anything, to overwrite a complete merge and a merge that does
    not fit (``check_space``). The caller holds the folder's ``OutLock``."""
    if os.path.exists(os.path.join(out_dir, INDEX_NAME)):
        raise FileExistsError(f"{out_dir} already holds a complete merge ({INDEX_NAME}); choose another folder")
    recorded: dict[str, str] = {}
    for name in _state_files(out_dir) if resume else []:
        with open(os.path.join(out_dir, name)) as f:
            state = json.load(f)
        if state.get("fingerprint") == fingerprint:
            recorded.update(state.get("shards", {}))
    done = {name: digest for name, digest in recorded.items()
            if os.path.exists(os.path.join(out_dir, name)) and file_crc32(os.path.join(out_dir, name)) == digest}
    stale = [name for name in os.listdir(out_dir) if name.endswith(".tmp")
             or (name.startswith("model-") and name.endswith(".safetensors") and name not in done)]
    check_space(out_dir, plan, layouts, done, freed=sum(os.path.getsize(os.path.join(out_dir, n)) for n in stale))
    for name in stale + _state_files(out_dir):
        os.remove(os.path.join(out_dir, name))
    _write_state(out_dir, fingerprint, done)
    return done


def check_space(out_dir: str, plan: MergePlan, layouts, done: Collection[str], freed: int = 0) -> None:
    """Refuses a merge whose shards still to write and the config files copied beside them
    exceed the free space of ``out_dir``'s filesystem (plus ``freed``: bytes about to be
    removed)."""
    source = plan.checkpoints[plan.reference].folder
    needed = sum(layout.size for layout in layouts if layout.filename not in done)
    needed += sum(os.path.getsize(os.path.join(source, n)) for n in _copied_files(source))
    stat = os.statvfs(out_dir)
    free = stat.f_bavail * stat.f_frsize + freed
    if needed > free:
        raise OSError(errno.ENOSPC, f"the merge needs {_size(needed)} there, {_size(free)} free", out_dir)


@contextmanager
def stopped_cleanly(out_dir: str, layouts):
    """Turns a fault (an OSError, an unreadable input) or a signal into ``MergeStopped``,
    counting the shards finished in ``out_dir``."""
    try:
        yield
    except (OSError, CheckpointError, KeyboardInterrupt) as exc:
        finished = sum(os.path.exists(os.path.join(out_dir, layout.filename)) for layout in layouts)
        raise MergeStopped(exc, finished, len(layouts)) from exc


def _write_json(path: str, value, **options) -> None:
    """Writes ``value`` to ``path`` through a temporary renamed into place, removed if the
    write fails (the error then names ``path``)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, **options)
        os.replace(tmp, path)
    except OSError as exc:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise OSError(exc.errno, exc.strerror, path) from exc


def _write_state(out_dir: str, fingerprint: str, shards: dict[str, str], name: str = STATE_NAME) -> None:
    _write_json(os.path.join(out_dir, name), {"fingerprint": fingerprint, "shards": shards})


def _copied_files(source: str) -> list[str]:
    """The reference model's config and tokenizer files, copied into the output."""
    return [name for name in os.listdir(source) if os.path.isfile(os.path.join(source, name))
            and name.endswith(COPIED_SUFFIXES) and name not in (INDEX_NAME, BIN_INDEX_NAME)]


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
    for name in _copied_files(source):
        shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    config_path = os.path.join(out_dir, "config.json")
    out_dtype = plan.config.out_dtype or plan.config.dtype
    if (out_dtype or plan.layers_out is not None) and os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        if out_dtype:
            for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
                config[key] = out_dtype
        if plan.layers_out is not None:  # slices: the stacked layers' count, where the config keeps it
            section = config if "num_hidden_layers" in config else config.get("text_config", config)
            section["num_hidden_layers"] = plan.layers_out
            kinds = section.get("layer_types")
            if isinstance(kinds, list) and kinds and len(set(kinds)) == 1:  # one kind for every layer
                section["layer_types"] = kinds[:1] * plan.layers_out
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
    tasks_by_name = {t.name: t for t in plan.tasks}
    total = sum(tasks_by_name[n].nbytes for layout in layouts for n in layout.names)
    index = {"metadata": {"total_size": total, "merged_by": "vfuse_kernels"},
             "weight_map": {n: layout.filename for layout in layouts for n in layout.names}}
    _write_json(os.path.join(out_dir, INDEX_NAME), index, indent=2)
    for name in _state_files(out_dir):
        os.remove(os.path.join(out_dir, name))


def merge_checkpoints(
    config: MergeConfig | str,
    out_dir: str,
    *,
    device="cpu",
    out_shard_size: str | int = "5GB",
    resume: bool = False,
    progress: bool = True,
    staging: bool | None = None,
) -> MergeSummary:
    """Merges the checkpoints a config names into sharded safetensors in ``out_dir``.
    ``staging``: move merged tensors through pinned staging buffers and device streams
    (default: on any device but the CPU); ``True`` on the CPU runs that route with CPU
    tensors (it writes the same bytes; for tests and benchmarks without a GPU).

    >>> merge_checkpoints("ties.yml", "merged/")  # doctest: +SKIP
    """
    start = time.perf_counter()
    config = load_config(config) if isinstance(config, str) else config
    device = _device(device)
    plan = build_plan(config)
    try:
        layouts = plan_shards([(t.name, t.out_dtype, t.shape) for t in plan.tasks], parse_size(out_shard_size))
        fingerprint = plan.fingerprint()
        with OutLock(out_dir):
            done = _prepare_out_dir(out_dir, plan, layouts, fingerprint, resume)
            with stopped_cleanly(out_dir, layouts):
                summary = _run(plan, layouts, fingerprint, done, out_dir, device, progress, start, staging=staging)
                _finish_out_dir(plan, out_dir, layouts)
        return summary
    finally:
        plan.close()


def _run(plan: MergePlan, layouts, fingerprint: str, done: dict[str, str], out_dir: str, device, progress: bool,
         start: float, shards: Collection[str] | None = None, state_name: str = STATE_NAME,
         staging: bool | None = None) -> MergeSummary:
    """Writes the shards of ``layouts`` not in ``done`` (only those named in ``shards``, when
    given), recording each finished one in the state file ``state_name``. ``staging``: merge
    through the staged route (default: on any device but the CPU)."""
    device = _device(device)
    with _current_device(device):
        return _pipeline(plan, layouts, fingerprint, done, out_dir, device, progress, start, shards, state_name,
                         staged(device) if staging is None else staging)


def _pipeline(plan: MergePlan, layouts, fingerprint, done, out_dir, device, progress, start, shards, state_name,
              staging: bool) -> MergeSummary:
    tasks_by_name = {t.name: t for t in plan.tasks}
    mine = [layout for layout in layouts if shards is None or layout.filename in shards]
    todo = [(layout, tasks_by_name[n], offset) for layout in mine if layout.filename not in done
            for n, offset in zip(layout.names, layout.offsets)]
    skipped = sum(len(layout.names) for layout in mine if layout.filename in done)
    largest = max((t.nbytes for t in plan.tasks), default=0)
    runner = _Runner(plan, device, _BufferPool(max_bytes=2 * largest), staging)
    if runner.needs_torch([task for _, task, _ in todo]):
        load_torch()
    drain = _DeviceToFile(device, staging_bytes(largest)) if staging else None
    completed = dict(done)
    last = todo[-1][0] if todo else None  # followed only by publishing the folder: no CRC, no state entry
    state = {"writer": None, "written": 0, "failed": False}

    def write(layout, task, result: _Result):
        if state["failed"]:  # an earlier write failed (the error the run stops with): write nothing more
            return
        try:
            _write(layout, task, result)
        except BaseException:
            state["failed"] = True
            if state["writer"] is not None:
                state["writer"].abort()
                state["writer"] = None
            raise

    def _write(layout, task, result: _Result):
        writer = state["writer"]
        if writer is None or writer.layout is not layout:
            writer = state["writer"] = ShardWriter(out_dir, layout, checksum=layout is not last)
        if result.staged:
            drain.put(writer, task.name, result.data, result.ready)
        else:  # a host output's bytes, or a part of them (_Runner.parts)
            if result.first:
                writer.start(task.name)
            if result.data.nbytes:
                writer.append(memoryview(result.data))
        state["written"] += result.data.nbytes
        HostReader.release(result.mapped)
        if result.buffer is not None:
            runner.pool.give(result.buffer)
        if result.last and writer.complete:
            if drain is not None:
                drain.flush()
            digest = writer.finish()
            state["writer"] = None
            if digest is not None:
                completed[layout.filename] = digest
                _write_state(out_dir, fingerprint, completed, state_name)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(t.nbytes for _, t, _ in todo), unit="B", unit_scale=True, desc="vfuse merge",
                   dynamic_ncols=True)
    merged = copied = 0
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="vfuse-write") as writer_pool:
            loads = read_ahead([runner.reads(task) for _, task, _ in todo], lambda i: runner.reader(todo[i][1]))
            writes: deque = deque()  # (future, output bytes) of the outputs waiting for the writer

            def make_room(nbytes: int) -> None:
                while not staging and writes and sum(n for _, n in writes) + nbytes > WRITE_AHEAD_BYTES:
                    writes.popleft()[0].result()  # its buffer returns to the pool: the new output reuses it

            for i, ((layout, task, offset), loaded) in enumerate(zip(todo, loads)):
                for result in runner.parts(task, loaded, offset, make_room):
                    writes.append((writer_pool.submit(write, layout, task, result), result.data.nbytes))
                    del result
                    while staging and len(writes) > WRITE_QUEUE:
                        writes.popleft()[0].result()
                del loaded
                merged, copied = (merged, copied + 1) if task.copy_from else (merged + 1, copied)
                if bar is not None:
                    bar.update(task.nbytes)
                    rate = (i + 1) / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(tensors=f"{i + 1}/{len(todo)}", per_s=f"{rate:.0f}", refresh=False)
            while writes:
                writes.popleft()[0].result()
    except BaseException:
        if state["writer"] is not None:
            state["writer"].abort()
        raise
    finally:
        runner.close()
        if bar is not None:
            bar.close()
    return MergeSummary(out_dir, merged, copied, skipped, len(mine), state["written"], time.perf_counter() - start,
                        peak_rss_bytes())
