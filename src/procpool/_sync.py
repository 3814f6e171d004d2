"""Queues and locks for processes, bound to procpool's default start method.

These are the standard library's own objects (``multiprocessing.Queue`` and
friends), made from the context procpool uses by default (``forkserver`` on
Linux, ``spawn`` elsewhere), so they can be handed to a ``procpool.Process``
or a pool's initializer as arguments. To pair them with another start method,
take them from ``procpool.get_context(method)`` instead: a lock made for
``fork`` cannot be sent to a ``spawn`` child.
"""

from __future__ import annotations

from collections.abc import Callable

from ._core._startmethod import resolve_context

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    import multiprocessing.context
    import multiprocessing.queues
    import multiprocessing.synchronize
    from typing import Any

__all__ = [
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "JoinableQueue",
    "Lock",
    "Queue",
    "RLock",
    "Semaphore",
    "SimpleQueue",
]


def _ctx() -> multiprocessing.context.BaseContext:
    return resolve_context(None)


def Queue(maxsize: int = 0) -> multiprocessing.queues.Queue[Any]:
    """A first-in first-out queue shared between processes (``multiprocessing.Queue``).

    Args:
        maxsize: The most items it holds before ``put`` blocks; 0 for no limit.

    Raises:
        OSError: if the operating system refuses a pipe or semaphore.
    """
    return _ctx().Queue(maxsize)


def SimpleQueue() -> multiprocessing.queues.SimpleQueue[Any]:
    """An unbounded queue without a feeder thread (``multiprocessing.SimpleQueue``)."""
    return _ctx().SimpleQueue()


def JoinableQueue(maxsize: int = 0) -> multiprocessing.queues.JoinableQueue[Any]:
    """A :func:`Queue` with ``task_done()`` and ``join()`` (``multiprocessing.JoinableQueue``).

    Args:
        maxsize: The most items it holds before ``put`` blocks; 0 for no limit.
    """
    return _ctx().JoinableQueue(maxsize)


def Lock() -> multiprocessing.synchronize.Lock:
    """A lock shared between processes (``multiprocessing.Lock``)."""
    return _ctx().Lock()


def RLock() -> multiprocessing.synchronize.RLock:
    """A re-entrant lock shared between processes (``multiprocessing.RLock``)."""
    return _ctx().RLock()


def Semaphore(value: int = 1) -> multiprocessing.synchronize.Semaphore:
    """A semaphore shared between processes (``multiprocessing.Semaphore``).

    Raises:
        ValueError: if ``value`` is negative.
    """
    return _ctx().Semaphore(value)


def BoundedSemaphore(value: int = 1) -> multiprocessing.synchronize.BoundedSemaphore:
    """A semaphore that may not be released above ``value`` (``multiprocessing.BoundedSemaphore``).

    Raises:
        ValueError: if ``value`` is negative.
    """
    return _ctx().BoundedSemaphore(value)


def Event() -> multiprocessing.synchronize.Event:
    """An event flag shared between processes (``multiprocessing.Event``)."""
    return _ctx().Event()


def Condition(
    lock: multiprocessing.synchronize.Lock | multiprocessing.synchronize.RLock | None = None,
) -> multiprocessing.synchronize.Condition:
    """A condition variable shared between processes (``multiprocessing.Condition``).

    Args:
        lock: The lock it uses; a new :func:`RLock` if None.
    """
    return _ctx().Condition(lock)


def Barrier(
    parties: int, action: Callable[[], object] | None = None, timeout: float | None = None
) -> multiprocessing.synchronize.Barrier:
    """A barrier for ``parties`` processes (``multiprocessing.Barrier``).

    Args:
        parties: How many processes must call ``wait()`` before all go on.
        action: Called by one of them when the barrier opens.
        timeout: Default timeout of ``wait()``, in seconds.
    """
    return _ctx().Barrier(parties, action, timeout)


# Public names say where users find them, so reprs and pickles show procpool.X.
for _factory in (
    Barrier,
    BoundedSemaphore,
    Condition,
    Event,
    JoinableQueue,
    Lock,
    Queue,
    RLock,
    Semaphore,
    SimpleQueue,
):
    _factory.__module__ = "procpool"
del _factory
