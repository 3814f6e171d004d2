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

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = [
    "CrasherError",
    "CrashesOnUnpickle",
    "FailsOnUnpickle",
    "Unpicklable",
    "allocate",
    "check_backend",
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


def check_backend(backend: Any, *, workers: int = 2) -> None:
    """The conformance suite every backend passes; raises AssertionError on a deviation.

    ``backend`` is what ``Pool(backend=...)`` accepts: a built-in name or a factory.
    Checks results and their order, errors in place and raised with their type,
    lazy bounded input, adaptive chunking (the backend reports each batch's busy
    time to its sink), close/join, terminate (nothing waits forever), and the
    statistics counts.
    """
    from procpool import Pool

    with Pool(workers, backend=backend) as pool:
        _check_results(pool)
        _check_errors(pool)
        _check_laziness(pool)
        stats = pool.statistics()
        assert stats.tasks_completed >= 200, stats
        assert stats.workers == workers, stats
    _check_adaptive_chunking(backend, workers)
    pool = Pool(workers, backend=backend)
    pool.close()
    try:
        pool.apply(_double, (1,))
    except ValueError:
        pass
    else:
        raise AssertionError("a closed pool accepted a task")
    pool.join()
    pool = Pool(workers, backend=backend)
    pending = pool.map_async(sleep, [0.2] * (8 * workers), chunksize=1)
    pool.terminate()
    pool.join()
    assert pending.ready(), "terminate() left a result waiting forever"


def _double(x: Any) -> Any:
    return x * 2


def _raise_if_three(x: int) -> int:
    if x == 3:
        raise CrasherError("three")
    return x


def _check_results(pool: Any) -> None:
    xs = list(range(100))
    assert pool.map(_double, xs) == [2 * x for x in xs]
    assert pool.map(_double, xs, chunksize=7) == [2 * x for x in xs]
    assert list(pool.imap(_double, iter(xs))) == [2 * x for x in xs]
    assert sorted(pool.imap_unordered(_double, xs)) == [2 * x for x in xs]
    assert pool.starmap(divmod, [(7, 2), (9, 4)]) == [(3, 1), (2, 1)]
    assert pool.apply(int, ("ff",), {"base": 16}) == 255
    assert pool.map(_double, []) == []


def _check_errors(pool: Any) -> None:
    try:
        pool.apply(_raise_if_three, (3,))
    except CrasherError as exc:
        assert str(exc) == "three"
    else:
        raise AssertionError("a task's exception was not raised")
    out = pool.map(_raise_if_three, range(6), return_exceptions=True)
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5], out
    assert isinstance(out[3], CrasherError), out


def _check_adaptive_chunking(backend: Any, workers: int) -> None:
    from procpool import Pool
    from procpool.backends import make_backend

    batches = 0

    def counting(n: int, options: Any) -> Any:
        made: Any = make_backend(backend, n, options)
        submit = made.submit

        def counted(batch_list: list[Any]) -> None:
            nonlocal batches
            batches += len(batch_list)
            submit(batch_list)

        made.submit = counted
        return made

    tasks = 20_000
    with Pool(workers, backend=counting) as pool:
        assert list(pool.imap(_double, range(tasks))) == [2 * x for x in range(tasks)]
    assert batches < tasks // 10, (
        f"imap sent {tasks:,} tiny tasks in {batches:,} batches: the backend does not "
        f"call batch.sink.observe(count, busy_seconds, nbytes) as each batch runs "
        f"(see procpool.backends.Backend)"
    )


def _check_laziness(pool: Any) -> None:
    pulled = 0

    def numbers() -> Any:
        nonlocal pulled
        for i in range(10**9):
            pulled += 1
            yield i

    for n, _ in enumerate(pool.imap(_double, numbers(), buffersize=64)):
        if n == 10:
            break
    assert pulled < 10_000, f"imap read {pulled} items to return 10"
