r"""The direct path: a lone call on an idle pool, without the dispatcher thread.

A round trip through the dispatcher thread crosses four hand-offs (caller,
dispatcher, worker, dispatcher, caller); on a small machine each thread's
wake-up costs about what the worker's does. So, when a worker is idle::

    caller's thread                                    worker
    ---------------                                    ------
    submit --(engine lock)-- send BATCH ------------->  run
    get()/result(): borrow the worker's pipe             |
       (out of the dispatcher's epoll), wait   <------  RESULTS
       (_pipewait), read, handle, give it back

The dispatcher thread sleeps through it. Everything that touches engine state
does so under the engine lock, which the dispatcher holds whenever it is not
asleep in select(), and with signal handlers held back (_signals). What the
direct path does not take (a busy pool, callbacks, a task timeout, a large
batch, a result nobody waits for) goes the dispatcher's way, as before.

This is a mixin of :class:`~._dispatcher.Dispatcher`, whose state it shares;
it is kept apart as one concept, and to keep the dispatcher readable.
"""

from __future__ import annotations

import select
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable

from . import _protocol as P
from . import _signals
from ._pipewait import PipeWait

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

    from ._batch import Batch
    from ._workers import Worker

__all__ = ["DIRECT_LOCK_WAIT_S", "HOLD_FOR_WAITER_S", "DirectPath", "DirectWaiter"]

# How long a lone call waits for the dispatcher to let go of the engine lock
# before it goes the dispatcher's way (see DirectPath._send_direct).
DIRECT_LOCK_WAIT_S = 0.0005
# How long the dispatcher leaves a direct call's reply for the thread that will
# wait for it, when the reply comes first (see DirectPath._hold_for_waiter).
HOLD_FOR_WAITER_S = 0.001


class DirectWaiter:
    """What a direct call's sink holds for the thread that will wait for its outcome.

    That thread calls it, with its timeout, to read the reply itself
    (DirectPath._wait_direct). A sink whose outcome will reach a callback
    instead (a Future's done callbacks, as asyncio's ``run_in_executor`` adds;
    ``concurrent.futures.wait`` and ``as_completed``) calls ``not_coming()``:
    the reply is then read by the dispatcher as soon as it comes, rather than
    left up to HOLD_FOR_WAITER_S for a thread that never takes it.
    """

    __slots__ = ("_batch", "_path", "_worker")

    def __init__(self, path: DirectPath, worker: Worker, batch: Batch) -> None:
        self._path = path
        self._worker = worker
        self._batch = batch

    def __call__(self, timeout: float | None) -> None:
        self._path._wait_direct(self._worker, self._batch, timeout)

    def not_coming(self) -> None:
        self._path._not_coming(self._worker, self._batch)


class DirectPath:
    """The dispatcher's direct path (see the module docstring)."""

    if TYPE_CHECKING:  # the Dispatcher's, which this is mixed into
        _pending: deque[Batch]
        _workers: dict[int, Worker]
        _sel: selectors.BaseSelector
        _thread: threading.Thread
        _broken: BaseException | None
        _stopped: bool
        _closing: bool
        _terminating: bool

        @property
        def accepting(self) -> bool: ...
        def _send(self, worker: Worker, batch: Batch, linger: bool = False) -> None: ...
        def _handle(self, worker: Worker, msg: tuple[Any, ...]) -> None: ...
        def _wake(self) -> None: ...
        @staticmethod
        def _fits_pipe(worker: Worker, batch: Batch, *, with_held: bool = False) -> bool: ...

    def _init_direct_path(self) -> None:
        # Held by whichever thread moves batches and reads pipes: the dispatcher
        # thread, or a caller's thread on the direct path (see _send_direct).
        self._engine_lock = threading.Lock()
        self._lendings = 0  # pipes lent and taken back so far (see Dispatcher._on_ready)
        self._handler: int | None = None  # a caller's thread handling a message under it
        # The kernel's epoll behind the selector, if it is one: see _mute().
        epoll = getattr(self._sel, "_selector", None)
        self._epoll: Any = epoll if isinstance(epoll, getattr(select, "epoll", ())) else None
        self._muted: dict[int, selectors.SelectorKey | None] = {}  # see _mute
        self._held: dict[int, Worker] = {}  # replies left to their waiters (_hold_for_waiter)

    def _send_direct(self, batch: Batch) -> bool:
        """Send a lone call straight to an idle worker from the caller's thread.

        A round trip through the dispatcher thread crosses four hand-offs
        (caller, dispatcher, worker, dispatcher, caller), and on a small
        machine each thread's wake-up costs as much as the worker's. When the
        pool is idle, the caller sends the batch itself, without waking the
        dispatcher, and lends the thread that waits for the result the worker's
        pipe (_wait_direct): two hand-offs, as for a bare Pipe. Only when
        nothing else waits: the lock is waited for only briefly; a batch with a
        task timeout needs the dispatcher's clock; a sink that runs user
        callbacks must run them on the dispatcher thread, as the stdlib does.
        Returns whether the batch was taken (sent, or dropped as cancelled).
        """
        attach: Callable[[DirectWaiter], bool] | None
        attach = getattr(batch.sink, "attach_waiter", None)
        if attach is None or batch.policy.timeout is not None or self._pending:
            return False
        if batch.first_index:
            # A map's later batch (one submitted alone, as large arguments are):
            # its pool is busy with the earlier ones, and a wait for the lock
            # here would hold up the caller's pickling of the next.
            return False
        saved = _signals.defer()  # engine code on the caller's thread: see _signals
        try:
            return self._send_direct_locked(batch, attach)
        finally:
            _signals.deliver(saved)

    def _send_direct_locked(self, batch: Batch, attach: Callable[[DirectWaiter], bool]) -> bool:
        if not self._engine_lock.acquire(blocking=False):
            if threading.get_ident() in (self._thread.ident, self._handler):
                return False  # called back from under the lock: it will not come free
            # The dispatcher holds it for microseconds at a time, typically just
            # after it delivered the result whose caller now calls again.
            if not self._engine_lock.acquire(timeout=DIRECT_LOCK_WAIT_S):
                return False
        try:
            if self._pending or not self.accepting or self._broken is not None or self._stopped:
                return False
            worker = self._idle_worker()
            if (
                worker is None
                # A write that could block would block the caller, holding the lock.
                or not self._fits_pipe(worker, batch)
                or not attach(DirectWaiter(self, worker, batch))
            ):
                return False
            if batch.on_start is not None:
                on_start, batch.on_start = batch.on_start, None
                if not on_start():
                    batch.release()
                    return True  # cancelled before it started
            self._send(worker, batch, linger=True)
            worker.unwaited = False
            worker.direct_at = time.monotonic()
            return True
        finally:
            self._engine_lock.release()

    def _idle_worker(self) -> Worker | None:
        for worker in self._workers.values():
            if worker.ready and not (
                worker.inflight or worker.retiring or worker.timed_out or worker.lent
            ):
                return worker
        return None

    def _wait_direct(self, worker: Worker, batch: Batch, timeout: float | None) -> None:
        """Read ``batch``'s result from ``worker``'s pipe on this (the waiting) thread.

        The pipe leaves the dispatcher's selector while lent. The thread returns
        when the batch is settled, or the timeout passes, or the worker exits
        (then the dispatcher, which gets the pipe back, settles the batch as for
        any death; until then it ignores the sentinel, see _on_ready). The
        dispatcher may hold events from a select() begun before the pipe was
        lent: it checks that the pipe still has something to read.
        """
        if threading.get_ident() in (self._thread.ident, self._handler):
            return  # a callback waiting on another result: the lock is this thread's
        deadline = None if timeout is None else time.monotonic() + timeout
        engine = self._engine_lock
        saved = _signals.defer()  # engine code on the caller's thread: see _signals
        try:
            with engine:
                if worker.lent or not self._holds(worker, batch):
                    return
                pipe_wait = self._lend(worker)
            stop = _signals.pending if saved is not None else None
            self._read_lent(worker, batch, pipe_wait, deadline, stop)
        finally:
            _signals.deliver(saved)

    def _not_coming(self, worker: Worker, batch: Batch) -> None:
        """No thread will wait to read ``batch``'s reply: the dispatcher is to read
        it as it comes (see _hold_for_waiter), or now, if it holds it already.

        Any thread, without the engine lock: the caller may hold a Future's own
        lock (``concurrent.futures.wait`` adds its waiters under it), which the
        dispatcher takes to deliver. So it only sets a flag that the dispatcher
        reads under the engine lock, and wakes it. The reads here may be stale: a
        call sent to the same worker since then may lose its hold, and is only
        read the dispatcher's way, a few microseconds later.
        """
        if worker.direct_at and batch in worker.inflight:
            worker.unwaited = True
            self._wake()

    def _read_lent(
        self,
        worker: Worker,
        batch: Batch,
        pipe_wait: PipeWait,
        deadline: float | None,
        stop: Callable[[], bool] | None,
    ) -> None:
        """Read and handle ``worker``'s messages until ``batch`` is settled, or ``stop()``
        says to give up (asked every tick of the wait); give the pipe back."""
        engine = self._engine_lock
        settled = False
        try:
            while not settled:
                if not pipe_wait.wait(deadline, stop):
                    # Timed out, a signal to deliver, or the worker exited (its
                    # sentinel, which the dispatcher watches, says how).
                    return
                try:
                    # Outside the lock: while lent, nothing else reads this pipe,
                    # and a large reply does not hold up the dispatcher.
                    msg = P.recv(worker.conn)
                except (EOFError, OSError):
                    worker.eof = True  # exiting (or buried): the sentinel reports how
                    return
                with engine:
                    if not self._holds(worker, batch):
                        return  # failed meanwhile (terminate): the message is moot
                    self._handler = threading.get_ident()  # sinks may call submit()
                    try:
                        self._handle(worker, msg)
                    finally:
                        self._handler = None
                    settled = not self._holds(worker, batch)
                    if settled:
                        self._take_back(worker)
        finally:
            if not settled:
                with engine:
                    self._take_back(worker)

    def _holds(self, worker: Worker, batch: Batch) -> bool:
        return worker.id in self._workers and not self._terminating and batch in worker.inflight

    def _lend(self, worker: Worker) -> PipeWait:
        worker.lent = True
        worker.direct_at = 0.0
        self._lendings += 1
        self._mute(worker.fd)  # the sentinel stays: see _on_ready
        return worker.waiter()

    def _take_back(self, worker: Worker) -> None:
        worker.lent = False
        self._lendings += 1
        buried = worker.id not in self._workers
        self._unmute(worker.fd, drop=buried or worker.eof)
        self._unmute(worker.process.sentinel, drop=buried)  # if _on_ready muted it
        if self._pending or self._closing or worker.eof:
            self._wake()  # work to schedule, a close to finish, or a death to settle

    def _mute(self, fd: int) -> None:
        """Take ``fd`` out of the dispatcher's select() while it is lent (see _unmute).

        Under epoll (Linux) only the kernel is asked, and the selector's key
        stays: ~0.4 us a call, where the selectors API's unregister and register
        cost ~2 us each, and the direct path makes two such calls a round trip.
        """
        if fd in self._muted:
            return  # held for its waiter already (see _hold_for_waiter)
        if self._epoll is None:
            try:
                self._muted[fd] = self._sel.unregister(fd)
            except KeyError:
                pass  # taken out for good already: its pipe's end of file was seen
            return
        try:
            self._epoll.unregister(fd)
        except OSError:
            return  # as above
        self._muted[fd] = None

    def _unmute(self, fd: int, *, drop: bool) -> None:
        """Put a muted ``fd`` back in select(), or (``drop``) out of the selector for good."""
        if fd not in self._muted:
            return
        key = self._muted.pop(fd)
        if key is not None:  # no epoll: the selector forgot it
            if not drop:
                self._sel.register(key.fileobj, key.events, key.data)
        elif not drop:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            try:
                self._sel.unregister(fd)  # the key alone: the kernel forgot the fd
            except KeyError:
                pass  # buried meanwhile

    def _hold_for_waiter(self, worker: Worker) -> bool:
        """Leave the reply of a call sent on the direct path to the thread that will wait for it.

        The reply came before that thread took the pipe: the dispatcher was
        awake (a thread asleep in select() takes longer to wake than the caller
        takes to come). Read here, the call would pay the two thread wake-ups
        the direct path spares, and an awake dispatcher tends to stay awake for
        the next call too. So the pipe is muted for up to HOLD_FOR_WAITER_S; a
        reply nobody comes for (a fire-and-forget ``apply_async``) is read then,
        and one that its sink said nobody will come for (``worker.unwaited``, see
        _not_coming) is not held at all.
        """
        if worker.unwaited or time.monotonic() - worker.direct_at >= HOLD_FOR_WAITER_S:
            worker.direct_at = 0.0
            return False
        self._mute(worker.fd)
        self._held[worker.id] = worker
        return True

    def _release_held(self) -> None:
        """Read the held replies whose waiter did not come in time (see _hold_for_waiter)."""
        now = time.monotonic()
        for wid, worker in list(self._held.items()):
            if worker.lent or not worker.direct_at:
                del self._held[wid]  # its waiter took it
            elif worker.unwaited or now - worker.direct_at >= HOLD_FOR_WAITER_S:
                del self._held[wid]
                worker.direct_at = 0.0
                self._unmute(worker.fd, drop=False)

    def _next_release(self, now: float) -> float | None:
        """Seconds until the first held reply is due to be read here, if any is held."""
        if not self._held:
            return None
        return max(0.0, min(w.direct_at for w in self._held.values()) + HOLD_FOR_WAITER_S - now)

    def _forget_direct(self, worker: Worker) -> None:
        """Drop what the direct path keeps of a worker that was buried."""
        self._held.pop(worker.id, None)
        if not worker.lent:
            self._muted.pop(worker.fd, None)  # its number may come back with another pipe
