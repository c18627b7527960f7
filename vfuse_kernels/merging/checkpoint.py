"""Checkpoints (safetensors, or PyTorch ``.bin``) read lazily; safetensors written as a stream.

``Checkpoint`` parses every shard's header up front (names, dtypes, shapes, offsets;
truncated or inconsistent files are rejected before any work) and reads one tensor at a
time with ``os.preadv`` into a fresh (or caller-given) buffer, or maps it zero-copy, so
memory holds only the tensors in flight. PyTorch ``.bin`` files (the zip format of
``torch.save``) are opened with ``torch.load(weights_only=True, mmap=True)``: no pickled
code runs, anything but a flat dict of tensors is refused, and the tensors are views of
the file's pages, read through the same interface. ``DeviceReader`` moves tensors onto an
accelerator through a fixed ring of pinned staging buffers (file → pinned by ``preadv`` on
a few threads, pinned → device on a side stream). ``ShardWriter`` lays out output shards
from the plan before any data exists (headers first), streams tensors into
``<shard>.tmp`` and renames each shard when complete; the index, written last, is what
makes the output complete.
"""
from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import struct
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy

from .output import OutputFile

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> (bytes per element, torch dtype name); the merge plans with the
# names, and torch is imported only where a tensor is built (the merge itself may not need it)
ST_DTYPES = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
             "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
             "BOOL": (1, "bool")}
ST_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")  # safetensors' layout: dtype, name
INDEX_NAME = "model.safetensors.index.json"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
STAGING_BYTES = 16 << 20  # one pinned staging buffer; tensors move in chunks of at most this
READ_SLOTS = 8  # staging buffers of a DeviceReader (allocated once, reused in turn)
READ_THREADS = 4  # threads reading chunks into them
# Linux ≥ 5.14: read the pages in and map them now, on the reading thread, so their user
# takes no page faults; older kernels fall back to MADV_WILLNEED (read-ahead only).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
LIBC = ctypes.CDLL(None, use_errno=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as promised; the message names the file."""


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return ST_DTYPES[dtype][0]


def torch_dtype(dtype: str):
    """The torch dtype of a safetensors dtype name."""
    import torch

    return getattr(torch, ST_DTYPES[dtype][1])


def dtype_name(dtype) -> str | None:
    """The safetensors name of a torch dtype (None: no safetensors dtype)."""
    return next((name for name, (_, torch_name) in ST_DTYPES.items() if str(dtype) == f"torch.{torch_name}"), None)


def as_tensor(raw: numpy.ndarray, dtype: str, shape):
    """A torch view (no copy) of the uint8 array ``raw`` holding a tensor of safetensors
    ``dtype`` and ``shape``; writable only when ``raw`` is."""
    import torch

    if raw.size == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    with warnings.catch_warnings():  # a read-only array (a file's pages) is only read
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(raw)
    return tensor.view(torch_dtype(dtype)).view(shape)


def byte_view(data) -> numpy.ndarray:
    """The bytes of a host tensor (torch, or a numpy array), contiguous, as a uint8 array
    (no copy when the tensor is contiguous)."""
    if isinstance(data, numpy.ndarray):
        return numpy.ascontiguousarray(data).reshape(-1).view(numpy.uint8)
    import torch

    return data.detach().contiguous().view(-1).view(torch.uint8).numpy()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str  # safetensors name (ST_DTYPES)
    shape: tuple[int, ...]
    offset: int  # byte offset of the data in the file (.bin: in the safetensors file of the same tensors)
    nbytes: int


def _read_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    return header, 8 + length


def read_tensor_infos(path: str) -> dict[str, TensorInfo]:
    """Validated tensor records of one safetensors file."""
    header, data_start = _read_header(path)
    data_size = os.path.getsize(path) - data_start
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            size = itemsize(dtype)
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed header entry") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * size or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated — tensor {name!r} ends at byte {end} of {data_size}")
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return infos


def load_bin(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch ``.bin`` file as views of its pages (nothing read yet).
    ``weights_only``: a pickle that would build anything but tensors, dicts and plain values
    is refused unexecuted; anything but a flat dict of tensors is refused too."""
    import torch

    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({cause})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if dtype_name(tensor.dtype) is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}")
    return state


def _madvise(tensor: torch.Tensor, advice: int) -> None:
    """madvise on the pages under a tensor of a ``.bin`` file's mapping."""
    start = tensor.data_ptr() - tensor.data_ptr() % mmap.PAGESIZE
    length = tensor.data_ptr() + tensor.nbytes - start
    if LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) != 0 and advice != mmap.MADV_WILLNEED:
        _madvise(tensor, mmap.MADV_WILLNEED)  # an advice this kernel does not know


class Checkpoint:
    """A model folder (sharded with ``model.safetensors.index.json`` or
    ``pytorch_model.bin.index.json``, ``*.safetensors`` files or ``pytorch_model.bin``) or a
    single ``.safetensors`` or ``.bin`` file."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._mapped: dict[str, torch.Tensor] = {}  # .bin tensors: views of their files' pages
        self._copied: set[str] = set()  # .bin tensors stored non-contiguous: made contiguous in memory
        weight_map = None
        if os.path.isfile(self.path):
            files, self.folder = [self.path], os.path.dirname(self.path)
        elif os.path.isdir(self.path):
            self.folder = self.path
            files, weight_map = self._shard_files()
        else:
            raise CheckpointError(f"{path}: no such checkpoint")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in (self._bin_infos(file) if file.endswith(".bin") else read_tensor_infos(file)).items():
                if name in self.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in two shards")
                self.tensors[name] = info
        for name, file in (weight_map or {}).items():
            if name not in self.tensors:
                raise CheckpointError(f"{path}: the index lists {name!r} in {file} but the shard lacks it")

    def _bin_infos(self, path: str) -> dict[str, TensorInfo]:
        """The records of a ``.bin`` file, its tensors kept as views; each offset is the one
        the tensor would have in a safetensors file, so both formats plan alike."""
        tensors = load_bin(path)
        infos, offset = {}, 0
        dtypes = {name: dtype_name(t.dtype) for name, t in tensors.items()}
        for name in sorted(tensors, key=lambda n: (ST_ORDER.index(dtypes[n]), n)):
            t = tensors[name]
            infos[name] = TensorInfo(name, path, dtypes[name], tuple(t.shape), offset, t.nbytes)
            offset += t.nbytes
        for name, tensor in tensors.items():
            if name in self._mapped:
                raise CheckpointError(f"{self.path}: tensor {name!r} appears in two shards")
            if not tensor.is_contiguous():
                tensors[name] = tensor = tensor.contiguous()
                self._copied.add(name)
            self._mapped[name] = tensor
        return infos

    def _shard_files(self) -> tuple[list[str], dict | None]:
        index = next((p for p in (os.path.join(self.folder, n) for n in (INDEX_NAME, BIN_INDEX_NAME))
                      if os.path.exists(p)), None)
        if index is not None:
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: unreadable index ({exc})") from None
            files = sorted(set(weight_map.values()))
            for file in files:
                if not os.path.exists(os.path.join(self.folder, file)):
                    raise CheckpointError(f"{index}: shard {file} is missing")
            return [os.path.join(self.folder, f) for f in files], weight_map
        files = sorted(f for f in os.listdir(self.folder) if f.endswith(".safetensors"))
        if not files and os.path.exists(os.path.join(self.folder, BIN_SINGLE_NAME)):
            files = [BIN_SINGLE_NAME]
        if not files:
            raise CheckpointError(f"{self.path}: no .safetensors files, no {BIN_SINGLE_NAME} and no index")
        return [os.path.join(self.folder, f) for f in files], None

    @property
    def config(self) -> dict | None:
        path = os.path.join(self.folder, "config.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``, read from disk (into ``out``'s storage when given)."""
        import torch

        info = self.tensors[name]
        if out is None:
            out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        if info.nbytes:
            self.read_bytes(name, out.view(-1).view(torch.uint8))
        return out

    def read_bytes(self, name: str, out: torch.Tensor, start: int = 0) -> None:
        """Bytes ``[start, start + out.numel())`` of tensor ``name``'s data into the
        contiguous host uint8 tensor ``out``."""
        info = self.tensors[name]
        if start < 0 or start + out.numel() > info.nbytes:
            raise ValueError(f"bytes [{start}, {start + out.numel()}) are outside tensor {name!r} "
                             f"({info.nbytes} bytes)")
        if name in self._mapped:
            out.copy_(as_tensor(self.raw(name), "U8", (-1,))[start:start + out.numel()])
            return
        with self._lock:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view = memoryview(out.numpy()) if out.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], info.offset + start + done)
            if n <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading {name!r}")
            done += n

    def _mapping(self, file: str) -> mmap.mmap:
        with self._lock:
            mapped = self._maps.get(file)
            if mapped is None:
                with open(file, "rb") as f:
                    mapped = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return mapped

    def view(self, name: str):
        """The tensor ``name`` as a read-only torch view of the file's pages (no copy); pair
        with ``advise(name, MADV_DONTNEED)`` so the pages leave this process's resident set once used."""
        if name in self._mapped:
            return self._mapped[name]
        info = self.tensors[name]
        return as_tensor(self.raw(name), info.dtype, info.shape)

    def raw(self, name: str) -> numpy.ndarray:
        """The bytes of tensor ``name`` as a read-only uint8 array over the file's pages (no
        copy, no torch; a ``.bin`` tensor's: a view of the tensor's memory)."""
        if name in self._mapped:
            return byte_view(self._mapped[name])
        info = self.tensors[name]
        if info.nbytes == 0:
            return numpy.empty(0, dtype=numpy.uint8)
        return numpy.frombuffer(self._mapping(info.file), dtype=numpy.uint8, count=info.nbytes, offset=info.offset)

    def advise(self, name: str, advice: int) -> None:
        """madvise on the pages of tensor ``name`` (MADV_WILLNEED to read ahead,
        MADV_DONTNEED to drop them from this process; the page cache keeps them)."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return
        if name in self._mapped:
            if name not in self._copied:  # never on memory of our own: MADV_DONTNEED would zero it
                _madvise(self._mapped[name], advice)
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        try:
            self._mapping(info.file).madvise(advice, start, info.offset + info.nbytes - start)
        except OSError:  # an advice this kernel does not know (e.g. MADV_POPULATE_READ before 5.14)
            if advice != mmap.MADV_WILLNEED:
                self.advise(name, mmap.MADV_WILLNEED)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for mapped in self._maps.values():
                try:
                    mapped.close()
                except BufferError:  # a view is still alive; the mapping closes with it
                    pass
            self._maps.clear()
            self._mapped.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def staged(device) -> bool:
    """Whether tensors for ``device`` (a torch device or its name) travel through staging
    buffers (an accelerator) rather than as zero-copy views of the files' pages (the CPU)."""
    return str(device).split(":")[0] != "cpu"


class HostReader:
    """Tensors' bytes as read-only uint8 arrays over the files' pages (no copy), populated on one thread
    ahead of their use so the consumer takes no page faults; ``release`` drops the pages
    from this process (the page cache keeps them)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vfuse-map")

    def submit(self, reads: list[tuple[Checkpoint, str]]):
        """A future of the views of each (checkpoint, tensor name)."""
        return self._pool.submit(self._map, reads)

    @staticmethod
    def _map(reads: list[tuple[Checkpoint, str]]) -> list[numpy.ndarray]:
        for ck, name in reads:
            ck.advise(name, MADV_POPULATE_READ)
        return [ck.raw(name) for ck, name in reads]

    @staticmethod
    def release(reads: list[tuple[Checkpoint, str]]) -> None:
        for ck, name in reads:
            ck.advise(name, mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def staging_bytes(largest: int) -> int:
    """The size of a staging buffer for tensors of at most ``largest`` bytes: STAGING_BYTES,
    or less when no tensor needs that much (small merges pin little memory)."""
    return min(STAGING_BYTES, max(largest, 1))


def host_buffers(count: int, nbytes: int, device):
    """``count`` uint8 host tensors of ``nbytes`` from one allocation, page-locked (pinned)
    when ``device`` is CUDA so copies to and from them are asynchronous DMA."""
    import torch

    block = torch.empty(count * nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return [block[i * nbytes:(i + 1) * nbytes] for i in range(count)]


class _Ring:
    """Staging buffers shared by threads: ``acquire`` hands out a free buffer once the event
    recorded after its last copy has completed (a wait on that copy alone, not the device)."""

    def __init__(self, buffers: list[torch.Tensor]):
        self._free = deque((buffer, None) for buffer in buffers)
        self._ready = threading.Condition()

    def acquire(self) -> torch.Tensor:
        with self._ready:
            while not self._free:
                self._ready.wait()
            buffer, last_use = self._free.popleft()
        if last_use is not None:
            last_use.synchronize()
        return buffer

    def release(self, buffer: torch.Tensor, last_use) -> None:
        with self._ready:
            self._free.append((buffer, last_use))
            self._ready.notify()


class StagedLoad:
    """Tensors a ``DeviceReader`` is filling. ``result()`` waits for the reads (the host
    part), makes the calling thread's current stream wait for the copies (no host wait) and
    marks the tensors as used there, then returns them."""

    def __init__(self, reader: DeviceReader, tensors: list[torch.Tensor], chunks: list):
        self._reader = reader
        self._tensors = tensors
        self._chunks = chunks

    def result(self) -> list[torch.Tensor]:
        import torch

        for chunk in self._chunks:
            chunk.result()
        if self._reader.cuda:
            copied = self._reader.record()
            stream = torch.cuda.current_stream(self._reader.device)
            stream.wait_event(copied)
            for tensor in self._tensors:
                tensor.record_stream(stream)  # freed memory waits for that stream's use
        return self._tensors


class DeviceReader:
    """Reads checkpoint tensors onto ``device``: ``threads`` threads ``preadv`` chunks of at
    most ``slot_bytes`` into a ring of ``slots`` staging buffers (pinned on CUDA, allocated
    once) and copy each chunk into its device tensor on a side stream, recording an event
    per chunk; a buffer is refilled only after the event of its previous copy. The device
    tensors are allocated on the side stream. With a CPU ``device`` the same code runs with
    plain buffers and synchronous copies (so it is testable without a GPU)."""

    def __init__(self, device: torch.device, *, slots: int = READ_SLOTS, slot_bytes: int = STAGING_BYTES,
                 threads: int = READ_THREADS):
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slot_bytes = slot_bytes
        self._ring = _Ring(host_buffers(slots, slot_bytes, device))
        self._pool = ThreadPoolExecutor(min(threads, slots), thread_name_prefix="vfuse-stage")

    def submit(self, reads: list[tuple[Checkpoint, str]]) -> StagedLoad:
        """Starts reading each (checkpoint, tensor name) onto the device."""
        import torch

        tensors, chunks = [], []
        for ck, name in reads:
            info = ck.tensors[name]
            with torch.cuda.stream(self.stream) if self.cuda else nullcontext():  # the block belongs to that stream
                tensor = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device=self.device)
            tensors.append(tensor)
            raw = tensor.view(-1).view(torch.uint8) if info.nbytes else None
            for start in range(0, info.nbytes, self.slot_bytes):
                end = min(start + self.slot_bytes, info.nbytes)
                chunks.append(self._pool.submit(self._copy, ck, name, raw[start:end], start))
        return StagedLoad(self, tensors, chunks)

    def _copy(self, ck: Checkpoint, name: str, dst: torch.Tensor, start: int) -> None:
        buffer = self._ring.acquire()
        copied = None
        try:
            chunk = buffer[:dst.numel()]
            ck.read_bytes(name, chunk, start)
            if self.cuda:
                import torch

                with torch.cuda.stream(self.stream):
                    dst.copy_(chunk, non_blocking=True)
                copied = self.record()
            else:
                dst.copy_(chunk)
        finally:
            self._ring.release(buffer, copied)

    def record(self):
        """An event on the copy stream after every copy queued so far (None on the CPU)."""
        if not self.cuda:
            return None
        import torch

        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def read_ahead(jobs: list[list[tuple[Checkpoint, str]]], reader_of) -> Iterator[list]:
    """The tensors of each job (its (checkpoint, name) reads), in order, loaded by the
    reader ``reader_of(i)`` (a ``HostReader`` or ``DeviceReader``). The next jobs' reads
    start ahead as long as the bytes in flight, the current job's included, stay within the
    largest job's: two huge tensors (embeddings, lm_head) are never in flight together,
    while many small ones are."""
    sizes = [sum(ck.tensors[name].nbytes for ck, name in reads) for reads in jobs]
    budget = max(sizes, default=0)
    loads: deque = deque()
    requested = in_flight = 0
    for i in range(len(jobs)):
        while requested < len(jobs) and (requested == i or in_flight + sizes[requested] <= budget):
            loads.append(reader_of(requested).submit(jobs[requested]))
            in_flight += sizes[requested]
            requested += 1
        yield loads.popleft().result()
        in_flight -= sizes[i]


def parse_size(text: str | int) -> int:
    """'5GB', '500MiB', '2e9' or an int → bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    if unit not in units:
        raise ValueError(f"cannot read size {text!r} (e.g. 5GB, 500MiB)")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"cannot read size {text!r} (e.g. 5GB, 500MiB)") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


@dataclass
class ShardLayout:
    filename: str
    names: list[str]
    header: bytes  # the complete safetensors header (length prefix included)
    size: int  # total file size
    offsets: list[int]  # file offset of each tensor's first byte


def plan_shards(tensors: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[ShardLayout]:
    """Assigns tensors (name, safetensors dtype, shape), in order, to shards of at most
    ``max_bytes`` of data (a larger tensor gets a shard of its own) and builds each shard's header."""
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, dtype, shape in tensors:
        nbytes = itemsize(dtype) * _numel(shape)
        if groups[-1] and used + nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, dtype, shape))
        used += nbytes
    count = len(groups)
    layouts = []
    for i, group in enumerate(groups):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in group:
            nbytes = itemsize(dtype) * _numel(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data 8-byte aligned
        blob = struct.pack("<Q", len(encoded)) + encoded
        starts = [len(blob) + header[name]["data_offsets"][0] for name, _, _ in group]
        layouts.append(ShardLayout(f"model-{i + 1:05d}-of-{count:05d}.safetensors", [g[0] for g in group], blob,
                                   len(blob) + offset, starts))
    return layouts


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# appends from this size compute their CRC on a helper thread during the write, when there
# are cores to spare (on two, the thread only competes with the merge)
CRC_THREAD_BYTES = 1 << 20 if (os.cpu_count() or 1) >= 4 else None


def crc32(data, crc: int = 0) -> int:
    """``zlib.crc32(data, crc)``: the extension's (PCLMULQDQ folding: 6.0 GB/s against zlib's 3.2 on
    the 2-core dev VM) where it is built, else zlib's — the same values either way, so a state
    file checks under both."""
    return _crc32()(data, crc)


@functools.cache
def _crc32():
    from .._backend import cpu_extension

    return getattr(cpu_extension(), "crc32", None) or zlib.crc32


class ShardWriter:
    """Writes one shard: header, then tensors in layout order, into ``<file>.tmp`` (an
    ``OutputFile``: direct I/O where the file system takes it); ``finish`` checks the size,
    fsyncs and renames, and returns the file's CRC-32 (None with ``checksum=False``: a shard
    no later run resumes from needs none, and the CRC costs ~0.2 s per GB on the writer's
    path). Large appends compute their CRC on a helper thread while the write runs (both
    release the GIL; with 4 cores or more)."""

    def __init__(self, folder: str, layout: ShardLayout, checksum: bool = True):
        self.layout = layout
        self.checksum = checksum
        self.final = os.path.join(folder, layout.filename)
        self.tmp = self.final + ".tmp"
        self._file = OutputFile(self.tmp)
        self._failed: OSError | None = None  # the write error that broke this shard
        self._crc = 0
        self._crc_thread: ThreadPoolExecutor | None = None
        self.append(layout.header)
        self._next = 0

    def append(self, data) -> None:
        """Raw bytes of the tensor being written (``start`` names it)."""
        if self._failed is not None:
            raise self._failed
        try:
            self._append(data)
        except OSError as exc:  # named by the shard; every later append fails alike
            self._failed = OSError(exc.errno, exc.strerror, self.final)
            raise self._failed from exc

    def _append(self, data) -> None:
        nbytes = data.nbytes if isinstance(data, memoryview) else len(data)
        if not self.checksum:
            self._file.write(data)
        elif CRC_THREAD_BYTES is not None and nbytes >= CRC_THREAD_BYTES:
            if self._crc_thread is None:
                self._crc_thread = ThreadPoolExecutor(1, thread_name_prefix="vfuse-crc")
            crc = self._crc_thread.submit(crc32, data, self._crc)
            self._file.write(data)
            self._crc = crc.result()
        else:
            self._file.write(data)
            self._crc = crc32(data, self._crc)

    def start(self, name: str) -> int:
        """The next tensor's bytes follow (``append``); it must be the next in the layout.
        Returns its offset in the file."""
        if self._next >= len(self.layout.names):
            raise RuntimeError(f"shard {self.layout.filename}: got {name!r} after its last tensor")
        expected = self.layout.names[self._next]
        if name != expected:
            raise RuntimeError(f"shard {self.layout.filename}: got {name!r}, expected {expected!r}")
        self._next += 1
        return self.layout.offsets[self._next - 1]

    def write(self, name: str, data) -> None:
        """A whole host tensor (torch, or a numpy array of its bytes)."""
        self.start(name)
        if data.nbytes:
            self.append(memoryview(byte_view(data)))

    @property
    def complete(self) -> bool:
        return self._next == len(self.layout.names)

    def finish(self) -> str | None:
        self._close_crc_thread()
        if self._failed is not None:
            raise self._failed
        try:
            self._file.finish()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.final) from exc
        if self._next != len(self.layout.names) or os.path.getsize(self.tmp) != self.layout.size:
            raise RuntimeError(f"shard {self.layout.filename}: incomplete ({self._next}/{len(self.layout.names)})")
        os.replace(self.tmp, self.final)
        return f"{self._crc:08x}" if self.checksum else None

    def abort(self) -> None:
        """Closes and removes the temporary; never raises on the error that stopped the run
        (closing may report the failed write again)."""
        self._close_crc_thread()
        with suppress(OSError):
            self._file.close()
        with suppress(FileNotFoundError):
            os.remove(self.tmp)

    def _close_crc_thread(self) -> None:
        if self._crc_thread is not None:
            self._crc_thread.shutdown()
            self._crc_thread = None


def file_crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            crc = crc32(block, crc)
    return f"{crc:08x}"
