"""A worker's shared slot: a few doubles both processes can read and write.

The worker writes which batch and item it is running; the dispatcher reads it
when the worker dies or a task may have timed out (see ``_worker.py``). It is a
page of shared memory from ``memfd_create`` (or an unlinked temporary file),
inherited under fork and handed to spawn/forkserver children as a file
descriptor while the process is being started, like multiprocessing's own
shared arrays, but without importing ctypes (tens of milliseconds at start-up).
"""

from __future__ import annotations

import mmap
import os
from multiprocessing import context, reduction

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Slot"]

_ITEM = 8  # bytes per double


class Slot:
    """``size`` doubles of shared memory; index it like a list of floats."""

    def __init__(self, size: int, fd: int | None = None) -> None:
        self.size = size
        if fd is None:
            fd = _anonymous_file(size * _ITEM)
        self._fd: int | None = fd
        self._map = mmap.mmap(fd, size * _ITEM)
        self.view = memoryview(self._map).cast("d")

    def __getitem__(self, index: int) -> float:
        return float(self.view[index])

    def __setitem__(self, index: int, value: float) -> None:
        self.view[index] = value

    def close_fd(self) -> None:
        """Drop the descriptor once the child has its copy (the mapping stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __reduce__(self) -> tuple[Any, ...]:
        if context.get_spawning_popen() is None or self._fd is None:
            raise RuntimeError("a Slot can only be passed to a process as it starts")
        return _rebuild, (reduction.DupFd(self._fd), self.size)

    def __del__(self) -> None:
        try:
            self.close_fd()
        except OSError:
            pass


def _rebuild(dup: Any, size: int) -> Slot:
    return Slot(size, dup.detach())


def _anonymous_file(nbytes: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("procpool-slot", os.MFD_CLOEXEC)
    else:  # macOS and others: an unlinked temporary file
        import tempfile

        fd, path = tempfile.mkstemp(prefix="procpool-slot-")
        os.unlink(path)
    os.ftruncate(fd, nbytes)
    return fd
