"""Large buffers cross between processes through shared memory, not the pipe.

Pickle protocol 5 lets a pickler hand its large buffers (NumPy arrays, bytes-like
objects exposing ``__reduce_ex__`` with ``PickleBuffer``) to a callback instead
of copying them into the stream. ``pack`` copies every such buffer above
``THRESHOLD`` once into one POSIX shared-memory file (``/dev/shm``); the message
then carries only the pickle stream and the segment's name. ``unpack`` maps the
segment and rebuilds the objects *on top of the mapping*: no copy on the
receiving side, and the memory lives as long as the arrays that use it.

Lifetimes, so that nothing leaks even when a process dies:

* the receiver unlinks a segment as soon as it has mapped it (the mapping stays
  valid; the name is gone);
* the parent unlinks the segments of a batch it created once the batch is
  settled (a no-op when the worker already did);
* a worker names the segments it creates ``<pool prefix>-w<worker id>-<n>``; when
  a worker dies, the dispatcher removes every segment left under its name, and
  a pool that shuts down removes everything under its prefix.

Only where ``/dev/shm`` exists (Linux); elsewhere everything goes in-band.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
from collections.abc import Callable
from typing import Any

__all__ = [
    "THRESHOLD",
    "Packed",
    "available",
    "namer",
    "pack",
    "process_namer",
    "remove_matching",
    "unlink",
    "unpack",
]

# Buffers at least this large go through shared memory.
THRESHOLD = 256 * 1024
_DIR = "/dev/shm"
_PROTOCOL = 5


def available() -> bool:
    return os.path.isdir(_DIR) and os.access(_DIR, os.W_OK)


_AVAILABLE = available()
# Fault every page in with one call instead of one fault per 4 KiB page.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


Namer = Callable[[], str]
# What pack() returns: the pickle alone, or (pickle, segment name, buffer layout).
Packed = bytes | tuple[bytes, str, list[tuple[int, int]]]


def pack(obj: Any, namer: Namer | None) -> Packed:
    """Pickle ``obj``; large buffers go to a new shared-memory segment named by ``namer()``.

    Returns the pickle alone when nothing was large (or ``namer`` is None), or
    when the segment could not be written (then everything is in the pickle).
    """
    if namer is None:
        return pickle.dumps(obj, _PROTOCOL)
    large: list[pickle.PickleBuffer] = []

    def keep_small(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= THRESHOLD:
            large.append(buf)
            return False  # out of band
        return True

    data = pickle.dumps(obj, _PROTOCOL, buffer_callback=keep_small)
    if not large:
        return data
    name = namer()
    try:
        return data, name, _write_segment(name, [b.raw() for b in large])
    except OSError:
        # /dev/shm full (ENOSPC), a file size limit (EFBIG), out of descriptors:
        # the pipe still carries it, one copy slower.
        return pickle.dumps(obj, _PROTOCOL)


def unpack(message: Packed) -> Any:
    """Rebuild what :func:`pack` made; a segment is mapped, then unlinked at once."""
    if isinstance(message, bytes):
        return pickle.loads(message)
    data, name, layout = message
    views = _map_segment(name, layout)
    return pickle.loads(data, buffers=views)


def _write_segment(name: str, buffers: list[memoryview]) -> list[tuple[int, int]]:
    # Written with pwrite, not through a mapping: the kernel copies straight into
    # fresh tmpfs pages, where a mapping first zeroes each page, then takes a fault
    # (or MAP_POPULATE's walk) for it, then tears the page tables down at munmap.
    # 8 MB: 3.2 ms against 6.6 here (docs/performance.md, fourth session).
    layout = []
    offset = 0
    for buf in buffers:
        layout.append((offset, buf.nbytes))
        offset += (buf.nbytes + 63) // 64 * 64  # keep every buffer 64-byte aligned
    fd = os.open(os.path.join(_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        for (start, _), buf in zip(layout, buffers):
            _pwrite_all(fd, buf.cast("B"), start)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)
    return layout


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:  # a regular file takes it all at once; loop all the same
        done += os.pwrite(fd, data[done:], offset + done)


def _map_segment(name: str, layout: list[tuple[int, int]]) -> list[memoryview]:
    path = os.path.join(_DIR, name)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, flags=_MAP_FLAGS)
    finally:
        os.close(fd)
        unlink(name)
    whole = memoryview(mm)
    return [whole[start : start + length] for start, length in layout]


def unlink(name: str) -> None:
    """Remove a segment's name if it still exists."""
    try:
        os.unlink(os.path.join(_DIR, name))
    except FileNotFoundError:
        pass


def remove_matching(prefix: str) -> int:
    """Remove every segment whose name starts with ``prefix``; return how many."""
    removed = 0
    try:
        names = os.listdir(_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            unlink(name)
            removed += 1
    return removed


_process_namer: tuple[int, Namer] | None = None


def process_namer() -> Namer | None:
    """This process's namer (``procpool-<pid>-a-<n>``), or None where shared memory is missing."""
    global _process_namer
    if not _AVAILABLE:
        return None
    pid = os.getpid()
    if _process_namer is None or _process_namer[0] != pid:  # a forked child gets its own
        _process_namer = (pid, namer(f"procpool-{pid}-a"))
    return _process_namer[1]


def namer(prefix: str) -> Namer:
    """A thread-safe source of unique segment names under ``prefix``."""
    counter = itertools.count()
    return lambda: f"{prefix}-{next(counter)}"
