"""An exclusive lock on a merge's output folder, so two merges never write into one."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys

LOCK_NAME = ".vfuse-merge.lock"


class OutDirBusy(OSError):
    """Another process is merging into the folder; the message names it."""


def _holder(fd: int) -> str | None:
    """'pid N on HOST' as recorded in the lock file; None when it records nothing."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {int(record['pid'])} on {record['host']}"
    except (ValueError, TypeError, KeyError):
        return None


class OutLock:
    """``with OutLock(out_dir):`` creates ``out_dir`` and holds ``out_dir/.vfuse-merge.lock``
    (this host and pid) under ``flock`` until the block ends; the kernel frees the lock when
    the process ends, however it ends. A second writer fails at once naming the holder; the
    file a holder that is gone left behind is taken over, with a note on stderr."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self._fd: int | None = None

    def __enter__(self) -> OutLock:
        os.makedirs(self.out_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd) or "another process"
                os.close(fd)
                raise OutDirBusy(f"{self.out_dir} is being merged into by {holder} (lock {self.path})") from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # its holder removed that file as we opened it: lock the new one
        previous = _holder(fd)
        if previous is not None:
            print(f"vfuse merge: note: took over the lock of {previous}, which is no longer running", file=sys.stderr)
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        os.remove(self.path)  # before unlocking, so a waiting process re-checks the path
        os.close(self._fd)
        self._fd = None
