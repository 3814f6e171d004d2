"""The loop a worker process runs.

A worker owns one end of a duplex pipe to the parent's dispatcher. It reads one
message at a time, runs batches in the order they arrive, and answers each with
one RESULTS message. It never talks to another worker.

It also publishes, in a small shared-memory slot, which batch and which item of
that batch it is running and when the item started. The dispatcher reads the
slot only when it needs to: when the worker dies (to fail exactly the task that
was running and re-dispatch the ones that had not started) and to enforce
per-task timeouts. Writing the slot costs one store per item; no message.

A watchdog thread waits on the parent's sentinel and ends the worker within
milliseconds of the parent's death, even in the middle of a task.
"""

from __future__ import annotations

import _thread
import os
import pickle
import random
import select
import signal
import sys
import time
from collections import OrderedDict
from itertools import islice, starmap
from multiprocessing import parent_process
from multiprocessing.connection import Connection, wait
from sys import getsizeof

from .._exceptions import SerializationError
from . import _protocol as P
from . import _shm as shm
from . import usable_cpus

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    # A pipe's poll, and a count of this process's preemptions (see _Spinner).
    _Probes = tuple[Callable[[int], list[tuple[int, int]]], Callable[[], int]]

# Exit code of a worker whose parent died: it had nobody to report to.
_ORPHAN_EXIT = 70

# Whether this process is a worker whose parent watchdog (a bare thread) runs.
watchdog_started = False


def worker_main(
    conn: Connection, slot: Any, init_bytes: bytes | None, options: dict[str, Any]
) -> None:
    """Entry point of a worker process (the ``target`` of its Process).

    Options: ``stdio`` (install whole-line stdout/stderr), ``max_rss`` (bytes of
    resident memory after which the worker asks to be replaced, or None),
    ``shm_prefix`` (this worker's segments' names, where they need names).
    """
    if options.get("stdio", True):
        from . import _stdio  # here: the parent, which imports this module, never needs it

        _stdio.install_line_writers()
        if options.get("tag_output"):
            global _TAG
            _TAG = f"[worker {options.get('worker_id')} "
    # Ctrl-C in a terminal reaches the whole process group; the parent decides
    # what happens to workers, so they must not die on their own mid-task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the parent's SIGTERM handler; terminate() means die.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _watch_parent()
    _fresh_numpy_state()
    slot[P.SLOT_ALIVE] = time.monotonic()  # started; the initializer may take its time
    initargs = options.get("initargs", ())
    if init_bytes is not None and not _run_initializer(conn, init_bytes, initargs):
        return
    conn.send_bytes(P.dumps((P.READY, os.getpid())))

    def first_named() -> None:
        slot[P.SLOT_SHM] = 1.0  # the dispatcher looks for what it left only if so

    segments = shm.worker_segments(options.get("shm_prefix"), first_named)
    _serve(conn, slot.view, options.get("max_rss"), segments, slot.take)
    if isinstance(segments, shm.Recycler):
        segments.clear()


# How long a worker that has answered a lone call spins for the next before it
# sleeps (see P.BATCH's linger). The caller's thread spins as long for the
# reply (see _pipewait): on a virtual machine much of a short round trip is the
# hypervisor waking an idle vCPU, and each side pays it where it sleeps.
SPIN_S = 100e-6


class _Spinner:
    """Spins up to SPIN_S for a pipe's next message (``spin()``: whether it came).

    It does not spin where that would take the only core there is, nor if this
    process has been preempted since it last was asked (``ru_nivcsw``): the
    cores are busy, and a spinning worker would hold one the process that is
    to write to it may need. It never yields the core while it spins
    (``sched_yield``): on a loaded machine each yield handed the core to another
    process for a whole time slice (two CPU hogs: ~174 us a round trip, where
    this spin takes ~68 and no spin 120-190). Set up at its first use, not at
    the worker's start: ``resource`` may not be loaded yet.
    """

    __slots__ = ("_conn", "_preempted", "_probes")

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn  # None once set up, or found unable to spin
        self._probes: _Probes | None = None
        self._preempted = -1

    def spin(self) -> bool:
        probes = self._probes or self._set_up()
        if probes is None:
            return False
        poll, preemptions = probes
        before, self._preempted = self._preempted, preemptions()
        if self._preempted != before:
            return False
        clock = time.perf_counter
        until = clock() + SPIN_S
        while not poll(0):
            if clock() > until:
                return False
        return True

    def _set_up(self) -> _Probes | None:
        conn, self._conn = self._conn, None  # once: where it cannot spin, it never will
        if conn is None or usable_cpus() < 2:
            return None
        try:
            import resource
        except ImportError:
            return None
        watch = select.poll()
        watch.register(conn.fileno(), select.POLLIN)
        self._probes = (watch.poll, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)
        return self._probes


def _expire_while_idle(conn: Connection, recycler: shm.Recycler | None) -> None:
    """Wait for the next message; meanwhile close the kept result segments, and
    the kept mappings of argument segments, once due."""
    left = shm.expire_kept(recycler)
    while left is not None and not conn.poll(left):
        left = shm.expire_kept(recycler)


def _send_results(
    conn: Connection, msg: tuple[Any, ...], segments: shm.Namer | shm.Recycler | None
) -> None:
    P.send(conn, msg)
    if isinstance(segments, shm.Recycler) and shm.descriptor_of(msg[-1]) is not None:
        segments.sent(msg[-1][1])


def _watch_parent() -> None:
    parent = parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])
        os._exit(_ORPHAN_EXIT)

    # A bare thread: threading.Thread.start() waits until the new thread runs,
    # ~0.4 ms of every worker's start on a busy machine. This one takes no
    # lock and only sleeps in select(). It still counts as a Python thread (as
    # for CPython's fork warning): a pool made by a task uses forkserver.
    global watchdog_started
    watchdog_started = True
    _thread.start_new_thread(watch, ())


def _run_initializer(conn: Connection, init_bytes: bytes, initargs: tuple[Any, ...]) -> bool:
    name = "<unpicklable initializer>"
    try:
        initializer = pickle.loads(init_bytes)
        name = getattr(initializer, "__qualname__", repr(initializer))
        initializer(*initargs)
    except BaseException as exc:
        error = P.portable_error(exc, f"initializer {name}")
        conn.send_bytes(P.dumps((P.INIT_FAILED, name, error)))
        return False
    return True


def _serve(
    conn: Connection,
    slot: Any,
    max_rss: int | None,
    segments: shm.Namer | shm.Recycler | None,
    take_offer: Callable[[], int | None],
) -> None:
    fns = _Callables()
    recycler = segments if isinstance(segments, shm.Recycler) else None
    spinner = _Spinner(conn)
    linger = False  # the last batch was a lone call whose caller waits (see P.BATCH)
    quick = False  # the last wait ended within SPIN_S
    owned: set[int] = set()  # offered batches whose token came early (see _slot.py)
    while True:
        try:
            waiting = time.perf_counter()
            if linger and quick and spinner.spin():
                shm.expire_kept(recycler)  # as a wait would have, kept ones still expire
            else:
                _expire_while_idle(conn, recycler)
            # A wait longer than a spin turns spinning off until one is not:
            # the caller is slow to call again (or this process to see it).
            quick = time.perf_counter() - waiting < SPIN_S
            msg = P.recv(conn)
        except (EOFError, OSError):
            return  # the parent closed the pipe: nothing more will come
        tag = msg[0]
        linger = False
        if tag == P.OFFER:
            if msg[1] in owned:
                owned.discard(msg[1])
            else:
                token = take_offer()
                if token != msg[1]:
                    # Taken back for a worker that ran out of work: it runs there.
                    # A later batch's token, found instead, makes that one ours.
                    if token is not None:
                        owned.add(token)
                    continue
            tag = P.BATCH
        if tag == P.BATCH:
            linger = msg[7]
            started = time.perf_counter()
            reply, running, mapping = _run_batch(msg, fns, slot, segments, conn)
            # The batch's arguments are gone with _run_batch's frame, unless a
            # task kept one: then the parent must not write their segment again.
            let_go = shm.let_go(mapping)
            del mapping
            transfer = time.perf_counter() - started - running
            recycle = max_rss is not None and over_memory(max_rss)
            _send_results(
                conn, (P.RESULTS, msg[1], running, transfer, recycle, let_go, reply), segments
            )
        elif tag == P.FN:
            fns.add(msg[1], msg[2])
        elif tag == P.FREED:
            if isinstance(segments, shm.Recycler):
                for segment in msg[1]:
                    segments.give_back(segment)
        elif tag == P.STOP:
            return


def _run_batch(
    msg: tuple[Any, ...],
    fns: _Callables,
    slot: Any,
    segments: shm.Namer | shm.Recycler | None,
    conn: Connection,
) -> tuple[shm.Packed, float, Any]:
    """Run one batch; return its reply payload, the seconds spent in the tasks,
    and what its arguments' large buffers were read from (see shm.let_go).

    Large results go ahead in pieces while the batch runs (see _Stream); the
    payload then holds the results of the tasks after the last piece.
    """
    _, batch_id, fn_id, star, timed, first_index, seed, _, payload = msg
    slot[P.SLOT_ITEM] = P.ITEM_UNPICKLING
    slot[P.SLOT_SPAN] = 1
    slot[P.SLOT_STARTED] = time.monotonic()
    slot[P.SLOT_BATCH] = batch_id
    try:
        fn = _callable(fns, fn_id)
    except BaseException as exc:
        err = SerializationError(f"cannot unpickle the callable in the worker: {exc!r}")
        err.__cause__ = exc
        return P.dumps((None, P.portable_error(err, "unpickling the callable"))), 0.0, None
    calls = star == P.CALLS  # single calls sent as one batch: run as each alone would
    joined = star & P.JOINED  # a map's chunks sent as one batch: each as it would run alone
    try:
        items, mapping = shm.unpack_arguments(payload)
        if calls:  # each call's own pickle, as it was submitted
            items = [pickle.loads(call)[0] for call in items]
    except BaseException as exc:
        err = SerializationError(f"cannot unpickle the task's arguments in the worker: {exc!r}")
        err.__cause__ = exc
        return P.dumps((None, P.portable_error(err, "unpickling the arguments"))), 0.0, None
    # Joined: the chunks' (tasks, pickle) pairs, each unpickled as its turn comes.
    tasks = sum(n for n, _ in items) if joined else len(items)
    stream = (
        _Stream(conn, slot, batch_id, segments, first_index, tasks, calls, bool(joined))
        if tasks > 1
        else None
    )
    if calls:
        star = P.CALL_ARGS_KWARGS
    elif joined:
        star ^= P.JOINED
    started = time.perf_counter()
    if joined:
        try:
            values, errors = _call_joined(fn, star, first_index, items, slot, stream)
        except _ChunkUnpickleError as exc:
            cause = exc.__cause__
            err = SerializationError(
                f"cannot unpickle the task's arguments in the worker: {cause!r}"
            )
            err.__cause__ = cause
            error = P.portable_error(err, "unpickling the arguments")
            return P.dumps((None, error)), time.perf_counter() - started, mapping
    else:
        values, errors = _call_all(fn, star, timed, first_index, seed, items, slot, stream)
    running = time.perf_counter() - started
    slot[P.SLOT_SPAN] = 1
    slot[P.SLOT_ITEM] = tasks  # from here on, a crash is in sending the results
    sent = 0
    if stream is not None and stream.sent:
        sent = stream.sent
        values, errors = values[sent:], _shift(errors, sent, len(values))
    try:
        return shm.pack((values, errors), segments), running, mapping
    except BaseException:
        return _dumps_item_by_item(values, errors, first_index + sent), running, mapping


class _Stream:
    """Sends a batch's first results ahead (P.PARTIAL) once they add up to P.PIECE_BYTES,
    and, for single calls sent as one batch (P.CALLS), once P.CALLS_PIECE_S has passed;
    for a map's chunks sent as one (P.JOINED), each chunk's as its last task ends.

    Sizes are estimates (see _result_size). Without this, 25 results of 1 MB
    wait for each other and travel as one 25 MB message; the parent delivers
    each piece as it comes, so an ordered ``imap`` yields while the batch runs.
    Calls sent together are not one job to their callers: each result should
    not wait long for the others. The last task's results always go with the
    final reply, so a batch never sends a piece more than it must.
    """

    __slots__ = (
        "batch_id",
        "by_time",
        "conn",
        "due",
        "each",
        "first_index",
        "n",
        "segments",
        "sent",
        "size",
        "slot",
    )

    def __init__(
        self,
        conn: Connection,
        slot: Any,
        batch_id: int,
        segments: shm.Namer | shm.Recycler | None,
        first_index: int,
        n: int,
        calls: bool = False,
        each: bool = False,
    ) -> None:
        self.conn = conn
        self.slot = slot
        self.batch_id = batch_id
        self.segments = segments
        self.first_index = first_index
        self.n = n
        self.sent = 0  # results sent ahead: those of tasks 0 .. sent-1
        self.size = 0  # bytes of the results run since then
        # Single calls sent as one batch: their results also go ahead by time.
        self.by_time = calls
        self.due = time.monotonic() + P.CALLS_PIECE_S if calls else 0.0
        # A map's chunks sent as one batch (P.JOINED): each chunk's results go
        # alone, at its last task (add()'s boundary, see _call_joined).
        self.each = each

    def add(
        self,
        nbytes: int,
        values: list[Any],
        errors: dict[int, BaseException] | None,
        upto: int,
        boundary: bool = False,
    ) -> None:
        """Count ``nbytes`` more of results, which now cover tasks ``0 .. upto-1``;
        ``boundary``: task ``upto - 1`` ended a chunk (see ``each``)."""
        self.size += nbytes
        if upto >= self.n:
            return
        if (
            self.size < P.PIECE_BYTES
            and not (self.each and boundary)
            and not (self.by_time and time.monotonic() >= self.due)
        ):
            return
        sent, slot = self.sent, self.slot
        # The span first: a dispatcher that sees the item moved on then sees the
        # sending too (it reads the span after the item, see _enforce_timeouts).
        slot[P.SLOT_SPAN] = P.SPAN_SENDING
        slot[P.SLOT_ITEM] = upto  # a death now is in sending; tasks from upto on have not run
        piece, piece_errors = values[sent:upto], _shift(errors, sent, upto)
        try:
            payload = shm.pack((piece, piece_errors), self.segments)
        except BaseException:
            payload = _dumps_item_by_item(piece, piece_errors, self.first_index + sent)
        _send_results(self.conn, (P.PARTIAL, self.batch_id, upto - sent, payload), self.segments)
        values[sent:upto] = [None] * (upto - sent)  # sent: free them, keep the indexes
        self.sent, self.size = upto, 0
        # The clock first: the item is the next task's already, and a timed task's
        # start, taken before the sending, would make the sending count against it
        # (a task killed for a timeout it did not reach, seen under load).
        slot[P.SLOT_STARTED] = now = time.monotonic()
        slot[P.SLOT_SPAN] = 1  # the fast path sets its own before each span
        if self.by_time:
            self.due = now + P.CALLS_PIECE_S


def _result_size(value: Any) -> int:
    """About how many bytes ``value`` pickles to, cheaply: ``sys.getsizeof`` (whole
    for bytes, str and NumPy arrays), plus that of the first few members of a
    tuple, list or dict (a result is often a tuple around a large object)."""
    size: int = getsizeof(value, 0)
    kind = type(value)
    if kind is tuple or kind is list:
        for member in value[:_MEMBERS_SIZED]:
            size += getsizeof(member, 0)
    elif kind is dict:
        for member in islice(value.values(), _MEMBERS_SIZED):
            size += getsizeof(member, 0)
    return size


_MEMBERS_SIZED = 4


def _shift(
    errors: dict[int, BaseException] | None, start: int, stop: int
) -> dict[int, BaseException] | None:
    """The errors of tasks ``start .. stop-1``, indexed from ``start``."""
    if not errors:
        return None
    return {i - start: e for i, e in errors.items() if start <= i < stop} or None


class _Callables:
    """The callables this worker was sent (by id), pickled until first used."""

    __slots__ = ("by_id", "ledger")

    def __init__(self) -> None:
        self.by_id: dict[int, Any] = {}
        self.ledger: OrderedDict[int, int] = OrderedDict()  # see P.admit_callable

    def add(self, fn_id: int, data: bytes) -> None:
        # Unpickled at first use, so that a failure is blamed on a batch.
        self.by_id[fn_id] = data
        for gone in P.admit_callable(self.ledger, fn_id, len(data)):
            del self.by_id[gone]


# Callables arrive as plain pickle (what cloudpickle writes is plain pickle too,
# and only what a worker cannot find by name goes as its copy: _batch._ByName): a
# function or class sent by name loads without importing cloudpickle at all,
# which keeps it out of every worker's (and the fork server's) start-up; so does
# one of __main__ the worker has itself (see _script).
def _callable(fns: _Callables, fn_id: int) -> Any:
    fn = fns.by_id[fn_id]
    if isinstance(fn, bytes):
        fn = fns.by_id[fn_id] = pickle.loads(fn)
    fns.ledger.move_to_end(fn_id)
    return fn


def _call_all(
    fn: Any,
    star: int,
    timed: bool,
    first_index: int,
    seed: tuple[int, int] | None,
    items: list[Any],
    slot: Any,
    stream: _Stream | None = None,
) -> tuple[list[Any], dict[int, BaseException] | None]:
    fast = star != P.CALL_ARGS_KWARGS and not (timed or seed is not None or _TAG is not None)
    if fast and len(items) >= P.FAST_MIN_ITEMS:
        return _call_fast(fn, star, first_index, items, slot, stream)
    values: list[Any] = []
    append = values.append
    errors: dict[int, BaseException] | None = None
    for i, item in enumerate(items):
        if timed:
            # The clock before the item: a dispatcher that reads the new item must
            # not time it from the previous task's start (see _enforce_timeouts).
            slot[P.SLOT_STARTED] = time.monotonic()
        slot[P.SLOT_ITEM] = i
        if seed is not None:
            seed_task(seed[0], seed[1] + i)
        if _TAG is not None:
            _tag_output(_TAG, first_index, i)
        try:
            if star == P.CALL_ONE:
                append(fn(item))
            elif star == P.CALL_STAR:
                append(fn(*item))
            else:
                append(fn(*item[0], **item[1]))
        except BaseException as exc:
            append(None)
            if errors is None:
                errors = {}
            errors[i] = P.portable_error(exc, _task_name(first_index, i))
        if stream is not None:
            stream.add(_result_size(values[i]), values, errors, i + 1)
    return values, errors


def _call_joined(
    fn: Any,
    star: int,
    first_index: int,
    chunks: list[tuple[int, bytes]],
    slot: Any,
    stream: _Stream | None,
) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Run a map's chunks sent as one batch (P.JOINED), each as it would run alone.

    A chunk's pickle is unpickled just before its first task. One that fails
    to ends the batch there (_ChunkUnpickleError), and the reply says so as for
    a batch that would not unpickle (the chunks before it were answered): the
    pool tries that chunk's tasks one by one, and sends the chunks after it
    again (Dispatcher._on_unpickle_failure). A crash while unpickling it is a
    crash in one of its tasks (the slot's span covers the chunk meanwhile).
    Each chunk's results go back as its last task ends (``stream``, made with
    ``each``), so a later crash loses none of them. A chunk of FAST_MIN_ITEMS
    tasks or more runs as a batch of them alone would (_fast_into): a crash
    in it fails the span of up to FAST_SPAN tasks it happened in. No timeouts,
    retries or seeds here: such chunks are never joined (Dispatcher._merge).
    """
    values: list[Any] = []
    append = values.append
    errors: dict[int, BaseException] | None = None
    i = 0
    for n, pickled in chunks:
        slot[P.SLOT_ITEM] = i
        slot[P.SLOT_SPAN] = n
        try:
            items = pickle.loads(pickled)
        except BaseException as exc:
            raise _ChunkUnpickleError() from exc
        slot[P.SLOT_SPAN] = 1
        end = i + n
        if n >= P.FAST_MIN_ITEMS and _TAG is None:
            # A chunk of many tasks at C speed, as a batch of them alone would
            # run (_call_fast): a crash then fails the span it happened in.
            errors = _fast_into(fn, star, first_index, items, slot, values, errors, stream)
            i = end
            if stream is not None:
                stream.add(0, values, errors, i, True)
            continue
        for item in items:
            slot[P.SLOT_ITEM] = i
            if _TAG is not None:
                _tag_output(_TAG, first_index, i)
            try:
                value = fn(item) if star == P.CALL_ONE else fn(*item)
            except BaseException as exc:
                value = None
                if errors is None:
                    errors = {}
                errors[i] = P.portable_error(exc, _task_name(first_index, i))
            append(value)
            i += 1
            if stream is not None:
                stream.add(_result_size(value), values, errors, i, i == end)
    return values, errors


class _ChunkUnpickleError(Exception):
    """A joined chunk's arguments would not unpickle (see _call_joined); the
    unpickling error is its ``__cause__``."""


def _call_fast(
    fn: Any, star: int, first_index: int, items: list[Any], slot: Any, stream: _Stream | None
) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Many tiny tasks: ``map`` at C speed, publishing progress every FAST_SPAN items.

    A per-item loop with a slot write and a ``try`` costs about as much as a
    task like ``x * x`` itself; this runs near a list comprehension's speed.
    """
    values: list[Any] = []
    return values, _fast_into(fn, star, first_index, items, slot, values, None, stream)


def _fast_into(
    fn: Any,
    star: int,
    first_index: int,
    items: list[Any],
    slot: Any,
    values: list[Any],
    errors: dict[int, BaseException] | None,
    stream: _Stream | None,
) -> dict[int, BaseException] | None:
    """Run ``items`` as the tasks from ``len(values)`` on, appending their
    results to ``values``, FAST_SPAN at a time; returns ``errors`` with theirs.

    ``list.extend`` keeps what ``map`` produced before an exception, so the
    failing item is ``len(values)`` and the rest of its span carries on.
    """
    extend = values.extend
    apply = starmap if star == P.CALL_STAR else map
    base = len(values)
    n = len(items)
    start = 0
    while start < n:
        end = min(start + P.FAST_SPAN, n)
        slot[P.SLOT_SPAN] = end - start
        slot[P.SLOT_ITEM] = base + start
        try:
            extend(apply(fn, items[start:end]))
            if len(values) < base + end:  # map() took a task's StopIteration for its end
                raise P.stop_iteration_lost()
        except BaseException as exc:
            failed = len(values)
            values.append(None)
            if errors is None:
                errors = {}
            errors[failed] = P.portable_error(exc, _task_name(first_index, failed))
            start = failed - base + 1
            continue
        if stream is not None:  # sized by the span's first result
            size = _result_size(values[base + start]) * (end - start)
            stream.add(size, values, errors, base + end)
        start = end
    return errors


def _dumps_item_by_item(
    values: list[Any], errors: dict[int, BaseException] | None, first_index: int
) -> bytes:
    errors = dict(errors or {})
    for i, value in enumerate(values):
        if i in errors:
            continue
        try:
            P.dumps(value)
        except BaseException as exc:
            from .._exceptions_stdlib import ResultSerializationError  # see its docstring

            err = ResultSerializationError(
                f"cannot pickle the result of {_task_name(first_index, i)} "
                f"(type {type(value).__module__}.{type(value).__qualname__}): "
                f"{type(exc).__name__}: {exc}",
                exc=exc,
                value=value,
            )
            errors[i] = P.portable_error(err, "pickling the result")
            values[i] = None
    return P.dumps((values, errors))


# "[worker 3 " when the pool tags output; each task completes it with its own index.
_TAG: str | None = None


def _tag_output(tag: str, first_index: int, i: int) -> None:
    task = "task]" if first_index < 0 else f"task {first_index + i}]"
    prefix = f"{tag}{task} "
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "prefix"):
            stream.prefix = prefix


def seed_task(seed: int, index: int) -> None:
    """Seed ``random`` (and NumPy's global generator, if loaded) for one task.

    The stream depends only on (seed, index), never on which worker runs the
    task or when, so results are the same for any number of workers.
    """
    import hashlib  # here, not at the top: every worker would pay for it at start-up

    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    random.seed(value)
    numpy = _numpy()
    if numpy is not None:
        numpy.random.seed(value % (2**32))


def _numpy() -> Any:
    """NumPy, imported once per worker if installed (a task may import it after seeding)."""
    global _NUMPY
    if _NUMPY is False:
        try:
            import numpy

            _NUMPY = numpy
        except ImportError:
            _NUMPY = None
    return _NUMPY


_NUMPY: Any = False


def _fresh_numpy_state() -> None:
    # A forked worker inherits NumPy's global generator state from its parent,
    # so every worker would draw the same numbers; `random` re-seeds itself at
    # fork, NumPy does not.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


def over_memory(limit: int) -> bool:
    """Whether this process holds more than ``limit`` bytes of its own memory.

    The resident set (a few microseconds to read) bounds the private memory
    from above; only above the limit is the private figure (a walk of every
    mapping, ~0.2 ms) worth reading.
    """
    return _rss() > limit and resident_bytes() > limit


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except OSError:
        return sys.maxsize


def resident_bytes() -> int:
    """The memory this process alone holds now: what its exit would free.

    Linux: its private pages (USS, from smaps_rollup), so that a forked worker
    is not charged for the pages it still shares with its parent or zygote;
    else its resident set (statm); elsewhere the peak resident set so far.
    """
    try:
        with open("/proc/self/smaps_rollup", "rb") as f:
            private = 0
            for line in f:
                if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    private += int(line.split()[1]) * 1024
            return private
    except OSError:
        pass
    rss = _rss()
    if rss != sys.maxsize:
        return rss
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _task_name(first_index: int, i: int) -> str:
    return "the task" if first_index < 0 else f"task {first_index + i}"
