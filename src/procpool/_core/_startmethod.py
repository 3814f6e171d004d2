"""Which start method procpool uses, and why.

The default is ``forkserver`` on Linux and ``spawn`` elsewhere (macOS, Windows).
``fork`` is never the default: forking a process that already runs threads (a
web server, a notebook kernel, procpool's own dispatcher thread) can deadlock
the child on a lock some other thread held, and Python 3.12+ warns about it.
``forkserver`` is safe because it forks from a small single-threaded server
process; it costs one server start (about 50-100 ms, once per interpreter) and
a few milliseconds per worker. ``fork`` stays available for those who want it.

Pools go one step further (``_zygote.py``): made in a process that runs no
other Python thread, a pool with the default method forks a single-threaded
copy of the process, which then forks the workers: fork's speed, without ever
forking a threaded process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["ContextLike", "default_start_method", "resolve_context", "starting_a_process"]

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


@contextlib.contextmanager
def starting_a_process() -> Iterator[None]:
    """Hold while making a child's pipes, starting it, and closing the parent's copies."""
    with _start_lock:
        yield


def default_start_method() -> str:
    """Return the start method procpool uses when none is given."""
    if sys.platform.startswith("linux"):
        return "forkserver"
    return "spawn"


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
