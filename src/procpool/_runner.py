"""What Pool and ProcessPoolExecutor share: an engine, a callable cache, task policies.

Options that belong together travel as one small frozen object
(:class:`TaskPolicy` in the engine); this module turns the public keyword
arguments into it and validates them once, with errors that name the option.
"""

from __future__ import annotations

import atexit
import itertools
import math
import multiprocessing.util  # noqa: F401 - before atexit.register below
import pickle
import signal
import threading
import weakref
from collections.abc import Callable, Iterable

from ._core import _protocol as P
from ._core import usable_cpus
from ._core._batch import CHUNK_BYTES, Batch, CallableCache, Sink, TaskPolicy, make_batches
from ._core._startmethod import ContextLike
from .backends import Backend, BackendOptions, make_backend

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

_UNSET: Any = object()


def default_workers() -> int:
    """A pool's size where none is given: the CPUs this process may run on."""
    return usable_cpus()


def make_policy(
    task_timeout: float | None,
    retries: int,
    retry_on: Iterable[type[BaseException]] | None,
    seed: int | None = None,
) -> TaskPolicy:
    """Validate the fault options and bundle them. Raises ValueError/TypeError naming the option."""
    if task_timeout is not None:
        if isinstance(task_timeout, bool) or not isinstance(task_timeout, (int, float)):
            raise TypeError(f"task_timeout must be a number of seconds, not {task_timeout!r}")
        if not task_timeout > 0 or math.isinf(task_timeout):
            raise ValueError(
                f"task_timeout must be a positive number of seconds, not {task_timeout!r}"
            )
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, not {retries!r}")
    kinds = None if retry_on is None else tuple(retry_on)  # None: TaskPolicy's default
    for kind in kinds or ():
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            raise TypeError(f"retry_on must hold exception types, not {kind!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, not {seed!r}")
    return TaskPolicy(task_timeout, retries, kinds, seed)


class Runner:
    """An engine plus the caches that make submitting to it cheap."""

    def __init__(
        self,
        workers: int,
        context: ContextLike,
        initializer: Callable[..., Any] | None,
        initargs: Iterable[Any],
        max_tasks_per_worker: int | None,
        policy: TaskPolicy,
        *,
        drain_at_exit: bool,
        max_memory_per_worker: int | str | None = None,
        tag_output: bool = False,
        backend: Any = "processes",
    ) -> None:
        options = BackendOptions(
            context=context,
            initializer=initializer,
            initargs=tuple(initargs),
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=parse_bytes(max_memory_per_worker),
            tag_output=bool(tag_output),
        )
        self.engine: Backend = make_backend(backend, workers, options)
        self.policy = policy
        self.callables = CallableCache(
            serialize=self.engine.serializes,
            inherited_main=self.engine.inherited_main,
            script_rerun=self.engine.script_rerun,
        )
        self._calls = itertools.count()  # single calls' sequence numbers, for seeds
        try:
            self.check_policy(policy)
        except BaseException:
            self.engine.terminate()
            raise
        _register(self.engine, drain_at_exit)
        _handle_sigterm()

    @property
    def workers(self) -> int:
        return self.engine.size

    def check_policy(self, policy: TaskPolicy) -> TaskPolicy:
        """Refuse options the backend cannot honour. Raises ValueError naming them."""
        name = type(self.engine).__name__
        if policy.timeout is not None and not self.engine.can_time_out:
            raise ValueError(f"task_timeout needs a backend that can stop a task; {name} cannot")
        if policy.seed is not None and not self.engine.can_seed:
            raise ValueError(f"seed needs one interpreter per worker; {name} shares one")
        return policy

    def policy_for(
        self, task_timeout: float | None, retries: int | None, retry_on: Any
    ) -> TaskPolicy:
        """The pool's policy, with any per-call overrides applied."""
        if task_timeout is _UNSET and retries is None and retry_on is None:
            return self.policy
        base = self.policy
        return self.check_policy(
            make_policy(
                base.timeout if task_timeout is _UNSET else task_timeout,
                base.retries if retries is None else retries,
                base.retry_on if retry_on is None else retry_on,
                base.seed,
            )
        )

    def submit_call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        sink: Sink,
        policy: TaskPolicy,
        on_start: Callable[[], bool] | None = None,
    ) -> None:
        ref = self.callables.get(fn)
        call_index = next(self._calls)
        batches = make_batches(
            ref,
            P.CALL_ARGS_KWARGS,
            [(args, kwargs)],
            0,
            sink,
            policy,
            named=False,
            serialize=self.engine.serializes,
        )
        for batch in batches:
            batch.on_start = on_start
            batch.seed_base = call_index
        if batches:
            self.engine.submit(batches)

    def seconds_per_task(self, fn: Callable[..., Any]) -> float | None:
        """What the engine measured of ``fn``'s tasks so far (None: nothing yet)."""
        ref = self.callables.known(fn)
        return None if ref is None else self.engine.seconds_per_task(ref.id)

    def chunk_submitter(
        self, fn: Callable[..., Any], star: int, policy: TaskPolicy
    ) -> Callable[[list[list[Any]], int, Sink], list[Batch]]:
        """A function that submits chunks of a map, pickling ``fn`` only once.

        ``submit(chunks, first, sink)`` submits consecutive chunks, the first one's
        task starting at ``first``, in one call of the engine: a burst of chunks
        (an ``imap`` refilling its buffer) takes the engine's lock and wakes its
        thread once, and reaches it together, to be sent together (see
        Dispatcher._merge). A sink with an ``accepting()`` method (a lazy
        iterator) can drop its batches that have not started yet, once nobody
        wants their results.
        """
        ref = self.callables.get(fn)
        engine = self.engine
        serialize = engine.serializes

        def submit(chunks: list[list[Any]], first: int, sink: Sink) -> list[Batch]:
            batches: list[Batch] = []
            for items in chunks:
                batches += make_batches(ref, star, items, first, sink, policy, serialize=serialize)
                first += len(items)
            on_start = getattr(sink, "accepting", None)
            if on_start is not None:
                for batch in batches:
                    batch.on_start = on_start
            if batches:
                engine.submit(batches)
            return batches

        return submit


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1000**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}


def parse_bytes(value: int | str | None) -> int | None:
    """``2_000_000``, ``"2MB"``, ``"1.5 GiB"`` -> bytes. Raises ValueError naming the option."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number) :]
        try:
            if unit not in _UNITS:
                raise ValueError(unit)
            value = int(float(number) * _UNITS[unit])
        except ValueError:
            raise ValueError(
                f"max_memory_per_worker must be bytes or a size like '2GB', not {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"max_memory_per_worker must be a positive number of bytes, not {value!r}")
    return value


# Largest default chunk for map: beyond this, bigger chunks only delay the first
# results and the overlap of pickling with work (1M tiny tasks: 5.3M tasks/s at
# 125,000 per chunk, 6.2M at 4,096-8,192).
MAX_MAP_CHUNK = 8192
# A map of a function measured at LONG_TASK_S or more a task gets chunks of about
# CHUNK_WORK_S of work, but never more than MAX_CHUNKS_PER_WORKER chunks per worker
# (see map_chunksize).
LONG_TASK_S = 0.001
CHUNK_WORK_S = 0.005
MAX_CHUNKS_PER_WORKER = 32
# A map whose whole work, at its function's measured seconds per task, is at
# most SMALL_MAP_S gets one chunk per worker, not four (see map_chunksize).
SMALL_MAP_S = 0.001
_NO_ITEM = object()  # map_chunksize's ``other`` when the map has no second item to show


def map_chunksize(
    length: int,
    workers: int,
    sample: object = None,
    seconds_per_task: float | None = None,
    other: object = _NO_ITEM,
) -> int:
    """Default chunk size for a map over ``length`` items: about 4 chunks per worker.

    ``sample``, an item of the map, caps the chunk at about CHUNK_BYTES of data.
    ``other``, another item, says what each item adds to a chunk: an object that
    every item shares (one large argument passed to every task) is pickled once
    per chunk, so it does not make chunks small (see _item_bytes).

    ``seconds_per_task``, what the pool measured of the function's earlier
    tasks, makes chunks of long tasks smaller: four chunks per worker leave the
    tail of a map to a few long chunks (64 tasks of 25 ms on 8 workers: chunks
    of 2, and a worker whose cores ran slower ends 25 ms after the others).
    Only from LONG_TASK_S a task, where a batch's fixed cost (tens of
    microseconds) is small beside it, and never beyond MAX_CHUNKS_PER_WORKER
    chunks per worker, so that an estimate that no longer holds (a function
    that was slow on earlier inputs) costs at most that many batches.

    A map whose whole work, at ``seconds_per_task``, is SMALL_MAP_S or less gets
    one chunk per worker instead of four: each batch costs more in hand-offs
    between threads (~100 us apiece on 2 cores) than such a map's tasks. 20
    squares on 2 workers took ~650 us a map in 7 chunks, ~410 in 2 (200
    squares: ~750 -> ~410; `multiprocessing.Pool` ~740 and ~780). Not one
    chunk: a function measured short on earlier inputs may run long on these,
    and the map must still use every worker.
    """
    small = seconds_per_task is not None and length * seconds_per_task <= SMALL_MAP_S
    chunksize, extra = divmod(length, workers if small else workers * 4)
    chunksize = max(1, min(MAX_MAP_CHUNK, chunksize + (1 if extra else 0)))
    if chunksize > 1 and seconds_per_task is not None and seconds_per_task >= LONG_TASK_S:
        fewest = -(-length // (workers * MAX_CHUNKS_PER_WORKER))
        chunksize = min(chunksize, max(fewest, int(CHUNK_WORK_S / seconds_per_task), 1))
    if chunksize > 1 and length:
        chunksize = max(1, min(chunksize, CHUNK_BYTES // _item_bytes(sample, other, chunksize)))
    return chunksize


def _item_bytes(sample: object, other: object, chunksize: int) -> int:
    """Bytes an item adds to a chunk's pickle, at least 1.

    ``sample``'s own size, unless a chunk of that many items would pass
    CHUNK_BYTES: then what ``other`` adds to a pickle that already holds
    ``sample``. The pickler writes an object once per stream, so when every item
    refers to one large object (``[(table, i) for i in ...]``, ``[array] * n``),
    a chunk carries it once however many items it holds, as the standard
    library's chunks do (200 items each holding one 1 MB object: 9 ms there,
    290 ms with this pool's chunks of 1 item, one 1 MB pickle each).
    """
    alone = max(1, _pickled_size(sample))
    if alone * chunksize <= CHUNK_BYTES or other is _NO_ITEM:
        return alone
    pair = _pickled_size([sample, other])
    return max(1, pair - alone) if pair else alone


def _pickled_size(obj: object) -> int:
    """Bytes ``obj`` takes pickled, its large buffers counted but not copied; 0 if unpicklable."""
    size = 0

    def count(buffer: pickle.PickleBuffer) -> bool:
        nonlocal size
        size += buffer.raw().nbytes
        return False  # out of band: counted, not copied

    try:
        stream = pickle.dumps(obj, P.PROTOCOL, buffer_callback=count)
    except Exception:
        return 0  # the real pickling will say what is wrong, naming the task
    return size + len(stream)


def check_chunksize(chunksize: int | None) -> None:
    if chunksize is not None and (
        isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1
    ):
        raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")


# -------------------------------------------------------------- at exit

_engines: dict[int, tuple[weakref.ref[Backend], bool]] = {}
# Reentrant: an engine's weakref callback (forget) runs wherever the collector
# frees it, which may be inside _register on a thread that holds this lock
# (a collection triggered by an allocation there). A plain Lock deadlocked
# pool creation that way (seen on 3.13: the main thread stuck in forget).
_engines_lock = threading.RLock()


def _register(engine: Backend, drain_at_exit: bool) -> None:
    key = id(engine)

    def forget(_: object) -> None:
        with _engines_lock:
            _engines.pop(key, None)

    with _engines_lock:
        _engines[key] = (weakref.ref(engine, forget), drain_at_exit)


def _shutdown_all() -> None:
    """At interpreter exit: executors finish their queued work, pools stop at once."""
    with _engines_lock:
        entries = list(_engines.values())
    for ref, drain in entries:
        engine = ref()
        if engine is None:
            continue
        if drain:
            engine.close()
            engine.join()
        else:
            engine.terminate()


def _handle_sigterm() -> None:
    """Make SIGTERM a clean shutdown (like Ctrl-C) instead of an abrupt death.

    Only when nobody else handles SIGTERM and we are on the main thread: the
    handler raises SystemExit(143) in the main thread, so ``with`` blocks close
    their pools and the exit hooks stop every worker. A second SIGTERM kills
    outright, as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


# Registered after multiprocessing's own exit hook, so it runs first: workers
# are gone before multiprocessing joins its children (which would wait forever
# for a worker still running a task). multiprocessing.util registers that hook
# when first imported: it is imported at the top of this module for that.
atexit.register(_shutdown_all)
