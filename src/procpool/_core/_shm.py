"""Large buffers cross between processes through shared memory, not the pipe.

Pickle protocol 5 lets a pickler hand its large buffers (NumPy arrays, bytes-like
objects exposing ``__reduce_ex__`` with ``PickleBuffer``) to a callback instead
of copying them into the stream. ``pack`` copies every such buffer above
``THRESHOLD`` once into one POSIX shared-memory file (``/dev/shm``); the message
then carries only the pickle stream and the segment's name. ``unpack`` maps the
segment and rebuilds the objects *on top of the mapping*: no copy on the
receiving side, and the memory lives as long as the arrays that use it.

A batch's arguments go into segments this process keeps and writes again
(``Recycler``): writing into a fresh tmpfs file allocates and zeroes every page
first, ~4x the cost of writing into one whose pages exist (8 MB: 3.9 ms against
0.95 here). A worker keeps its mapping of an argument segment while the batch
runs, then closes it; only when that succeeds (nothing the tasks left behind
still uses the memory) does its reply say so, and the segment is written again
for a later batch. Otherwise the name goes, and the memory lives on with what
uses it. Results travel in fresh segments: the caller keeps them.

Lifetimes, so that nothing leaks even when a process dies:

* the receiver of a result unlinks its segment as soon as it has mapped it
  (the mapping stays valid; the name is gone);
* the parent unlinks, or keeps for reuse, an argument segment once its batch is
  settled; it unlinks the ones it keeps once none was used for a second
  (``Recycler.expire``), when a pool shuts down and at exit, and a worker whose
  parent dies unlinks every argument segment the parent named;
* a worker names the segments it creates ``<pool prefix>-w<worker id>-<n>``; when
  a worker dies, the dispatcher removes every segment left under its name, and
  a pool that shuts down removes everything under its prefix.

Only where ``/dev/shm`` exists (Linux); elsewhere everything goes in-band.
"""

from __future__ import annotations

import atexit
import itertools
import mmap
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "THRESHOLD",
    "Packed",
    "Recycler",
    "arguments_prefix",
    "available",
    "current_recycler",
    "let_go",
    "namer",
    "pack",
    "process_recycler",
    "remove_matching",
    "unlink",
    "unpack",
    "unpack_arguments",
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


def pack(obj: Any, namer: Namer | Recycler | None) -> Packed:
    """Pickle ``obj``; large buffers go to a shared-memory segment.

    The segment is a new one named by ``namer()``, or one a ``Recycler`` gives
    (see ``Recycler.take``). Returns the pickle alone when nothing was large (or
    ``namer`` is None), or when the segment could not be written (then
    everything is in the pickle).
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
    buffers = [b.raw() for b in large]
    layout = _layout(buffers)
    try:
        if isinstance(namer, Recycler):
            name = namer.write(buffers, layout)
        else:
            name = namer()
            _write_segment(name, buffers, layout, os.O_CREAT | os.O_EXCL)
        return data, name, layout
    except OSError:
        # /dev/shm full (ENOSPC), a file size limit (EFBIG), out of descriptors:
        # the pipe still carries it, one copy slower.
        return pickle.dumps(obj, _PROTOCOL)


def unpack(message: Packed) -> Any:
    """Rebuild what :func:`pack` made; a segment is mapped, then unlinked at once."""
    if isinstance(message, bytes):
        return pickle.loads(message)
    data, name, layout = message
    mm = _map_segment(name, layout)
    unlink(name)
    return pickle.loads(data, buffers=_views(mm, layout))


def unpack_arguments(message: Packed) -> tuple[Any, mmap.mmap | None]:
    """Rebuild a batch's arguments, and return the mapping of their segment, if any.

    The name stays: the parent may write the segment again once :func:`let_go`
    has closed the mapping.
    """
    if isinstance(message, bytes):
        return pickle.loads(message), None
    data, name, layout = message
    mm = _map_segment(name, layout)
    return pickle.loads(data, buffers=_views(mm, layout)), mm


def let_go(mm: mmap.mmap | None) -> bool:
    """Close an argument segment's mapping; False if something still uses it."""
    if mm is None:
        return False
    try:
        mm.close()
    except BufferError:  # a task kept (a view of) an argument: it stays mapped
        return False
    return True


def _layout(buffers: list[memoryview]) -> list[tuple[int, int]]:
    layout = []
    offset = 0
    for buf in buffers:
        layout.append((offset, buf.nbytes))
        offset += (buf.nbytes + 63) // 64 * 64  # keep every buffer 64-byte aligned
    return layout


def _write_segment(
    name: str, buffers: list[memoryview], layout: list[tuple[int, int]], flags: int
) -> None:
    # Written with pwrite, not through a mapping: the kernel copies straight into
    # the file's pages, where a mapping of a fresh file first zeroes each page,
    # then takes a fault (or MAP_POPULATE's walk) for it, then tears the page
    # tables down at munmap. 8 MB: 3.2 ms against 6.6 here (docs/performance.md,
    # fourth session).
    fd = os.open(os.path.join(_DIR, name), flags | os.O_RDWR, 0o600)
    try:
        for (start, _), buf in zip(layout, buffers):
            _pwrite_all(fd, buf.cast("B"), start)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:  # a regular file takes it all at once; loop all the same
        done += os.pwrite(fd, data[done:], offset + done)


def _map_segment(name: str, layout: list[tuple[int, int]]) -> mmap.mmap:
    fd = os.open(os.path.join(_DIR, name), os.O_RDWR)
    try:
        # What the layout covers: a segment written again may be larger.
        size = layout[-1][0] + layout[-1][1] if layout else 0
        return mmap.mmap(fd, size or os.fstat(fd).st_size, flags=_MAP_FLAGS)
    finally:
        os.close(fd)


def _views(mm: mmap.mmap, layout: list[tuple[int, int]]) -> list[memoryview]:
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


class Recycler:
    """This process's argument segments, written again once a worker has let go of them.

    Thread-safe: callers' threads pack batches, the dispatcher settles them.
    What it keeps is bounded (``MAX_KEPT`` segments, ``MAX_KEPT_BYTES`` in all,
    none over ``MAX_SEGMENT_BYTES``); a segment that does not fit the next
    batch's buffers (or has since been removed) is simply not used.
    """

    MAX_KEPT = 8
    MAX_KEPT_BYTES = 128 << 20
    MAX_SEGMENT_BYTES = 64 << 20

    def __init__(self, prefix: str) -> None:
        self._namer = namer(prefix)
        self._lock = threading.Lock()
        self._kept: dict[str, int] = {}  # name -> size, ready to be written again
        self._sizes: dict[str, int] = {}  # every segment made, in use or kept
        self._used = time.monotonic()  # when a segment was last written or given back
        self.made = 0  # segments created, for tests and statistics

    def expire(self, idle_s: float) -> float | None:
        """Unlink the kept segments once none was written or given back for ``idle_s``.

        Returns the seconds left until they would be, or None if none is kept.
        A name in ``/dev/shm`` outlives a process killed with all its workers at
        once (SIGKILL to the process group): keeping segments only while they
        are in use bounds what such a kill can leave behind to what a busy pool
        has in flight anyway.
        """
        with self._lock:
            if not self._kept:
                return None
            left = self._used + idle_s - time.monotonic()
            if left > 0:
                return left
        self.clear()
        return None

    def write(self, buffers: list[memoryview], layout: list[tuple[int, int]]) -> str:
        """Write ``buffers`` at ``layout`` into a kept segment that fits, or a new one."""
        need = layout[-1][0] + layout[-1][1]
        name = self._take(need)
        self._used = time.monotonic()
        if name is not None:
            try:
                _write_segment(name, buffers, layout, 0)
                return name
            except FileNotFoundError:
                self._forget(name)  # removed under us (a pool's shutdown): make another
        name = self._namer()
        _write_segment(name, buffers, layout, os.O_CREAT | os.O_EXCL)
        with self._lock:
            self._sizes[name] = need
            self.made += 1
        return name

    def give_back(self, name: str) -> None:
        """A worker let go of the segment: keep it for a later batch, or unlink it."""
        with self._lock:
            self._used = time.monotonic()
            size = self._sizes.get(name)
            keep = (
                size is not None
                and size <= self.MAX_SEGMENT_BYTES
                and len(self._kept) < self.MAX_KEPT
                and sum(self._kept.values()) + size <= self.MAX_KEPT_BYTES
            )
            if keep:
                self._kept[name] = size  # type: ignore[assignment]
            else:
                self._sizes.pop(name, None)
        if not keep:
            unlink(name)

    def discard(self, name: str) -> None:
        """The segment may still be mapped somewhere: never write it again."""
        self._forget(name)
        unlink(name)

    def clear(self) -> None:
        """Unlink every kept segment (those in use go as their batches settle)."""
        with self._lock:
            kept = list(self._kept)
            for name in kept:
                del self._kept[name]
                del self._sizes[name]
        for name in kept:
            unlink(name)

    def _take(self, need: int) -> str | None:
        # The smallest kept segment that holds ``need`` bytes without wasting
        # more than it holds (a 64 MB segment for 1 MB of arguments would keep
        # 63 MB mapped in the worker for nothing).
        with self._lock:
            fits = [(size, name) for name, size in self._kept.items() if need <= size <= 2 * need]
            if not fits:
                return None
            _, name = min(fits)
            del self._kept[name]
            return name

    def _forget(self, name: str) -> None:
        with self._lock:
            self._kept.pop(name, None)
            self._sizes.pop(name, None)


_process_recycler: tuple[int, Recycler] | None = None
_recycler_lock = threading.Lock()


def process_recycler() -> Recycler | None:
    """This process's recycler (segments ``procpool-<pid>-a-<n>``), or None without /dev/shm."""
    global _process_recycler
    if not _AVAILABLE:
        return None
    pid = os.getpid()
    current = _process_recycler
    if current is not None and current[0] == pid:
        return current[1]
    with _recycler_lock:
        if _process_recycler is None or _process_recycler[0] != pid:  # a forked child: its own
            _process_recycler = (pid, Recycler(f"procpool-{pid}-a"))
            atexit.register(_clear_at_exit, pid)
        return _process_recycler[1]


def current_recycler() -> Recycler | None:
    """This process's recycler if it has made one (see process_recycler), else None."""
    current = _process_recycler
    return current[1] if current is not None and current[0] == os.getpid() else None


def arguments_prefix(pid: int) -> str:
    """The prefix of every argument segment the process ``pid`` names (see remove_matching)."""
    return f"procpool-{pid}-a-"


def _clear_at_exit(pid: int) -> None:
    current = _process_recycler
    if current is not None and current[0] == pid == os.getpid():  # not in a forked child
        current[1].clear()


def namer(prefix: str) -> Namer:
    """A thread-safe source of unique segment names under ``prefix``."""
    counter = itertools.count()
    return lambda: f"{prefix}-{next(counter)}"
