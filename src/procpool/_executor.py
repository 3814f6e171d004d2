"""``procpool.ProcessPoolExecutor``: the :mod:`concurrent.futures` surface on procpool's engine."""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator

from ._core import _protocol as P
from ._core._generic import TypeVar
from ._core._startmethod import ContextLike
from ._exceptions import PoolClosedError
from ._results import IMapIterator, wait_helped
from ._runner import _UNSET, Runner, check_chunksize, default_workers, make_policy

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

    from ._core._direct import DirectWaiter
    from ._statistics import PoolStatistics
    from .backends import Backend

__all__ = ["ProcessPoolExecutor"]

T = TypeVar("T")

# Set as the interpreter starts to exit, before any atexit callback runs, as
# the stdlib's executor does: a late submit() fails the same way wherever
# procpool was imported relative to the caller's own exit hooks.
_interpreter_exiting = False


def _mark_interpreter_exiting() -> None:
    global _interpreter_exiting
    _interpreter_exiting = True


getattr(threading, "_register_atexit", atexit.register)(_mark_interpreter_exiting)


_future_init = cf.Future.__init__


class _Future(cf.Future[T]):
    """A Future whose ``result()`` may read the outcome from the worker itself.

    See ``_batch.Sink``: on an idle pool the task went straight to a worker,
    and the thread that waits reads the reply, sparing two thread wake-ups.
    ``as_completed``, ``wait`` and callbacks get the outcome as before.
    """

    _waiter: DirectWaiter | None = None
    _engine: Backend | None = None  # the backend that settles it (see refuse_own_thread)

    def __init__(self) -> None:
        _future_init(self)
        # concurrent.futures.wait and as_completed add their waiters to this list
        # (a private attribute, the same from Python 3.2 to 3.13): a future
        # waited for that way is never read through result() (see not_coming).
        # The list has no __init__ of its own, and this one calls the base's
        # directly: every submit() makes one (0.6 us a future in all, against
        # 1.4 through super() and a list __init__).
        # It refers back weakly: a cycle would leave a dropped future, and the
        # result it holds (shared memory, perhaps), to the cyclic collector.
        waiters = _Waiters()
        waiters.future = weakref.ref(self)
        self._waiters: list[Any] = waiters

    def add_done_callback(self, fn: Callable[[cf.Future[T]], object]) -> None:
        self._not_coming()  # asyncio's run_in_executor waits this way, for one
        super().add_done_callback(fn)

    def _not_coming(self) -> None:
        """Its outcome goes to a callback, not to a thread in result(): tell the
        direct path, which would leave the reply for that thread for up to 1 ms
        (the dispatcher reads it at once instead)."""
        waiter = self._waiter
        if waiter is not None:
            waiter.not_coming()

    def result(self, timeout: float | None = None) -> T:
        return super().result(wait_helped(self, self.done, timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(wait_helped(self, self.done, timeout))


class _Waiters(list):  # type: ignore[type-arg]
    """A Future's list of ``concurrent.futures`` waiters, which tells it when one is added."""

    __slots__ = ("future",)
    future: weakref.ref[_Future[Any]]

    def append(self, waiter: Any) -> None:
        super().append(waiter)
        future = self.future()
        if future is not None:
            future._not_coming()


class _FutureSink:
    """Hands a single task's outcome to its Future."""

    __slots__ = ("__weakref__", "future", "owner")  # weakly referenced: Dispatcher._answered

    def __init__(self, future: _Future[Any], owner: ProcessPoolExecutor) -> None:
        self.future = future
        self.owner = owner

    def attach_waiter(self, waiter: DirectWaiter) -> bool:
        """Let ``future.result()`` read the outcome itself (see ``_batch.Sink``)."""
        self.future._waiter = waiter
        return True

    def start(self) -> bool:
        """Called as the task is sent to a worker; False (cancelled) drops it."""
        if self.future.set_running_or_notify_cancel():
            return True
        self.owner._forget(self.future)
        return False

    def deliver(
        self, first: int, values: list[Any], errors: dict[int, BaseException] | None
    ) -> None:
        self.owner._forget(self.future)
        self.future._waiter = None  # it holds the batch and the worker: let them go
        if self.future.done():
            return
        if errors:
            self.future.set_exception(errors[0])
        else:
            self.future.set_result(values[0])


class ProcessPoolExecutor(cf.Executor):
    """A drop-in for :class:`concurrent.futures.ProcessPoolExecutor`.

    Its futures are real :class:`concurrent.futures.Future` objects, so
    ``as_completed``, ``wait`` and asyncio's ``run_in_executor`` work. Unlike the
    standard library, a worker that dies fails only its own futures (with
    WorkerCrashedError, a BrokenProcessPool) and the executor keeps serving.

    Args:
        max_workers: Number of worker processes (default: the CPUs available).
        mp_context: A start method name or multiprocessing context (default: as
            for :class:`procpool.Pool`: a per-pool zygote on Linux, spawn elsewhere).
        initializer: Called as ``initializer(*initargs)`` in each worker as it starts.
        initargs: Arguments for ``initializer``.
        max_tasks_per_child: Replace a worker after it has run this many tasks.
        task_timeout: Seconds a task may run (TaskTimeoutError after that).
        retries: How many times to re-run a task that failed with one of ``retry_on``.
        retry_on: Exception types that cause a retry (default: crash and timeout).
        backend: Where tasks run: ``"processes"`` (default) or ``"threads"`` (I/O-bound
            work; no pickling, no task_timeout, seed or memory limit), or a factory
            returning a :class:`procpool.backends.Backend`.
        tag_output: Prefix every line a task prints (stdout, stderr, logging) with
            ``[worker N task I]``. Lines are always whole, tagged or not.
        seed: Seeds ``random`` (and NumPy's global generator) before each task
            from (seed, task index), so results do not depend on the number of
            workers or the scheduling.
        max_memory_per_worker: Bytes (or ``"2GB"``): a worker above it after a task
            is replaced before its next task.

    Raises:
        ValueError: if ``max_workers`` <= 0 or ``max_tasks_per_child`` is not positive.
        TypeError: if ``initializer`` is not callable.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: ContextLike = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        retries: int = 0,
        retry_on: Iterable[type[BaseException]] | None = None,
        max_memory_per_worker: int | str | None = None,
        seed: int | None = None,
        tag_output: bool = False,
        backend: str | Callable[..., Backend] = "processes",
    ) -> None:
        if max_workers is None:
            max_workers = default_workers()
        elif isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int) or max_tasks_per_child <= 0
        ):
            raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        policy = make_policy(task_timeout, retries, retry_on, seed)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._pending: dict[cf.Future[Any], None] = {}  # not yet done, oldest first
        self._max_workers = max_workers
        self._runner = Runner(
            max_workers,
            mp_context,
            initializer,
            initargs,
            max_tasks_per_child,
            policy,
            drain_at_exit=True,
            max_memory_per_worker=max_memory_per_worker,
            tag_output=tag_output,
            backend=backend,
        )

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """Schedule ``fn(*args, **kwargs)``; return a Future.

        Raises:
            RuntimeError: after shutdown() or once the interpreter is exiting.
            concurrent.futures.process.BrokenProcessPool: if the initializer failed.
            SerializationError: if ``fn`` cannot be pickled.
        """
        return self._submit(fn, args, kwargs, self._runner.policy)

    def submit_with(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        task_timeout: float | None = _UNSET,
        retries: int | None = None,
        retry_on: Iterable[type[BaseException]] | None = None,
        **kwargs: Any,
    ) -> cf.Future[T]:
        """Like :meth:`submit`, with this task's own task_timeout / retries / retry_on."""
        return self._submit(
            fn, args, kwargs, self._runner.policy_for(task_timeout, retries, retry_on)
        )

    def _submit(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], policy: Any
    ) -> cf.Future[T]:
        with self._shutdown_lock:
            self._check_open()
            broken = self._runner.engine.broken
            if broken is not None:
                raise broken
            future: _Future[T] = _Future()
            future._engine = self._runner.engine
            self._pending[future] = None
        sink = _FutureSink(future, self)
        try:
            self._runner.submit_call(fn, args, kwargs, sink, policy, sink.start)
        except PoolClosedError:  # closed by the exit hook since the check above
            self._forget(future)
            raise RuntimeError("cannot schedule new futures after interpreter shutdown") from None
        except BaseException:
            self._forget(future)
            raise
        return future

    def _check_open(self) -> None:
        """Raise the stdlib's RuntimeError if no new work is accepted (under the lock)."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _interpreter_exiting or not self._runner.engine.accepting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Return an iterator of ``fn(*args)`` over zipped ``iterables``, in order.

        Input is read lazily: at most ``buffersize`` tasks (default: a few per
        worker) are submitted and not yet yielded, so a huge generator costs
        little memory. ``timeout`` counts from this call. ``chunksize`` None (the
        default) adapts the batch size to the measured task duration; the
        standard library's default of 1 makes tiny tasks 10-100x slower.

        Raises:
            TimeoutError: from the iterator, if a result is not ready in time.
            ValueError: if ``chunksize`` < 1.
        """
        check_chunksize(chunksize)
        with self._shutdown_lock:
            self._check_open()
        end = None if timeout is None else time.monotonic() + timeout
        if chunksize is None and self._runner.policy.timeout is not None:
            chunksize = 1  # a timed-out task must not take finished ones with it
        # One iterable (the usual case) goes as is: no 1-tuple to build, pickle
        # and unpack per item, and workers run it as map(fn, items).
        star, items = (
            (P.CALL_ONE, iterables[0]) if len(iterables) == 1 else (P.CALL_STAR, zip(*iterables))
        )
        it: IMapIterator[T] = IMapIterator(
            self._runner.chunk_submitter(fn, star, self._runner.policy),
            items,
            chunksize,
            buffersize,
            workers=self._max_workers,
            ordered=True,
            engine=self._runner.engine,
        )
        return it._results_until(end, cf.TimeoutError, close=True)

    def statistics(self) -> PoolStatistics:
        """Task counts, faults, and how each worker spent its time, as of now."""
        return self._runner.engine.statistics()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel the backlog; optionally wait.

        ``cancel_futures=True`` cancels the futures that have not started and that
        no free worker would take at once (see :meth:`_backlog`). Safe to call
        more than once.
        """
        with self._shutdown_lock:
            self._shutdown = True
            backlog = self._backlog() if cancel_futures else []
        for future in backlog:
            future.cancel()
        engine = self._runner.engine
        engine.close()
        if wait:
            engine.join()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Ctrl-C or SystemExit: stop now rather than wait for running tasks.
            self.shutdown(wait=False, cancel_futures=True)
            self._runner.engine.terminate()
            return None
        return super().__exit__(exc_type, exc, tb)

    def _backlog(self) -> list[cf.Future[Any]]:
        """The not-yet-started futures, less the oldest few that free workers would take.

        The stdlib hands calls to its workers' queue as they are submitted, where
        they can no longer be cancelled, so ``shutdown(cancel_futures=True)``
        right after a burst of submits still runs about one per worker. Keeping
        that many of the oldest gives the same outcome however soon procpool's
        dispatcher thread got to them; work behind busy workers is all cancelled.
        """
        pending = list(self._pending)  # one call: _forget pops without the lock
        waiting = [f for f in pending if not f.running()]
        free = max(0, self._max_workers - (len(pending) - len(waiting)))
        return waiting[free:]

    def _forget(self, future: cf.Future[Any]) -> None:
        # Without _shutdown_lock: one dict call, atomic, on the thread that settles
        # each future. Taken there, the lock convoyed with submit() whenever its
        # holder lost the GIL: 20,000 submits on the threads backend took 2.3x
        # concurrent.futures' ThreadPoolExecutor.
        self._pending.pop(future, None)

    def __repr__(self) -> str:
        return f"<procpool.ProcessPoolExecutor max_workers={self._max_workers}>"


# Public classes say they live in `procpool` (tracebacks, pickles, repr).
for _cls in (ProcessPoolExecutor,):
    _cls.__module__ = "procpool"
del _cls
