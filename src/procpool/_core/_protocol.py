"""The messages that travel between the dispatcher and a worker.

Every message is one ``Connection.send_bytes`` frame holding a pickled tuple
whose first element is a one-letter tag. Arguments and results ride inside as
an already-pickled ``bytes`` payload (protocol 5), so a payload that fails to
unpickle can be blamed on its batch instead of killing the conversation.

Parent to worker::

    (FN, fn_id, fn_bytes)                  cloudpickled callable, once per worker
    (FREED, segments)                      result segments nothing maps in the parent
                                           any more: the worker may write them again
    (BATCH, batch_id, fn_id, star, timed, first_index, seed, linger, payload)
                                           seed: None, or (S, index of the batch's first
                                           task) from which each task's stream derives;
                                           linger: a caller waits for it alone (the direct
                                           path), and may send the next call as soon as
                                           it has the reply: wait for it spinning
    (OFFER, ...)                           a BATCH sent ahead of its turn, behind work
                                           that may be long: run it only if the token the
                                           worker takes from its slot's offers is its id
                                           (see _slot.py); else the dispatcher took it
                                           back for another worker: no reply
    (STOP,)

Worker to parent::

    (READY, pid)                           initializer done, serving
    (INIT_FAILED, name, error)             initializer raised; worker exits
    (RESULTS, batch_id, running, transfer, recycle, let_go, payload)
                                           seconds spent running tasks and (un)pickling;
                                           recycle = the worker is over its memory limit;
                                           let_go = it closed its mapping of the batch's
                                           argument segment (see _shm.Recycler);
                                           payload = pickle((values, errors))
    (PARTIAL, batch_id, count, payload)    the results of the batch's next count tasks,
                                           sent ahead of its RESULTS
"""

from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import socket
import struct
from collections import OrderedDict
from collections.abc import Iterator

from .._exceptions import RemoteTraceback, SerializationError
from . import _shm as shm

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from typing import Any

FN = "F"
BATCH = "B"
OFFER = "O"  # a BATCH that the dispatcher may take back until the worker starts it
STOP = "S"
READY = "R"
INIT_FAILED = "I"
RESULTS = "D"
PARTIAL = "P"  # the results of a batch's first tasks, ahead of the rest (see _worker._Stream)
FREED = "X"

# A batch's results go ahead in pieces once they add up to this many bytes (by
# sys.getsizeof): one 25 MB message of 25 results is several times slower to
# pickle, send and unpickle than 25 of 1 MB, which stay in cache and overlap
# with the next task.
PIECE_BYTES = 1 << 20
# The results of single calls sent as one batch (star CALLS) go ahead between
# calls, a piece once this long has passed since the batch began or the last piece
# went: a call's result waits about this long for those after it, or, where the
# next one turns out long, until it ends. A worker that dies loses the results of
# the calls it ran since the last piece.
CALLS_PIECE_S = 0.001

# How many callables a worker keeps unpickled, and how many bytes of them
# (pickled); the dispatcher mirrors this cache exactly (admit_callable), so it
# knows which callables it must send again.
FN_CACHE_SIZE = 64
FN_CACHE_BYTES = 32 * 1024 * 1024

# How a batch's items become call arguments.
CALL_ONE = 0  # fn(item)
CALL_STAR = 1  # fn(*item)
CALL_ARGS_KWARGS = 2  # fn(*item[0], **item[1]): one single call (apply_async, submit)
# Several single calls sent as one batch (see Dispatcher._merge): the payload is
# the list of their CALL_ARGS_KWARGS payloads, each pickled when it was submitted.
CALLS = 3
# Added to CALL_ONE or CALL_STAR: a map's chunks sent as one batch (see
# Dispatcher._merge). The payload is the list of (tasks, payload) of each chunk,
# its payload unpickled just before its first task runs, and each chunk's
# results go back on their own (P.PARTIAL) as its last task ends: what each
# chunk would have been alone.
JOINED = 4

PROTOCOL = 5

# Shared slot layout, one per worker (see _worker.py): which batch and which
# item of it the worker is on, and when that item started (time.monotonic()).
# SLOT_SPAN: how many items from SLOT_ITEM on are running as one unit (1, except in
# the fast path for many tiny tasks, which publishes progress every FAST_SPAN items).
# SLOT_ALIVE: when (time.monotonic()) the worker finished starting up, before its
# initializer; 0 until then. A worker that never gets there is stuck (see
# Dispatcher.START_TIMEOUT).
# SLOT_SHM: 1 once the worker is about to make its first shared-memory segment;
# only then must the parent look in /dev/shm for what it left behind.
SLOT_BATCH, SLOT_ITEM, SLOT_STARTED, SLOT_SPAN, SLOT_ALIVE, SLOT_SHM = 0, 1, 2, 3, 4, 5
SLOT_SIZE = 6
FAST_SPAN = 256
# SLOT_SPAN while a worker sends the results of tasks before SLOT_ITEM ahead of its
# reply (P.PARTIAL): no task runs.
SPAN_SENDING = 0
# Batches this long run in the fast path; shorter ones keep one slot write per
# item, so a crash is pinned to exactly one task.
FAST_MIN_ITEMS = 64
ITEM_UNPICKLING = -1  # slot item while the batch's arguments are being unpickled


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, PROTOCOL)


# BATCH, OFFER, RESULTS and PARTIAL end with a payload (pickled arguments or results).
# One this large travels as a frame of its own right after its message, not
# pickled into it: that copy, and the one unpickling the message makes, cost
# ~0.5 ms per MB on each side.
FRAME_BYTES = 64 * 1024
_WITH_PAYLOAD = frozenset((BATCH, OFFER, RESULTS, PARTIAL))


def _one_frame(msg: tuple[Any, ...]) -> bool:
    """Whether ``msg`` travels as one frame: no payload large enough for a frame of
    its own, and no shared-memory segment's descriptor to follow it."""
    if msg[0] not in _WITH_PAYLOAD:
        return True
    payload = msg[-1]
    if isinstance(payload, bytes):
        return len(payload) < FRAME_BYTES
    return shm.descriptor_of(payload) is None


def send(conn: Connection, msg: tuple[Any, ...]) -> None:
    """Send ``msg``; a large payload (its last field) follows in a frame of its own,
    and a shared-memory segment's descriptor in a one-byte message of its own."""
    if _one_frame(msg):
        conn.send_bytes(dumps(msg))
        return
    payload = msg[-1]
    if isinstance(payload, bytes):
        conn.send_bytes(dumps((*msg[:-1], None)))
        conn.send_bytes(payload)
        return
    fd = shm.descriptor_of(payload)
    conn.send_bytes(dumps(msg))
    if fd is not None:
        # Right behind the frame, which the receiver reads to its last byte and
        # no further: the descriptor is attached to the next byte it reads.
        with _unix_socket(conn) as sock:
            socket.send_fds(sock, [b"S"], [fd])


# multiprocessing.Connection's framing: a signed 32-bit big-endian length, then the bytes.
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
# Buffers per writev() call: well under any system's limit (Linux: 1024).
_IOV_MAX = 256
_WRITEV = hasattr(os, "writev")  # POSIX
_READV = hasattr(os, "readv")


def framed(msg: tuple[Any, ...]) -> tuple[bytes, bytes] | None:
    """``msg`` as :func:`send` would write it (a length, then the pickle), to be
    written with others at once (:func:`write`); None for one that ``send`` writes
    otherwise (a payload large enough for a frame of its own, or with a
    shared-memory segment's descriptor)."""
    if not _one_frame(msg):
        return None
    data = dumps(msg)
    return _LENGTH.pack(len(data)), data


def write(conn: Connection, buffers: list[bytes]) -> None:
    """Write messages framed by :func:`framed`, in one system call where the socket
    has room for them all (and no copy); the receiver reads them one by one with
    :func:`recv`."""
    fd = conn.fileno()
    for start in range(0, len(buffers), _IOV_MAX):
        part = buffers[start : start + _IOV_MAX]
        written = os.writev(fd, part) if _WRITEV else 0
        if written < sum(map(len, part)):  # cut short (a signal), or no writev()
            rest = memoryview(b"".join(part))[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]


def recv(conn: Connection) -> tuple[Any, ...]:
    """Receive a message sent by :func:`send`."""
    return _message(conn, _recv_frame(conn))


def recv_begun(conn: Connection, sock: socket.socket) -> tuple[Any, ...] | None:
    """Receive a message sent by :func:`send` if it has begun to arrive, else
    return None at once; ``sock`` is a socket on ``conn``'s descriptor.

    One system call where a poll() and then a read would take two: a
    non-blocking read of the frame's length.
    """
    try:
        head = sock.recv(_LENGTH.size, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    if not head:
        raise EOFError
    fd = conn.fileno()
    if len(head) < _LENGTH.size:  # the rest of the length is on its way
        head += _read_exactly(fd, _LENGTH.size - len(head))
    return _message(conn, _frame_after(fd, head))


def _message(conn: Connection, frame: bytes | bytearray) -> tuple[Any, ...]:
    msg: tuple[Any, ...] = pickle.loads(frame)
    if msg[0] not in _WITH_PAYLOAD:
        return msg
    if msg[-1] is None:
        return (*msg[:-1], conn.recv_bytes())
    if shm.descriptor_of(msg[-1]) is not None:
        with _unix_socket(conn) as sock:
            carrier, fds, _, _ = socket.recv_fds(sock, 1, 1)
        if not carrier:
            raise EOFError("the sender went away before its segment's descriptor arrived")
        # No descriptor with its byte: the kernel dropped it (this process has none
        # left). The conversation goes on; unpacking fails, for these tasks only.
        msg = (*msg[:-1], (*msg[-1], shm.Received(fds[0] if fds else -1)))
    return msg


def _recv_frame(conn: Connection) -> bytes | bytearray:
    """What ``conn.recv_bytes()`` returns, read straight from the descriptor.

    Every message, both ways, starts with such a frame; Connection reads each
    through an ``io.BytesIO`` and four Python calls (~1.6 us of a ~5 us read).
    """
    if not _READV:
        return conn.recv_bytes()  # Windows: a pipe handle, not a descriptor
    fd = conn.fileno()  # OSError if closed, as recv_bytes
    return _frame_after(fd, _read_exactly(fd, _LENGTH.size))


def _frame_after(fd: int, head: bytes | bytearray) -> bytes | bytearray:
    """The rest of a frame whose length ``head`` was read from ``fd``."""
    (size,) = _LENGTH.unpack(head)
    if size == -1:  # Connection's frame for 2 GiB or more: the length follows
        (size,) = _LONG_LENGTH.unpack(_read_exactly(fd, _LONG_LENGTH.size))
    return _read_exactly(fd, size)


def _read_exactly(fd: int, size: int) -> bytes | bytearray:
    data = os.read(fd, size)
    if len(data) == size:
        return data
    if not data:
        raise EOFError
    # Cut short: a large frame comes a socket buffer at a time; read the rest
    # into one buffer rather than joining the pieces.
    buf = bytearray(size)
    view = memoryview(buf)
    got = len(data)
    view[:got] = data
    while got < size:
        n = os.readv(fd, [view[got:]])
        if not n:
            raise EOFError
        got += n
    return buf


@contextlib.contextmanager
def _unix_socket(conn: Connection) -> Iterator[socket.socket]:
    """The socket under ``conn`` (a socket pair's end), borrowed: its descriptor stays open."""
    sock = socket.socket(fileno=conn.fileno())
    if sock.gettimeout() is not None:  # socket.setdefaulttimeout() made it non-blocking
        sock.settimeout(None)
    try:
        yield sock
    finally:
        sock.detach()


def attach_traceback(exc: BaseException) -> BaseException:
    """Give ``exc`` its worker-side traceback text as ``__cause__``, ready to be pickled."""
    tb = _traceback_text(exc)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    exc.__traceback__ = None
    return _Portable(exc)  # type: ignore[return-value]


# The stack part of tracebacks already formatted in this process, by where each
# frame stood: (code, instruction). Formatting costs ~60-125 us (the lines,
# and since 3.11 the carets under them, each parsed with ast), and the tasks
# of a map that fail tend to fail at one place. None: the text did not split.
_STACKS: dict[tuple[tuple[Any, int], ...], str | None] = {}
_STACKS_KEPT = 64
_STACK_DEPTH_KEPT = 100  # frames: a deep recursion's text is not kept
_HEADER = "Traceback (most recent call last):\n"
_GROUPS = getattr(builtins, "BaseExceptionGroup", ())  # Python 3.11 and later


def _traceback_text(exc: BaseException) -> str:
    """``traceback.format_exception(exc)``, its stack part formatted once per place.

    The same code at the same instruction gives the same lines; only the
    exception's own line (its message) is new each time. A chained exception,
    or a group, is formatted whole, every time. So is any stack whose text was
    not found to be the header, the stack and the exception's line, in that
    order (checked as it is first formatted).
    """
    # Imported here: with textwrap and tokenize it costs a spawned worker's
    # start ~3-5 ms on 2 cores, and only a task that raises needs it.
    import traceback

    tb = exc.__traceback__
    if (
        tb is None
        or exc.__cause__ is not None
        or exc.__context__ is not None
        or isinstance(exc, _GROUPS)
    ):
        return "".join(traceback.format_exception(type(exc), exc, tb))
    place: list[tuple[Any, int]] = []
    frame: Any = tb
    while frame is not None:
        place.append((frame.tb_frame.f_code, frame.tb_lasti))
        frame = frame.tb_next
    key = tuple(place)
    stack = _STACKS.get(key, "")
    if stack:
        return _HEADER + stack + "".join(traceback.format_exception_only(type(exc), exc))
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if stack == "" and len(_STACKS) < _STACKS_KEPT and len(key) <= _STACK_DEPTH_KEPT:
        stack = "".join(traceback.extract_tb(tb).format())
        only = "".join(traceback.format_exception_only(type(exc), exc))
        _STACKS[key] = stack if text == _HEADER + stack + only else None
    return text


class _Portable:
    """Pickles an exception together with its ``__cause__`` (plain pickling drops it)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_exc, (self.exc, self.exc.__cause__)


def _rebuild_exc(exc: BaseException, cause: BaseException | None) -> BaseException:
    exc.__cause__ = cause
    return exc


def stop_iteration_lost() -> StopIteration:
    """The error of a task whose StopIteration a C loop (map, starmap) took for its
    own end: the loop stopped short of its items, and the exception is gone."""
    return StopIteration(
        "the task raised StopIteration (next() on an exhausted iterator?); its message "
        "and traceback were lost: the tasks ran through map(), which takes a "
        "StopIteration for the end of its input"
    )


def portable_error(exc: BaseException, what: str) -> BaseException:
    """Return ``exc`` prepared to cross the pipe, or a stand-in that will.

    An exception that cannot make the round trip through pickle (unpicklable
    attributes, an ``__init__`` that rejects its own ``args``) is replaced by a
    SerializationError that keeps its type name, message and traceback text.
    """
    wrapped = attach_traceback(exc)
    try:
        pickle.loads(dumps(wrapped))
    except Exception as err:
        stand_in = SerializationError(
            f"{what} raised {type(exc).__qualname__}: {exc}, "
            f"which cannot be sent back to the parent ({type(err).__name__}: {err})"
        )
        stand_in.__cause__ = exc.__cause__
        return _Portable(stand_in)  # type: ignore[return-value]
    return wrapped


def admit_callable(ledger: OrderedDict[int, int], fn_id: int, size: int) -> list[int]:
    """Enter a callable of ``size`` pickled bytes in a worker's cache; return
    the ids of the callables that leave it to make room (the oldest used).

    The worker (as it reads FN) and the dispatcher's mirror of it (as it sends
    FN) run this on the same sequence, and both mark a callable used
    (``move_to_end``) at each of its batches, so they always agree. The bound on
    bytes is for callables bound to large objects: a method of a model sent with
    each call (a new bound method each time) would otherwise leave FN_CACHE_SIZE
    copies of the model in every worker. The newest stays, whatever its size.
    """
    ledger[fn_id] = size
    gone: list[int] = []
    total = sum(ledger.values())
    while len(ledger) > FN_CACHE_SIZE or (len(ledger) > 1 and total > FN_CACHE_BYTES):
        old, old_size = ledger.popitem(last=False)
        total -= old_size
        gone.append(old)
    return gone
