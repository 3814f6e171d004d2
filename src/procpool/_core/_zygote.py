"""The default way a pool starts its workers on Linux: fork, made safe by forking early.

Fork is the fastest way to start a worker: nothing is imported again, the
parent's modules, ``__main__`` and globals are simply there. It is also unsafe
in a process that runs threads: a child forked while another thread holds a
lock (logging's, malloc's, an import's) waits for it forever. A pool's own
dispatcher thread makes every worker that replaces a dead or recycled one such
a fork.

So when a pool is made in a process that runs a single thread (as the kernel
counts them, so native threads count too), procpool forks a *zygote* right
then: a copy of the parent that stays single-threaded and forks the pool's
workers on request, every one but the first, and every replacement. The
first, asked for as the pool is made, is forked straight from the parent
right after the zygote, while it is still single-threaded (``_DirectPopen``).
Workers get fork's speed and semantics (the parent as it was when the pool
was made), with forkserver's safety. In a process that already runs other
threads, pools use forkserver instead (``_startmethod.py``).

Protocol, over a Unix socket pair, one request per worker: the parent sends one
byte with the descriptors ``[status_w, data_r, *inherited]``; the zygote forks;
the child reads its pickled Process object from ``data_r`` and runs it; the
zygote writes the child's pid to ``status_w``, then its exit code once it has
reaped it. The parent's end of the status pipe is the worker's sentinel, as with
forkserver. The zygote stops taking requests when the parent's end of the
socket closes (the pool stopped, or the parent died) and exits once all of its
children have been reaped.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from multiprocessing import context, popen_fork, process, reduction, util
from multiprocessing.connection import wait

from ._batch import main_functions
from ._startmethod import fork_is_safe, single_threaded, starting_a_process

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["ZygoteContext", "available"]

_SIGNED = struct.Struct("q")
_FORK, _STOP = b"F", b"Q"  # the requests a zygote takes
_MAX_FDS = 256
# Exit code of a zygote child that failed before its Process could run.
_CHILD_FAILED = 1

# In a worker started by a zygote: the descriptors it received, in the order
# the parent's pickler asked for them (see _DupFd).
_inherited_fds: list[int] = []


def available() -> bool:
    """Whether a pool made now may fork a zygote."""
    return hasattr(socket, "send_fds") and fork_is_safe()


class Zygote:
    """A single-threaded copy of this process that forks workers on request."""

    def __init__(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # or the children would print the parent's buffered output again
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with starting_a_process():
                pid = os.fork()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # the zygote
            code = 70
            try:
                ours.close()
                code = _serve(theirs)
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._sock: socket.socket | None = ours
        self._lock = threading.Lock()

    def request(self, fds: list[int]) -> tuple[int, int]:
        """Ask for a child; return (status_r, data_w). ``fds`` reach it as _inherited_fds.

        Raises:
            OSError: if the zygote is gone.
        """
        status_r, status_w = os.pipe()
        data_r, data_w = os.pipe()
        try:
            with self._lock:
                if self._sock is None:
                    raise OSError("the pool's zygote was closed")
                socket.send_fds(self._sock, [_FORK], [status_w, data_r, *fds])
        except BaseException:
            os.close(status_r)
            os.close(data_w)
            raise
        finally:
            os.close(status_w)
            os.close(data_r)
        return status_r, data_w

    def forget(self) -> None:
        """In a child forked from the pool's process: close its copy of the socket."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self, timeout: float = 5.0) -> None:
        """Let the zygote exit (after its last child) and reap it; SIGKILL it after ``timeout``."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is None:
            return
        # Say it, rather than rely on EOF: a child forked from this process
        # meanwhile (another pool's fork worker) holds a copy of the socket.
        with contextlib.suppress(OSError):
            sock.send(_STOP)
        sock.close()
        deadline = time.monotonic() + timeout
        _wait_for_exit(self.pid, timeout)
        pause = 0.0005
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _wait_for_exit(pid: int, timeout: float) -> None:
    """Sleep until the child exits (Linux 5.3+: a pidfd), or until ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return  # the caller polls
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


class ZygoteContext(context.BaseContext):
    """A multiprocessing context whose processes are forked by one zygote."""

    _name = "zygote"

    def __init__(self) -> None:
        # The functions __main__ has now, which every worker will have too.
        self.main_functions = main_functions()
        self.zygote = Zygote()
        self._direct_next = True  # see _DirectPopen

    def Process(self, *args: Any, **kwargs: Any) -> _ZygoteProcess:
        proc = _ZygoteProcess(*args, **kwargs)
        proc._zygote = self.zygote
        # The pool's first worker, asked for as the pool is made, while this
        # process is as single-threaded as when the zygote was forked.
        proc._direct = self._direct_next and _pidfds() and single_threaded()
        self._direct_next = False
        return proc

    def close(self) -> None:
        self.zygote.close()


class _ZygoteProcess(process.BaseProcess):
    _start_method = None  # inside the child, leave multiprocessing's default as inherited
    _zygote: Zygote
    _direct = False  # forked straight from this process (see _DirectPopen)

    @staticmethod
    def _Popen(process_obj: Any) -> popen_fork.Popen:
        if process_obj._direct:
            try:
                return _DirectPopen(process_obj, process_obj._zygote)
            except OSError:
                pass  # this process cannot fork now (EAGAIN, ENOMEM): ask the zygote
        return _Popen(process_obj, process_obj._zygote)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_zygote", None)
        state.pop("_direct", None)
        return state


class _DirectPopen(popen_fork.Popen):
    """A pool's first worker, forked straight from the pool's process.

    The zygote has just been forked, and this process still runs one thread,
    so forking it is as safe as forking the zygote was. A cold pool's first
    result then waits for one fork, not two in a row (the zygote's, then its
    child's, each ~1-2 ms on a busy machine), and for no pickled Process to be
    read: 1.0 ms sooner (the median of 15 cold processes on 2 cores), and a
    5-worker pool's 1,000 squares 1.4 ms sooner. Every later worker comes from
    the zygote.

    The child is made as the zygote's children are: the collector's inherited
    objects frozen, a worker's signal dispositions from its first instruction,
    and no copy of the zygote's socket. Its Process is pickled all the same, and
    dropped, so that what the zygote could not start (initargs that do not
    pickle) fails the pool as it is made, not its second worker; the child,
    just started, is killed then.
    """

    method = "fork"

    def __init__(self, process_obj: Any, zygote: Zygote) -> None:
        self._zygote = zygote
        super().__init__(process_obj)

    def _launch(self, process_obj: Any) -> None:
        # The child's sentinel for this process: end of file once it is gone.
        child_r, parent_w = os.pipe()
        try:
            pid = os.fork()
        except BaseException:
            _close_fds(child_r, parent_w)
            raise
        if pid == 0:
            code = _CHILD_FAILED
            try:
                # First: until then the parent's handlers are this child's, and
                # its SIGTERM handler raises SystemExit (a pool terminated now).
                _restore_signals({})
                _close_fds(parent_w)
                self._zygote.forget()
                gc.freeze()
                code = _bootstrap(process_obj, child_r)
            except SystemExit as exc:  # that handler, in the instant before
                code = exc.code if isinstance(exc.code, int) else _CHILD_FAILED
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        self.pid = pid
        _close_fds(child_r)
        # Its sentinel here is a pidfd, not the end of a pipe the child holds
        # (multiprocessing's fork): a process the worker forks would inherit
        # that pipe and hide the worker's death for as long as it lived, as the
        # zygote's status pipe never does.
        try:
            self.sentinel = os.pidfd_open(pid)
        except OSError:
            _kill_and_reap(pid)
            _close_fds(parent_w)
            raise
        self.finalizer = util.Finalize(self, _close_fds, (self.sentinel, parent_w))
        try:
            # While the child starts, not before: ~0.3 ms of this process's time.
            _pickle_for_zygote(process_obj, _FdCounter())
        except BaseException:
            _kill_and_reap(pid)
            self.finalizer()
            raise


class _DupFd:
    """A descriptor passed to the child at start, by its index among those sent."""

    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:
        return _inherited_fds[self.index]


class _FdNumbering:
    """Numbers the descriptors a pickled Process sends, as its child finds them (_DupFd)."""

    DupFd = _DupFd
    _fds: list[int]

    def duplicate_for_child(self, fd: int) -> int:
        self._fds.append(fd)
        return len(self._fds) - 1


class _Popen(_FdNumbering, popen_fork.Popen):
    method = "zygote"

    def __init__(self, process_obj: Any, zygote: Zygote) -> None:
        self._zygote = zygote
        self._fds: list[int] = []
        self._pid: int | None = None
        self._pid_lock = threading.Lock()  # the dispatcher and statistics() may both ask
        super().__init__(process_obj)

    @property
    def pid(self) -> int:  # type: ignore[override]
        # Read when first needed: a pool sends all its start requests before
        # waiting for any pid, so the parent's work overlaps the zygote's forks.
        if self._pid is not None:
            return self._pid
        with self._pid_lock:
            return self._read_pid()

    def pid_pending(self) -> bool:
        """Whether the pid has not been read yet (so the fork may be under way)."""
        return self._pid is None

    def _read_pid(self) -> int:
        # With _pid_lock held: two threads must never both read the status pipe.
        if self._pid is None:
            try:
                self._pid = _read_signed(self.sentinel)
            except EOFError:
                raise OSError(
                    "the pool's zygote did not start the worker: it could not fork "
                    "(out of processes or memory?) or it died"
                ) from None
        return self._pid

    def _launch(self, process_obj: Any) -> None:
        buf = _pickle_for_zygote(process_obj, self)
        self.sentinel, data_w = self._zygote.request(self._fds)
        # The child watches the read end of the data pipe: while this
        # process holds a copy of the write end, it knows its parent lives.
        keep = os.dup(data_w)
        self.finalizer = util.Finalize(self, _close_fds, (keep, self.sentinel))
        try:
            data = memoryview(buf.getbuffer())
            while data:
                data = data[os.write(data_w, data) :]
        except BrokenPipeError:
            pass  # the zygote could not fork: reading the pid says so
        finally:
            os.close(data_w)

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None:
            timeout = 0 if flag == os.WNOHANG else None
            if not wait([self.sentinel], timeout):
                return None
            with self._pid_lock:
                if self.returncode is not None:
                    return self.returncode  # another thread read it meanwhile
                self._read_returncode(timeout)
        return self.returncode

    def _read_returncode(self, timeout: float | None) -> None:
        # With _pid_lock held.
        try:
            self._read_pid()  # the status pipe carries the pid first, then the code
            if wait([self.sentinel], timeout):
                self.returncode = _read_signed(self.sentinel)
        except (OSError, EOFError):
            # The zygote died without reporting: the worker was orphaned. Its
            # pid cannot have been reused while it runs; make sure it stops.
            if self._pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(self._pid, signal.SIGKILL)
            self.returncode = 255


class _FdCounter(_FdNumbering):
    """Stands in for a zygote's Popen while a Process is pickled only as a check."""

    def __init__(self) -> None:
        self._fds = []


@functools.cache
def _pidfds() -> bool:
    """Whether this kernel makes pidfds (Linux 5.3+), which _DirectPopen needs."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def _pickle_for_zygote(process_obj: Any, popen: Any) -> io.BytesIO:
    """Pickle a Process for a zygote's child; ``popen`` numbers the descriptors it sends."""
    buf = io.BytesIO()
    context.set_spawning_popen(popen)
    try:
        reduction.dump(process_obj, buf)
    finally:
        context.set_spawning_popen(None)
    return buf


def _kill_and_reap(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_signed(fd: int) -> int:
    data = b""
    while len(data) < _SIGNED.size:
        chunk = os.read(fd, _SIGNED.size - len(data))
        if not chunk:
            raise EOFError("unexpected EOF")
        data += chunk
    value: int = _SIGNED.unpack(data)[0]
    return value


def _write_signed(fd: int, value: int) -> None:
    with contextlib.suppress(OSError):  # the parent may have gone
        os.write(fd, _SIGNED.pack(value))


# ------------------------------------------------------------------ the zygote


def _serve(sock: socket.socket) -> int:
    """The zygote's loop: fork on request, report pids and exit codes."""
    # Everything inherited from the parent goes to the collector's permanent
    # generation: a worker's full collections then skip it, instead of writing
    # to every inherited object's header and so copying every page of them.
    gc.freeze()
    saved = _calm_signals()
    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)
    signal.set_wakeup_fd(sig_w)
    children: dict[int, int] = {}  # pid -> status_w
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(sig_r, selectors.EVENT_READ)
    accepting = True
    while accepting or children:
        for key, _ in sel.select():
            if key.fileobj is sock:
                try:
                    msg, fds, _, _ = socket.recv_fds(sock, 1, _MAX_FDS)
                except OSError:
                    msg, fds = b"", []
                if not msg or msg == _STOP:  # the pool closed, or the parent died
                    _close_fds(*fds)
                    sel.unregister(sock)
                    sock.close()
                    accepting = False
                    continue
                status_w, data_r, *inherited = fds
                try:
                    pid = os.fork()
                except OSError:
                    # Out of processes or memory: the parent reads EOF instead
                    # of a pid, and says so; later requests may succeed.
                    _close_fds(status_w, data_r, *inherited)
                    continue
                if pid == 0:
                    code = _CHILD_FAILED
                    try:
                        sel.close()
                        sock.close()
                        signal.set_wakeup_fd(-1)
                        _close_fds(sig_r, sig_w, status_w, *children.values())
                        _restore_signals(saved)
                        code = _run_child(data_r, inherited)
                    except BaseException:
                        import traceback

                        traceback.print_exc()
                    finally:
                        os._exit(code)
                _close_fds(data_r, *inherited)
                _write_signed(status_w, pid)
                children[pid] = status_w
            else:
                with contextlib.suppress(OSError):
                    os.read(sig_r, 4096)
        _reap(children)
    return 0


def _reap(children: dict[int, int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_w = children.pop(pid, None)
        if status_w is not None:
            _write_signed(status_w, os.waitstatus_to_exitcode(status))
            _close_fds(status_w)


def _calm_signals() -> dict[int, Any]:
    """The zygote runs none of the parent's signal handlers; Ctrl-C is the parent's to handle."""
    saved: dict[int, Any] = {}
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler) or sig in (signal.SIGINT, signal.SIGCHLD):
            saved[sig] = handler
            new = signal.SIG_IGN if sig == signal.SIGINT else signal.SIG_DFL
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, new)
    # SIGCHLD needs a handler (any) for the wake-up descriptor to hear it.
    signal.signal(signal.SIGCHLD, lambda *_: None)
    return saved


def _restore_signals(saved: dict[int, Any]) -> None:
    # A child takes a worker's dispositions for these two from its first
    # instruction (worker_main sets the same), and never the parent's, not even
    # for a moment: the parent's SIGTERM handler raises SystemExit, which a pool
    # terminated while this child was still starting would print as a
    # traceback (it did, when they were restored here and then reset); Ctrl-C
    # is the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig, handler in saved.items():
        if sig in (signal.SIGTERM, signal.SIGINT):
            continue
        with contextlib.suppress(OSError, ValueError, TypeError):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _run_child(data_r: int, inherited: list[int]) -> int:
    global _inherited_fds
    _inherited_fds = inherited
    parent_sentinel = os.dup(data_r)
    me = process.current_process()
    with os.fdopen(data_r, "rb", closefd=True) as source:
        me._inheriting = True  # type: ignore[attr-defined]
        try:
            proc = pickle.load(source)
        finally:
            del me._inheriting  # type: ignore[attr-defined]
    return _bootstrap(proc, parent_sentinel)


def _bootstrap(proc: Any, parent_sentinel: int) -> int:
    """Run a child's Process, then multiprocessing's exit steps, as its own fork does.

    Python 3.13 moved those steps (run the finalizers, which flush every Queue
    this process put items on; join its own children) out of
    ``Process._bootstrap`` and into its fork and forkserver children's exit. A
    child that skipped them lost the items its Queues still buffered. Running
    them twice is harmless: they run once per process.
    """
    code: int = proc._bootstrap(parent_sentinel=parent_sentinel)
    util._exit_function()  # type: ignore[attr-defined]
    return code
