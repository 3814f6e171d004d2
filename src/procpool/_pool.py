"""``procpool.Pool``: the :class:`multiprocessing.pool.Pool` surface on procpool's engine."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping

from ._core import _protocol as P
from ._core._generic import TypeVar
from ._core._startmethod import ContextLike
from ._exceptions import PoolClosedError
from ._results import AsyncResult, IMapIterator, MapResult, _ApplySink
from ._runner import (
    _UNSET,
    Runner,
    check_chunksize,
    default_workers,
    make_policy,
    map_chunksize,
)

__all__ = ["Pool"]

T = TypeVar("T")
R = TypeVar("R")

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

    from ._progress import Progress, ProgressUpdate
    from ._statistics import PoolStatistics
    from .backends import Backend

    ProgressOption = bool | Callable[[ProgressUpdate], object] | Progress | None


def _length_hint(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


class Pool:
    """A pool of worker processes; a drop-in for :class:`multiprocessing.pool.Pool`.

    Unlike the standard library's pool, a worker that dies (segfault, SIGKILL,
    ``os._exit``) fails only the tasks it held, with WorkerCrashedError, and is
    replaced; lambdas and closures work under every start method; ``imap`` reads
    its input lazily with bounded memory.

    Args:
        processes: Number of workers (default: the CPUs this process may use).
        initializer: Called as ``initializer(*initargs)`` in each worker as it starts.
        initargs: Arguments for ``initializer``.
        maxtasksperchild: Replace a worker after it has run this many tasks.
        context: A start method name (``"fork"``, ``"spawn"``, ``"forkserver"``), a
            multiprocessing context, or a procpool Context. Default: on Linux,
            workers forked by a per-pool zygote (forkserver if the process runs
            other Python threads; see docs/pools.md), spawn elsewhere.
        task_timeout: Seconds a task may run before it fails with TaskTimeoutError
            and its worker is replaced. Default: no limit.
        retries: How many times a task that failed with one of ``retry_on`` is run
            again, on a fresh worker.
        retry_on: Exception types that cause a retry (default: WorkerCrashedError,
            TaskTimeoutError).
        progress: Default for the ``progress=`` option of map, starmap, imap and
            imap_unordered: True (a bar on a terminal, plain lines on stderr
            otherwise), a callable (called with a ProgressUpdate), or a Progress.
        backend: Where tasks run: ``"processes"`` (default) or ``"threads"`` (I/O-bound
            work; no pickling, no task_timeout, seed or memory limit), or a factory
            returning a :class:`procpool.backends.Backend`.
        tag_output: Prefix every line a task prints (stdout, stderr, logging) with
            ``[worker N task I]``. Lines are always whole, tagged or not.
        seed: Seeds ``random`` (and NumPy's global generator) before each task
            from (seed, task index), so results do not depend on the number of
            workers or the scheduling.
        max_memory_per_worker: Bytes (or a size such as ``"2GB"``) of resident memory;
            a worker above it after a task is replaced before its next task.

    Raises:
        ValueError: if ``processes`` < 1 or ``maxtasksperchild`` is not a positive int.
        TypeError: if ``initializer`` is not callable.
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: ContextLike = None,
        *,
        task_timeout: float | None = None,
        retries: int = 0,
        retry_on: Iterable[type[BaseException]] | None = None,
        max_memory_per_worker: int | str | None = None,
        seed: int | None = None,
        tag_output: bool = False,
        backend: str | Callable[..., Backend] = "processes",
        progress: ProgressOption = None,
    ) -> None:
        self._state = _TERMINATE  # until fully built, so __del__ stays quiet
        if processes is None:
            processes = default_workers()
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            isinstance(maxtasksperchild, bool)
            or not isinstance(maxtasksperchild, int)
            or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        policy = make_policy(task_timeout, retries, retry_on, seed)
        self._runner = Runner(
            processes,
            context,
            initializer,
            initargs,
            maxtasksperchild,
            policy,
            drain_at_exit=False,
            max_memory_per_worker=max_memory_per_worker,
            tag_output=tag_output,
            backend=backend,
        )
        self._processes = processes
        if progress is not None:
            from ._progress import progress_for

            progress_for(progress)  # validate now, not at the first map
        self._progress = progress
        self._iterators: weakref.WeakSet[IMapIterator[Any]] = weakref.WeakSet()
        self._state = _RUN

    def __repr__(self) -> str:
        return f"<procpool.Pool state={self._state} pool_size={self._processes}>"

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    # ------------------------------------------------------------ one call

    def apply(
        self,
        func: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        **options: Any,
    ) -> R:
        """Run ``func(*args, **kwds)`` in a worker and return its result (blocks)."""
        result: R = self.apply_async(func, args, kwds, **options).get()
        return result

    def apply_async(
        self,
        func: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        task_timeout: float | None = _UNSET,
        retries: int | None = None,
        retry_on: Iterable[type[BaseException]] | None = None,
    ) -> AsyncResult[R]:
        """Start ``func(*args, **kwds)`` in a worker; return an AsyncResult at once.

        ``callback`` / ``error_callback`` run in the parent when the call ends; an
        exception they raise becomes the result's outcome.

        Raises:
            ValueError: if the pool is closed.
            SerializationError: if ``func`` cannot be pickled.
        """
        self._check_running()
        result: _ApplySink[R] = _ApplySink(callback, error_callback, engine=self._runner.engine)
        policy = self._runner.policy_for(task_timeout, retries, retry_on)
        self._runner.submit_call(func, tuple(args), dict(kwds), result, policy)
        return result

    # ---------------------------------------------------------------- maps

    def map(
        self,
        func: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None = None,
        **options: Any,
    ) -> list[R]:
        """Return ``[func(x) for x in iterable]``, computed by the workers.

        Raises the error of the lowest-indexed failing task (after all finished),
        unless ``return_exceptions=True``, which puts exception objects in place.
        """
        return self._map_async(func, iterable, P.CALL_ONE, chunksize, **options).get()

    def map_async(
        self,
        func: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        **options: Any,
    ) -> AsyncResult[list[R]]:
        """Like :meth:`map`, returning an AsyncResult at once."""
        return self._map_async(
            func, iterable, P.CALL_ONE, chunksize, callback, error_callback, **options
        )

    def starmap(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        **options: Any,
    ) -> list[R]:
        """Return ``[func(*args) for args in iterable]``."""
        return self._map_async(func, iterable, P.CALL_STAR, chunksize, **options).get()

    def starmap_async(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        **options: Any,
    ) -> AsyncResult[list[R]]:
        """Like :meth:`starmap`, returning an AsyncResult at once."""
        return self._map_async(
            func, iterable, P.CALL_STAR, chunksize, callback, error_callback, **options
        )

    def imap(
        self,
        func: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None = None,
        **options: Any,
    ) -> IMapIterator[R]:
        """Lazily yield ``func(x)`` for each ``x``, in order, with bounded memory.

        Keyword options: ``buffersize`` (tasks submitted but not yet yielded; default
        a few per worker), ``return_exceptions``, ``task_timeout``, ``retries``, ``retry_on``.
        """
        return self._imap(func, iterable, chunksize, ordered=True, **options)

    def imap_unordered(
        self,
        func: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None = None,
        **options: Any,
    ) -> IMapIterator[R]:
        """Like :meth:`imap`, but yield results as they complete."""
        return self._imap(func, iterable, chunksize, ordered=False, **options)

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        star: int,
        chunksize: int | None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        return_exceptions: bool = False,
        task_timeout: float | None = _UNSET,
        retries: int | None = None,
        retry_on: Iterable[type[BaseException]] | None = None,
        progress: ProgressOption = _UNSET,
    ) -> AsyncResult[list[Any]]:
        self._check_running()
        check_chunksize(chunksize)
        items = iterable if isinstance(iterable, (list, tuple)) else list(iterable)
        policy = self._runner.policy_for(task_timeout, retries, retry_on)
        submit = self._runner.chunk_submitter(func, star, policy)
        if chunksize is None:
            # With a task timeout, one task per batch: a timed-out task's worker is
            # killed, and tasks of its batch that had finished would die with it.
            if policy.timeout is not None:
                chunksize = 1
            else:
                sample, other = (items[0], items[len(items) // 2]) if items else (None, None)
                measured = self._runner.seconds_per_task(func)
                chunksize = map_chunksize(len(items), self._processes, sample, measured, other)
        result: MapResult[Any] = MapResult(
            len(items),
            callback,
            error_callback,
            return_exceptions=return_exceptions,
            engine=self._runner.engine,
        )
        result.progress = self._reporter(progress, len(items))
        for start in range(0, len(items), chunksize):
            chunk = items[start : start + chunksize]  # a new list already, for a list
            submit([chunk if type(chunk) is list else list(chunk)], start, result)
        return result

    def _imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        *,
        ordered: bool,
        star: int = P.CALL_ONE,
        buffersize: int | None = None,
        return_exceptions: bool = False,
        task_timeout: float | None = _UNSET,
        retries: int | None = None,
        retry_on: Iterable[type[BaseException]] | None = None,
        progress: ProgressOption = _UNSET,
    ) -> IMapIterator[Any]:
        self._check_running()
        check_chunksize(chunksize)
        if buffersize is not None and (not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError(f"buffersize must be a positive int, not {buffersize!r}")
        policy = self._runner.policy_for(task_timeout, retries, retry_on)
        if chunksize is None and policy.timeout is not None:
            chunksize = 1  # see _map_async: a timeout must not take finished tasks with it
        it: IMapIterator[Any] = IMapIterator(
            self._runner.chunk_submitter(func, star, policy),
            iterable,
            chunksize,
            buffersize,
            workers=self._processes,
            ordered=ordered,
            return_exceptions=return_exceptions,
            engine=self._runner.engine,
        )
        it.progress = self._reporter(progress, _length_hint(iterable))
        self._iterators.add(it)
        return it

    def _reporter(self, option: ProgressOption, total: int | None) -> Progress | None:
        option = self._progress if option is _UNSET else option
        if option is None or option is False:
            return None  # the common case: no need to import the progress machinery
        from ._progress import progress_for

        return progress_for(option, total=total)

    # ----------------------------------------------------------- lifecycle

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise PoolClosedError("Pool not running")  # a ValueError, as the stdlib's

    def statistics(self) -> PoolStatistics:
        """Task counts, faults, and how each worker spent its time, as of now."""
        return self._runner.engine.statistics()

    def close(self) -> None:
        """Accept no more tasks; the workers exit once the queued work is done."""
        if self._state == _RUN:
            self._state = _CLOSE
            if not self._iterators:
                self._runner.engine.close()

    def terminate(self) -> None:
        """Stop the workers now; unfinished tasks fail. Safe to call twice."""
        self._state = _TERMINATE
        self._runner.engine.terminate()

    def join(self) -> None:
        """Wait for the workers to exit; call :meth:`close` or :meth:`terminate` first.

        Raises:
            ValueError: if the pool is still running.
        """
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        for it in list(self._iterators):  # their input was promised to run, as in the stdlib
            it._feed_all()
        self._iterators.clear()
        self._runner.engine.close()
        self._runner.engine.join()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", _TERMINATE) == _RUN:
            _warn(f"unclosed running procpool pool {self!r}", ResourceWarning, source=self)
        runner = getattr(self, "_runner", None)
        if runner is None:
            return
        # Dropped while running: stop the workers. Dropped after close(): let
        # them finish the queued work, as close() promised. Never block here.
        if self._state == _RUN:
            runner.engine.terminate(wait=False)
        elif self._state == _CLOSE:
            runner.engine.close()


# Public classes say they live in `procpool` (tracebacks, pickles, repr).
for _cls in (Pool,):
    _cls.__module__ = "procpool"
del _cls
