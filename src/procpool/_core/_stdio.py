"""Whole-line stdout and stderr for child processes.

When several processes share one terminal or pipe, the standard library's
streams can tear lines: an unbuffered stream (``PYTHONUNBUFFERED=1``, ``-u``)
writes ``print(a, b)`` as several ``write()`` calls, and a block-buffered one
flushes at 8 KiB boundaries that fall mid-line, so another process's output
lands in the middle of a line.

:func:`install_line_writers`, called first thing in every child, replaces
``sys.stdout`` and ``sys.stderr`` with :class:`LineWriter` streams that keep
bytes until a line is complete and then hand complete lines to the kernel in
a single ``os.write()``. POSIX makes a write of at most ``PIPE_BUF`` bytes
(4096 on Linux) to a pipe atomic, so lines up to that size never tear; several
short lines are grouped into one write up to that size. A longer line still
goes out in one ``write()`` call (looping only on partial writes), which keeps
it whole on terminals and files in practice.

A partial line is held until its newline arrives, an explicit ``flush()``
(progress bars that redraw with ``\\r`` flush), the held text grows past
:data:`MAX_HELD` bytes, or the process exits (the multiprocessing bootstrap
flushes ``sys.stdout``/``sys.stderr``, and an ``atexit`` hook covers the rest).
"""

from __future__ import annotations

import atexit
import io
import os
import select
import sys
import threading
import weakref
from _thread import get_ident
from collections.abc import Iterator

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "MAX_HELD",
    "PIPE_BUF",
    "LineWriter",
    "install_line_writers",
    "make_line_writers_ahead",
]

# The atomic-write size for pipes; POSIX guarantees at least 512.
PIPE_BUF: int = getattr(select, "PIPE_BUF", 512)

# A partial line is emitted anyway past this size: a stream that never writes
# a newline must not grow without bound.
MAX_HELD = 1 << 20
# Pieces of a partial line kept as text before they are encoded into the bytes
# that MAX_HELD bounds.
MAX_PIECES = 256
# Threads' (empty) lists of pieces kept before a flush looks for ended ones.
MAX_THREADS = 64

# Every live line buffer, so one fork hook and one exit hook serve them all:
# weak references in a set, not a WeakSet. The fork hook runs in every child
# forked here, and most find the set empty: a test in C, where a WeakSet runs
# Python code to be iterated, each function of it a copy-on-write fault.
_BUFFERS: set[weakref.ref[_LineBuffer]] = set()

# Writers a parent made for the children it forks (make_line_writers_ahead), by
# stream ("stdout"), with the stream they replace. Not in _BUFFERS until one is
# installed: until then nothing is written through them.
_MADE_AHEAD: dict[str, tuple[object, object, object, LineWriter | None]] = {}
_NOTHING = (None, None, None, None)


class _LineBuffer(io.BufferedIOBase):
    """Binary layer: holds bytes and writes complete lines to a file descriptor.

    This is ``LineWriter.buffer``, so ``sys.stdout.buffer.write(b"...")`` is
    line-buffered too and stays in order with text writes.
    """

    def __init__(self, fd: int, *, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._name = name
        # Partial lines, one per thread: print() makes several write() calls
        # per line, and two threads printing at once must not mix them. The
        # text layer's pieces stay str until their line is complete (see
        # LineWriter.write), encoded as these say; bytes written here go in
        # _held, after what the thread's text had held. A thread appends to its
        # own list without the lock; under it, lists are emptied in place (see
        # _take_text), never swapped, so no piece can land in a list let go.
        self._text: dict[int, list[str]] = {}
        self._held: dict[int, bytearray] = {}
        self.encoding = "utf-8"
        self.errors = "backslashreplace"
        self._at_line_start = True
        self._prefix: bytes | None = None
        # Re-entrant: a signal handler that prints while the main thread is
        # inside write() must not deadlock.
        self._lock = threading.RLock()
        _BUFFERS.add(weakref.ref(self, _BUFFERS.discard))

    @property
    def name(self) -> str:
        return self._name

    @property
    def prefix(self) -> bytes | None:
        """Bytes put at the start of every line written, or None."""
        return self._prefix

    @prefix.setter
    def prefix(self, value: bytes | None) -> None:
        with self._lock:
            self._prefix = value or None

    def write(self, data: Any) -> int:
        """Hold ``data`` (any bytes-like object); write out every line it completes.

        Returns:
            The number of bytes taken, always all of them.

        Raises:
            ValueError: if the stream is closed.
            OSError: if the write to the file descriptor fails (e.g. BrokenPipeError).
        """
        if self.closed:
            raise ValueError("write to closed file")
        chunk = data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes()
        ident = get_ident()
        with self._lock:
            parts = self._text.get(ident)
            if parts:  # the thread's text first, as it was written first
                self._add(ident, self._take_text(parts).encode(self.encoding, self.errors))
            self._add(ident, chunk)
        return len(chunk)

    def _pieces(self, ident: int) -> list[str]:
        """Thread ``ident``'s list of text pieces, made at its first write."""
        with self._lock:
            return self._text.setdefault(ident, [])

    @staticmethod
    def _take_text(parts: list[str]) -> str:
        """The pieces in ``parts`` as one str, taken out of it in place. Under the lock.

        Its thread may append meanwhile (it does without the lock): each step
        here is one operation under the GIL, and what comes after the slice stays.
        """
        count = len(parts)
        taken = parts[:count]
        del parts[:count]
        return "".join(taken)

    def _add(self, ident: int, chunk: bytes) -> None:
        """Add ``chunk`` to thread ``ident``'s partial line; write out each line it
        completes. The caller holds the lock."""
        held = self._held.get(ident)
        if held is None:
            if chunk[-1:] == b"\n":  # whole lines, and nothing held: the usual case
                self._emit(chunk)
                return
            held = self._held[ident] = bytearray()
        held += chunk
        if b"\n" in chunk:
            end = held.rfind(b"\n") + 1
            data = bytes(held[:end])  # out before the write: an error must not repeat it
            del held[:end]
            self._emit(data)
        elif len(held) > MAX_HELD:
            data = bytes(held)
            held.clear()
            self._emit(data)
        if not held:
            del self._held[ident]

    def flush(self) -> None:
        """Write out everything held, every thread's partial line included.

        Raises:
            ValueError: if the stream is closed.
            OSError: if the write to the file descriptor fails.
        """
        if self.closed:
            raise ValueError("flush of closed file")
        with self._lock:
            text = self._text
            if any(text.values()):  # pieces never hold a newline: they go to _held
                for ident, parts in list(text.items()):
                    if parts:
                        self._add(ident, self._take_text(parts).encode(self.encoding, self.errors))
            if len(text) > MAX_THREADS:
                self._forget_ended_threads()
            if self._held:
                # The calling thread's first: it is the one that asked.
                mine = self._held.pop(get_ident(), None)
                for held in [mine, *self._held.values()]:
                    if held:
                        self._emit(bytes(held))
                self._held.clear()

    def _forget_ended_threads(self) -> None:
        # Under the lock, after a flush: an ended thread's list is empty, and no
        # thread appends to it any more. A live thread's list must stay (see _text).
        live = sys._current_frames()
        for ident in [i for i, parts in self._text.items() if not parts and i not in live]:
            del self._text[ident]

    def close(self) -> None:
        """Flush and mark closed. The file descriptor itself stays open (like ``sys.stdout``)."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            super().close()

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        try:
            return os.isatty(self._fd)
        except OSError:
            return False

    def writable(self) -> bool:
        return True

    def _emit(self, data: bytes) -> None:
        # Caller holds the lock, and has taken ``data`` out of what is held.
        if self._prefix is not None:
            data = self._add_prefix(data, self._prefix)
        _write_lines(self._fd, data)

    def _add_prefix(self, data: bytes, prefix: bytes) -> bytes:
        out = bytearray()
        for line in data.splitlines(keepends=True):
            if self._at_line_start:
                out += prefix
            out += line
            self._at_line_start = line.endswith(b"\n")
        return bytes(out)

    def _after_fork_in_child(self) -> None:
        # What a parent held belongs to the parent; the child must not print
        # it a second time. The lock may have been held by a parent thread.
        self._lock = threading.RLock()
        self._text.clear()
        self._held.clear()
        self._at_line_start = True


def split_lines(data: bytes, limit: int) -> Iterator[bytes]:
    """Cut ``data`` at line ends into chunks of at most ``limit`` bytes.

    A line longer than ``limit`` becomes a chunk of its own, whole. ``data``
    may end with a partial line (an explicit flush); it is the last chunk.
    """
    start, size = 0, len(data)
    while size - start > limit:
        cut = data.rfind(b"\n", start, start + limit) + 1
        if cut <= start:
            cut = data.find(b"\n", start + limit) + 1 or size
        yield data[start:cut]
        start = cut
    if start < size:
        yield data[start:]


def _write_lines(fd: int, data: bytes) -> None:
    """Write whole lines ``data`` to ``fd``: in one ``write()`` up to PIPE_BUF bytes
    (the usual case: a line or a few), else in chunks of whole lines."""
    if len(data) <= PIPE_BUF:
        _write_all(fd, data)
        return
    for chunk in split_lines(data, PIPE_BUF):
        _write_all(fd, chunk)


def _write_all(fd: int, data: bytes) -> None:
    written = 0
    try:
        written = os.write(fd, data)
    except BlockingIOError:
        _wait_writable(fd)  # someone made the descriptor non-blocking
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            _wait_writable(fd)
            continue
        view = view[written:]


def _wait_writable(fd: int) -> None:
    # poll(), not select(): select() cannot watch descriptors numbered 1024+.
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        poller.poll()
    else:
        select.select([], [fd], [])


class LineWriter(io.TextIOBase):
    """A text stream for ``sys.stdout``/``sys.stderr`` that writes whole lines only.

    Behaves like the stream it replaces (``write`` returns the number of
    characters, ``encoding``, ``errors``, ``fileno``, ``isatty``, ``buffer``,
    ``reconfigure``), but output reaches the file descriptor a complete line
    at a time; see the module docstring.

    Args:
        fd: The file descriptor to write to.
        encoding: The text encoding.
        errors: The encoding error handler; ``"strict"`` becomes
            ``"backslashreplace"`` so that a stray surrogate cannot kill a worker.
        name: The stream's name, e.g. ``"<stdout>"``.
    """

    def __init__(
        self, fd: int, *, encoding: str = "utf-8", errors: str = "backslashreplace", name: str = ""
    ) -> None:
        super().__init__()
        self._buffer = buffer = _LineBuffer(fd, name=name)
        buffer.encoding = encoding
        buffer.errors = "backslashreplace" if errors == "strict" else errors
        # Text mode on Windows writes "\r\n"; keep that behaviour.
        self._linesep = os.linesep if os.linesep != "\n" else None

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._buffer.encoding

    @property
    def errors(self) -> str:  # type: ignore[override]
        return self._buffer.errors

    @property
    def newlines(self) -> None:  # type: ignore[override]
        return None

    @property
    def buffer(self) -> io.BufferedIOBase:
        """The binary layer; bytes written here are line-buffered the same way."""
        return self._buffer

    @property
    def line_buffering(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return self._buffer.name

    @property
    def mode(self) -> str:
        return "w"

    @property
    def prefix(self) -> str | None:
        """Text put at the start of every line (e.g. ``"[w1] "``), or None for none."""
        prefix = self._buffer.prefix
        return None if prefix is None else prefix.decode(self.encoding, self.errors)

    @prefix.setter
    def prefix(self, value: str | None) -> None:
        self._buffer.prefix = None if value is None else value.encode(self.encoding, self.errors)

    def write(self, s: str) -> int:
        """Write ``s``; complete lines go out at once. Returns ``len(s)``.

        Raises:
            TypeError: if ``s`` is not a str.
            ValueError: if the stream is closed.
            OSError: if the underlying write fails (e.g. BrokenPipeError).
        """
        # The hot path of every print() in a worker, which makes a call per
        # argument, separator and end: one Python frame each, pieces kept as
        # str until their line is complete, then encoded and written at once
        # (100,000 four-argument prints to a file, 2 cores: 20 us a line when
        # each piece went through the binary layer, encoded on its own).
        if type(s) is not str and not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        buffer = self._buffer
        if buffer.closed:
            raise ValueError("write to closed file")
        size = len(s)
        if self._linesep is not None:
            s = s.replace("\n", self._linesep)
        ident = get_ident()
        parts = buffer._text.get(ident)
        if parts is None:
            parts = buffer._pieces(ident)
        if "\n" not in s:
            parts.append(s)  # without the lock: see _LineBuffer._text
            if len(parts) >= MAX_PIECES:  # a line of many pieces: into the bytes MAX_HELD bounds
                with buffer._lock:
                    text = buffer._take_text(parts)
                    buffer._add(ident, text.encode(buffer.encoding, buffer.errors))
            return size
        with buffer._lock:
            if parts:
                s = buffer._take_text(parts) + s
            data = s.encode(buffer.encoding, buffer.errors)
            if data[-1:] == b"\n" and ident not in buffer._held and buffer._prefix is None:
                _write_lines(buffer._fd, data)  # whole lines: out as they are
            else:
                buffer._add(ident, data)
        return size

    def flush(self) -> None:
        """Write out everything held, a partial line included.

        Raises:
            ValueError: if the stream is closed.
        """
        self._buffer.flush()

    def close(self) -> None:
        """Flush and mark closed; the file descriptor stays open."""
        # Not IOBase.close(): it would flush again after the buffer is closed.
        self._buffer.close()

    @property
    def closed(self) -> bool:
        return self._buffer.closed

    def fileno(self) -> int:
        return self._buffer.fileno()

    def isatty(self) -> bool:
        return self._buffer.isatty()

    def writable(self) -> bool:
        return True

    def reconfigure(
        self, *, encoding: str | None = None, errors: str | None = None, **_: object
    ) -> None:
        """Change ``encoding`` or ``errors``; other options are accepted and ignored.

        Buffering options have no meaning here: output is always whole-line.
        """
        self.flush()
        if encoding is not None:
            self._buffer.encoding = encoding
        if errors is not None:
            self._buffer.errors = errors

    def __repr__(self) -> str:
        return f"<procpool LineWriter name={self.name!r} fd={self.fileno()}>"


def install_line_writers() -> None:
    """Replace ``sys.stdout`` and ``sys.stderr`` with :class:`LineWriter` streams.

    Called at the start of every child process. A stream is replaced only when
    it is a real file-backed text stream; ``None`` (no console), a ``StringIO``
    or a notebook's stream object is left alone. Calling it twice is harmless.
    ``logging`` handlers that already pointed at the old stream are moved to
    the new one, so log records come out whole-line too.
    """
    for attr in ("stdout", "stderr"):
        old = getattr(sys, attr)
        source, encoding, errors, new = _MADE_AHEAD.pop(attr, _NOTHING)
        if (
            new is None
            or source is not old
            # Reconfigured since (the same stream, another encoding).
            or getattr(old, "encoding", None) != encoding
            or getattr(old, "errors", None) != errors
            or not _flushed(old)
        ):
            new = _line_writer_for(old, f"<{attr}>")
        else:
            _BUFFERS.add(weakref.ref(new._buffer, _BUFFERS.discard))
        if new is not None:
            setattr(sys, attr, new)
            _rebind_logging(old, new)


def make_line_writers_ahead() -> None:
    """In a process about to fork children, make the writers they will install.

    A forked child that makes its own pays ~0.2 ms (2 cores), mostly in
    copy-on-write faults on the pages its new objects and the code that makes
    them share with the parent; putting in place one made before the fork
    costs it ~0.02 ms. Once made, a call only checks that ``sys.stdout`` and
    ``sys.stderr`` are the streams they were made for (the child checks their
    encoding, in case one was reconfigured since).
    """
    for attr in ("stdout", "stderr"):
        stream = getattr(sys, attr)
        if _MADE_AHEAD.get(attr, _NOTHING)[0] is stream:
            continue
        new = _line_writer_for(stream, f"<{attr}>", flush=False)
        if new is None:
            _MADE_AHEAD.pop(attr, None)
        else:
            _BUFFERS.discard(weakref.ref(new._buffer))  # equal to the one it registered
            _MADE_AHEAD[attr] = (stream, stream.encoding, stream.errors, new)  # type: ignore[attr-defined]


def _flushed(stream: object) -> bool:
    # Output written before the swap (a spawn child importing __main__) goes first.
    try:
        stream.flush()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _line_writer_for(stream: object, name: str, *, flush: bool = True) -> LineWriter | None:
    if isinstance(stream, LineWriter) or not isinstance(stream, io.TextIOWrapper):
        return None
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return None
    if flush and not _flushed(stream):
        return None
    return LineWriter(fd, encoding=stream.encoding, errors=stream.errors or "strict", name=name)


def _rebind_logging(old: object, new: LineWriter) -> None:
    # Only if logging is in use: importing it here would cost every child.
    logging = sys.modules.get("logging")
    if logging is None:
        return
    loggers = [logging.getLogger()]
    loggers += [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)


def _live_buffers() -> list[_LineBuffer]:
    return [buffer for ref in list(_BUFFERS) if (buffer := ref()) is not None]


def _flush_all() -> None:
    for buffer in _live_buffers():
        try:
            buffer.flush()
        except (OSError, ValueError):
            pass  # at exit, a closed pipe is nobody's problem any more


def _after_fork_in_child() -> None:
    if _BUFFERS:
        for buffer in _live_buffers():
            buffer._after_fork_in_child()


atexit.register(_flush_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
