"""A worker's shared slot: a few doubles both processes can read and write.

The worker writes which batch and item it is running; the dispatcher reads it
when the worker dies or a task may have timed out (see ``_worker.py``). It is a
page of shared memory from ``memfd_create`` (or an unlinked temporary file),
inherited under fork and handed to spawn/forkserver children as a file
descriptor while the process is being started, like multiprocessing's own
shared arrays, but without importing ctypes (tens of milliseconds at start-up).

A slot also holds the worker's *offers*: a pipe of tokens, each the id of a
batch the dispatcher has sent the worker ahead of its turn (``P.OFFER``), in
the order it sent them. Both ends take tokens from the front. The worker
takes one as it reads each offered batch, and runs the batch if the token is
its own; the dispatcher takes one to have that batch back, for a worker that
has run out of work. The kernel gives each token to one reader only, so an
offered batch runs exactly once, with no lock between the processes and none
of the memory-ordering subtleties of a shared flag. (A token the worker finds
in place of its batch's belongs to a later batch, which is the worker's now:
the dispatcher took the earlier one.)
"""

from __future__ import annotations

import mmap
import os
import struct
from multiprocessing import context, reduction

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Slot"]

_ITEM = 8  # bytes per double
_TOKEN = struct.Struct("q")  # a batch id; a pipe never splits so short a write or read


class Slot:
    """``size`` doubles of shared memory; index it like a list of floats."""

    def __init__(self, size: int, fd: int | None = None, offers: int | None = None) -> None:
        self.size = size
        if fd is None:
            fd = _anonymous_file(size * _ITEM)
        self._fd: int | None = fd
        self._map = mmap.mmap(fd, size * _ITEM)
        self.view = memoryview(self._map).cast("d")
        # The offers' pipe: both ends here (the dispatcher's side), the read
        # end alone in the worker. Reads never block: no token, no batch.
        if offers is None:
            offers, self._offers_w = os.pipe()
        else:
            self._offers_w = -1
        os.set_blocking(offers, False)
        self._offers_r = offers

    def offer(self, batch_id: int) -> None:
        """Put the token of a batch sent ahead (the dispatcher, before it sends it)."""
        os.write(self._offers_w, _TOKEN.pack(batch_id))

    def take(self) -> int | None:
        """Take the first token left: a batch id, or None if none is left."""
        try:
            token = os.read(self._offers_r, _TOKEN.size)
        except BlockingIOError:
            return None
        return _TOKEN.unpack(token)[0] if len(token) == _TOKEN.size else None

    def __getitem__(self, index: int) -> float:
        return float(self.view[index])

    def __setitem__(self, index: int, value: float) -> None:
        self.view[index] = value

    def close_fd(self) -> None:
        """Drop the descriptor once the child has its copy (the mapping stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the offers' pipe too: the worker is gone (the mapping stays)."""
        self.close_fd()
        for fd in (self._offers_r, self._offers_w):
            if fd >= 0:
                os.close(fd)
        self._offers_r = self._offers_w = -1

    def __reduce__(self) -> tuple[Any, ...]:
        if context.get_spawning_popen() is None or self._fd is None:
            raise RuntimeError("a Slot can only be passed to a process as it starts")
        return _rebuild, (reduction.DupFd(self._fd), self.size, reduction.DupFd(self._offers_r))

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass


def _rebuild(dup: Any, size: int, offers: Any) -> Slot:
    return Slot(size, dup.detach(), offers.detach())


def _anonymous_file(nbytes: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("procpool-slot", os.MFD_CLOEXEC)
    else:  # macOS and others: an unlinked temporary file
        import tempfile

        fd, path = tempfile.mkstemp(prefix="procpool-slot-")
        os.unlink(path)
    os.ftruncate(fd, nbytes)
    return fd
