"""Crashers and awkward objects for testing code that runs on procpool.

Each helper fails in one precise way, at one precise stage of a task's life, so
a test (ours, or a backend author's) can say exactly what the caller must see.
They are importable by reference, so they work under every start method.

Stages: building the task in the parent (``Unpicklable``), unpickling it in
the worker (``FailsOnUnpickle``, ``CrashesOnUnpickle``), running it (the
functions), pickling the result (``return_unpicklable``,
``return_crashes_on_pickle``), unpickling the result in the parent
(``return_fails_on_unpickle``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import Any, NoReturn

__all__ = [
    "CrashesOnUnpickle",
    "FailsOnUnpickle",
    "Unpicklable",
    "allocate",
    "exit_abruptly",
    "kill_self",
    "raise_error",
    "return_crashes_on_pickle",
    "return_fails_on_unpickle",
    "return_unpicklable",
    "segfault",
    "sleep",
    "sys_exit",
]


class CrasherError(Exception):
    """The exception :func:`raise_error` raises."""


def raise_error(message: str = "boom", *_: Any) -> NoReturn:
    """Raise CrasherError(message)."""
    raise CrasherError(message)


def sys_exit(code: int = 3, *_: Any) -> NoReturn:
    """Call ``sys.exit(code)`` (raises SystemExit; the worker survives)."""
    sys.exit(code)


def exit_abruptly(code: int = 3, *_: Any) -> NoReturn:
    """End the worker process at once with ``os._exit(code)``."""
    os._exit(code)


def kill_self(sig: int = signal.SIGKILL, *_: Any) -> NoReturn:
    """Send ``sig`` (default SIGKILL) to the worker's own process."""
    os.kill(os.getpid(), sig)
    time.sleep(60)
    raise AssertionError("unreachable: the signal should have ended the process")


def segfault(*_: Any) -> NoReturn:
    """Read address 0: a real segmentation fault (SIGSEGV)."""
    ctypes.string_at(0)
    raise AssertionError("unreachable")


def sleep(seconds: float, value: Any = None) -> Any:
    """Sleep, then return ``value``."""
    time.sleep(seconds)
    return value


def allocate(nbytes: int, hold: float = 0.0) -> int:
    """Allocate and touch ``nbytes`` of memory (kept alive in the worker), return its size."""
    block = bytearray(nbytes)
    for i in range(0, nbytes, 4096):
        block[i] = 1
    _held.append(block)
    if hold:
        time.sleep(hold)
    return nbytes


_held: list[bytearray] = []


class Unpicklable:
    """Cannot be pickled at all (fails in the parent, before the task is sent)."""

    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable objects cannot be pickled, on purpose")


def _fail_unpickle() -> NoReturn:
    raise ValueError("FailsOnUnpickle objects cannot be unpickled, on purpose")


class FailsOnUnpickle:
    """Pickles fine; raises ValueError when unpickled (in the worker, as an argument)."""

    def __reduce__(self) -> Any:
        return (_fail_unpickle, ())


def _crash_on_unpickle(code: int) -> NoReturn:
    os._exit(code)


class CrashesOnUnpickle:
    """Pickles fine; ends the process with ``os._exit(code)`` when unpickled."""

    def __init__(self, code: int = 7) -> None:
        self.code = code

    def __reduce__(self) -> Any:
        return (_crash_on_unpickle, (self.code,))


def return_unpicklable(*_: Any) -> Unpicklable:
    """Return an object that cannot be pickled (fails in the worker, sending the result)."""
    return Unpicklable()


class _CrashesOnPickle:
    def __reduce__(self) -> Any:
        os._exit(9)


def return_crashes_on_pickle(*_: Any) -> Any:
    """Return an object whose pickling ends the worker with ``os._exit(9)``."""
    return _CrashesOnPickle()


def return_fails_on_unpickle(*_: Any) -> FailsOnUnpickle:
    """Return an object that pickles in the worker but fails to unpickle in the parent."""
    return FailsOnUnpickle()
