"""The file a shard is written into: direct I/O where the file system takes it, the page cache elsewhere.

A buffered ``write`` copies every byte into the page cache (on the 2-core dev VM that copy
ran at ~1.5 GB/s, on the writer's core, beside the merge), and the final ``fsync`` then
waits for the disk anyway. With ``O_DIRECT`` the disk reads the bytes from the caller's
memory: no copy, and the CPU stays with the merge. Direct I/O needs file offsets, lengths
and memory addresses that are multiples of the disk's logical block (``ALIGN`` covers
every block size in use). Bytes whose address lines up with their file offset modulo
``ALIGN`` (the merge engine allocates its outputs so) go to the disk from where they are;
the others, and the partial blocks between tensors, are gathered in an aligned bounce
buffer first; the file's last partial block goes through the page cache. A file system
that refuses direct I/O, at ``open`` or at a ``write``, gets the rest of the file through
the page cache; so does everything with ``VFUSE_NO_DIRECT_IO=1``. Either way, ``finish``
returns only after ``fsync``.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

import numpy

ALIGN = 4096  # file offsets, lengths and addresses of direct writes are multiples of this
BOUNCE_BYTES = 8 << 20  # the aligned buffer that gathers bytes not in line with their offset
WRITEBACK_BYTES = 64 << 20  # page-cache route: written bytes are sent to disk in steps of this, so fsync finds few left
SYNC_FILE_RANGE_WRITE = 2


def direct_io_enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("VFUSE_NO_DIRECT_IO") != "1"


def address(data) -> int:
    """The address of a buffer's first byte (read-only buffers too)."""
    return numpy.frombuffer(data, dtype=numpy.uint8).ctypes.data


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux): starts writing a file range's dirty pages back to
    disk without waiting for it or dropping them from the page cache; None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except AttributeError:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


SYNC_FILE_RANGE = _sync_file_range()


class OutputFile:
    """A new file at ``path``, written sequentially by ``write`` and made durable by ``finish``."""

    def __init__(self, path: str):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.fd = -1
        if direct_io_enabled():
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(path, flags, 0o666)
        self.size = 0  # bytes given to write so far
        self.direct_bytes = 0  # of them, those written with direct I/O
        self._held = 0  # of them, the last ones, waiting in the bounce buffer (which starts at an aligned offset)
        self._synced = 0  # page-cache route: bytes already sent to disk
        self._bounce = None
        if self.direct:
            self._bounce = mmap.mmap(-1, BOUNCE_BYTES)  # page-aligned
            self._bounce_at = address(self._bounce)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            if not self.direct:
                self._write_all(view)
                self.size += len(view)
                return
            start = address(view)
            in_line = (start - self.size) % ALIGN == 0
            if in_line and self.size % ALIGN == 0 and len(view) >= ALIGN:
                self._flush()  # a whole number of blocks: the bounce buffer starts aligned, and so does size
                n = len(view) - len(view) % ALIGN
                self._write_all(view[:n])
                self.size += n
                view = view[n:]
                continue
            n = min(len(view), BOUNCE_BYTES - self._held)
            if in_line and self.size % ALIGN:
                n = min(n, ALIGN - self.size % ALIGN)  # up to the block boundary, where the rest lines up
            ctypes.memmove(self._bounce_at + self._held, start, n)
            self._held += n
            self.size += n
            view = view[n:]
            if self._held == BOUNCE_BYTES:
                self._flush()

    def _flush(self) -> None:
        """Writes the bounce buffer's bytes (a whole number of blocks, unless direct I/O is off)."""
        if self._held:
            self._write_all(memoryview(self._bounce)[:self._held])
        self._held = 0

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._stop_direct()  # refused here, or a short write left the offset out of line
                continue
            if self.direct:
                self.direct_bytes += n
            view = view[n:]
        if not self.direct and SYNC_FILE_RANGE is not None:
            position = os.lseek(self.fd, 0, os.SEEK_CUR)
            if position - self._synced >= WRITEBACK_BYTES:
                SYNC_FILE_RANGE(self.fd, self._synced, position - self._synced, SYNC_FILE_RANGE_WRITE)
                self._synced = position

    def _stop_direct(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def finish(self) -> None:
        """Writes what is held (a last partial block through the page cache), syncs and closes the file."""
        if self._held % ALIGN:
            self._stop_direct()
        self._flush()
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._bounce = None  # unmapped once no view of it is left (a traceback may hold one)
