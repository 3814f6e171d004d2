"""Which start method procpool uses, and why.

``fork`` is the fastest way to start a process, and the only unsafe one: forking
a process that runs other threads (a web server, a notebook kernel, procpool's
own dispatcher thread) can deadlock the child on a lock one of them held, and
Python 3.12+ warns about it. So procpool forks only when nothing else runs
(:func:`fork_is_safe`), and otherwise uses ``forkserver`` on Linux (safe: it
forks from a small single-threaded server; one server start, about 50-100 ms
once per interpreter, then a few milliseconds per process) and ``spawn``
elsewhere (macOS, Windows), which is :func:`default_start_method`.

* ``procpool.Process`` with no start method (:func:`process_start_method`):
  ``fork`` where it is safe at ``start()``, else the default.
* Pools go one step further (``_zygote.py``): made in a process where fork is
  safe, a pool with the default method forks a single-threaded copy of the
  process, which then forks the workers, so that they are still forked safely
  once the pool's own thread runs.

Any method named explicitly is used as it is.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import os
import sys
import threading

__all__ = [
    "ContextLike",
    "checked_start_method",
    "default_start_method",
    "fork_is_safe",
    "process_start_method",
    "resolve_context",
    "single_threaded",
    "starting_a_process",
]

# A start method name, a multiprocessing context, a procpool Context, or None.
ContextLike = object

_PRELOAD = "procpool._core._worker"


# procpool's own process starts never overlap. Under fork, a child forked while
# another thread is between making a pipe for its child and closing the
# parent's copy of the child's end would hold that end open: the other child's
# death would then go unseen (no EOF, no sentinel) for as long as it lives.
_start_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _start_lock
    _start_lock = threading.Lock()  # a forked child may inherit it held
    _forget_parents_forkserver()


def _forget_parents_forkserver() -> None:
    """Let a forked child start a forkserver of its own, like a fresh interpreter.

    The stdlib's forkserver handle survives fork: the child would think the
    parent's server is its own, and fail (ECHILD) or hang using it. That is the
    case of a fork-started worker whose task makes a pool with the default
    start method. Closing our copy of the server's liveness pipe also lets the
    parent's server exit when the parent does.
    """
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(alive_fd)
    server._forkserver_alive_fd = None
    server._forkserver_address = None
    server._forkserver_pid = None
    server._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def starting_a_process() -> threading.Lock:
    """The lock to hold while making a child's pipes, starting it, and closing
    the parent's copies (``with starting_a_process(): ...``)."""
    return _start_lock


def default_start_method() -> str:
    """Return the start method procpool uses when none is given and fork is not safe."""
    if sys.platform.startswith("linux"):
        return "forkserver"
    return "spawn"


def process_start_method() -> str:
    """The start method of a ``procpool.Process`` started now without one."""
    return "fork" if fork_is_safe() else default_start_method()


_FORK_HERE = "fork" in multiprocessing.get_all_start_methods()


def checked_start_method(method: str) -> str:
    """Return ``method`` once it is known to work here, as resolve_context checks it.

    The same checks, and the same preloading for ``forkserver``, without making
    a context for ``fork``, which a process started with it does not need.

    Raises:
        ValueError: if the name is not a start method available on this platform.
    """
    if method == "fork" and _FORK_HERE:
        return method
    return resolve_context(method).get_start_method()


# Native runtimes whose threads (or state) do not survive fork: GNU OpenMP's
# pool hangs a child that uses it, CUDA cannot be used in a forked child, and
# XLA, TensorFlow and gRPC say so themselves. Loaded *and* with native threads
# running, they rule fork out.
_FORK_UNSAFE_LIBRARIES = (b"libgomp", b"libcuda.so", b"xla_extension", b"libtensorflow", b"cygrpc")


def fork_is_safe() -> bool:
    """Whether forking this process now is safe: Linux, no other Python thread,
    and no fork-unsafe native runtime running (macOS's system libraries are not
    fork-safe, which is why CPython spawns there)."""
    if not _LINUX:
        return False
    # The usual answer first, in one look at the kernel's list of this
    # process's threads: there is no other (every Python thread is one).
    # Each check after a fork costs copy-on-write faults on the objects it
    # touches: ~0.1 ms per process started, measured (2 cores).
    threads = _thread_count()
    if threads == 1:
        return True
    return single_threaded() and not (threads != 0 and _fork_unsafe_library_loaded())


_LINUX = sys.platform.startswith("linux")


def _thread_count() -> int:
    """This process's threads, native ones included; 0 if unknown."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def single_threaded() -> bool:
    """Whether this process runs no Python thread but the current one.

    The rule CPython's own fork warning (3.12+) applies: native threads alone
    do not count (NumPy's OpenBLAS starts some at import, and makes itself
    safe across fork with ``pthread_atfork``). See also fork_is_safe().
    Threads started with ``_thread`` count too, as they do for that warning,
    though ``threading`` does not list them: a worker's parent watchdog (known
    from the moment it is started), and any other that is running Python code.
    """
    worker = sys.modules.get("procpool._core._worker")  # not imported: no watchdog
    return (
        threading.active_count() == 1
        and not getattr(worker, "watchdog_started", False)
        and len(sys._current_frames()) == 1
    )


def _fork_unsafe_library_loaded() -> bool:
    """A runtime known not to survive fork is loaded (see _FORK_UNSAFE_LIBRARIES)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            mapped = maps.read()
    except OSError:
        return False
    return any(name in mapped for name in _FORK_UNSAFE_LIBRARIES)


def resolve_context(context: ContextLike = None) -> multiprocessing.context.BaseContext:
    """Turn None, a method name, a procpool Context or a multiprocessing context into the latter.

    Raises:
        ValueError: if the name is not a start method available on this platform.
        TypeError: if ``context`` is none of the accepted kinds.
    """
    if context is None:
        context = default_start_method()
    if isinstance(context, str):
        if context not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"unknown start method {context!r}; "
                f"this platform has {multiprocessing.get_all_start_methods()}"
            )
        ctx = multiprocessing.get_context(context)
    elif isinstance(context, multiprocessing.context.BaseContext):
        ctx = context
    elif isinstance(getattr(context, "mp_context", None), multiprocessing.context.BaseContext):
        ctx = context.mp_context  # type: ignore[attr-defined]
    else:
        raise TypeError(
            f"context must be a start method name or a multiprocessing context, "
            f"not {type(context).__name__}"
        )
    if ctx.get_start_method() == "forkserver":
        _preload_worker_module(ctx)
    return ctx


def _preload_worker_module(ctx: multiprocessing.context.BaseContext) -> None:
    # Workers forked from a server that has already imported procpool start in
    # milliseconds instead of re-importing it. The stdlib preloads '__main__' by
    # default; keep whatever is there and add ours. No effect once the server runs.
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    if _PRELOAD not in current:
        ctx.set_forkserver_preload([*current, _PRELOAD])  # type: ignore[attr-defined]
