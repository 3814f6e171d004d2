"""A batch: consecutive tasks of one call, sent to a worker as one message.

The API layer cuts its input into batches; the dispatcher moves them to
workers and hands their outcomes to the batch's sink. A batch can be split
after it was made: when a worker dies mid-batch, the items that had not started
go back to the queue as a new, shorter batch.
"""

from __future__ import annotations

import copy
import itertools
import pickle
import sys
import types
import weakref
from collections.abc import Callable, Mapping

from .._exceptions import ProcpoolError, SerializationError, TaskTimeoutError
from . import _protocol as P
from . import _shm as shm
from . import importable_by_name
from ._generic import Protocol

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

_batch_ids = itertools.count(1)


class Sink(Protocol):
    """Where a batch's outcomes go; called on the dispatcher thread, must not block."""

    def deliver(
        self, first: int, values: list[Any], errors: dict[int, BaseException] | None
    ) -> None:
        """Take the results of tasks ``first .. first+len(values)-1``; ``errors`` overrides."""


# A sink may also offer ``attach_waiter(wait) -> bool``: it takes (or declines)
# a DirectWaiter (_direct.py) that the thread waiting for its outcome calls, with
# its timeout in seconds, to read the outcome from the worker itself. A sink
# that takes it calls deliver() on that thread, so it takes it only if
# deliver() runs no user code that expects the dispatcher's thread. A sink
# whose outcome will go to a callback instead calls its ``not_coming()``.
# A sink may also offer ``observe(count, busy_seconds, nbytes)``, which every
# backend calls, one call at a time, when a batch has run and before its
# deliver(): the lazy maps (imap, Executor.map) size their next chunks by it.


# Items whose pickles (large buffers included) are bigger than this go in
# smaller chunks, so a chunk carries about this much: big items then spread
# evenly over the workers, and sending one overlaps with running another.
CHUNK_BYTES = 1 << 20


class Batch:
    """Tasks ``first_index ..`` of one call of ``fn``, pickled and ready to send."""

    __slots__ = (
        "alone",
        "attempts",
        "done",
        "first_index",
        "fn",
        "id",
        "items",
        "let_go",
        "named",
        "offered",
        "on_start",
        "payload",
        "policy",
        "released",
        "seed_base",
        "sink",
        "star",
    )

    def __init__(
        self,
        fn: CallableRef,
        star: int,
        items: list[Any],
        payload: shm.Packed,
        first_index: int,
        sink: Sink,
        policy: TaskPolicy,
        *,
        named: bool = True,
        attempts: int = 0,
        on_start: Callable[[], bool] | None = None,
        seed_base: int | None = None,
    ) -> None:
        self.id = next(_batch_ids)
        self.fn = fn
        self.star = star
        self.items = items
        self.payload = payload
        self.first_index = first_index
        self.sink = sink
        self.policy = policy
        self.named = named
        self.attempts = attempts
        self.on_start = on_start
        # A single call to send on its own: it went with others once, and their
        # batch could not be unpickled in the worker (see Calls.subset).
        self.alone = False
        # Tasks whose results came ahead of the batch's reply (P.PARTIAL): 0 .. done-1.
        self.done = 0
        # Whether the worker that ran it closed its mapping of the argument
        # segment (see shm.let_go), and whether release() has run.
        self.let_go = False
        self.released = False
        # Sent as P.OFFER (set at each send; read only while a worker holds it):
        # until answered, the worker may not have started it, and the
        # dispatcher may take it back.
        self.offered = False
        # Index of the first task for per-task random seeds (a map's own index,
        # or a single call's sequence number in its pool).
        self.seed_base = first_index if seed_base is None else seed_base

    def units(self) -> int:
        """How many batches it stands for, each answered on its own: one, or the
        parts of a Calls or Joined batch (they count one each against a worker's
        burst, Dispatcher._burst_limit)."""
        return 1

    @property
    def size(self) -> int:
        payload = self.payload
        return len(payload) if isinstance(payload, bytes) else len(payload[0])

    @property
    def nbytes(self) -> int:
        """Bytes its arguments take pickled, those in shared memory included."""
        payload = self.payload
        if isinstance(payload, bytes):
            return len(payload)
        start, length = payload[2][-1]
        return len(payload[0]) + start + length

    def release(self) -> None:
        """Let go of this batch's argument segment, if it has one, once it is settled.

        The segment is written again for a later batch if the worker that ran
        this one let go of it; else this process lets go of it (the memory
        lives on with whatever still maps it). Only the first call acts: a
        segment given back may already carry another batch's arguments.
        """
        if isinstance(self.payload, bytes) or self.released:
            return
        self.released = True
        segment = self.payload[1]
        recycler = shm.current_recycler()
        if shm.descriptor_of(self.payload) is None or recycler is None:
            shm.unlink(segment)  # a named one (which the worker unlinked as it mapped it)
        elif self.let_go:
            recycler.give_back(segment)
        else:
            recycler.discard(segment)

    def task_name(self, offset: int = 0) -> str:
        return f"task {self.first_index + offset}" if self.named else "the task"

    def tail(self, start: int, *, attempts: int | None = None) -> Batch:
        """A new batch holding this one's items from ``start`` on (they had not run)."""
        return self.subset(start, len(self.items), attempts=attempts)

    def subset(self, start: int, stop: int, *, attempts: int | None = None) -> Batch:
        items = self.items[start:stop]
        return Batch(
            self.fn,
            self.star,
            items,
            shm.pack(items, shm.argument_segments()),
            self.first_index + start,
            self.sink,
            self.policy,
            named=self.named,
            attempts=self.attempts if attempts is None else attempts,
            seed_base=self.seed_base + start,
        )

    def fail(self, start: int, stop: int, exc: BaseException) -> None:
        """Deliver ``exc`` as the outcome of items ``start .. stop-1``."""
        count = stop - start
        self.release()
        if count <= 0:
            return
        errors: dict[int, BaseException]
        if self.named and isinstance(exc, ProcpoolError):
            # Each task gets its own copy that says which task it is.
            errors = {i: for_task(exc, self.first_index + start + i) for i in range(count)}
        else:
            errors = dict.fromkeys(range(count), exc)
        self.sink.deliver(self.first_index + start, [None] * count, errors)


class Calls(Batch):
    """Single calls queued together, sent to a worker as one batch (see
    Dispatcher._merge); its sink hands task i's outcome to call i's own sink.

    Each call travels as the pickle made when it was submitted: an argument
    changed since then is not seen, as it would not be had the call gone alone.
    Split again (a worker died, or the batch would not unpickle), it gives back
    the calls themselves.
    """

    __slots__ = ("parts",)

    def __init__(self, parts: list[Batch]) -> None:
        first = parts[0]
        super().__init__(
            first.fn,
            P.CALLS,
            [part.items[0] for part in parts],
            P.dumps([part.payload for part in parts]),
            0,
            self,
            first.policy,
            named=False,
        )
        self.parts = parts

    def units(self) -> int:
        return len(self.parts)

    def deliver(
        self, first: int, values: list[Any], errors: dict[int, BaseException] | None
    ) -> None:
        parts = self.parts
        for i, value in enumerate(values):
            part = parts[first + i]
            error = errors.get(i) if errors else None
            if isinstance(error, ProcpoolError) and error.task_index == first + i:
                error = for_task(error, part.first_index)  # the call's index, not its place
            part.sink.deliver(part.first_index, [value], None if error is None else {0: error})

    def subset(self, start: int, stop: int, *, attempts: int | None = None) -> Batch:
        parts = self.parts[start:stop]
        if len(parts) > 1:
            return Calls(parts)
        parts[0].alone = True
        return parts[0]


class Joined(Batch):
    """A map's chunks, contiguous, sent to a worker as one batch (see
    Dispatcher._merge), each still answered on its own.

    The worker unpickles each chunk's own pickle just before running its
    tasks, and sends the chunk's results back as its last task ends (P.JOINED):
    a chunk whose arguments will not unpickle is tried task by task, as one
    sent alone (Dispatcher._on_unpickle_failure), a crash costs what it would
    have cost the chunk alone, and no chunk's results that were computed die
    with the worker. For one-task chunks that is what ``chunksize=1``
    promises: a crash fails only its own task. Split again (a worker died), it
    gives back what was not run, the chunks still joined.
    """

    __slots__ = ("parts",)

    def __init__(self, parts: list[Batch]) -> None:
        first = parts[0]
        super().__init__(
            first.fn,
            first.star | P.JOINED,
            [item for part in parts for item in part.items],
            P.dumps([(len(part.items), part.payload) for part in parts]),
            first.first_index,
            first.sink,
            first.policy,
            attempts=first.attempts,
            seed_base=first.seed_base,
        )
        self.parts = parts

    def units(self) -> int:
        return len(self.parts)

    def chunk_end(self, start: int) -> int:
        """Where the chunk that holds task ``start`` (of this batch) ends."""
        offset = 0
        for part in self.parts:
            offset += len(part.items)
            if start < offset:
                return offset
        return offset

    def subset(self, start: int, stop: int, *, attempts: int | None = None) -> Batch:
        pieces: list[Batch] = []
        offset = 0
        for part in self.parts:
            n = len(part.items)
            first, last = max(start, offset), min(stop, offset + n)
            if first < last:
                whole = first == offset and last == offset + n
                pieces.append(part if whole else part.subset(first - offset, last - offset))
            offset += n
        if len(pieces) == 1:
            return pieces[0]
        if not pieces or any(type(piece.payload) is not bytes for piece in pieces):
            # A chunk cut short and pickled again went to shared memory, which a
            # Joined batch does not carry: the tasks go as one chunk instead
            # (and no tasks as an empty one, as Batch.subset gives).
            items = self.items[start:stop]
            return Batch(
                self.fn,
                self.star & ~P.JOINED,
                items,
                shm.pack(items, shm.argument_segments()),
                self.first_index + start,
                self.sink,
                self.policy,
                attempts=self.attempts if attempts is None else attempts,
                seed_base=self.seed_base + start,
            )
        return Joined(pieces)


def for_task(exc: ProcpoolError, index: int) -> ProcpoolError:
    """``exc`` as the error of task ``index``: itself if it says so, else a copy that does."""
    if exc.task_index == index:
        return exc
    mine = copy.copy(exc)
    mine.task_index = index
    return mine


class TaskPolicy:
    """What to do about slow and failing tasks of one call (shared by its batches)."""

    __slots__ = ("retries", "retry_on", "seed", "timeout")

    def __init__(
        self,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] | None = None,
        seed: int | None = None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.retry_on = retry_on  # None: a crashed worker or a timeout
        self.seed = seed

    def should_retry(self, exc: BaseException, attempts: int) -> bool:
        if attempts >= self.retries:
            return False
        if self.retry_on is None:
            # Looked up only now: see _exceptions_stdlib.py for why it is not imported above.
            from .._exceptions_stdlib import WorkerCrashedError

            return isinstance(exc, (WorkerCrashedError, TaskTimeoutError))
        return isinstance(exc, self.retry_on)


DEFAULT_POLICY = TaskPolicy()


def dumps_callable(
    fn: Any, inherited_main: Mapping[str, Any] | None = None, script_rerun: bool = False
) -> bytes:
    """Pickle a callable for a worker: by name where that works, else by value.

    A builtin, or a function at the top of an importable module, goes by name
    with plain pickle, as cloudpickle would send it too; that spares a process
    that never needs cloudpickle its import (a few ms of every pool's start-up).
    Anything else (lambdas, closures, ``__main__``, bound methods, partials)
    goes through cloudpickle, and so does everything once cloudpickle is
    loaded: a module registered with ``cloudpickle.register_pickle_by_value``
    is then honoured.

    ``inherited_main`` names the functions of ``__main__`` that the workers
    already have (forked from a copy of this process); those go by name too,
    and so run as they were when the workers' zygote was forked, like fork.
    ``script_rerun``: the workers import the script again (spawn, forkserver),
    so a function at its top level goes with its name and code alone
    (``_script.rerun_by_children``), sparing this process cloudpickle too.
    """
    if inherited_main and _inherited_from_main(fn, inherited_main):
        return pickle.dumps(fn, P.PROTOCOL)
    if script_rerun and isinstance(fn, types.FunctionType):
        from ._script import ScriptFunction, of_main, rerun_by_children

        if of_main(fn) and rerun_by_children(fn):
            try:
                return pickle.dumps(ScriptFunction(fn, None), P.PROTOCOL)
            except ValueError:  # a constant marshal cannot write: by value below
                pass
    if "cloudpickle" not in sys.modules and _importable_by_name(fn):
        return pickle.dumps(fn, P.PROTOCOL)
    import cloudpickle

    # Here: a pool whose functions all go by name never needs _script (a
    # module less on the way to a first result, ~0.2 ms of a cold start).
    from ._script import ScriptFunction, of_main

    by_value = bytes(cloudpickle.dumps(fn, P.PROTOCOL))
    if not of_main(fn):
        return by_value
    # A worker that has the function itself runs its own (see _script).
    try:
        return pickle.dumps(ScriptFunction(fn, by_value), P.PROTOCOL)
    except ValueError:  # a constant marshal cannot write: by value alone
        return by_value


def main_functions() -> dict[str, Any]:
    """The functions ``__main__`` has now: what a worker forked now will have too."""
    main = sys.modules.get("__main__")
    return {
        name: obj
        for name, obj in (vars(main).items() if main is not None else ())
        if isinstance(obj, types.FunctionType)
    }


def _inherited_from_main(fn: Any, inherited_main: Mapping[str, Any]) -> bool:
    if not isinstance(fn, types.FunctionType) or fn.__module__ != "__main__":
        return False
    main = sys.modules.get("__main__")
    name = fn.__qualname__
    return inherited_main.get(name) is fn and getattr(main, name, None) is fn


def _importable_by_name(fn: Any) -> bool:
    kinds = (types.FunctionType, types.BuiltinFunctionType)
    return isinstance(fn, kinds) and importable_by_name(fn)


class CallableRef:
    """A callable pickled once (see :func:`dumps_callable`), with the id workers cache it under."""

    __slots__ = ("data", "id", "name", "obj")
    _ids = itertools.count(1)

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        serialize: bool = True,
        inherited_main: Mapping[str, Any] | None = None,
        script_rerun: bool = False,
    ) -> None:
        self.id = next(self._ids)
        # The callable itself, only for backends that run it in this process; a
        # process backend must not keep (say) a bound method's instance alive.
        self.obj = None if serialize else fn
        self.name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self.data = b""
        if not serialize:
            return
        try:
            self.data = dumps_callable(fn, inherited_main, script_rerun)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle the callable {self.name!r} "
                f"(type {type(fn).__qualname__}): {type(exc).__name__}: {exc}"
            ) from exc


def _weak_or_strong(fn: Any, strong: bool) -> Callable[[], Any]:
    """A weak reference to ``fn``, or for one that takes none (a builtin, immortal
    anyway) a function that returns it."""
    return (lambda: fn) if strong else weakref.ref(fn)


class CallableCache:
    """Remembers the last few callables pickled, so a map pickles its callable once."""

    def __init__(
        self,
        limit: int = 128,
        *,
        serialize: bool = True,
        inherited_main: Mapping[str, Any] | None = None,
        script_rerun: bool = False,
    ) -> None:
        self._limit = limit
        self._serialize = serialize
        self._inherited_main = inherited_main
        self._script_rerun = script_rerun
        # Weak keys: caching a callable must not keep it (or what it is bound to)
        # alive. Builtins cannot be weakly referenced; they are immortal anyway.
        self._weak: weakref.WeakKeyDictionary[Any, CallableRef] = weakref.WeakKeyDictionary()
        self._strong: dict[Any, CallableRef] = {}
        # The last callable asked for, weakly, and its ref: a loop of apply_async
        # or submit asks for the same one each time, and the dictionaries' pop and
        # re-insert cost ~3 us a call (a weak reference made for each).
        self._last: tuple[Callable[[], Any], CallableRef] | None = None

    def _refs_for(self, fn: Callable[..., Any]) -> Any:
        try:
            weakref.ref(fn)
        except TypeError:
            return self._strong
        return self._weak

    def get(self, fn: Callable[..., Any]) -> CallableRef:
        last = self._last
        if last is not None and last[0]() is fn:
            return last[1]  # the most recently used already: nothing to reorder
        refs = self._refs_for(fn)
        try:
            ref: CallableRef = refs.pop(fn)
        except KeyError:
            ref = self._ref(fn)
        except TypeError:  # unhashable callable: nothing to cache it by
            return self._ref(fn)
        refs[fn] = ref  # re-insert: the dict's order is the LRU order
        if len(refs) > self._limit:
            del refs[next(iter(refs.keys()))]
        self._last = (_weak_or_strong(fn, refs is self._strong), ref)
        return ref

    def _ref(self, fn: Callable[..., Any]) -> CallableRef:
        return CallableRef(
            fn,
            serialize=self._serialize,
            inherited_main=self._inherited_main,
            script_rerun=self._script_rerun,
        )

    def known(self, fn: Callable[..., Any]) -> CallableRef | None:
        """``fn``'s ref if one is cached; makes none, and leaves the LRU order."""
        try:
            return self._refs_for(fn).get(fn)  # type: ignore[no-any-return]
        except TypeError:  # unhashable
            return None


def make_batches(
    fn: CallableRef,
    star: int,
    items: list[Any],
    first_index: int,
    sink: Sink,
    policy: TaskPolicy,
    *,
    named: bool = True,
    serialize: bool = True,
) -> list[Batch]:
    """Pickle ``items`` as one batch; an item that will not pickle fails alone.

    With ``serialize=False`` (backends running in this process) nothing is pickled.

    The happy path pickles the whole list once. Only when that fails are the
    items pickled one by one to find the culprits: each fails with a
    SerializationError naming its task and type, and the others still run.
    """
    if not serialize:
        return [Batch(fn, star, items, b"", first_index, sink, policy, named=named)]
    try:
        payload = shm.pack(items, shm.argument_segments())
    except Exception:
        return _make_batches_item_by_item(fn, star, items, first_index, sink, policy, named)
    return [Batch(fn, star, items, payload, first_index, sink, policy, named=named)]


def _make_batches_item_by_item(
    fn: CallableRef,
    star: int,
    items: list[Any],
    first_index: int,
    sink: Sink,
    policy: TaskPolicy,
    named: bool,
) -> list[Batch]:
    batches = []
    for i, item in enumerate(items):
        try:
            payload = shm.pack([item], shm.argument_segments())
        except Exception as exc:
            where = f"task {first_index + i}" if named else "the task"
            err = SerializationError(
                f"cannot pickle the arguments of {where} "
                f"(type {_type_name(item, star)}): {type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            sink.deliver(first_index + i, [None], {0: err})
            continue
        batches.append(Batch(fn, star, [item], payload, first_index + i, sink, policy, named=named))
    return batches


def _type_name(item: Any, star: int) -> str:
    """Name the type of the argument that fails to pickle, not just its tuple."""
    parts = []
    if star == P.CALL_ONE:
        parts = [item]
    elif star == P.CALL_STAR:
        parts = list(item)
    else:
        parts = [*item[0], *item[1].values()]
    for part in parts:
        try:
            pickle.dumps(part, P.PROTOCOL)
        except Exception:
            return f"{type(part).__module__}.{type(part).__qualname__}"
    return type(item).__qualname__
