"""Where outcomes land: AsyncResult for one call or a whole map, and the lazy imap iterator.

Each class here is a ``_core._batch.Sink``: the dispatcher thread calls
``deliver`` with the outcomes of consecutive tasks; callers wait on them.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from multiprocessing import TimeoutError as MPTimeoutError

from ._core._batch import CHUNK_BYTES, Batch
from ._core._generic import Generic, Protocol, TypeVar
from ._core._wakeups import release, wake

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

    from ._core._direct import DirectWaiter
    from ._progress import Progress
    from .backends._base import Backend

T = TypeVar("T")

__all__ = ["ApplyResult", "AsyncResult", "IMapIterator", "MapResult"]


class _Latch:
    """A flag set once, that threads wait for: ``threading.Event``'s job for a
    fifth of its cost to make (a lock, no Condition). One is made per call."""

    __slots__ = ("_flag", "_lock")

    def __init__(self) -> None:
        self._flag = False
        self._lock = threading.Lock()
        self._lock.acquire()  # held until set(); waiters queue on it

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            try:
                release(self._lock)
            except RuntimeError:
                pass  # set twice at once: released already

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._lock.release()  # let the next waiter through
        return self._flag


class AsyncResult(Generic[T]):
    """The pending outcome of ``apply_async``, ``map_async`` or ``starmap_async``.

    Compatible with :class:`multiprocessing.pool.AsyncResult`.
    """

    def __init__(
        self,
        callback: Callable[[T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        engine: Backend | None = None,
    ) -> None:
        self._event = _Latch()
        self._callback = callback
        self._error_callback = error_callback
        self._value: Any = None
        self._success = False
        self._waiter: DirectWaiter | None = None
        self._engine = engine  # the backend that delivers it (see refuse_own_thread)

    def ready(self) -> bool:
        """Return whether the call has completed."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Return whether the call completed without raising.

        Raises:
            ValueError: if the result is not ready yet.
        """
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is available or ``timeout`` seconds pass."""
        self._event.wait(wait_helped(self, self._event.is_set, timeout))

    def attach_waiter(self, waiter: DirectWaiter) -> bool:
        """Let the thread that waits read the outcome itself (see ``_batch.Sink``).

        Declined when callbacks are set: they run on the dispatcher thread, as
        ``multiprocessing.Pool`` runs them on its result thread.
        """
        if self._callback is not None or self._error_callback is not None:
            return False
        self._waiter = waiter
        return True

    def get(self, timeout: float | None = None) -> T:
        """Return the result when it arrives.

        Raises:
            multiprocessing.TimeoutError: if it does not arrive within ``timeout`` seconds.
            BaseException: the task's own exception (with the worker traceback as
                ``__cause__``), WorkerCrashedError, TaskTimeoutError, SerializationError.
        """
        self.wait(timeout)
        if not self.ready():
            raise MPTimeoutError
        if self._success:
            return self._value  # type: ignore[no-any-return]
        raise self._value

    def _finish(self, success: bool, value: Any) -> None:
        self._waiter = None  # it holds the batch and the worker: let them go
        # Callbacks run before waiters wake, as in the stdlib; an exception in a
        # callback becomes the call's outcome rather than vanishing in a thread.
        try:
            if success and self._callback is not None:
                self._callback(value)
            elif not success and self._error_callback is not None:
                self._error_callback(value)
        except BaseException as exc:
            success, value = False, exc
        self._success, self._value = success, value
        self._event.set()


ApplyResult = AsyncResult


class _Helped(Protocol):
    _waiter: DirectWaiter | None
    _engine: Backend | None


OWN_THREAD_WAIT = (
    "cannot wait for a result of this pool on the pool's own thread, which runs its "
    "callbacks and delivers its results: the wait could never end. From a callback, "
    "chain the next call (apply_async(..., callback=...), add_done_callback) instead "
    "of waiting for it, or wait in another thread"
)


def refuse_own_thread(engine: Backend | None, timeout: float | None) -> None:
    """Raise RuntimeError rather than block the thread that would end the wait.

    A callback runs on the thread that delivers the pool's results; one that
    waits there for another result of the same pool (``pool.apply``, ``get``,
    ``result``, iterating an ``imap``) waited for ever, as with the standard
    library's pools. A wait of 0 s is a poll, and allowed.
    """
    if engine is not None and (timeout is None or timeout > 0) and engine.on_own_thread():
        raise RuntimeError(OWN_THREAD_WAIT)


def wait_helped(owner: _Helped, done: Callable[[], bool], timeout: float | None) -> float | None:
    """Run the waiter ``owner`` (a sink) was given, if it has one and is not ``done()``
    (see ``_batch.Sink``); return what is left of ``timeout``. A wait that times out
    leaves the waiter for the next one."""
    if done():
        return timeout
    refuse_own_thread(owner._engine, timeout)
    waiter, owner._waiter = owner._waiter, None
    if waiter is None:
        return timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    waiter(timeout)
    if not done():
        owner._waiter = waiter
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _ApplySink(AsyncResult[T]):
    def deliver(
        self, first: int, values: list[Any], errors: dict[int, BaseException] | None
    ) -> None:
        if errors:
            self._finish(False, errors[0])
        else:
            self._finish(True, values[0])


class MapResult(AsyncResult[list[T]]):
    """The pending outcome of a whole ``map_async``: a list, or the first task's error."""

    def __init__(
        self,
        length: int,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        return_exceptions: bool = False,
        engine: Backend | None = None,
    ) -> None:
        super().__init__(callback, error_callback, engine=engine)
        self._lock = threading.Lock()
        self._values: list[Any] = [None] * length
        self._left = length
        self._first_error: tuple[int, BaseException] | None = None
        self._return_exceptions = return_exceptions
        self._length = length
        self._failed = 0
        self.progress: Progress | None = None  # reported from the thread that waits in get()
        if length == 0:
            self._finish(True, self._values)

    def get(self, timeout: float | None = None) -> list[T]:
        """Like :meth:`AsyncResult.get`; also drives the progress reporter, if any."""
        if self.progress is not None and not self.ready():
            refuse_own_thread(self._engine, timeout)
            self._wait_reporting(self.progress, timeout)
        return super().get(timeout)

    def _wait_reporting(self, progress: Progress, timeout: float | None) -> None:
        # Progress is reported on the caller's thread, so an exception from a
        # progress callback reaches the caller instead of the dispatcher.
        deadline = None if timeout is None else time.monotonic() + timeout
        reported_done = reported_failed = 0
        try:
            while True:
                finished = self._event.wait(PROGRESS_POLL_SECONDS)
                done, failed = self._length - self._left, self._failed
                progress.update(done - reported_done, failed - reported_failed)
                reported_done, reported_failed = done, failed
                progress.tick()
                if finished or (deadline is not None and time.monotonic() >= deadline):
                    break
        finally:
            if self.ready():
                progress.close()
                self.progress = None

    def deliver(
        self, first: int, values: list[Any], errors: dict[int, BaseException] | None
    ) -> None:
        with self._lock:
            self._values[first : first + len(values)] = values
            if errors:
                self._failed += len(errors)
                self._note_errors(first, errors)
            self._left -= len(values)
            done = self._left == 0
        if done:
            if self._first_error is None or self._return_exceptions:
                self._finish(True, self._values)
            else:
                self._values = []
                self._finish(False, self._first_error[1])

    def _note_errors(self, first: int, errors: dict[int, BaseException]) -> None:
        for offset, exc in errors.items():
            index = first + offset
            if self._return_exceptions:
                self._values[index] = exc
            elif self._first_error is None or index < self._first_error[0]:
                self._first_error = (index, exc)


PROGRESS_POLL_SECONDS = 0.1
TARGET_BATCH_SECONDS = 0.005
MAX_CHUNK = 8192
# Chunks a worker that a fixed chunksize's buffer may hold, when they are short
# (see IMapIterator._deepen): the dispatcher lets a worker hold up to 16. Chunks
# of one or a few tasks may be more, up to FIXED_AHEAD_TASKS tasks a worker.
FIXED_AHEAD_CHUNKS = 32
FIXED_AHEAD_TASKS = 128
# The longest an imap's refill holds chunks read from its input before sending
# them (see IMapIterator._top_up): an input that is slow to read must not keep
# the workers waiting for a whole burst.
BURST_WAIT_S = 0.001


class IMapIterator(Iterator[T]):
    """Results of ``imap`` / ``imap_unordered``, pulled lazily with bounded memory.

    The input is read on the consumer's thread, a chunk at a time, only while
    fewer than ``buffersize`` tasks are submitted-but-not-yet-returned; a slow
    consumer therefore holds the workers back instead of piling results up.
    """

    def __init__(
        self,
        submit: Callable[[list[list[Any]], int, IMapIterator[T]], list[Batch]],
        iterable: Any,
        chunksize: int | None,
        buffersize: int | None,
        *,
        workers: int,
        ordered: bool,
        return_exceptions: bool = False,
        engine: Backend | None = None,
    ) -> None:
        self._submit = submit
        self._engine = engine  # the backend that delivers it (see refuse_own_thread)
        self._input = iter(iterable)
        # chunksize None: adaptive (see observe); buffersize None: a few chunks per worker.
        self._adaptive = chunksize is None
        self._chunksize = 1 if chunksize is None else chunksize
        self._fixed_buffer = buffersize
        self._workers = workers
        self._buffersize = self._buffer_for(self._chunksize)
        self._per_item: float | None = None  # seconds per task, as workers measured
        # The seconds and bytes per task that _deepen last sized the buffer for.
        self._deepened_for: tuple[float, float] | None = None
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        self._cond = threading.Condition(threading.Lock())
        self._chunks: dict[int, tuple[list[Any], dict[int, BaseException] | None]] = {}
        self._arrived: deque[tuple[list[Any], dict[int, BaseException] | None]] = deque()
        # The chunk being handed out: its values not yet returned, last one next
        # (pop() hands each over without keeping it: an iterator must not keep a
        # result the consumer let go, as CPython's test_free_reference checks;
        # ``yield from`` a list, 46 against 73 ns a value, would), and its
        # errors by position.
        self._ready: list[Any] = []
        self._errors: dict[int, BaseException] | None = None
        self._chunk_len = 0
        self._taken = 0  # tasks in the chunks taken so far, the current one included
        self._next_index = 0  # ordered: index of the first task of the next chunk
        self._submitted = 0
        self._length: int | None = None  # known once the input is exhausted
        self._closed = False
        self.progress: Progress | None = None  # updated on the consumer's thread
        self._top_up()

    def __iter__(self) -> Iterator[T]:
        # A for-loop (or list(), sum(), ...) gets a generator over the same state:
        # resuming it costs less than a call of __next__ per result. It keeps
        # nothing of its own, so next(it) and later loops carry on where it stopped.
        return self._results_until(None)

    def __next__(self) -> T:
        # next(it) on a chunk without errors (most are): a pop, nothing more.
        # Loops do not come here: __iter__ gives them _results_until.
        ready = self._ready
        if ready and self._errors is None:
            return ready.pop()  # type: ignore[no-any-return]
        return self.next()

    def next(self, timeout: float | None = None) -> T:
        """Return the next result, waiting at most ``timeout`` seconds.

        Raises:
            multiprocessing.TimeoutError: if no result arrives in time.
            StopIteration: when every result has been returned.
        """
        if not self._ready and not self._advance(timeout):
            raise StopIteration
        value = self._ready.pop()
        errors = self._errors
        if errors is not None:
            pos = self._chunk_len - len(self._ready) - 1
            exc = errors.pop(pos, None)
            if not errors:
                self._errors = None
            if exc is not None:
                if self._return_exceptions:
                    return exc  # type: ignore[return-value]
                raise exc
        return value  # type: ignore[no-any-return]

    def _results_until(
        self,
        end: float | None,
        timeout_error: type[Exception] = MPTimeoutError,
        close: bool = False,
    ) -> Iterator[T]:
        """Every result in turn, each wait ending by ``end`` (``time.monotonic()``).

        What loops over this iterator (``__iter__``) and ``Executor.map`` use:
        the results of a chunk without errors go out without a method call each.
        A wait that ends by ``end`` raises ``timeout_error``, and ``close`` closes
        this iterator as the generator ends, is closed or is collected: the
        executor's ``map`` needs both, and one generator instead of one around
        another saves ~30 ns a value.
        """
        try:
            while True:
                ready = self._ready
                if not ready:
                    remaining = None if end is None else max(0.0, end - time.monotonic())
                    try:
                        if not self._advance(remaining):
                            return
                    except MPTimeoutError:
                        if timeout_error is MPTimeoutError:
                            raise
                        raise timeout_error from None
                elif self._errors is None:
                    while ready:
                        yield ready.pop()  # no local keeps a result the consumer let go
                else:
                    yield self.next()  # this chunk has results left: never StopIteration
        finally:
            if close:
                self.close()

    @property
    def _yielded(self) -> int:
        return self._taken - len(self._ready)

    def close(self) -> None:
        """Stop reading the input; tasks not yet started are dropped."""
        self._closed = True

    # The consumer's side -------------------------------------------------

    def _advance(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._top_up()
        with self._cond:
            while True:
                chunk = self._take_chunk()
                if chunk is not None:
                    break
                if self._length is not None and self._yielded >= self._length:
                    if self.progress is not None:
                        self.progress.close()
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise MPTimeoutError
                refuse_own_thread(self._engine, remaining)
                self._cond.wait(remaining)
        values, errors = chunk
        self._ready = values[::-1]
        self._errors = errors or None
        self._chunk_len = len(values)
        self._taken += len(values)
        if self.progress is not None:
            self.progress.update(len(chunk[0]), len(chunk[1] or ()))
        return True

    def _take_chunk(self) -> tuple[list[Any], dict[int, BaseException] | None] | None:
        if not self._ordered:
            return self._arrived.popleft() if self._arrived else None
        chunk = self._chunks.pop(self._next_index, None)
        if chunk is not None:
            self._next_index += len(chunk[0])
        return chunk

    def _top_up(self) -> None:
        """Submit more input while the buffer has room (runs on the consumer's thread).

        An explicit ``chunksize`` refills in bursts: only once the tasks
        submitted and not yet returned are half the buffer or fewer, and then as
        many chunks as fill it, in one submit. Chunk by chunk, each result taken
        sent one chunk: with ``chunksize=1`` the consumer's thread pickled and
        queued every task in a call of its own, and the pool's thread sent each
        in a write of its own (in a burst, a worker's share goes as one batch,
        Dispatcher._merge). 20,000 squares through ``imap(f, xs, 1)`` on 2
        cores: 1.31-1.37 -> 1.16-1.19 s, ``imap_unordered`` 1.35 -> 1.15 s
        (medians of 5). Half a buffer is still ahead of the workers as the
        burst is read. The first chunk read while nothing is submitted goes at
        once (the workers wait for it), and so do the chunks read so far once
        BURST_WAIT_S has passed (a slow input). The adaptive chunk size
        (``chunksize=None``) does not need bursts: its chunks grow to
        milliseconds of work, and its first, small ones must start at once
        (1M squares: 303 ms as before, 306-328 with bursts).
        """
        bursts = not self._adaptive
        if bursts and self._submitted - self._yielded > self._buffersize // 2:
            return
        chunks: list[list[Any]] = []
        first = self._submitted
        began = time.perf_counter()
        while self._length is None and not self._closed:
            if chunks and (
                not bursts or first == self._yielded or time.perf_counter() - began > BURST_WAIT_S
            ):
                if not self._send_burst(chunks, first):
                    return
                chunks, first, began = [], self._submitted, time.perf_counter()
            room = self._buffersize - (self._submitted - self._yielded)
            if room < self._chunksize and self._submitted > self._yielded:
                break
            start = self._submitted
            items: list[Any] = []
            try:
                items.extend(islice(self._input, self._chunksize))
            except BaseException as exc:
                if self._send_burst(chunks, first):
                    self._input_failed(start, items, exc)
                return
            if not items:
                if self._send_burst(chunks, first):
                    self._end_input(start)
                return
            self._submitted += len(items)
            chunks.append(items)
        self._send_burst(chunks, first)

    def _send_burst(self, chunks: list[list[Any]], start: int) -> bool:
        """Submit ``chunks``, the first one's task starting at ``start``; if that
        raises, their tasks fail with the error, the input ends after them, and
        False says so (runs on the consumer's thread)."""
        if not chunks or self._send(chunks, start):
            return True
        self._end_input(start + sum(map(len, chunks)))
        return False

    def _send(self, chunks: list[list[Any]], start: int) -> bool:
        """Submit ``chunks``, the first one's task starting at ``start``; if that
        raises, their tasks fail with the error, and False says so."""
        try:
            self._submit(chunks, start, self)
        except BaseException as exc:
            count = sum(map(len, chunks))
            self.deliver(start, [None] * count, dict.fromkeys(range(count), exc))
            return False
        return True

    def _input_failed(self, start: int, items: list[Any], exc: BaseException) -> None:
        """Reading the input raised ``exc`` after ``items`` of a chunk from ``start``.

        The input ends there. With the adaptive chunk size (the default) those
        items still run, as a chunk of their own, and the error takes the place
        of the item that failed: what the standard library's ``imap`` does with
        its default ``chunksize=1``. With an explicit ``chunksize`` the error
        takes the place of the chunk being read, and its items do not run, as
        in the standard library (its own test_imap_handle_iterable_exception
        pins that: "SayWhenError seen at start of problematic chunk's results").
        ``list.extend`` keeps what it appended before its iterator raised.
        """
        if not self._adaptive:
            items = []
        failed_at = start + len(items)
        self._end_input(failed_at + 1)
        if items:
            self._send([items], start)
        self.deliver(failed_at, [None], {0: exc})

    def _buffer_for(self, chunksize: int) -> int:
        if self._fixed_buffer is not None:
            return max(self._fixed_buffer, chunksize)
        return max(8 * self._workers, 4 * self._workers * chunksize)

    def observe(self, count: int, busy: float, nbytes: int = 0) -> None:
        """Learn how long tasks take (dispatcher thread); grow or shrink the chunk size
        (a fixed ``chunksize``: deepen the buffer instead, see _deepen).

        Adaptive chunking aims at batches of about ``TARGET_BATCH_SECONDS`` of work:
        long enough that per-batch overhead (~50 us) is noise for tiny tasks,
        short enough that work still balances when durations vary. The size at
        most doubles per observation, and stays small enough to keep at least two
        batches per worker inside the buffer, and to carry about ``CHUNK_BYTES`` of
        arguments (``nbytes`` for the ``count`` just run), as ``Pool.map`` does:
        four 8 MB arrays in one batch waited for each other, and for one copy.
        """
        if count <= 0:
            return
        sample = busy / count
        per_item = sample if self._per_item is None else 0.7 * self._per_item + 0.3 * sample
        self._per_item = per_item
        if not self._adaptive:
            # Only as the estimate moves: this runs for every batch, on the
            # dispatcher's thread.
            item_bytes = nbytes / count
            last = self._deepened_for
            if last is None or not (
                0.8 * last[0] <= per_item <= 1.25 * last[0]
                and 0.8 * last[1] <= item_bytes <= 1.25 * last[1]
            ):
                self._deepened_for = (per_item, item_bytes)
                self._deepen(per_item, item_bytes)
            return
        ideal = int(TARGET_BATCH_SECONDS / per_item) if per_item > 0 else MAX_CHUNK
        limit = MAX_CHUNK
        if self._fixed_buffer is not None:
            limit = max(1, self._fixed_buffer // (2 * self._workers))
        if nbytes > 0:
            limit = min(limit, max(1, CHUNK_BYTES * count // nbytes))
        size = max(1, min(ideal, 2 * self._chunksize, limit))
        self._chunksize = size
        self._buffersize = self._buffer_for(size)

    def _deepen(self, per_item: float, item_bytes: float) -> None:
        """Size the buffer of a fixed ``chunksize`` by how long its chunks take.

        Four chunks a worker keep a worker busy when a chunk is long enough to
        cover a round trip through the dispatcher; a chunk of ten tiny tasks
        (~5 us of work) is not: each worker ran dry and was woken for every
        chunk, and ``imap_unordered(f, xs, 10)`` of 200,000 squares took 2.9x
        ``multiprocessing.Pool``'s time. So the buffer holds up to
        FIXED_AHEAD_CHUNKS chunks a worker, as many as hold 4 x
        TARGET_BATCH_SECONDS of work (what an adaptive buffer holds), and no
        more arguments than an adaptive buffer may: 4 x CHUNK_BYTES a worker.

        Chunks of fewer than four tasks may be up to FIXED_AHEAD_TASKS tasks a
        worker instead: an ordered ``imap`` stops refilling while it waits for a
        slow task, and the other workers ran dry behind 32 one-task chunks.
        ``imap(f, xs, 1)`` of 10,000 squares, one in a hundred spinning 2 ms:
        653 -> 546 ms (medians of 3); of squares only, 974 -> 892 ms.
        """
        if self._fixed_buffer is not None:
            return
        chunk_s = per_item * self._chunksize
        wanted = max(FIXED_AHEAD_CHUNKS, FIXED_AHEAD_TASKS // self._chunksize)
        if chunk_s > 0:
            wanted = min(wanted, math.ceil(4 * TARGET_BATCH_SECONDS / chunk_s))
        items = self._workers * max(4, wanted) * self._chunksize
        if item_bytes > 0:
            items = min(items, int(4 * self._workers * CHUNK_BYTES / item_bytes))
        self._buffersize = max(self._buffer_for(self._chunksize), items)

    def _feed_all(self) -> None:
        """Submit the rest of the input now, whatever the buffer (Pool.join() needs it)."""
        self._buffersize = 1 << 62
        self._top_up()

    def _end_input(self, length: int) -> None:
        with self._cond:
            self._length = length
            self._submitted = length
            self._cond.notify_all()

    # The dispatcher's side ----------------------------------------------

    def deliver(
        self, first: int, values: list[Any], errors: dict[int, BaseException] | None
    ) -> None:
        with self._cond:
            if self._ordered:
                self._chunks[first] = (values, errors)
                if first == self._next_index:
                    wake(self._cond)
            else:
                self._arrived.append((values, errors))
                wake(self._cond)

    def accepting(self) -> bool:
        """Whether batches of this iterator should still start (False once closed)."""
        return not self._closed


# Public classes say they live in `procpool` (tracebacks, pickles, repr).
for _cls in (AsyncResult, IMapIterator):
    _cls.__module__ = "procpool"
del _cls
