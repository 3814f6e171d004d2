"""Every exception procpool raises, rooted at one base class.

::

    ProcpoolError
    ├── WorkerCrashedError      also concurrent.futures.process.BrokenProcessPool
    │                           (so BrokenExecutor): a worker died holding the task
    ├── TaskTimeoutError        also TimeoutError: the task ran past task_timeout
    ├── InitializerError        also BrokenProcessPool: the pool's initializer failed
    ├── PoolClosedError         also ValueError (as the stdlib's "Pool not running"):
    │                           work given to a pool after close() or terminate(),
    │                           or left unfinished by terminate()
    └── SerializationError      also pickle.PicklingError: an argument, a result or
        │                       the callable could not be pickled or unpickled
        └── ResultSerializationError
                                also multiprocessing.pool.MaybeEncodingError: a
                                task's result could not be pickled in the worker

A task's own exception is never wrapped: it reaches the caller with its original
type, and the worker-side traceback text is attached as ``__cause__`` (a
:class:`RemoteTraceback`), as in :mod:`concurrent.futures`.

Pool-breaking errors subclass the standard library's, so ``except
BrokenExecutor`` and ``except TimeoutError`` clauses written for the stdlib keep
working; unlike the stdlib, the pool itself keeps serving afterwards. The three
that subclass one of the standard library's pool errors are defined in
``_exceptions_stdlib.py``, imported only where they are raised: importing
``concurrent.futures`` (with the ``logging`` it imports) and
``multiprocessing.pool`` would add 2.5-4 ms to every worker's start, and to
every program's first pool.
"""

from __future__ import annotations

import pickle
import signal

__all__ = [
    "PoolClosedError",
    "ProcpoolError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeoutError",
    "describe_exitcode",
]

# Likely causes, said once so every crash message reads the same.
_SIGNAL_HINTS = {
    signal.SIGKILL: "killed from outside, or out of memory?",
    signal.SIGSEGV: "segmentation fault in native code?",
    signal.SIGBUS: "bad memory access in native code?",
    signal.SIGABRT: "aborted by native code (assertion failure?)",
    signal.SIGTERM: "terminated from outside",
    signal.SIGFPE: "arithmetic fault in native code",
}


def describe_exitcode(exitcode: int | None) -> str:
    """Say how a process ended, e.g. ``'SIGKILL (-9): killed from outside, or out of memory?'``."""
    if exitcode is None:
        return "unknown exit status"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:
            return f"signal {-exitcode} ({exitcode})"
        hint = _SIGNAL_HINTS.get(sig)
        text = f"{sig.name} ({exitcode})"
        return f"{text}: {hint}" if hint else text
    return f"exit code {exitcode}"


class ProcpoolError(Exception):
    """Base class of every error procpool raises on its own account.

    Attributes:
        task_index: Position of the task it is the outcome of, in its map (None
            for a single call, or an error that belongs to no task).
    """

    task_index: int | None = None

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class TaskTimeoutError(ProcpoolError, TimeoutError):
    """A task ran longer than its ``task_timeout``; its worker was killed and replaced.

    Attributes:
        timeout: The limit, in seconds.
        task_index: Position of the task in its map, or None for a single call.
    """

    def __init__(
        self, message: str, *, timeout: float | None = None, task_index: int | None = None
    ) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.task_index = task_index


class PoolClosedError(ProcpoolError, ValueError):
    """Work was given to a pool that is closed or terminated, or a pool was
    terminated before the work ran. A ``ValueError``, as the standard library's
    ``Pool not running`` is."""


class SerializationError(ProcpoolError, pickle.PicklingError):
    """A task's callable, argument or result could not cross a process boundary.

    The original error is attached as ``__cause__``.
    """


class RemoteTraceback(Exception):
    """Carries a worker's traceback text; attached as ``__cause__`` of a task's error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _rebuild(
    cls: type[BaseException], args: tuple[object, ...], attrs: dict[str, object]
) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    for name, value in attrs.items():
        setattr(exc, name, value)
    return exc


# Public classes say they live in `procpool` (tracebacks, pickles, repr).
for _cls in (
    ProcpoolError,
    TaskTimeoutError,
    SerializationError,
    RemoteTraceback,
):
    _cls.__module__ = "procpool"
del _cls
