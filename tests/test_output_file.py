"""OutputFile (merging/output.py): the bytes of a shard land in the file as given, whether each
piece goes to the disk from where it is (direct I/O, in line with its offset), through the
bounce buffer (out of line, partial blocks, a full bounce buffer), or through the page cache
(direct I/O off, refused by the file system, or broken off by a short write)."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os

import numpy
import pytest

from vfuse_kernels.merging import output
from vfuse_kernels.merging.output import ALIGN, OutputFile

# (length, in line with its file offset?) of the pieces written in turn, after a 13-byte start
PIECES = [(0, True), (1, True), (ALIGN - 14, True), (3 * ALIGN + 5, True), (ALIGN, False), (2 * ALIGN, True),
          (7 * ALIGN + 3, False), (5, True), (10 * ALIGN, True), (ALIGN - 1, False), (1, True), (12 * ALIGN, True)]


def direct_io_works(folder) -> bool:
    """Whether this file system takes an aligned O_DIRECT write (tmpfs before Linux 6.6 does not)."""
    path = os.path.join(folder, "probe")
    block = mmap.mmap(-1, ALIGN)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        try:
            return os.write(fd, block) == ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        block.close()
        if os.path.exists(path):
            os.remove(path)


def write_pieces(path, source: mmap.mmap) -> tuple[OutputFile, bytes]:
    """Writes a 13-byte bytes object, then PIECES cut from ``source`` (page-aligned) at an address
    in line with their file offset or one byte past it; returns the closed file and the bytes expected."""
    f = OutputFile(path)
    view = memoryview(source)
    expected = [b"safetensors\x00\x01"]
    f.write(expected[0])
    for length, in_line in PIECES:
        start = f.size % ALIGN + (0 if in_line else 1) + ALIGN
        piece = view[start:start + length]
        assert ((output.address(piece) - f.size) % ALIGN == 0) == in_line or not length
        f.write(piece)
        expected.append(bytes(piece))
    f.finish()
    return f, b"".join(expected)


@pytest.fixture()
def source():
    block = mmap.mmap(-1, 16 * ALIGN)
    block.write(numpy.random.default_rng(5).integers(0, 256, 16 * ALIGN, dtype=numpy.uint8).tobytes())
    yield block
    block.close()


@pytest.mark.parametrize("bounce_blocks", [3, 2048], ids=["bounce-fills", "bounce-large"])
@pytest.mark.parametrize("direct", ["direct", "page-cache"])
def test_output_file_holds_the_bytes_written(tmp_path, monkeypatch, source, direct, bounce_blocks):
    monkeypatch.setattr(output, "BOUNCE_BYTES", bounce_blocks * ALIGN)
    monkeypatch.setenv("VFUSE_NO_DIRECT_IO", "0" if direct == "direct" else "1")
    path = str(tmp_path / "shard")
    f, expected = write_pieces(path, source)
    with open(path, "rb") as read:
        assert read.read() == expected
    assert f.size == len(expected) and f.fd == -1
    if direct == "direct" and direct_io_works(str(tmp_path)):
        assert f.direct_bytes == len(expected) - len(expected) % ALIGN  # all but the last partial block
    else:
        assert f.direct_bytes == 0


@pytest.mark.parametrize("fault", ["refused", "short"])
def test_output_file_goes_on_through_the_page_cache(tmp_path, monkeypatch, source, fault):
    """A direct write refused (EINVAL) or cut short mid-block: the rest goes through the page
    cache, and the file still holds every byte."""
    if not direct_io_works(str(tmp_path)):
        pytest.skip("this file system takes no direct I/O")
    real_write = os.write
    direct_writes = []

    def write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and len(data) > ALIGN:
            direct_writes.append(len(data))
            if len(direct_writes) == 2:
                if fault == "refused":
                    raise OSError(errno.EINVAL, "Invalid argument")
                return real_write(fd, memoryview(data)[:ALIGN + 100])
        return real_write(fd, data)

    monkeypatch.setenv("VFUSE_NO_DIRECT_IO", "0")
    monkeypatch.setattr(output.os, "write", write)
    path = str(tmp_path / "shard")
    f, expected = write_pieces(path, source)
    with open(path, "rb") as read:
        assert read.read() == expected
    assert len(direct_writes) == 2 and not f.direct
