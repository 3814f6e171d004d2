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

from ._generic import Generic, TypeVar

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "KEEP_IDLE_S",
    "THRESHOLD",
    "Mappings",
    "Packed",
    "Received",
    "Recycler",
    "argument_segments",
    "current_mappings",
    "current_recycler",
    "descriptor_of",
    "expire_kept",
    "let_go",
    "namer",
    "pack",
    "received_mappings",
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

    # Large bytes and str objects pickle only in band unless swapped
    # (_BytesOutOfBand, _TextOutOfBand). Short containers are searched first;
    # longer ones only once their pickle has turned out large, so that a chunk
    # of many small items pays nothing.
    found = _large_data_inside(obj, _SEARCH_FIRST)
    if found:
        obj = _data_out_of_band(obj, _DATA_DEPTH, {})
    data = pickle.dumps(obj, _PROTOCOL, buffer_callback=keep_small)
    if (
        found is None
        and len(data) >= THRESHOLD
        and _items_average_large(obj, len(data))
        and _large_data_inside(obj, sys.maxsize)
    ):
        large.clear()
        obj = _data_out_of_band(obj, _DATA_DEPTH, {})
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


# How many levels of lists and tuples _data_out_of_band looks into (and the three
# loops of _large_data_inside): a batch's items, each call's argument tuple,
# and the positional tuple of a call with keywords; a reply's (values, errors),
# its values, and a value's tuple.
_DATA_DEPTH = 3
# Containers this long or shorter are searched before pickling (see pack).
_SEARCH_FIRST = 16
# Longer ones, after it, only if their pickle averages this much an item
# (see _items_average_large): the search then costs a few percent of the
# pickling (~40 ns an item, where copying 4 KiB takes ~400 or more).
LARGE_ITEM_MEAN = THRESHOLD // 64


class _BytesOutOfBand:
    """Pickles a ``bytes`` object as a buffer, which ``pack`` may take out of band.

    ``bytes`` itself always pickles in band (the C pickler handles it before
    any hook): a 1 MB argument or result went through the pipe, ~4x slower
    than through a segment (a 1 MB echo, 2 workers: 4.7-5.4 ms). Rebuilt as
    ``bytes``, copied out of the segment, so nothing maps it afterwards and
    the segment is free at once.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[type[bytes], tuple[pickle.PickleBuffer]]:
        return bytes, (pickle.PickleBuffer(self.data),)


class _TextOutOfBand:
    """Pickles a ``str`` as its UTF-8 bytes in a buffer, as _BytesOutOfBand does bytes.

    Encoded as the pickler encodes a str ("surrogatepass": lone surrogates
    come back as they went), and decoded on arrival straight from the segment.
    """

    __slots__ = ("data",)

    def __init__(self, data: str) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[pickle.PickleBuffer]]:
        return _text, (pickle.PickleBuffer(self.data.encode("utf-8", "surrogatepass")),)


def _text(buffer: Any) -> str:
    return str(buffer, "utf-8", "surrogatepass")


def _items_average_large(obj: Any, size: int) -> bool:
    """Whether list or tuple ``obj``, pickled to ``size`` bytes, is worth searching
    for large data: its longest container, down to the _DATA_DEPTH levels that
    are searched, holds no more items than ``size`` / LARGE_ITEM_MEAN. (Only
    containers of up to _SEARCH_FIRST items are looked into for it.)

    The search runs in Python, item by item: for a long list of small objects it
    cost 3-4x their pickling (100,000 ints: 5.2 ms against 1.0 for the pickle), to
    find nothing. A list whose pickle owes its size to its large items holds few
    of them for its size. So a long container whose items average less than
    LARGE_ITEM_MEAN is not searched: a lone large ``bytes`` or ``str`` among many
    small items then goes in band, through the pipe, as before it was looked for.
    """
    longest = len(obj)
    if longest <= _SEARCH_FIRST:
        for item in obj:
            if type(item) is list or type(item) is tuple:
                length = len(item)
                longest = max(longest, length)
                if length <= _SEARCH_FIRST:
                    for inner in item:
                        if type(inner) is list or type(inner) is tuple:
                            longest = max(longest, len(inner))
    return size >= longest * LARGE_ITEM_MEAN


def _large_data_inside(obj: Any, longest: int) -> bool | None:
    """Whether list or tuple ``obj``, or a list or tuple in it down to
    _DATA_DEPTH levels, holds a ``bytes`` or ``str`` of THRESHOLD or more
    (bytes, or characters); None if one of them is longer than ``longest``,
    and was not searched.

    Three plain nested loops, as _DATA_DEPTH says: this runs for every
    message, and a call or a stack per level cost twice as much (0.5 us for a
    call's arguments or a reply, against 0.7-0.8).
    """
    if type(obj) is not list and type(obj) is not tuple:
        return False
    if len(obj) > longest:
        return None
    whole = True
    for item in obj:
        kind = type(item)
        if kind is bytes or kind is str:
            if len(item) >= THRESHOLD:
                return True
        elif kind is list or kind is tuple:
            if len(item) > longest:
                whole = False
                continue
            for inner in item:
                kind = type(inner)
                if kind is bytes or kind is str:
                    if len(inner) >= THRESHOLD:
                        return True
                elif kind is list or kind is tuple:
                    if len(inner) > longest:
                        whole = False
                        continue
                    for leaf in inner:
                        kind = type(leaf)
                        if (kind is bytes or kind is str) and len(leaf) >= THRESHOLD:
                            return True
    return False if whole else None


def _data_out_of_band(obj: Any, depth: int, seen: dict[int, Any]) -> Any:
    """A copy of ``obj`` whose ``bytes`` and ``str`` of THRESHOLD or more, in it
    or in the lists and tuples it holds down to ``depth`` levels, pickle out of
    band (``obj`` itself where there are none). ``seen`` maps each object
    already replaced to its replacement: what several items refer to stays one
    object, which the pickle carries once."""
    kind = type(obj)
    if kind is bytes or kind is str:
        if len(obj) < THRESHOLD:
            return obj
    elif (kind is not list and kind is not tuple) or depth == 0:
        return obj
    new = seen.get(id(obj))
    if new is None:
        if kind is bytes:
            new = _BytesOutOfBand(obj)
        elif kind is str:
            new = _TextOutOfBand(obj)
        else:
            copy = [_data_out_of_band(item, depth - 1, seen) for item in obj]
            new = copy if kind is list else tuple(copy)
        seen[id(obj)] = new
    return new


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

    def map(self, layout: list[tuple[int, int]]) -> Any:
        """What the message's buffers are read from: an exporter over this
        process's kept mapping of the segment (see Mappings), else a mapping of
        its own."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            raise OSError(
                errno.EMFILE, "the segment's descriptor was dropped on arrival: no descriptor left"
            )
        try:
            lent = received_mappings().lend(fd, _extent(layout))
            return lent if lent is not None else _map(fd, _extent(layout))
        finally:
            os.close(fd)

    def __del__(self) -> None:
        if self.fd >= 0:  # a message dropped unread (its batch had failed already)
            os.close(self.fd)


def unpack(message: Any, on_free: Callable[[str], object] | None = None) -> Any:
    """Rebuild what :func:`pack` made.

    ``on_free(id)`` is called once nothing uses a received segment's buffers
    any more, from whichever thread drops the last object built on them.
    """
    if isinstance(message, bytes):
        return pickle.loads(message)
    source = _mapping(message)
    if on_free is not None and len(message) == 4:
        weakref.finalize(source, on_free, message[1]).atexit = False
    return pickle.loads(message[0], buffers=_views(source, message[2]))


def unpack_arguments(message: Any) -> tuple[Any, Any]:
    """Rebuild a batch's arguments; also return what their buffers are read
    from (None if nothing was large), for :func:`let_go` after the batch."""
    if isinstance(message, bytes):
        return pickle.loads(message), None
    source = _mapping(message)
    items = pickle.loads(message[0], buffers=_views(source, message[2]))
    if isinstance(source, mmap.mmap):
        return items, source
    return items, weakref.ref(source)


def let_go(source: Any) -> bool:
    """Whether nothing uses a batch's argument segment any more (a mapping of
    the batch's own is closed); False if something does, or none was given."""
    if source is None:
        return False
    if isinstance(source, weakref.ref):
        # An exporter over a kept mapping (Mappings): it dies with the last
        # object built on it.
        return source() is None
    try:
        source.close()
    except BufferError:  # a task kept (a view of) an argument: it stays mapped
        return False
    return True


def _mapping(message: tuple[Any, ...]) -> Any:
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
    # tables down at munmap. 8 MB: 3.2 ms against 6.6 here (docs/performance-journal.md,
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


def _views(source: Any, layout: list[tuple[int, int]]) -> list[memoryview]:
    whole = memoryview(source).cast("B")
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


class _Kept:
    """What a process keeps to use again (segments, mappings), for as long as
    it is used: ``expire`` lets all of it go once none was used for a while."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[Any, Any] = {}
        self._used = time.monotonic()  # when something kept was last used, or came back

    def kept(self) -> int:
        """How many are kept."""
        return len(self._kept)

    def expire(self, idle_s: float) -> float | None:
        """Let go of all that is kept once none was used for ``idle_s``.

        Returns the seconds left until then, or None if nothing is kept: an idle
        pool holds no memory for work that may never come.
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
        """Let go of all that is kept now."""
        raise NotImplementedError


class Recycler(_Kept):
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
        super().__init__()
        _RECYCLERS.add(self)
        self._max_kept_bytes = max_kept_bytes
        self._serials = itertools.count()
        self._kept: dict[str, int] = {}  # id -> capacity, ready to be written again
        self._lent: dict[str, int] = {}  # id -> capacity, with a receiver
        self._maps: dict[str, mmap.mmap] = {}  # id -> this process's mapping, once written again
        self.made = 0  # segments created, for tests and statistics

    def write(self, buffers: list[memoryview], layout: list[tuple[int, int]]) -> str:
        """Write ``buffers`` at ``layout`` into a kept segment that fits, or a new one."""
        need = _extent(layout)
        self._used = time.monotonic()
        segment = self._take(need)
        fresh = segment is None
        if segment is None:
            segment = self._create(_capacity(need))
        try:
            if fresh:
                _write(_descriptor(segment), buffers, layout)
            else:
                self._write_again(segment, buffers, layout)
        except BaseException:
            self.discard(segment)
            raise
        return segment

    def _create(self, capacity: int) -> str:
        fd = os.memfd_create("procpool", os.MFD_CLOEXEC)
        segment = f"{_FD}{fd}:{next(self._serials)}"
        with self._lock:
            self._lent[segment] = capacity
            self.made += 1
        try:
            # Its whole capacity, so that a receiver maps it once (Mappings);
            # tmpfs allocates a page only when it is written.
            os.ftruncate(fd, capacity)
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
        self._close(segment)

    def discard(self, segment: str) -> None:
        """``segment`` may still be mapped somewhere: never write it again."""
        with self._lock:
            known = self._lent.pop(segment, None) or self._kept.pop(segment, None)
        if known is not None:
            self._close(segment)

    def sent(self, segment: str) -> None:
        """``segment``'s descriptor went out: close it if too many are lent already."""
        with self._lock:
            if len(self._lent) <= self.MAX_LENT or segment not in self._lent:
                return
            del self._lent[segment]
        self._close(segment)

    def close_in_child(self) -> None:
        """In a child just forked (one thread runs, no locks): close the copies
        of the parent's segments."""
        segments = [*self._kept, *self._lent]
        maps = list(self._maps.values())
        self._kept, self._lent, self._maps = {}, {}, {}
        self._lock = threading.Lock()
        for mm in maps:
            _close_if_unused(mm)
        for segment in segments:
            try:
                os.close(_descriptor(segment))
            except OSError:
                pass

    def _write_again(
        self, segment: str, buffers: list[memoryview], layout: list[tuple[int, int]]
    ) -> None:
        # Through a mapping kept for the segment: a copy into pages that are
        # mapped already costs ~2/3 of pwrite's page-by-page path (8 MB: 0.9 ms
        # against 1.4 here). A fresh segment is written with pwrite (_write):
        # its pages do not exist yet.
        ctypes = _ctypes()
        mm = self._maps.get(segment)
        if mm is None:
            if ctypes is None:
                _write(_descriptor(segment), buffers, layout)
                return
            fd = _descriptor(segment)
            mm = _map_kept(fd, os.fstat(fd).st_size, _extent(layout))
            with self._lock:
                self._maps[segment] = mm
        # One c_char at each buffer's start gives its address, and holds it
        # while the copy runs; an array type per length would be a new class
        # (~20 us) for every size of buffer sent.
        dst = ctypes.c_char.from_buffer(mm)
        try:
            base = ctypes.addressof(dst)
            for (start, length), buf in zip(layout, buffers):
                if buf.readonly:  # ctypes takes writable buffers only
                    _write(_descriptor(segment), [buf], [(start, length)])
                    continue
                src = ctypes.c_char.from_buffer(buf)
                # Without the GIL, as pwrite.
                ctypes.memmove(base + start, ctypes.addressof(src), length)
                del src
        finally:
            del dst  # so that the mapping can be closed

    def _close(self, segment: str) -> None:
        with self._lock:
            mm = self._maps.pop(segment, None)
        if mm is not None:
            _close_if_unused(mm)
        os.close(_descriptor(segment))

    def clear(self) -> None:
        """Close every kept segment (those lent go as they are given back or discarded)."""
        with self._lock:
            kept, self._kept = list(self._kept), {}
        for segment in kept:
            self._close(segment)

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


class Mappings(_Kept):
    """The segments this process received, kept mapped to be read again.

    Mapping a segment and unmapping it cost about as much as writing it (8 MB:
    ~0.5 and ~0.4 ms here; the kernel walks every page both times). Senders
    write their kept segments again (Recycler), so the same segment comes back
    with later messages: the receiver keeps its mapping, known by the file's
    inode, and lends each message an exporter over it (a ctypes array). What
    the message's objects are built on holds that exporter, so its death says
    that nothing uses them any more, as a mapping's did. Bounded: beyond
    ``MAX_KEPT`` mappings or ``max_bytes`` in all (those in use included), the
    least recently used that nothing uses are closed; a segment too large for
    its sender to keep is mapped per message, as before. All are let go once
    none was used for ``KEEP_IDLE_S`` (``expire``); one that something still
    uses lives on with its exporters.
    """

    MAX_KEPT = 32

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self._max_bytes = max_bytes
        self._kept: dict[tuple[int, int, int], mmap.mmap] = {}  # least recently used first
        self._bytes = 0

    def lend(self, fd: int, extent: int) -> Any | None:
        """An exporter of the segment behind ``fd``, or None where it is not kept."""
        ctypes = _ctypes()
        stat = os.fstat(fd)
        size = max(stat.st_size, extent)
        if ctypes is None or size > Recycler.MAX_SEGMENT_BYTES:
            return None
        # With its size: a file that grew (senders size theirs once, see
        # Recycler.write) is mapped anew, and the old mapping trimmed in time.
        key = (stat.st_dev, stat.st_ino, size)
        with self._lock:
            self._used = time.monotonic()
            mm = self._kept.pop(key, None)
            if mm is None:
                mm = _map_kept(fd, size, extent)
                self._bytes += size
            self._kept[key] = mm
            # Made while no other thread can close the mapping (expire, clear):
            # from here on, closing it fails while the exporter lives.
            exporter = (ctypes.c_char * len(mm)).from_buffer(mm)
            self._trim()
        return exporter

    def _trim(self) -> None:
        # Over the bounds, close the least recently used mappings that nothing
        # uses. One in use stays: it costs nothing that its objects do not hold
        # already, and dropped, it would be mapped again when it comes back (a
        # map's results, all held by the caller until the map returns).
        for key, mm in list(self._kept.items()):
            if len(self._kept) <= self.MAX_KEPT and self._bytes <= self._max_bytes:
                return
            size = len(mm)
            try:
                mm.close()
            except BufferError:
                continue
            del self._kept[key]
            self._bytes -= size

    def clear(self) -> None:
        """Drop every mapping; each is closed unless something still uses it."""
        with self._lock:
            kept, self._kept, self._bytes = list(self._kept.values()), {}, 0
        for mm in kept:
            _close_if_unused(mm)

    def close_in_child(self) -> None:
        """In a child just forked (one thread runs, no locks): close the parent's
        mappings but for those something uses."""
        kept, self._kept, self._bytes = list(self._kept.values()), {}, 0
        self._lock = threading.Lock()
        for mm in kept:
            _close_if_unused(mm)


def _map_kept(fd: int, size: int, extent: int) -> mmap.mmap:
    # The whole file, so that a later message that uses more of it (a sender's
    # segments hold up to 1/8 more than their first contents, see _capacity)
    # finds it mapped; only what this message uses is faulted in at once.
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, **_UNTRACKED)
    try:
        mm.madvise(_MADV_POPULATE_WRITE, 0, extent)
    except (OSError, ValueError):  # before Linux 5.14: faulted in page by page
        pass
    return mm


# Fault a range in with one call (Linux 5.14); Python names it from 3.14 on.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _close_if_unused(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # an exporter lives: the mapping goes with the last of them
        pass


_CTYPES: Any = None


def _ctypes() -> Any:
    """The ctypes module, imported at the first segment written again or
    received; None in a Python built without it (then a mapping per message,
    and pwrite)."""
    global _CTYPES
    if _CTYPES is None:
        try:
            import ctypes
        except ImportError:
            _CTYPES = False
        else:
            _CTYPES = ctypes
    return _CTYPES or None


_RECYCLERS: weakref.WeakSet[Recycler] = weakref.WeakSet()


def _close_inherited() -> None:
    # In a child just forked: the parent's segments are not this process's to
    # write, and copies of their descriptors and mappings would keep their
    # memory alive for as long as the child lives (a second pool's zygote and
    # workers, forked while the first pool keeps segments). A mapping that
    # something uses (a result the parent held at the fork) stays.
    mappings = _mappings.forget()
    if mappings is not None:
        mappings.close_in_child()
    try:
        recyclers = list(_RECYCLERS)
    except Exception:  # forked while another thread changed the set: keep the copies
        recyclers = []
    # Only now: the set holds its recyclers weakly, and this was the last
    # reference to the process's own (whose descriptors were left open in
    # every child until this was moved here).
    _recyclers.forget()
    for recycler in recyclers:
        recycler.close_in_child()


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


_T = TypeVar("_T")


class _PerProcess(Generic[_T]):
    """One object per process, made at first use: a forked child makes its own."""

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._current: tuple[int, _T] | None = None

    def get(self) -> _T:
        pid = os.getpid()
        current = self._current
        if current is None or current[0] != pid:
            with self._lock:
                if self._current is None or self._current[0] != pid:
                    self._current = (pid, self._make())
                current = self._current
        return current[1]

    def current(self) -> _T | None:
        """This process's object if it has made one, else None."""
        current = self._current
        return current[1] if current is not None and current[0] == os.getpid() else None

    def forget(self) -> _T | None:
        """In a child just forked (one thread runs): drop the parent's, and return it."""
        current, self._current = self._current, None
        self._lock = threading.Lock()  # another thread may have held it at the fork
        return None if current is None else current[1]


_recyclers: _PerProcess[Recycler] = _PerProcess(Recycler)
_mappings: _PerProcess[Mappings] = _PerProcess(lambda: Mappings(Recycler.MAX_KEPT_BYTES))


def process_recycler() -> Recycler | None:
    """This process's recycler for batches' arguments, or None without memfd segments."""
    return _recyclers.get() if _MEMFD else None


def current_recycler() -> Recycler | None:
    """This process's recycler if it has made one (see process_recycler), else None."""
    return _recyclers.current()


def expire_kept(recycler: Recycler | None) -> float | None:
    """Let go of ``recycler``'s kept segments and of this process's kept mappings
    once each was unused for ``KEEP_IDLE_S``; the seconds until the next is due,
    or None if nothing is kept (see _Kept.expire)."""
    lefts = [
        left
        for kept in (recycler, _mappings.current())
        if kept is not None and (left := kept.expire(KEEP_IDLE_S)) is not None
    ]
    return min(lefts, default=None)


def received_mappings() -> Mappings:
    """This process's kept mappings of segments it received."""
    return _mappings.get()


def current_mappings() -> Mappings | None:
    """This process's kept mappings if it has received a segment, else None."""
    return _mappings.current()


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
