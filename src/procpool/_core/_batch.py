"""A batch: consecutive tasks of one call, sent to a worker as one message.

The API layer cuts its input into batches; the dispatcher moves them to
workers and hands their outcomes to the batch's sink. A batch can be split
after it was made: when a worker dies mid-batch, the items that had not started
go back to the queue as a new, shorter batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import pickle
import sys
import types
import weakref
from collections.abc import Callable, Mapping

from .._exceptions import ProcpoolError, SerializationError, TaskTimeoutError
from . import _protocol as P
from . import _shm as shm
from . import importable_by_name, load_copy
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
    Anything else (a bound method, a partial, a callable object) goes through
    plain pickle too, with only the functions and classes inside it that a
    worker could not find by name (lambdas, closures, ``__main__``'s) each
    copied by cloudpickle (_ByName); or all through cloudpickle: a lambda or
    closure itself, what plain pickle refuses (a module, a code object), and
    everything once a module is registered with
    ``cloudpickle.register_pickle_by_value``.

    ``inherited_main`` names the functions and classes of ``__main__`` that the
    workers already have (forked from a copy of this process); those go by
    name too, and so run as they were when the workers' zygote was forked, like
    fork: ``fn`` itself, and any that ``fn`` refers to (a bound method's class,
    a closure's), which cloudpickle would otherwise copy by value at each call.
    ``script_rerun``: the workers import the script again (spawn, forkserver),
    so a function at its top level goes with its name and code alone
    (``_script.rerun_by_children``), sparing this process cloudpickle too.
    """
    return _dumps_callable(fn, inherited_main, script_rerun, None)


def _dumps_callable(
    fn: Any,
    inherited_main: Mapping[str, Any] | None,
    script_rerun: bool,
    copies: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] | None,
) -> bytes:
    """dumps_callable, reusing the copies of functions and classes inside
    ``fn`` made before (by object; see CallableCache)."""
    if inherited_main and _inherited_from_main(fn, inherited_main):
        return pickle.dumps(fn, P.PROTOCOL)
    if script_rerun and isinstance(fn, types.FunctionType):
        from ._script import ScriptFunction, of_main, rerun_by_children

        if of_main(fn) and rerun_by_children(fn):
            try:
                return pickle.dumps(ScriptFunction(fn, None), P.PROTOCOL)
            except ValueError:  # a constant marshal cannot write: by value below
                pass
    cloudpickle = sys.modules.get("cloudpickle")
    if cloudpickle is None and _importable_by_name(fn):
        return pickle.dumps(fn, P.PROTOCOL)
    if isinstance(fn, types.FunctionType):
        # Here: a pool whose functions all go by name never needs _script (a
        # module less on the way to a first result, ~0.2 ms of a cold start).
        from ._script import ScriptFunction, of_main

        if of_main(fn):
            by_value = _cloudpickled(fn, inherited_main)
            # A worker that has the function itself runs its own (see _script).
            try:
                return pickle.dumps(ScriptFunction(fn, by_value), P.PROTOCOL)
            except ValueError:  # a constant marshal cannot write: by value alone
                return by_value
    if cloudpickle is None or not cloudpickle.list_registry_pickle_by_value():
        # cloudpickle for the whole took ~35 us of Python for a small object's
        # method, plain pickle ~5; and a program that sends nothing by value
        # never imports cloudpickle (~13 ms).
        buf = io.BytesIO()
        try:
            _ByName(buf, inherited_main, script_rerun, copies).dump(fn)
            return buf.getvalue()
        except Exception:
            pass  # something only cloudpickle pickles (a module, a code object)
    return _cloudpickled(fn, inherited_main)


def is_code(fn: Any) -> bool:
    """Whether ``fn`` is code alone (a function, a class, a module's builtin),
    not an object bound to data (a method, a partial, a callable instance)."""
    if isinstance(fn, (types.FunctionType, type)):
        return True
    return isinstance(fn, types.BuiltinFunctionType) and isinstance(
        fn.__self__, (types.ModuleType, type(None))
    )


def main_functions() -> dict[str, Any]:
    """The functions and classes ``__main__`` has now, and its classes' own
    functions (``"Class.method"``), by qualified name: what a worker forked now
    will have too."""
    main = sys.modules.get("__main__")
    found: dict[str, Any] = {}
    for name, obj in vars(main).items() if main is not None else ():
        if isinstance(obj, types.FunctionType):
            found[name] = obj
        elif isinstance(obj, type) and obj.__module__ == "__main__" and obj.__qualname__ == name:
            found[name] = obj
            for attr, member in vars(obj).items():
                if isinstance(member, types.FunctionType):
                    found[f"{name}.{attr}"] = member
    return found


def _inherited_from_main(fn: Any, inherited_main: Mapping[str, Any]) -> bool:
    """Whether ``fn`` (any object) is a function or class of ``__main__`` that
    the workers have as it is, found by the name pickle would look it up by."""
    if not isinstance(fn, (types.FunctionType, type)) or fn.__module__ != "__main__":
        return False
    name = fn.__qualname__
    if inherited_main.get(name) is not fn:
        return False
    found: Any = sys.modules.get("__main__")
    for part in name.split("."):
        found = getattr(found, part, None)
    return found is fn


class _ByName(pickle.Pickler):
    """Plain pickle, where each function or class a worker cannot find by name
    (see _inherited_from_main and importable_by_name) goes as a cloudpickle copy
    of its own: lambdas, closures, those of ``__main__`` made after the workers
    were forked. Under spawn and forkserver (``script_rerun``), a function or
    class at the top of the script goes by name (see _script). What each
    function or class becomes is worked out once, at its first call
    (``copies``), as a function sent as the callable itself is (see
    CallableCache)."""

    def __init__(
        self,
        file: io.BytesIO,
        inherited_main: Mapping[str, Any] | None,
        script_rerun: bool,
        copies: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] | None,
    ) -> None:
        super().__init__(file, P.PROTOCOL)
        self.inherited_main = inherited_main or {}
        self.script_rerun = script_rerun
        self.copies = copies

    def reducer_override(self, obj: Any) -> Any:
        if (
            isinstance(obj, (types.FunctionType, type))
            and not importable_by_name(obj)
            and not _inherited_from_main(obj, self.inherited_main)
        ):
            copies = self.copies
            try:
                return copies[obj]  # type: ignore[index]
            except (KeyError, TypeError):  # not made yet; no copies kept; unhashable
                reduced = self._reduce(obj)
                with contextlib.suppress(TypeError):
                    copies[obj] = reduced  # type: ignore[index]
                return reduced
        return NotImplemented

    def _reduce(self, obj: type | types.FunctionType) -> tuple[Any, ...]:
        if self.script_rerun:
            from ._script import by_name_in_script

            reduced = by_name_in_script(obj)
            if reduced is not None:
                return reduced
        return load_copy, (_cloudpickled(obj, self.inherited_main),)


def _cloudpickled(fn: Any, inherited_main: Mapping[str, Any] | None) -> bytes:
    import cloudpickle

    if not inherited_main:
        return bytes(cloudpickle.dumps(fn, P.PROTOCOL))
    buf = io.BytesIO()
    _inheriting_pickler()(buf, inherited_main).dump(fn)
    return buf.getvalue()


@functools.cache
def _inheriting_pickler() -> Callable[[io.BytesIO, Mapping[str, Any]], pickle.Pickler]:
    """cloudpickle's pickler, sending by name what the workers inherited of
    ``__main__`` (see dumps_callable). A bound method of a class of the script
    took ~250 us to pickle with its class by value, and as long to load."""
    import cloudpickle

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO, inherited_main: Mapping[str, Any]) -> None:
            super().__init__(file, protocol=P.PROTOCOL)
            self.inherited_main = inherited_main

        def reducer_override(self, obj: Any) -> Any:
            if _inherited_from_main(obj, self.inherited_main):
                return NotImplemented  # pickle's own way: by module and name
            return super().reducer_override(obj)

    return Pickler


def _importable_by_name(fn: Any) -> bool:
    kinds = (types.FunctionType, types.BuiltinFunctionType)
    return isinstance(fn, kinds) and importable_by_name(fn)


class CallableRef:
    """A callable pickled (see :func:`dumps_callable`), with the id workers cache it under."""

    __slots__ = ("data", "fixed", "id", "name", "obj")
    _ids = itertools.count(1)

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        serialize: bool = True,
        inherited_main: Mapping[str, Any] | None = None,
        script_rerun: bool = False,
        copies: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] | None = None,
        data: bytes | None = None,
    ) -> None:
        self.id = next(self._ids)
        # The callable itself, only for backends that run it in this process; a
        # process backend must not keep (say) a bound method's instance alive.
        self.obj = None if serialize else fn
        self.name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        # Whether the callable is code alone, which goes as it was at its first
        # call, or bound to data, pickled at each (see CallableCache).
        self.fixed = not serialize or is_code(fn)
        if not serialize:
            self.data = b""
        elif data is not None:  # pickled already (CallableCache._now)
            self.data = data
        else:
            self.data = pickle_for_worker(fn, inherited_main, script_rerun, copies)


def pickle_for_worker(
    fn: Callable[..., Any],
    inherited_main: Mapping[str, Any] | None,
    script_rerun: bool,
    copies: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] | None,
) -> bytes:
    """_dumps_callable, with any failure as a SerializationError naming ``fn``."""
    try:
        return _dumps_callable(fn, inherited_main, script_rerun, copies)
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        raise SerializationError(
            f"cannot pickle the callable {name!r} "
            f"(type {type(fn).__qualname__}): {type(exc).__name__}: {exc}"
        ) from exc


def _weak_or_strong(fn: Any, strong: bool) -> Callable[[], Any]:
    """A weak reference to ``fn``, or for one that takes none (a builtin, immortal
    anyway) a function that returns it."""
    return (lambda: fn) if strong else weakref.ref(fn)


# How many methods' last pickles CallableCache keeps for comparison (the
# objects they are bound to are alive, and held by the program anyway), and
# how many pickles it keeps by their bytes, each of at most SMALL_PICKLE bytes.
MAX_METHODS = 8
MAX_SMALL = 128
SMALL_PICKLE = 64 * 1024


class CallableCache:
    """The refs of the callables used last, so that a worker that has a
    callable already does not get it, nor unpickle it, again.

    Code is pickled once: a function or class keeps its first call's ref
    (by name, or for a lambda or closure a copy by value, with what its cells
    and the globals it reads held then, as Ray sends a remote function; a
    function of ``__main__`` the workers inherited runs as it was when they
    were forked, like fork). A callable bound to data (a bound method, a
    partial, a callable object) is pickled again at each call (a map, an
    ``apply_async``, a ``submit``), as the standard library's pools do, since
    that data may have changed: a partial's list appended to, an attribute
    set. Functions and classes inside it go by name or as their first copy
    (``_copies``). When the bytes come out the same as the last time, the
    call keeps the last ref and its id, and the workers' copy serves
    (P.admit_callable bounds what they keep); otherwise it gets a new one.
    The comparison is a memcmp (~10 GB/s).
    """

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
        # Methods, by (id of the object, function): a weak reference to the object
        # and the last ref of that method. ``obj.method`` is a new bound method at
        # each lookup, so a loop of ``submit(obj.method, x)`` never finds the last
        # one above: without this, each call's copy of the object (a model's
        # weights, a table) would go to a worker, be unpickled there and kept.
        # The object is held weakly; its pickle is kept while it lives.
        self._methods: dict[tuple[int, Any], tuple[weakref.ref[Any], CallableRef]] = {}
        self._copies: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()
        # Small pickles of callables bound to data, and their refs (see _now).
        self._small: dict[bytes, CallableRef] = {}

    def _refs_for(self, fn: Callable[..., Any]) -> Any:
        try:
            weakref.ref(fn)
        except TypeError:
            return self._strong
        return self._weak

    def get(self, fn: Callable[..., Any]) -> CallableRef:
        last = self._last
        if last is not None and last[0]() is fn and last[1].fixed:
            return last[1]  # the most recently used already: nothing to reorder
        if self._serialize and isinstance(fn, types.MethodType):
            return self._now(fn, None)  # a new one at each lookup: found by its object
        refs = self._refs_for(fn)
        try:
            ref: CallableRef | None = refs.pop(fn)
        except KeyError:
            ref = None
        except TypeError:  # unhashable callable: nothing to cache it by
            return self._now(fn, None)
        if ref is None or not ref.fixed:
            ref = self._now(fn, ref)
        refs[fn] = ref  # re-insert: the dict's order is the LRU order
        if len(refs) > self._limit:
            del refs[next(iter(refs.keys()))]
        self._last = (_weak_or_strong(fn, refs is self._strong), ref)
        return ref

    def _now(self, fn: Callable[..., Any], before: CallableRef | None) -> CallableRef:
        """``fn`` pickled now: the ref of the same bytes if there is one
        (``before``, its method's last ref, or for a small pickle any ref
        ``_small`` holds), else a new ref."""
        if not self._serialize or is_code(fn):
            return CallableRef(
                fn,
                serialize=self._serialize,
                inherited_main=self._inherited_main,
                script_rerun=self._script_rerun,
                copies=self._copies,
            )
        data = pickle_for_worker(fn, self._inherited_main, self._script_rerun, self._copies)
        key = _method_key(fn)
        methods = self._methods
        owner = None
        if key is not None:
            owner = fn.__self__  # type: ignore[attr-defined]
            entry = methods.pop(key, None)  # re-inserted below: the dict's order is the LRU's
            if before is None and entry is not None and entry[0]() is owner:
                before = entry[1]
        ref = before if before is not None and before.data == data else None
        if len(data) <= SMALL_PICKLE:
            # By the bytes themselves too: a method of a new object at each
            # call (``Scale(3).times``), or a new partial, pickles the same.
            small = self._small
            ref = small.pop(data, None) or ref or CallableRef(fn, data=data)
            small[data] = ref  # (re-)inserted last: the dict's order is the LRU's
            if len(small) > MAX_SMALL:
                # Another thread's call may change the dict between iter and next.
                with contextlib.suppress(RuntimeError, StopIteration):
                    small.pop(next(iter(small)), None)
        elif ref is None:
            ref = CallableRef(fn, data=data)
        if key is None:
            return ref

        def forget(dead: weakref.ref[Any]) -> None:
            current = methods.get(key)
            if current is not None and current[0] is dead:
                del methods[key]

        try:
            methods[key] = (weakref.ref(owner, forget), ref)
        except TypeError:  # an object without weak references (a dict's method)
            return ref
        # list(): a weak reference's callback, in any thread, may shrink the dict.
        for old in list(methods)[: len(methods) - MAX_METHODS]:
            methods.pop(old, None)
        return ref

    def known(self, fn: Callable[..., Any]) -> CallableRef | None:
        """``fn``'s last ref if one is cached; makes none, and leaves the LRU order."""
        try:
            ref: CallableRef | None = self._refs_for(fn).get(fn)
        except TypeError:  # unhashable
            return None
        key = _method_key(fn) if ref is None else None
        if key is not None:
            # A method asked for again is a new bound method: its last ref's
            # measure still describes it (only its object's state may differ).
            entry = self._methods.get(key)
            if entry is not None and entry[0]() is fn.__self__:  # type: ignore[attr-defined]
                ref = entry[1]
        return ref


def _method_key(fn: Any) -> tuple[int, Any] | None:
    """(id of the object, function) for a method bound to an object, else None."""
    if isinstance(fn, types.MethodType):
        return id(fn.__self__), fn.__func__
    if isinstance(fn, types.BuiltinMethodType) and not isinstance(
        fn.__self__, (types.ModuleType, type(None))
    ):
        return id(fn.__self__), fn.__name__
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
