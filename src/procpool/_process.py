"""``procpool.Process``: ``multiprocessing.Process`` that also returns the target's result.

How a result travels::

    parent                                         child
    ------                                         -----
    start(): os.pipe() -> reader, writer
             pickle the Process (spawn/forkserver)  _bootstrap(): install_line_writers()
             close our copy of writer               run() -> value, or raises
    join()/result()/is_alive()/exitcode:            writer.send_bytes(b"R" + pickle(value))
             poll [reader, sentinel],           <-- or b"E" + pickle((traceback text, exc))
             read the one message as it comes       exit
    result(): unpickle; return it or raise it

The parent reads the pipe while it waits for the child to exit, so a return
value larger than the pipe's buffer never deadlocks ``join()``; and it closes
the reader as soon as the message (or the child's death) has been seen, so a
thousand processes started at once need only one more descriptor each than
the stdlib's (and the soft descriptor limit is raised when they run short).

The pipe is a bare ``os.pipe()``, framed as ``multiprocessing.connection``
frames its messages. Its reading end is non-blocking in the parent, which
tries it before it waits (with ``poll``): joining a child that has finished
takes one ``read``. Importing ``multiprocessing.connection`` would load
``tempfile``, ``shutil``, ``random`` and the compression modules with their
shared libraries: 60 more memory mappings in the parent, which every
``fork()`` copies and every child's exit tears down (~0.3 ms more per process
on 2 cores; docs/primitives.md).

Targets, arguments and the class itself cross with a pickler that is
cloudpickle (lambdas, closures, functions defined in ``__main__`` or a
notebook) extended with multiprocessing's own reducers (pipes, sockets, and
the queues and locks that carry them), so every start method accepts what
``fork`` accepts.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import multiprocessing.context
import os
import pickle
import select
import struct
import sys
import threading
import time
import types
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping
from multiprocessing import reduction
from multiprocessing.context import get_spawning_popen
from multiprocessing.reduction import ForkingPickler

from ._core import importable_by_name
from ._core._script import ScriptFunction, of_main, rerun_by_children
from ._core._startmethod import checked_start_method, process_start_method, starting_a_process
from ._core._stdio import install_line_writers, make_line_writers_ahead
from ._exceptions import RemoteTraceback, SerializationError, describe_exitcode

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

# A spawned or forkserver child imports this module to rebuild its Process, and
# it only ever writes one message: multiprocessing.connection (with tempfile,
# shutil and the compression modules it loads) is imported on neither side (see
# the module docstring), and traceback (with textwrap and tokenize) only where
# an error needs it. They cost such a child ~7 and ~5.6 ms of its start on 2
# cores (docs/primitives.md).

__all__ = ["ForkProcess", "ForkServerProcess", "Process", "SpawnProcess", "process_class"]

# Descriptors a start may need beyond the result pipe (the stdlib's pipes, the
# fork server's socket), with room to spare.
_FD_HEADROOM = 32

# First byte of the one message a child sends: a return value, or an error.
_VALUE = b"R"
_ERROR = b"E"
_NONE_MESSAGE = _VALUE + pickle.dumps(None, protocol=pickle.HIGHEST_PROTOCOL)
# The result pipe's framing: a message's length, and past 2 GiB -1 then the length.
_SIZE = struct.Struct("!i")
_LONG_SIZE = struct.Struct("!Q")
# The whole frame a child writes when its target returns None, as most do.
_NONE_FRAME = _SIZE.pack(len(_NONE_MESSAGE)) + _NONE_MESSAGE


# Plain values a child returns go through the C pickler as they are.
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})


class _ByNamePickler(ForkingPickler):
    """multiprocessing's pickler (which hands pipes, queues and locks to a
    child), sending with cloudpickle only the functions and classes that a
    child could not import by name: lambdas, closures, those of the script or
    made at run time. Each goes as a copy of its own, and cloudpickle is
    imported only then: most targets, their arguments and what children
    return never need it, which spares the parent's first spawn or forkserver
    start, and a child that returns a list, its import (13-35 ms, 2 cores)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)) and not importable_by_name(obj):
            return pickle.loads, (_cloud_dumps(obj),)
        return NotImplemented


def _cloud_dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    _pickler()(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


@functools.cache
def _pickler() -> type[pickle.Pickler]:
    """cloudpickle's pickler, with multiprocessing's reducers first (a
    Connection must become a DupFd handed to the child, not an integer), then
    ours for code objects, then cloudpickle's own."""
    import cloudpickle

    code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]

    def reduce_code(code: types.CodeType) -> tuple[Any, ...]:
        # cloudpickle renames the file of code sent by value to "<dynamic-code>";
        # keep the real one so the child's traceback shows file, line and source.
        ctor, args = code_reduce(code)
        return ctor, tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        dispatch_table = ChainMap(
            ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
            {types.CodeType: reduce_code},
            cloudpickle.Pickler.dispatch_table,
        )

    return Pickler


def _dump(obj: object, file: io.BytesIO) -> None:
    if type(obj) in _PLAIN:
        pickle.dump(obj, file, protocol=pickle.HIGHEST_PROTOCOL)
        return
    # Once cloudpickle is loaded it pickles everything, so that a module
    # registered with its register_pickle_by_value is honoured.
    if "cloudpickle" not in sys.modules:
        start, fds = file.tell(), _fds_for_child()
        try:
            _ByNamePickler(file, pickle.HIGHEST_PROTOCOL).dump(obj)
            return
        except Exception:
            # Something only cloudpickle pickles (a module, a code object): all
            # again with it, as if this attempt had not been; the descriptors
            # it gave the child would be passed twice, which spawn refuses.
            file.seek(start)
            file.truncate()
            if fds is not None:
                del fds[0][fds[1] :]
    _pickler()(file, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)


def _fds_for_child() -> tuple[list[Any], int] | None:
    """The list of descriptors a spawn or forkserver start is to pass to its
    child (the stdlib's Popen keeps it), and its length now; None outside one."""
    fds = getattr(get_spawning_popen(), "_fds", None)
    return (fds, len(fds)) if isinstance(fds, list) else None


def _dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    _dump(obj, buf)
    return buf.getvalue()


def _traveling(target: object) -> object:
    """``target`` as it goes to a spawned or forkserver child: a function of the
    script with its code (and a copy, unless it is at the script's top level),
    so that a child whose own import of the script has it runs its own, as the
    standard library's does (see _core._script)."""
    if not of_main(target):
        return target
    # A top-level function of the script needs no copy: the child will have it.
    copy = None if rerun_by_children(target) else _dumps(target)  # type: ignore[arg-type]
    try:
        return ScriptFunction(target, copy)  # type: ignore[arg-type]
    except ValueError:  # a constant marshal cannot write: by value alone
        return target


def _restore(cls_blob: bytes, state: dict[str, Any]) -> Process:
    cls: type[Process] = pickle.loads(cls_blob)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


class Process(multiprocessing.context.Process):
    """A process running ``target(*args, **kwargs)``; a drop-in for ``multiprocessing.Process``.

    Everything ``multiprocessing.Process`` offers works the same way (``start``,
    ``join``, ``is_alive``, ``terminate``, ``kill``, ``close``, ``pid``,
    ``exitcode``, ``sentinel``, ``daemon``, subclassing with ``run``), plus:

    - :meth:`result` returns what the target returned, or raises what it
      raised, with the child's traceback attached as ``__cause__``;
    - the target and its arguments may be lambdas, closures or functions
      defined in ``__main__``, under every start method;
    - the child's stdout and stderr are written whole lines at a time, so
      lines of processes printing at once never mix.

    ``procpool.Process`` forks, on Linux, when ``start()`` finds no other
    thread running (fork is then safe, and fastest); otherwise it uses
    procpool's default start method (``forkserver`` on Linux, ``spawn``
    elsewhere). ``procpool.get_context(method).Process`` pins a method.

    Args:
        group: Always None; kept for compatibility with ``threading.Thread``.
        target: The callable to run in the child.
        name: The process name; defaults to ``"Process-N"``.
        args: Positional arguments for ``target``.
        kwargs: Keyword arguments for ``target``.
        daemon: Whether the process is a daemon (terminated when the parent exits).
    """

    # None: chosen at start() (fork where it is safe, else procpool's default);
    # subclasses pin one.
    _start_method: str | None = None

    # The stdlib's private state that we build on; its stubs leave it out.
    _popen: Any
    _parent_pid: int

    _result_reader: _FdReader | None = None
    _result_writer: _FdWriter | _ChildEnd | None = None
    _outcome_blob: bytes | bytearray | None = None
    _outcome: tuple[bool, Any] | None = None
    _final_exitcode: int | None = None
    # For subclasses whose __init__ skips ours; each instance gets its own.
    _receive_lock = threading.Lock()

    def __init__(
        self,
        group: None = None,
        target: Callable[..., object] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        daemon: bool | None = None,
    ) -> None:
        super().__init__(group, target, name, args, kwargs or {}, daemon=daemon)
        # Two threads may wait on one process (join here, result there): only
        # one of them may read the pipe.
        self._receive_lock = threading.Lock()

    # -- parent side ---------------------------------------------------

    @staticmethod
    def _Popen(process_obj: multiprocessing.process.BaseProcess) -> Any:
        # start() has fixed the method on the instance; the stdlib's class for
        # that method knows how to launch it.
        method = process_obj._start_method  # type: ignore[attr-defined]
        return multiprocessing.get_context(method).Process._Popen(process_obj)

    def start(self) -> None:
        """Start the child process.

        Raises:
            ValueError: if the process object is closed, or its start method
                is not available on this platform.
            AssertionError: if the process was already started (as in the stdlib).
            SerializationError: if the target or its arguments cannot be pickled
                (spawn and forkserver only).
        """
        # No method pinned: fork where that is safe now, as the stdlib's default
        # does (but only then); else procpool's default. See _core/_startmethod.py.
        # An instance attribute: the stdlib's bootstrap reads it in the child
        # to make the same method the child's own default.
        self._start_method = checked_start_method(
            type(self)._start_method or process_start_method()
        )
        if self._start_method == "fork":
            make_line_writers_ahead()  # one fewer thing for the child to make
        with starting_a_process():
            reader, writer = _result_pipe()
            _ensure_fd_headroom(writer.fileno())
            self._result_writer = writer
            try:
                super().start()
            except BaseException:
                reader.close()
                raise
            finally:
                # The child has its copy now; ours would keep the pipe open forever.
                self._result_writer = None
                writer.close()
        self._result_reader = reader

    def __reduce__(self) -> tuple[Any, ...]:
        # Called only while spawn/forkserver launch the child. The stdlib would
        # pickle target and args by reference; cloudpickle them instead, into a
        # blob the child opens in run(), where a failure becomes a result.
        state = self.__dict__.copy()
        state.pop("_receive_lock", None)  # the child never reads; locks do not pickle
        writer = state.get("_result_writer")
        if writer is not None:
            state["_result_writer"] = _ChildEnd(reduction.DupFd(writer.fileno()))
        try:
            target = _traveling(state.pop("_target", None))
            state["_call_blob"] = _dumps((target, state.pop("_args", ()), state.pop("_kwargs", {})))
        except Exception as exc:
            raise SerializationError(
                f"cannot send the target or its arguments to process {self.name!r}: {exc}"
            ) from exc
        return (_restore, (_dumps(type(self)), state))

    def join(self, timeout: float | None = None) -> None:
        """Wait until the process ends, reading its result meanwhile.

        Args:
            timeout: Seconds to wait at most; None waits for ever. On timeout
                it returns quietly, as the stdlib's does: check ``exitcode``.

        Raises:
            ValueError: if the process object is closed.
            AssertionError: if the process was never started (as in the stdlib).
        """
        if self._popen is None or self._parent_pid != os.getpid():
            super().join(timeout)  # the stdlib's own checks and errors
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait(timeout):
            return
        # The one message is read (or the child is gone without one): what is
        # left is its exit, waited for as the stdlib waits.
        super().join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._popen is not None and self._popen.returncode is not None:
            self._finish()

    def is_alive(self) -> bool:
        """Whether the process is running; reads its result if one is waiting."""
        alive = super().is_alive()
        if self._popen is not None and self._parent_pid == os.getpid():
            self._drain_nowait()
            if not alive:
                self._finish()
        return alive

    @property
    def exitcode(self) -> int | None:
        """The exit code; negative is the signal that ended it; None while it runs."""
        code = super().exitcode
        self._drain_nowait()
        return code

    def close(self) -> None:
        """Release the process's resources; :meth:`result` keeps working afterwards.

        Raises:
            ValueError: if the process is still running.
        """
        if self._popen is not None:
            # Raises ValueError, as the stdlib's close() does, while it runs.
            self._final_exitcode = self._popen.poll()
        super().close()
        self._drain_nowait()
        self._close_reader()

    def result(self, timeout: float | None = None) -> Any:
        """Return what the target returned, waiting for it if needed.

        Args:
            timeout: Seconds to wait at most; None waits for ever.

        Returns:
            The target's return value (``run()``'s, for subclasses that override it).

        Raises:
            Exception: whatever the target raised, with its original type; the
                child's traceback text is attached as ``__cause__``
                (a :class:`procpool.RemoteTraceback`).
            WorkerCrashedError: if the process ended without a result (killed,
                crashed, ``os._exit``, ``sys.exit``); the message names the exit
                code or signal.
            SerializationError: if the result or the error could not be pickled
                in the child or unpickled here.
            TimeoutError: if ``timeout`` passed first; the process keeps running.
            ValueError: if the process was never started.
        """
        if self._outcome is None and self._outcome_blob is None and not self._ended():
            if self._popen is None:
                raise ValueError("process not started")
            if not self._wait(timeout):
                raise TimeoutError(
                    f"process {self.name!r} (pid {self.pid}) gave no result within {timeout} s"
                )
            if self._outcome_blob is None:
                self.join()  # it died without a result: reap it for its exit code
        ok, value = self._unpack()
        if ok:
            return value
        raise value

    def _wait(self, timeout: float | None) -> bool:
        """Read the result pipe until the result arrives or the child ends; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reader = self._result_reader
            if reader is None:
                if self._outcome_blob is not None:
                    return True
            elif self._receive(reader):
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message, ended = _ready(reader, self.sentinel, remaining)
            except OSError:
                continue  # another thread read the result and closed the reader
            if not message:
                return ended  # or, False, the time ran out

    def _receive(self, reader: _FdReader) -> bool:
        """Read the message if it has come (or the pipe's end); False if not yet."""
        with self._receive_lock:
            if self._result_reader is not reader:
                return True  # another thread got here first
            # One message per child, so the reader is done after it either way.
            try:
                blob = reader.recv_bytes_nowait()
                if blob is None:
                    return False
                self._outcome_blob = blob
            except (EOFError, OSError):
                pass  # died before (or while) writing: the exit code tells why
            self._close_reader()
            return True

    def _drain_nowait(self) -> None:
        reader = self._result_reader
        if reader is not None:
            self._receive(reader)

    def _finish(self) -> None:
        # The child has exited: whatever it wrote is in the pipe already.
        if self._final_exitcode is None and self._popen is not None:
            self._final_exitcode = self._popen.poll()
        self._drain_nowait()
        self._close_reader()

    def _ended(self) -> bool:
        popen = self._popen
        if self._final_exitcode is None and popen is not None and popen.poll() is not None:
            self._finish()
        return self._final_exitcode is not None

    def _close_reader(self) -> None:
        reader, self._result_reader = self._result_reader, None
        if reader is not None:
            reader.close()

    def _unpack(self) -> tuple[bool, Any]:
        if self._outcome is None:
            self._outcome = self._decode()
            self._outcome_blob = None
        return self._outcome

    def _decode(self) -> tuple[bool, Any]:
        blob = self._outcome_blob
        if blob is None:
            # Imported only now: see _exceptions_stdlib.py for what it costs.
            from ._exceptions_stdlib import WorkerCrashedError

            code = self._final_exitcode
            return False, WorkerCrashedError(
                f"process {self.name!r} (pid {self.pid}) ended without returning a result: "
                f"{describe_exitcode(code)}",
                exitcode=code,
                pid=self.pid,
            )
        if blob[:1] == _VALUE:
            return True, _load_or_raise(memoryview(blob)[1:], "its return value")
        tb, exc_blob = pickle.loads(memoryview(blob)[1:])
        cause = RemoteTraceback(tb)
        exc = _load_or_raise(exc_blob, "the exception it raised", cause)
        exc.__cause__ = cause
        return False, exc

    # -- child side ----------------------------------------------------

    def _bootstrap(self, parent_sentinel: int | None = None) -> int:
        install_line_writers()
        writer: _FdWriter | _ChildEnd | None
        writer, self._result_writer = self._result_writer, None
        if isinstance(writer, _ChildEnd):
            writer = writer.open()
        if writer is not None:
            # Wrap whatever run() is (a subclass may override it) so that its
            # return value or exception is reported, then the stdlib's
            # bootstrap does the rest (exit code, traceback on stderr).
            self.run = functools.partial(_run_and_report, self.run, writer)  # type: ignore[method-assign]
        return super()._bootstrap(parent_sentinel)  # type: ignore[misc, no-any-return]

    def run(self) -> Any:
        """Run the target in the child; return its value (the stdlib's returns None).

        Raises:
            SerializationError: if the target or its arguments cannot be unpickled here.
        """
        blob = self.__dict__.pop("_call_blob", None)
        if blob is not None:
            try:
                self._target, self._args, self._kwargs = pickle.loads(blob)
            except Exception as exc:
                raise SerializationError(
                    f"process {self.name!r} could not unpickle its target or arguments: {exc}"
                ) from exc
        target = getattr(self, "_target", None)
        if target is None:
            return None
        return target(*self._args, **self._kwargs)


Process.__module__ = "procpool"


def _ensure_fd_headroom(newest_fd: int) -> None:
    # Descriptors are numbered lowest-free first, so a high number means the
    # table is nearly full. Desktops default to a soft limit of 1,024 with a
    # far higher hard limit, for programs that need more to raise it: a
    # thousand processes started at once need ~3,000. Raise it (doubling, up to
    # the hard limit) before the standard library's own pipes fail with EMFILE.
    # The soft limit is read with sysconf: the resource module (one more shared
    # library in every forking parent) is imported only to raise it.
    try:
        soft = os.sysconf("SC_OPEN_MAX")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return
    if soft < 0 or newest_fd + _FD_HEADROOM < soft:
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or newest_fd + _FD_HEADROOM < soft:
        return
    wanted = soft * 2 if hard == resource.RLIM_INFINITY else min(hard, soft * 2)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _load_or_raise(blob: bytes | memoryview, what: str, cause: BaseException | None = None) -> Any:
    try:
        return pickle.loads(blob)
    except Exception as exc:
        raise SerializationError(f"could not unpickle {what} from the child process: {exc}") from (
            cause or exc
        )


def _result_pipe() -> tuple[_FdReader, _FdWriter]:
    reader, writer = os.pipe()  # close-on-exec, as multiprocessing's are
    return _FdReader(reader), _FdWriter(writer)


def _ready(reader: _FdReader | None, sentinel: int, timeout: float | None) -> tuple[bool, bool]:
    """Wait up to ``timeout`` for the result pipe or the child's sentinel.

    Returns:
        Whether the pipe is readable (a message, or end of file), and whether
        the child has ended.

    Raises:
        OSError: if another thread closed the reader meanwhile.
    """
    poller = select.poll()
    pipe = -1 if reader is None else reader.fileno()
    if pipe >= 0:
        poller.register(pipe, select.POLLIN)
    poller.register(sentinel, select.POLLIN)
    # poll() takes whole milliseconds: round up, so a wait is never cut short.
    ready = [fd for fd, _ in poller.poll(None if timeout is None else math.ceil(timeout * 1e3))]
    return pipe in ready, sentinel in ready


class _FdReader:
    """The parent's end of the result pipe: non-blocking, read as
    ``Connection.recv_bytes`` reads (see _FdWriter for the framing)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError("the result pipe is closed")
        return self._fd

    def recv_bytes_nowait(self) -> bytes | bytearray | None:
        """Read the message if it has begun to arrive (waiting for the rest), else None.

        Raises:
            EOFError: if the writer closed the pipe before a whole message.
            OSError: if the reader is closed.
        """
        try:
            first = os.read(self._fd, 512)
        except BlockingIOError:
            return None
        # The usual message, a small value, comes whole in this one read.
        if len(first) >= 4 and len(first) == _SIZE.unpack_from(first)[0] + 4:
            return first[4:]
        return _read_rest(self._fd, first)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _read_rest(fd: int, first: bytes) -> bytes | bytearray:
    """The message whose first bytes are ``first``, read on to its end."""
    head = _read_on(fd, first, 4)
    (size,) = _SIZE.unpack_from(head)
    start = 4
    if size == -1:  # longer than 2 GiB: the length follows, in 8 bytes
        head = _read_on(fd, head, 12)
        (size,) = _LONG_SIZE.unpack_from(head, 4)
        start = 12
    # Read on into the message's place in a buffer of its full size.
    buf = bytearray(size)
    got = head[start : start + size]
    buf[: len(got)] = got
    view, done = memoryview(buf), len(got)
    while done < size:
        done += _read_into(fd, view[done:])
    return buf


def _read_on(fd: int, data: bytes, size: int) -> bytes:
    """``data`` read on to at least ``size`` bytes (a frame's header)."""
    while len(data) < size:
        more = bytearray(size - len(data))
        data += more[: _read_into(fd, memoryview(more))]
    return data


def _read_into(fd: int, view: memoryview) -> int:
    """Read into ``view`` from the non-blocking ``fd``, waiting until something comes.

    Raises:
        EOFError: at the end of the pipe.
    """
    while True:
        try:
            got = os.readv(fd, [view])
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll()
            continue
        if not got:
            raise EOFError
        return got


class _FdWriter:
    """The child's end of the result pipe as a bare descriptor, framed as a
    ``Connection`` frames: a 4-byte big-endian length (-1 and 8 more bytes
    past 2 GiB), then the message."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def send_bytes(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        size = view.nbytes
        header = _SIZE.pack(size) if size <= 0x7FFFFFFF else _SIZE.pack(-1) + _LONG_SIZE.pack(size)
        if size <= 16384:  # in one write, as Connection sends a small message
            self._write_all(memoryview(header + view))
        else:
            self._write_all(memoryview(header))
            self._write_all(view)

    def _write_all(self, data: memoryview) -> None:
        while data:
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        os.close(self._fd)


class _ChildEnd:
    """The result pipe's writing end on its way to a spawned or forkserver child:
    the start method's handle on the descriptor, opened there as an _FdWriter."""

    __slots__ = ("_handle",)

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __getstate__(self) -> Any:
        return self._handle

    def __setstate__(self, handle: Any) -> None:
        self._handle = handle

    def open(self) -> _FdWriter:
        return _FdWriter(self._handle.detach())


def _run_and_report(run: Callable[[], Any], writer: _FdWriter) -> None:
    try:
        try:
            value = run()
        except Exception as exc:
            _send(writer, _error_message(exc))
            raise  # the stdlib prints it and exits with code 1, as users expect
        if value is None:
            # The frame made ahead, in one write (a few bytes to a pipe go whole):
            # each function a forked child runs costs it copy-on-write faults on
            # its code's pages: ~15 fewer a process than the general path.
            try:
                os.write(writer._fd, _NONE_FRAME)
            except OSError:
                pass  # the parent closed its end or exited: nobody wants the result
        else:
            _send(writer, _value_message(value))
        # SystemExit and KeyboardInterrupt send nothing: the exit code says it.
    finally:
        os.close(writer._fd)


def _value_message(value: object) -> bytes | memoryview:
    if value is None:
        return _NONE_MESSAGE  # what most targets return: nothing to pickle
    buf = io.BytesIO()
    buf.write(_VALUE)
    try:
        _dump(value, buf)
    except Exception as exc:
        err = SerializationError(
            f"could not pickle the return value ({type(value).__name__}): {exc}"
        )
        err.__cause__ = exc
        return _error_message(err)
    return buf.getbuffer()


def _error_message(exc: BaseException) -> memoryview:
    import traceback

    tb = '\n"""\n' + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + '"""'
    try:
        exc_blob = _dumps(exc)
    except Exception as err:
        exc_blob = _dumps(
            SerializationError(f"could not pickle the {type(exc).__name__} raised ({err}): {exc}")
        )
    buf = io.BytesIO()
    buf.write(_ERROR)
    pickle.dump((tb, exc_blob), buf, protocol=pickle.HIGHEST_PROTOCOL)
    return buf.getbuffer()


def _send(writer: _FdWriter, message: bytes | memoryview) -> None:
    try:
        writer.send_bytes(message)
    except OSError:
        pass  # the parent closed its end or exited: nobody wants the result


class ForkProcess(Process):
    """A :class:`Process` that always uses the ``fork`` start method."""

    _start_method = "fork"


class SpawnProcess(Process):
    """A :class:`Process` that always uses the ``spawn`` start method."""

    _start_method = "spawn"


class ForkServerProcess(Process):
    """A :class:`Process` that always uses the ``forkserver`` start method."""

    _start_method = "forkserver"


_BY_METHOD: dict[str, type[Process]] = {
    "fork": ForkProcess,
    "spawn": SpawnProcess,
    "forkserver": ForkServerProcess,
}


def process_class(method: str) -> type[Process]:
    """Return the :class:`Process` subclass bound to start method ``method``.

    Raises:
        ValueError: if ``method`` is not a start method.
    """
    try:
        return _BY_METHOD[method]
    except KeyError:
        raise ValueError(f"unknown start method {method!r}") from None
