"""safetensors checkpoints, read lazily and written as a stream.

``Checkpoint`` parses every shard's header up front (names, dtypes, shapes, offsets;
truncated or inconsistent files are rejected before any work) and reads one tensor at a
time with ``os.preadv`` into a fresh (or caller-given, e.g. pinned) buffer, so memory holds
only the tensors in flight. ``ShardWriter`` lays out output shards from the plan before
any data exists (headers first), streams tensors into ``<shard>.tmp`` and renames each
shard when complete; the index, written last, is what makes the output complete.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass

import torch

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as promised; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
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
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed header entry") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated — tensor {name!r} ends at byte {end} of {data_size}")
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return infos


class Checkpoint:
    """A model folder (sharded with ``model.safetensors.index.json``, or ``*.safetensors``
    files) or a single ``.safetensors`` file."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
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
            for name, info in read_tensor_infos(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in two shards")
                self.tensors[name] = info
        for name, file in (weight_map or {}).items():
            if name not in self.tensors:
                raise CheckpointError(f"{path}: the index lists {name!r} in {file} but the shard lacks it")

    def _shard_files(self) -> tuple[list[str], dict | None]:
        index = os.path.join(self.folder, INDEX_NAME)
        if os.path.exists(index):
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
        if not files:
            raise CheckpointError(f"{self.path}: no .safetensors files (only safetensors checkpoints are supported)")
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
        info = self.tensors[name]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        raw = out.view(-1).view(torch.uint8) if info.nbytes else out
        with self._lock:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        done = 0
        view = memoryview(raw.numpy()) if info.nbytes else memoryview(b"")
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading {name!r}")
            done += n
        return out

    def _mapping(self, file: str) -> mmap.mmap:
        with self._lock:
            mapped = self._maps.get(file)
            if mapped is None:
                with open(file, "rb") as f:
                    mapped = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return mapped

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a read-only view of the file's pages (no copy); pair with
        ``release`` so the pages leave this process's resident set once used."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():  # the mapping is read-only; the views are only read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(self._mapping(info.file), dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return raw.view(info.dtype).view(info.shape)

    def advise(self, name: str, advice: int) -> None:
        """madvise on the pages of tensor ``name`` (MADV_WILLNEED to read ahead,
        MADV_DONTNEED to drop them from this process; the page cache keeps them)."""
        info = self.tensors[name]
        if info.nbytes == 0:
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


def plan_shards(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[ShardLayout]:
    """Assigns tensors, in order, to shards of at most ``max_bytes`` of data (a larger
    tensor gets a shard of its own) and builds each shard's header."""
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    used = 0
    for name, dtype, shape in tensors:
        nbytes = dtype.itemsize * _numel(shape)
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
            nbytes = dtype.itemsize * _numel(shape)
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data 8-byte aligned
        blob = struct.pack("<Q", len(encoded)) + encoded
        layouts.append(ShardLayout(f"model-{i + 1:05d}-of-{count:05d}.safetensors", [g[0] for g in group], blob,
                                   len(blob) + offset))
    return layouts


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShardWriter:
    """Writes one shard: header, then tensors in layout order, into ``<file>.tmp``;
    ``finish`` checks the size, fsyncs and renames, and returns the file's CRC-32."""

    def __init__(self, folder: str, layout: ShardLayout):
        self.layout = layout
        self.final = os.path.join(folder, layout.filename)
        self.tmp = self.final + ".tmp"
        self._file = open(self.tmp, "wb")
        self._crc = 0
        self._write(layout.header)
        self._next = 0

    def _write(self, data) -> None:
        self._file.write(data)
        self._crc = zlib.crc32(data, self._crc)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.layout.names[self._next]
        if name != expected:
            raise RuntimeError(f"shard {self.layout.filename}: got {name!r}, expected {expected!r}")
        self._next += 1
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        self._write(memoryview(data))

    @property
    def complete(self) -> bool:
        return self._next == len(self.layout.names)

    def finish(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._next != len(self.layout.names) or os.path.getsize(self.tmp) != self.layout.size:
            raise RuntimeError(f"shard {self.layout.filename}: incomplete ({self._next}/{len(self.layout.names)})")
        os.replace(self.tmp, self.final)
        return f"{self._crc:08x}"

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def file_crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"
