"""Wake-ups of threads waiting for results, held back to the end of a turn.

The dispatcher thread handles, in one turn of its loop, every message that has
come (up to _dispatcher.DRAIN_MESSAGES a worker). A sink that woke its waiting
thread at each result it was given (an ``imap`` consumer, woken per chunk) made
the two threads trade the GIL at every message: the woken consumer took it at
the dispatcher's next system call, and the dispatcher waited for it back before
reading on. py-spy put ~a third of the dispatcher's time in those waits during
``imap(f, xs, chunksize=1)``. A sink calls :func:`wake` instead of notifying;
during a turn (from :func:`begin_turn` to :func:`end_turn`) the wake-up happens
once, as the turn ends, after every result of the turn is in. 20,000 squares
through ``imap(f, xs, 1)`` on 2 cores: 1.09 -> 0.85 s; ``imap_unordered``
1.16 -> 0.93 s (medians of 4).

A call's result (``AsyncResult``: ``apply_async``, ``map_async``) is marked ready
at once, but the lock its waiters queue on is released as the turn ends
(:func:`release`): 10,000 ``apply_async`` then their ``get()``s, 356 -> 329 ms;
2,000 ``map_async`` of 10 squares, 306 -> 276 ms (medians of 4).

Outside a turn (another backend's thread, a caller's thread on the direct
path, the dispatcher failing everything as it stops) :func:`wake` notifies at
once. The record is per thread, so only the thread whose turn it is defers.
"""

from __future__ import annotations

import threading


class _Turn(threading.local):
    # Conditions to notify as this thread's turn ends; None outside a turn.
    held: list[threading.Condition] | None = None
    # Locks that waiters queue on, to release as the turn ends (set per thread).
    locks: list[threading.Lock]


_TURN = _Turn()


def wake(cond: threading.Condition) -> None:
    """Notify a thread waiting on ``cond``, whose lock the caller holds: now, or,
    during this thread's turn, as the turn ends."""
    held = _TURN.held
    if held is None:
        cond.notify()
    elif cond not in held:
        held.append(cond)


def release(lock: threading.Lock) -> bool:
    """Release ``lock``, held and queued on by waiters, now; or, during this
    thread's turn, as the turn ends (then False). Raises RuntimeError, as
    ``lock.release()`` does, only when releasing now."""
    if _TURN.held is None:
        lock.release()
        return True
    _TURN.locks.append(lock)
    return False


def begin_turn() -> None:
    """Hold back :func:`wake`'s notifications on this thread until end_turn()."""
    _TURN.held = []
    _TURN.locks = []


def end_turn() -> None:
    """Notify and release what :func:`wake` and :func:`release` held back since
    begin_turn(). Call it in a ``finally``: a turn that raises must not leave a
    waiter asleep."""
    held, _TURN.held = _TURN.held, None
    locks, _TURN.locks = _TURN.locks, []
    for cond in held or ():
        with cond:
            cond.notify()
    for lock in locks:
        try:
            lock.release()
        except RuntimeError:
            pass  # released already
