"""Threads of the calling process: for I/O-bound work, and real parallelism on free-threaded Python.

Tasks run on the objects themselves (no pickling); a task's exception keeps
its own traceback. Threads cannot be killed, so ``task_timeout``, memory limits
and per-task seeds (one global ``random`` shared by all threads) are refused.
"""

from __future__ import annotations

import queue
import threading
import time
from itertools import islice, starmap

from .._core import _protocol as P
from .._exceptions import PoolClosedError
from .._exceptions_stdlib import InitializerError
from ._base import Backend, BackendOptions

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

    from .._core._batch import Batch
    from .._statistics import PoolStatistics

__all__ = ["ThreadBackend"]

_STOP = None


class _ThreadWorker:
    """One thread's counts, written by that thread only (no lock to share)."""

    __slots__ = ("busy", "failed", "id", "retried", "started", "tasks", "thread")

    def __init__(self, wid: int, thread: threading.Thread) -> None:
        self.id = wid
        self.thread = thread
        self.tasks = 0
        self.failed = 0
        self.retried = 0
        self.busy = 0.0
        self.started = time.monotonic()


class ThreadBackend(Backend):
    """A fixed set of threads taking batches from one queue."""

    serializes = False
    can_time_out = False
    can_seed = False

    def __init__(self, workers: int, options: BackendOptions) -> None:
        if options.max_memory_per_worker is not None:
            raise ValueError(
                "the threads backend cannot limit memory per worker (threads share it)"
            )
        if options.context is not None:
            raise ValueError("the threads backend has no start method; drop context=")
        self._options = options
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        # Taken by submit() and close(), not by the threads for each batch: a
        # thread that lost the GIL while holding it made submit() wait for it
        # (a convoy: 20,000 submits took 2.3x ThreadPoolExecutor's time).
        self._lock = threading.Lock()
        self._observe_lock = threading.Lock()  # a sink's observe(): one at a time
        self._closed = False
        self._terminating = False
        self._broken: BaseException | None = None
        self._workers = [_ThreadWorker(wid, self._thread(wid)) for wid in range(workers)]
        for worker in self._workers:
            worker.thread.start()

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    @property
    def accepting(self) -> bool:
        return not self._closed

    def submit(self, batches: list[Batch]) -> None:
        with self._lock:
            if self._closed:
                raise PoolClosedError("Pool not running")
            for batch in batches:
                if self._broken is not None:
                    batch.fail(0, len(batch.items), self._broken)
                else:
                    self._queue.put(batch)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                for _ in self._workers:
                    self._queue.put(_STOP)

    def terminate(self, wait: bool = True) -> None:
        self._terminating = True
        self.close()
        if wait:
            self.join()

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            if worker.thread is threading.current_thread():
                return False
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            worker.thread.join(left)
        return not any(w.thread.is_alive() for w in self._workers)

    def on_own_thread(self) -> bool:
        """With one thread, a task or callback on it that waits for another result
        of this pool waits for itself. With more, another thread may serve the
        wait (unless all of them wait: thread-pool starvation, not detected)."""
        return len(self._workers) == 1 and threading.current_thread() is self._workers[0].thread

    def statistics(self) -> PoolStatistics:
        from .._statistics import PoolStatistics, WorkerStatistics

        now = time.monotonic()
        per_worker = tuple(
            WorkerStatistics(
                worker_id=w.id,
                pid=0,
                alive=w.thread.is_alive(),
                tasks=w.tasks,
                busy_seconds=w.busy,
                transfer_seconds=0.0,
                idle_seconds=max(0.0, now - w.started - w.busy),
            )
            for w in self._workers
        )
        return PoolStatistics(
            workers=self.size,
            tasks_completed=sum(w.tasks for w in self._workers),
            tasks_failed=sum(w.failed for w in self._workers),
            crashes=0,
            timeouts=0,
            retries=sum(w.retried for w in self._workers),
            recycled=0,
            per_worker=per_worker,
        )

    # ----------------------------------------------------------- workers

    def _thread(self, wid: int) -> threading.Thread:
        return threading.Thread(
            target=self._serve, args=(wid,), name=f"procpool-thread-{wid}", daemon=True
        )

    def _serve(self, wid: int) -> None:
        me = self._workers[wid]
        if not self._run_initializer():
            return
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                return
            if self._terminating or self._broken is not None:
                batch.fail(
                    0, len(batch.items), self._broken or PoolClosedError("the pool was terminated")
                )
                continue
            if batch.on_start is not None and not batch.on_start():
                continue
            started = time.perf_counter()
            values, errors = self._run(batch, me)
            busy = time.perf_counter() - started
            me.tasks += len(values)
            me.failed += len(errors or ())
            me.busy += busy
            observe = getattr(batch.sink, "observe", None)
            if observe is not None:
                # The sink sizes the next chunks from this (adaptive chunking);
                # it expects one caller at a time, as the processes backend's
                # dispatcher thread is. No bytes: nothing was copied to send.
                with self._observe_lock:
                    observe(len(batch.items), busy, 0)
            batch.sink.deliver(batch.first_index, values, errors)

    def _run_initializer(self) -> bool:
        init = self._options.initializer
        if init is None:
            return True
        try:
            init(*self._options.initargs)
        except BaseException as exc:
            name = getattr(init, "__qualname__", repr(init))
            err = InitializerError(
                f"the pool's initializer {name!r} raised {type(exc).__name__}: {exc}; "
                f"no task can run"
            )
            err.__cause__ = exc
            self._break(err)
            return False
        return True

    def _break(self, err: BaseException) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = err
        while True:  # fail what is queued; later batches fail in submit()
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                return
            if batch is _STOP:
                self._queue.put(_STOP)  # leave the stop signals for the other threads
                return
            batch.fail(0, len(batch.items), err)

    def _run(
        self, batch: Batch, me: _ThreadWorker
    ) -> tuple[list[Any], dict[int, BaseException] | None]:
        fn = batch.fn.obj
        items = batch.items
        values: list[Any] = []
        errors: dict[int, BaseException] | None = None
        # The items run in C (map, starmap) up to the first that raises, which
        # list.extend leaves out: its index is len(values). Its exception counts
        # as its first attempt (it is not run again unless a retry is due), and
        # the rest resumes after it. A loop in Python per item took 1.3-1.5x
        # ThreadPool's time for tiny tasks.
        mapper = _MAPPERS.get(batch.star)
        i = 0
        while i < len(items):
            raised: BaseException | None = None
            if mapper is not None:
                try:
                    values.extend(mapper(fn, items if i == 0 else islice(items, i, None)))
                    if len(values) == len(items):
                        break
                    raise P.stop_iteration_lost()  # map() took it for its end
                except BaseException as exc:
                    i, raised = len(values), exc
            error = self._settle(fn, batch, items[i], me, values, raised)
            if error is not None:
                errors = errors if errors is not None else {}
                errors[i] = error
            i += 1
        return values, errors

    @staticmethod
    def _settle(
        fn: Any,
        batch: Batch,
        item: Any,
        me: _ThreadWorker,
        values: list[Any],
        raised: BaseException | None,
    ) -> BaseException | None:
        """Finish one item: ``raised`` is its first attempt's exception (None: not run
        yet). Run it (again) while retries are due; append its value, or None and
        return the exception it failed with."""
        attempts = batch.attempts
        while True:
            if raised is None:
                try:
                    values.append(_call(fn, batch.star, item))
                    return None
                except BaseException as exc:
                    raised = exc
            if not batch.policy.should_retry(raised, attempts):
                values.append(None)
                return raised
            attempts += 1
            me.retried += 1
            raised = None


_MAPPERS = {P.CALL_ONE: map, P.CALL_STAR: starmap}


def _call(fn: Any, star: int, item: Any) -> Any:
    if star == P.CALL_ONE:
        return fn(item)
    if star == P.CALL_STAR:
        return fn(*item)
    return fn(*item[0], **item[1])
