"""Large buffers cross between processes through shared memory, not the pipe.

Pickle protocol 5 lets a pickler hand its large buffers (NumPy arrays, bytes-like
objects exposing ``__reduce_ex__`` with ``PickleBuffer``) to a callback instead
of copying them into the stream. ``pack`` copies every such buffer above
``THRESHOLD`` once into one shared-memory segment; the message then carries only
the pickle stream and a reference to the segment. ``unpack`` maps the segment
and rebuilds the objects *on top of the mapping*: no copy on the receiving side,
and the memory lives as long as the arrays that use it.

Segments are anonymous files (``memfd_create``) whose descriptors travel with
their message over the worker's Unix socket (``SCM_RIGHTS``, see
``_protocol.send``); the receiver maps one and closes its descriptor at once.
Nothing has a name, so nothing can be left behind: the kernel frees a segment
once no process holds it, however they ended (a whole process group killed at
once included).

Each sender keeps its segments to write again (``Recycler``): writing into a
fresh file allocates and zeroes every page first, ~4x the cost of writing into
one whose pages exist (8 MB: 3.9 ms against 0.95 here). A segment is written
again only once its receiver has let go of it:

* a batch's arguments: the worker closes its mapping after the batch, which
  fails while a task kept an argument or a view of one; its reply says whether
  it succeeded (``let_go``);
* a result: the parent tells the worker once nothing maps it any more, i.e. the
  caller dropped every object built on it (a weak reference to the mapping;
  ``P.FREED``).

So what a task or a caller keeps is never written over.

Where ``memfd_create`` or descriptor passing is missing, segments are named
files in ``/dev/shm`` (``namer``), never written again: the receiver unlinks a
segment as soon as it has mapped it; a worker names the segments it creates
``<pool prefix>.<worker id>-<n>``, and when a worker dies the dispatcher removes
every segment left under its name, as a pool that shuts down does under its
prefix. Where neither exists, everything goes in-band.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import pickle
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

__all__ = [
    "KEEP_IDLE_S",
    "THRESHOLD",
    "Packed",
    "Received",
    "Recycler",
    "argument_segments",
    "current_recycler",
    "descriptor_of",
    "let_go",
    "namer",
    "pack",
    "remove_matching",
    "unlink",
    "unpack",
    "unpack_arguments",
    "worker_segments",
]

# Buffers at least this large go through shared memory.
THRESHOLD = 256 * 1024
# Segments kept to write again are closed once none was used this long: a pool
# between two maps keeps them, an idle one holds no memory for work that may
# never come. The dispatcher times it for the pool's process, each worker for
# itself (Recycler.expire).
KEEP_IDLE_S = 1.0
_DIR = "/dev/shm"
_PROTOCOL = 5


def _named_available() -> bool:
    """Whether segments can be named in /dev/shm (the fallback for _memfd_available)."""
    return os.path.isdir(_DIR) and os.access(_DIR, os.W_OK)


def _memfd_available() -> bool:
    if not (hasattr(os, "memfd_create") and hasattr(socket, "send_fds")):
        return False
    try:
        os.close(os.memfd_create("procpool-probe", os.MFD_CLOEXEC))
    except OSError:  # ENOSYS, or a seccomp filter
        return False
    return True


_AVAILABLE = _named_available()
_MEMFD = _memfd_available()
# Fault every page in with one call instead of one fault per 4 KiB page.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


Namer = Callable[[], str]
# What pack() returns: the pickle alone, or (pickle, segment, buffer layout). The
# segment is a name in /dev/shm, or a Recycler's id ("fd:<descriptor>:<serial>")
# whose descriptor goes with the message (_protocol.send). What the receiver
# gets for the latter is (pickle, id, layout, Received).
Packed = bytes | tuple[bytes, str, list[tuple[int, int]]]
_FD = "fd:"


def pack(obj: Any, segments: Namer | Recycler | None) -> Packed:
    """Pickle ``obj``; large buffers go to a shared-memory segment.

    The segment is one that ``segments`` gives (a Recycler), or a new file it
    names (a Namer). Returns the pickle alone when nothing was large (or
    ``segments`` is None), or when the segment could not be written (then
    everything is in the pickle).
    """
    if segments is None:
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
        if isinstance(segments, Recycler):
            return data, segments.write(buffers, layout), layout
        name = segments()
        _write_named(name, buffers, layout)
        return data, name, layout
    except OSError:
        # Out of memory or descriptors, /dev/shm full (ENOSPC), a file size
        # limit (EFBIG): the pipe still carries it, one copy slower.
        return pickle.dumps(obj, _PROTOCOL)


def descriptor_of(message: Any) -> int | None:
    """The descriptor to send along with a packed ``message``, if it has one."""
    if type(message) is tuple and len(message) == 3 and message[1].startswith(_FD):
        return int(message[1].split(":")[1])
    return None


class Received:
    """A segment's descriptor that came with a message; closed once mapped, or dropped."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def map(self, layout: list[tuple[int, int]]) -> mmap.mmap:
        fd, self.fd = self.fd, -1
        if fd < 0:
            raise OSError(
                errno.EMFILE, "the segment's descriptor was dropped on arrival: no descriptor left"
            )
        try:
            return _map(fd, _extent(layout))
        finally:
            os.close(fd)

    def __del__(self) -> None:
        if self.fd >= 0:  # a message dropped unread (its batch had failed already)
            os.close(self.fd)


def unpack(message: Any, on_free: Callable[[str], object] | None = None) -> Any:
    """Rebuild what :func:`pack` made.

    ``on_free(id)`` is called once nothing uses a received segment's mapping
    any more, from whichever thread drops the last object built on it.
    """
    if isinstance(message, bytes):
        return pickle.loads(message)
    mm = _mapping(message)
    if on_free is not None and len(message) == 4:
        weakref.finalize(mm, on_free, message[1]).atexit = False
    return pickle.loads(message[0], buffers=_views(mm, message[2]))


def unpack_arguments(message: Any) -> tuple[Any, mmap.mmap | None]:
    """Rebuild a batch's arguments, and return the mapping of their segment, if any."""
    if isinstance(message, bytes):
        return pickle.loads(message), None
    mm = _mapping(message)
    return pickle.loads(message[0], buffers=_views(mm, message[2])), mm


def let_go(mm: mmap.mmap | None) -> bool:
    """Close a segment's mapping; False if something still uses it (or none was given)."""
    if mm is None:
        return False
    try:
        mm.close()
    except BufferError:  # a task kept (a view of) an argument: it stays mapped
        return False
    return True


def _mapping(message: tuple[Any, ...]) -> mmap.mmap:
    if len(message) == 4:
        received: Received = message[3]
        return received.map(message[2])
    _, name, layout = message
    fd = os.open(os.path.join(_DIR, name), os.O_RDWR)
    try:
        return _map(fd, _extent(layout))
    finally:
        os.close(fd)
        unlink(name)


def _map(fd: int, size: int) -> mmap.mmap:
    # Before 3.13 an mmap object keeps a copy of the descriptor for as long as
    # it lives: one per result the caller holds (docs/pools.md, Large arrays).
    return mmap.mmap(fd, size, flags=_MAP_FLAGS, **_UNTRACKED)


_UNTRACKED: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def _layout(buffers: list[memoryview]) -> list[tuple[int, int]]:
    layout = []
    offset = 0
    for buf in buffers:
        layout.append((offset, buf.nbytes))
        offset += (buf.nbytes + 63) // 64 * 64  # keep every buffer 64-byte aligned
    return layout


def _extent(layout: list[tuple[int, int]]) -> int:
    # What the layout covers: a segment written again may be larger.
    return layout[-1][0] + layout[-1][1]


def _write(fd: int, buffers: list[memoryview], layout: list[tuple[int, int]]) -> None:
    # Written with pwrite, not through a mapping: the kernel copies straight into
    # the file's pages, where a mapping of a fresh file first zeroes each page,
    # then takes a fault (or MAP_POPULATE's walk) for it, then tears the page
    # tables down at munmap. 8 MB: 3.2 ms against 6.6 here (docs/performance.md,
    # fourth session).
    for (start, _), buf in zip(layout, buffers):
        data = buf.cast("B")
        done = 0
        while done < data.nbytes:  # a regular file takes it all at once; loop all the same
            done += os.pwrite(fd, data[done:], start + done)


def _write_named(name: str, buffers: list[memoryview], layout: list[tuple[int, int]]) -> None:
    fd = os.open(os.path.join(_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        _write(fd, buffers, layout)
    except BaseException:
        unlink(name)
        raise
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
    """Anonymous segments, written again once their receiver has let go of them.

    The pool's process has one for batches' arguments (``process_recycler``),
    each worker one for its results. Thread-safe: callers' threads pack
    batches, the dispatcher settles them. A segment is known by an id
    (``fd:<descriptor>:<serial>``) that stays unique after its descriptor is
    closed and the number reused. What it keeps is bounded (``MAX_KEPT``
    segments, ``max_kept_bytes`` in all, none over ``MAX_SEGMENT_BYTES``), and
    so is what it holds for receivers that may give segments back
    (``MAX_LENT``: beyond that, a segment's descriptor is closed once sent,
    and it lives on with its receiver alone).
    """

    MAX_KEPT = 16
    MAX_LENT = 64
    MAX_KEPT_BYTES = 256 << 20
    MAX_SEGMENT_BYTES = 64 << 20

    def __init__(self, max_kept_bytes: int = MAX_KEPT_BYTES) -> None:
        _RECYCLERS.add(self)
        self._max_kept_bytes = max_kept_bytes
        self._lock = threading.Lock()
        self._serials = itertools.count()
        self._kept: dict[str, int] = {}  # id -> capacity, ready to be written again
        self._lent: dict[str, int] = {}  # id -> capacity, with a receiver
        self._used = time.monotonic()  # when a segment was last written or given back
        self.made = 0  # segments created, for tests and statistics

    def write(self, buffers: list[memoryview], layout: list[tuple[int, int]]) -> str:
        """Write ``buffers`` at ``layout`` into a kept segment that fits, or a new one."""
        need = _extent(layout)
        self._used = time.monotonic()
        segment = self._take(need)
        if segment is None:
            fd = os.memfd_create("procpool", os.MFD_CLOEXEC)
            segment = f"{_FD}{fd}:{next(self._serials)}"
            with self._lock:
                self._lent[segment] = _capacity(need)
                self.made += 1
        try:
            _write(_descriptor(segment), buffers, layout)
        except BaseException:
            self.discard(segment)
            raise
        return segment

    def give_back(self, segment: str) -> None:
        """Its receiver let go of ``segment``: keep it to write again, or close it."""
        with self._lock:
            self._used = time.monotonic()
            capacity = self._lent.pop(segment, None)
            if capacity is None:
                return  # closed already (see MAX_LENT), or not ours
            if (
                capacity <= self.MAX_SEGMENT_BYTES
                and len(self._kept) < self.MAX_KEPT
                and sum(self._kept.values()) + capacity <= self._max_kept_bytes
            ):
                self._kept[segment] = capacity
                return
        os.close(_descriptor(segment))

    def discard(self, segment: str) -> None:
        """``segment`` may still be mapped somewhere: never write it again."""
        with self._lock:
            known = self._lent.pop(segment, None) or self._kept.pop(segment, None)
        if known is not None:
            os.close(_descriptor(segment))

    def sent(self, segment: str) -> None:
        """``segment``'s descriptor went out: close it if too many are lent already."""
        with self._lock:
            if len(self._lent) <= self.MAX_LENT or segment not in self._lent:
                return
            del self._lent[segment]
        os.close(_descriptor(segment))

    def kept(self) -> int:
        """How many segments wait to be written again."""
        return len(self._kept)

    def expire(self, idle_s: float) -> float | None:
        """Close the kept segments once none was written or given back for ``idle_s``.

        Returns the seconds left until they would be, or None if none is kept:
        an idle pool holds no memory for batches that may never come.
        """
        with self._lock:
            if not self._kept:
                return None
            left = self._used + idle_s - time.monotonic()
            if left > 0:
                return left
        self.clear()
        return None

    def clear(self) -> None:
        """Close every kept segment (those lent go as they are given back or discarded)."""
        with self._lock:
            kept, self._kept = list(self._kept), {}
        for segment in kept:
            os.close(_descriptor(segment))

    def _take(self, need: int) -> str | None:
        # The smallest kept segment that holds ``need`` bytes without wasting
        # more than it holds (a 64 MB segment for 1 MB of arguments would keep
        # 63 MB mapped in the worker for nothing).
        with self._lock:
            fits = [(size, s) for s, size in self._kept.items() if need <= size <= 2 * need]
            if not fits:
                return None
            size, segment = min(fits)
            del self._kept[segment]
            self._lent[segment] = size
            return segment


_RECYCLERS: weakref.WeakSet[Recycler] = weakref.WeakSet()


def _close_inherited() -> None:
    # In a child just forked: the parent's segments are not this process's to
    # write, and copies of their descriptors would keep their memory alive for
    # as long as the child lives (a second pool's zygote and workers, forked
    # while the first pool keeps segments). One thread runs here: no locks.
    global _process_recycler
    _process_recycler = None
    try:
        recyclers = list(_RECYCLERS)
    except Exception:  # forked while another thread changed the set: keep the copies
        return
    for recycler in recyclers:
        segments = [*recycler._kept, *recycler._lent]
        recycler._kept, recycler._lent = {}, {}
        for segment in segments:
            try:
                os.close(_descriptor(segment))
            except OSError:
                pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


def _descriptor(segment: str) -> int:
    return int(segment.split(":")[1])


def _capacity(need: int) -> int:
    """What a new segment of ``need`` bytes may hold when written again: ``need``
    rounded up to an eighth of its power of two, so that a slightly larger
    array (a result of one more row) still fits. Pages past ``need`` are only
    allocated if a later write reaches them."""
    step = 1 << max(0, need.bit_length() - 4)
    return -(-need // step) * step


_process_recycler: tuple[int, Recycler] | None = None
_recycler_lock = threading.Lock()


def process_recycler() -> Recycler | None:
    """This process's recycler for batches' arguments, or None without memfd segments."""
    global _process_recycler
    if not _MEMFD:
        return None
    pid = os.getpid()
    current = _process_recycler
    if current is not None and current[0] == pid:
        return current[1]
    with _recycler_lock:
        if _process_recycler is None or _process_recycler[0] != pid:  # a forked child: its own
            _process_recycler = (pid, Recycler())
        return _process_recycler[1]


def current_recycler() -> Recycler | None:
    """This process's recycler if it has made one (see process_recycler), else None."""
    current = _process_recycler
    return current[1] if current is not None and current[0] == os.getpid() else None


def worker_segments(prefix: str | None, on_first: Callable[[], object]) -> Namer | Recycler | None:
    """Where a worker packs its results: a Recycler, else named files under ``prefix``.

    ``on_first()`` runs before the first named file is made (see P.SLOT_SHM).
    """
    if _MEMFD:
        return Recycler(128 << 20)  # half the parent's bound: a pool has many workers
    if not prefix or not _AVAILABLE:
        return None
    names = namer(prefix)

    def name() -> str:
        on_first()
        return names()

    return name


def argument_segments() -> Namer | Recycler | None:
    """Where this process packs batches' arguments."""
    return process_recycler() or _process_namer()


_process_namer_state: tuple[int, Namer] | None = None


def _process_namer() -> Namer | None:
    """This process's namer (``procpool-<pid>-a-<n>``), or None where shared memory is missing."""
    global _process_namer_state
    if not _AVAILABLE:
        return None
    pid = os.getpid()
    if _process_namer_state is None or _process_namer_state[0] != pid:  # a forked child: its own
        _process_namer_state = (pid, namer(f"procpool-{pid}-a"))
    return _process_namer_state[1]


def namer(prefix: str) -> Namer:
    """A thread-safe source of unique segment names under ``prefix``."""
    counter = itertools.count()
    return lambda: f"{prefix}-{next(counter)}"
