r"""The dispatcher: one thread in the parent that moves batches to workers and back.

::

      caller threads                    dispatcher thread                  worker processes
      --------------                    -----------------                  ----------------
   map / submit / apply
        |  pickle args (once per batch)
        |  pickle fn (once per call)
        v
   +-----------+  deque.append    +-----------------------------+  FN, BATCH   +--------------+
   | Batch x n | ---------------> | pending --> pick a worker --|------------> | worker 0     |
   +-----------+  + wake-up byte  |   (idle first, then one     |  duplex pipe | unpickle,    |
                                  |    small prefetch each)     | <------------| run, pickle  |
        ^                         |                             |   RESULTS    +--------------+
        |  sink.deliver           | inflight[w]: what each      |              +--------------+
        +------------------------ | worker holds, in order      | -----------> | worker 1     |
          (AsyncResult, Future,   |                             | <----------- |              |
           imap iterator)         | one selector: every pipe,   |              +--------------+
                                  | every worker's sentinel,    |   shared slot per worker:
                                  | the wake-up pipe; deadlines | <- - - - -   batch, item, start
                                  | for task timeouts           |   (read on death / timeout)
                                  +-----------------------------+

Actors.

*Callers* (any thread) turn their input into batches: the arguments of
consecutive tasks pickled as one payload, plus a reference to the callable,
which was pickled once (by name, or by value with cloudpickle). They append to
``pending`` and write a byte to the wake-up pipe (only when the dispatcher may
be asleep). No lock is taken per task, and no feeder thread stands between
callers and pipes.

*The dispatcher thread* owns every worker and every pipe; nothing else touches
them, but for the direct path below, under the engine lock, which the
dispatcher holds whenever it is not asleep in select(). It waits on all
pipes, all worker sentinels and the wake-up pipe at once with one persistent
selector. It sends a batch to an idle worker first; while
every worker is busy, it keeps one more small batch (the *prefetch*) queued in
each worker's pipe so no worker waits for its next batch; for single calls
(apply_async, submit) that a worker has shown it answers quickly, up to BURST,
sent as one batch (``_merge``). A batch larger than
the prefetch limit is sent only to an idle worker: a worker blocked writing a
large result and a dispatcher blocked writing a large batch to it would
otherwise deadlock, and this rule is what makes plain blocking sends safe.
Nor does a large batch go to a worker that has not reported ready: a worker
stuck at start-up would never read it.

Nothing waits forever. A worker that has not finished starting up after
START_TIMEOUT (a fork child stuck on a lock held at fork time) is killed and
counts as a start-up death. If the dispatcher is itself stuck writing to a
worker that stopped reading (SIGSTOP), ``terminate()`` kills the workers from
the caller's thread after STUCK_DISPATCHER_S, which unblocks it.

It knows, at every moment, which batches each worker holds (``inflight``, in
the order sent; a worker runs them in that order). When a worker dies, its
shared slot says which batch and which item were running: that item fails with
WorkerCrashedError naming the exit code or signal; items of the batch that had
already run (their results died with the worker) fail too; everything that
had not started goes back to the front of ``pending``. The worker is replaced.

*The direct path* (``_direct.py``, mixed into the Dispatcher) spares a lone
call on an idle pool two thread wake-ups. The caller's thread sends the batch
to an idle worker itself, and the thread that then waits for the result
borrows that worker's pipe: it leaves the dispatcher's selector, the waiting
thread reads and handles the reply, and gives it back. A worker that dies
meanwhile is settled by the dispatcher, as any other, once the pipe is back.

*Workers* (``_worker.py``) run batches and answer each with one message.

*Sinks* (``_batch.Sink``) receive outcomes on the dispatcher thread: the API
layer's AsyncResult, Future and imap iterators.
"""

from __future__ import annotations

import itertools
import multiprocessing.context
import os
import selectors
import signal
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping

# WorkerCrashedError and InitializerError are imported where they are raised:
# their module loads concurrent.futures (see _exceptions_stdlib).
from .._exceptions import (
    PoolClosedError,
    ProcpoolError,
    SerializationError,
    TaskTimeoutError,
    describe_exitcode,
)
from . import _protocol as P
from . import _shm as shm
from . import run_worker, usable_cpus
from ._batch import Batch, Calls, Joined, dumps_callable, main_functions
from ._direct import DirectPath
from ._slot import Slot
from ._startmethod import starting_a_process
from ._wakeups import begin_turn, end_turn
from ._workers import Worker, WorkerRecord, fold, kill, record, worker_statistics

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

    from .._statistics import PoolStatistics

__all__ = ["Dispatcher", "PoolClosedError"]  # the latter re-exported from _exceptions

# Largest batch that may wait in a busy worker's pipe: well under the kernel's
# socket buffer (~200 KiB on Linux), so sending it can never block.
PREFETCH_BYTES = 64 * 1024
# Batches per worker: one running, one waiting in the pipe...
WINDOW = 2
# ...or up to this many single calls (apply_async, submit), sent as one batch, to
# a worker that has shown it runs them quickly: see Dispatcher._burst_limit, _merge.
BURST = 16
# A batch waits in a busy worker's pipe only behind work measured to take at
# most this long (see Dispatcher._prefetch_pays).
PREFETCH_AHEAD_S = 0.005
# A single call that ran and travelled within this long counts as short: a burst
# of them holds at most PREFETCH_AHEAD_S of work (see Dispatcher._burst_limit).
SHORT_CALL_S = PREFETCH_AHEAD_S / BURST
# Functions whose seconds per task are remembered for that (the most recent).
MEASURED_FNS = 256
# Start methods whose pools start their first worker alone, and how long the others
# wait at most for it to be ready (see Dispatcher._end_stagger). Not forkserver: its
# workers are forks of one server, and started together they came out level.
STAGGERED_METHODS = ("spawn",)
STAGGER_S = 0.2
# Messages read from one worker's pipe in a turn of the loop, while more are
# there (see _on_message).
DRAIN_MESSAGES = 16
# Workers that die before they are ready, in a row, before we stop replacing them.
MAX_STARTUP_DEATHS = 3
# Exited workers listed one by one in statistics(); older ones are summed.
GONE_KEPT = 256
# How long terminate() lets workers exit on SIGTERM before SIGKILL.
TERMINATE_GRACE = 0.5
# How long a closed pool lets a worker exit after its last task before SIGKILL
# (a worker blocked in its exit: a Queue it filled that nobody reads, a thread).
CLOSE_GRACE_S = 5.0
# How long terminate() waits for the dispatcher thread before it kills the
# workers itself (which unblocks a dispatcher stuck writing to a worker that
# stopped reading: SIGSTOP, a deadlocked fork child).
STUCK_DISPATCHER_S = 5.0
# A worker must finish starting up (interpreter, imports; not the initializer,
# which may take as long as it likes) within this long, or it is killed and
# counts as a death at start-up. The usual culprit is fork: a child forked
# while another thread of the parent held a lock waits for it forever.
START_TIMEOUT = 60.0
# A pool that starts workers on demand (see Dispatcher._grow) starts one more
# when the waiting work would keep its workers busy this long: about what a
# worker's start and stop cost. Evidence is a batch that has run this long, or
# the work queued, at the seconds per item measured so far...
GROW_AFTER_S = 0.002
# A batch that has run GROW_ALL_AFTER_S, or a worker GROW_AFTER_START_S in its
# initializer, warrants a worker for every waiting batch at once; the other
# evidence one more worker at a time (a worker stalled for 2 ms by a busy
# machine must not start them all).
GROW_AFTER_START_S = 0.010
GROW_ALL_AFTER_S = 0.020


_pool_ids = itertools.count()


def _nothing() -> None:
    return None


def _blocked(pid: int) -> bool:
    """Whether process ``pid`` is asleep (a task waiting on I/O, a lock, a timer),
    not running or waiting for a core; False where Linux's /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat.rfind(b")") + 2  # after "(name) ": the name may hold ")"
    return stat[state : state + 1] in (b"S", b"D")


def _weak(obj: object) -> Callable[[], object]:
    """A weak reference to ``obj``, or one to nothing if it takes none."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return _nothing


def _single_call(batch: Batch) -> bool:
    """Whether ``batch`` is one call (``apply_async``, ``submit``), not a map's chunk."""
    return not batch.named and len(batch.items) == 1


def _calls(batch: Batch) -> int:
    """How many of ``batch``'s tasks, or chunks, are answered one at a time: 1 for a
    single call or a map's chunk of one task (``chunksize=1``), n for n calls or
    chunks sent as one (Calls, Joined), or 0 for a map's chunk of several."""
    if type(batch) is not Batch:
        return batch.units()
    return 1 if len(batch.items) == 1 else 0


def _mergeable(batch: Batch) -> bool:
    """Whether ``batch`` is a single call that may go with others (see _merge)."""
    return _single_call(batch) and not batch.alone and _plain(batch)


def _joinable(batch: Batch) -> bool:
    """Whether ``batch`` is a map's chunk that may go with the chunks after it
    (see _merge)."""
    return batch.named and _plain(batch)


def _plain(batch: Batch) -> bool:
    """Whether ``batch`` may share a batch with others: no bookkeeping of its own
    (a task timeout, retries, a seed), nor arguments in shared memory."""
    policy = batch.policy
    return (
        type(batch) is Batch
        and type(batch.payload) is bytes
        and policy.timeout is None
        and policy.seed is None
        and not policy.retries
    )


class Dispatcher(DirectPath):
    """Runs batches on a set of worker processes; see the module docstring.

    Thread-safe: ``submit``, ``close``, ``terminate`` and ``join`` may be called
    from any thread. Sinks are called on the dispatcher thread.
    """

    def __init__(
        self,
        ctx: multiprocessing.context.BaseContext,
        workers: int,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        line_stdio: bool = True,
        tag_output: bool = False,
    ) -> None:
        self._ctx = ctx
        self._size = workers
        self._max_tasks = max_tasks_per_worker
        # Shared-memory segments made by this pool's workers carry this prefix.
        self._shm_prefix = f"procpool-{os.getpid()}-w{next(_pool_ids)}"
        self._worker_options = {
            "stdio": line_stdio,
            "tag_output": tag_output,
            "max_rss": max_memory_per_worker,
        }
        self.recycled = 0
        self.timeouts = 0
        self.retried = 0
        self.tasks_completed = 0
        self.tasks_failed = 0
        self._gone: list[WorkerRecord] = []  # workers that have exited (the last few)
        self._gone_folded: WorkerRecord | None = None  # and all the others, summed
        # Functions of __main__ the workers already have go by name: under a
        # zygote, forked now, and under fork, each worker forked from this
        # process. Sent by value instead, a function of the script would cost
        # this process and each worker the import of cloudpickle (~13 ms, on
        # the way to a fork pool's first result). A worker forked later lacks
        # one only if it left __main__ while a map of it ran (a call made
        # after goes by value: dumps_callable looks again); it then fails that
        # map's tasks with a SerializationError.
        self.inherited_main = getattr(ctx, "main_functions", None)
        if self.inherited_main is None and ctx.get_start_method() == "fork":
            self.inherited_main = main_functions()
        # Under spawn and forkserver every worker runs the script again first.
        self.script_rerun = ctx.get_start_method() in ("spawn", "forkserver")
        # Under a zygote, workers start on demand (see _grow).
        self._on_demand = getattr(ctx, "zygote", None) is not None
        # Under spawn, the first starts alone (see _end_stagger).
        self._staggered = (
            workers > 1 and not self._on_demand and ctx.get_start_method() in STAGGERED_METHODS
        )
        self._item_s: float | None = None  # seconds per task, as measured so far
        self._cores = usable_cpus()  # see _shortfall
        self._measured = 0  # replies that have updated _item_s
        self._grown_at = -1  # _measured when a worker was last started on demand
        self._grown_to = 1  # the most workers work has called for (see _replenish)
        self._fn_item_s: dict[int, float] = {}  # the same, per callable (see _prefetch_pays)
        self._prefetch = True  # whether a busy worker may be sent a batch (see _may_prefetch)
        # The sink of the batch answered last (see _may_prefetch); weakly, since
        # it holds the results, and they may hold shared-memory segments.
        self._answered: Callable[[], object] = _nothing
        self._refilling: set[int] = set()  # workers that may take a burst (_send_pending)
        # What _send_pending sends, held back to be written per worker at once (_post).
        self._corked: dict[int, tuple[Worker, list[bytes]]] | None = None
        # Workers that were sent a batch ahead as an offer (see _offer_pays), maybe
        # not started yet.
        self._offered: set[int] = set()
        self._init_bytes = self._pickle_initializer(
            initializer, self.inherited_main, self.script_rerun
        )
        # initargs go to each worker as it starts, pickled by multiprocessing itself,
        # which allows what only process start-up may carry (a Queue, a Lock).
        self._initargs = tuple(initargs)
        self._pending: deque[Batch] = deque()
        self._workers: dict[int, Worker] = {}
        self._wids = itertools.count()
        self._sel = selectors.DefaultSelector()
        self._init_direct_path()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Whether submit() must write a byte to wake the dispatcher; both under
        # self._lock (see _run and _queue).
        self._asleep = False  # it may be in select(), with no byte on its way
        self._news = False  # batches came since it last looked at _pending
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._closing = False  # no new work; finish what is there, then stop workers
        self._terminating = False  # drop everything now
        self._broken: BaseException | None = None
        self._startup_deaths = 0
        self._lock = threading.Lock()  # orders submit() against the final shutdown
        self._stats_lock = threading.Lock()  # keeps statistics() snapshots whole
        self._stopped = False
        self._shm_used = False  # whether any worker made a shared-memory segment
        self._killed_at_close: list[tuple[int, int]] = []  # (id, pid): see join()
        self.crashes = 0
        self._thread = threading.Thread(target=self._run, name="procpool-dispatcher", daemon=True)
        try:
            for _ in range(1 if self._on_demand or self._staggered else workers):
                self._watch(self._spawn())
        except BaseException:
            # Out of processes or descriptors: leave nothing half-started behind.
            self._terminating = True
            self._stop_workers()
            raise
        self._thread.start()

    # ----------------------------------------------------------- caller side

    @property
    def size(self) -> int:
        return self._size

    def on_own_thread(self) -> bool:
        """Whether the caller is this pool's thread (a callback runs on it)."""
        return threading.get_ident() == self._thread.ident

    @property
    def broken(self) -> BaseException | None:
        """The error that stopped the pool from running tasks (a failed initializer), if any."""
        return self._broken

    @property
    def accepting(self) -> bool:
        return not (self._closing or self._terminating)

    def submit(self, batches: list[Batch]) -> None:
        """Queue batches to run. Raises PoolClosedError once close() or terminate() was called."""
        if len(batches) == 1 and self._send_direct(batches[0]):
            return
        with self._lock:
            if not self.accepting or self._stopped:
                raise PoolClosedError("Pool not running")
            if self._broken is None:
                self._queue(batches)
                return
        for batch in batches:
            batch.fail(0, len(batch.items), self._broken)

    def close(self) -> None:
        """Stop accepting work; the queued work still runs, then the workers exit."""
        self._closing = True
        self._wake()

    def terminate(self, wait: bool = True) -> None:
        """Stop now: kill the workers; queued and running tasks fail."""
        self._closing = self._terminating = True
        self._wake()
        if wait and not self.join(STUCK_DISPATCHER_S):
            self._kill_workers_from_outside()
            self.join(STUCK_DISPATCHER_S)

    def _kill_workers_from_outside(self) -> None:
        for worker in list(self._workers.values()):
            try:
                running = worker.process.exitcode is None  # not reaped: the pid is still its
            except ValueError:
                continue  # the dispatcher buried it meanwhile
            if running:
                kill(worker.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the dispatcher (and so every worker) to finish; True if it has."""
        if threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._reap_everything()
        self._warn_killed_at_close()
        return True

    def _warn_killed_at_close(self) -> None:
        """Say which workers a graceful close had to kill: what they held is lost."""
        with self._stats_lock:
            killed, self._killed_at_close = self._killed_at_close, []
        for wid, pid in killed:
            warnings.warn(
                f"procpool: worker {wid} (pid {pid}) did not exit within "
                f"{CLOSE_GRACE_S:g} s of its last task after close() and was killed; "
                "what it had not sent yet is lost, such as items it put on a "
                "multiprocessing Queue that nobody had read (read such a queue "
                "before joining the pool, as with the standard library's)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _queue(self, batches: list[Batch]) -> None:
        """Queue batches for the dispatcher, waking it only if it may be asleep.

        Called with self._lock held. A burst of calls costs one byte, not one
        each (a write that wakes a sleeping thread: ~5 us of every apply_async
        in a burst). Only the dispatcher sets _asleep, under the lock, after
        seeing no news; only a byte written, or the dispatcher awake, clears
        it. A signal handler that raises between the write and the clear costs
        one spare byte; one that raises before the write leaves _asleep set,
        so the next call writes: the dispatcher is never left asleep with
        nobody to wake it (see _wake for the bug a flag once caused).
        """
        self._pending.extend(batches)
        self._news = True
        if self._asleep:
            self._wake()
            self._asleep = False

    def _wake(self) -> None:
        # Always a byte. A "byte pending" flag that callers set before writing
        # once let a signal handler that raised (Ctrl-C) between the two leave it
        # set with no byte to read: no caller could wake the dispatcher again.
        # submit() skips the write only while the dispatcher itself says it is
        # awake (see _queue). A full pipe means it will wake anyway.
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def statistics(self) -> PoolStatistics:
        """A snapshot of task counts, faults, and how each worker spent its time."""
        from .._statistics import PoolStatistics

        now = time.monotonic()
        with self._stats_lock:
            live = [record(w, now, None) for w in self._workers.values()]
            folded = [] if self._gone_folded is None else [self._gone_folded]
            gone = folded + self._gone
        return PoolStatistics(
            workers=self._size,
            tasks_completed=self.tasks_completed,
            tasks_failed=self.tasks_failed,
            crashes=self.crashes,
            timeouts=self.timeouts,
            retries=self.retried,
            recycled=self.recycled,
            per_worker=(
                *(worker_statistics(one, alive=False) for one in gone),
                *(worker_statistics(one, alive=True) for one in live),
            ),
        )

    def _remember(self, gone: WorkerRecord) -> None:
        # A long-lived pool that recycles workers must not grow without bound:
        # beyond the last GONE_KEPT exited workers, figures fold into one entry.
        self._gone.append(gone)
        if len(self._gone) > GONE_KEPT:
            oldest = self._gone.pop(0)
            folded = self._gone_folded
            self._gone_folded = fold(oldest) if folded is None else fold(folded, oldest)

    # ------------------------------------------------------ dispatcher loop

    def _run(self) -> None:
        engine = self._engine_lock
        try:
            while True:
                with engine:
                    with self._lock:
                        self._news = False
                    self._schedule()
                    if self._finished():
                        break
                    timeout = self._poll_timeout()
                    lendings = self._lendings
                    with self._lock:
                        if self._news:
                            timeout = 0.0  # batches came while it scheduled: look again
                        else:
                            self._asleep = True  # the next submit() wakes it (_queue)
                events = self._sel.select(timeout)  # the only wait without the lock
                self._asleep = False
                with engine:
                    stale = self._lendings != lendings
                    begin_turn()  # consumers are woken once, at its end (_wakeups)
                    try:
                        for key, _ in events:
                            self._on_ready(key, stale)
                    finally:
                        end_turn()
                    self._enforce_timeouts()
                    if self._held:
                        self._release_held()
        except BaseException as exc:
            with engine:
                self._fail_everything(
                    ProcpoolError(f"procpool's dispatcher failed: {type(exc).__name__}: {exc}")
                )
            raise
        finally:
            with engine:
                with self._lock:
                    self._stopped = True
                self._fail_everything(PoolClosedError("the pool was shut down"))
                self._stop_workers()

    def _on_ready(self, key: selectors.SelectorKey, stale: bool) -> None:
        """Handle one event of a select(); ``stale``: a pipe was lent since it began."""
        if key.data is None:
            self._drain_wake()
            return
        kind, worker = key.data
        if worker.id not in self._workers:
            return  # a previous event in this round buried it
        if worker.lent:
            if kind == "exit":
                # The thread it is lent to sees the death as well, and gives it
                # back; until then, the sentinel must not wake us again and again.
                self._mute(worker.process.sentinel)
            return
        if kind == "conn":
            if stale and not worker.conn.poll():
                return  # the caller it was lent to read what had come
            if worker.direct_at and self._hold_for_waiter(worker):
                return
            self._on_message(worker)
        elif not self._on_demand or self._has_exited(worker):
            self._on_exit(worker)

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def _finished(self) -> bool:
        if self._terminating:
            self._fail_everything(PoolClosedError("the pool was terminated"))
            return True
        if not self._closing:
            return False
        return not self._pending and not any(w.inflight for w in self._workers.values())

    def _poll_timeout(self) -> float | None:
        # Wake up in time for the nearest task deadline; without timed tasks, sleep.
        now = time.monotonic()
        nearest: float | None = None
        for worker in self._workers.values():
            if not worker.inflight:
                continue
            head = worker.inflight[0]
            timeout = head.policy.timeout
            if timeout is None:
                continue
            batch_id, item, started = worker.read_slot()
            if batch_id == head.id and item >= 0 and not worker.sending_ahead():
                left = max(0.0, started + timeout - now) + 0.001
            else:
                left = 0.01  # not started yet, or sending results ahead: look again soon
            nearest = left if nearest is None else min(nearest, left)
        for worker in self._workers.values():
            if not worker.start_timed_out and not worker.alive():
                left = max(0.0, worker.started + START_TIMEOUT - now) + 0.01
                nearest = left if nearest is None else min(nearest, left)
        if self._staggered:
            for worker in self._workers.values():
                if not worker.ready:
                    left = max(0.0, worker.started + STAGGER_S - now) + 0.001
                    nearest = left if nearest is None else min(nearest, left)
        if self._on_demand and self._pending and len(self._workers) < self._size:
            # Work waits in a pool that may grow: look again soon (see _grow).
            nearest = GROW_AFTER_S / 2 if nearest is None else min(nearest, GROW_AFTER_S / 2)
        held = self._next_release(now)
        if held is not None:
            nearest = held if nearest is None else min(nearest, held)
        kept = shm.expire_kept(shm.current_recycler())
        if kept is not None:
            nearest = kept if nearest is None else min(nearest, kept)
        return nearest

    # ------------------------------------------------------------ sending

    def _schedule(self) -> None:
        if self._on_demand:
            self._prefetch = self._may_prefetch()
        self._send_pending()
        if self._staggered and self._end_stagger():
            self._send_pending()
        if self._pending and self._on_demand and self._grow():
            self._send_pending()  # a small batch may wait in the new worker's pipe
        if self._offered and not self._pending and self._take_back_offers():
            self._send_pending()

    def _send_pending(self) -> None:
        """Send what waits in ``pending`` to the workers that may take it now.

        What goes to one worker here goes in one write (see _post). A worker
        that holds fewer than WINDOW batches as this begins may take a burst
        of single calls (see _burst_limit).
        """
        pending = self._pending
        self._refilling = {w.id for w in self._workers.values() if len(w.inflight) < WINDOW}
        corked = self._corked
        outer = corked is not None
        if corked is None:
            corked = self._corked = {}
        try:
            while pending and not self._terminating:
                batch = pending[0]
                worker, offer = self._pick_worker(batch)
                if worker is None:
                    return
                pending.popleft()
                if batch.on_start is not None:
                    on_start, batch.on_start = batch.on_start, None  # once, even if re-queued
                    if not on_start():
                        batch.release()
                        continue  # cancelled before it started
                if worker.inflight and not offer and (_mergeable(batch) or _joinable(batch)):
                    batch = self._merge(worker, batch)
                self._send(worker, batch, offer=offer)
        finally:
            if not outer:
                self._corked = None
                for worker, _ in list(corked.values()):
                    self._uncork(worker, corked)

    def _merge(self, worker: Worker, batch: Batch) -> Batch:
        """``batch``, a single call for busy ``worker``, and the calls queued right
        after it that the worker may hold too (see _burst_limit), as one batch;
        or, ``batch`` a map's chunk, the chunks of the same map that follow it
        (Joined: each chunk is still answered on its own, as it ends).

        Sent one by one, each call of a burst costs this thread a message out,
        a message back and a turn of its loop: ~40 us a call on 2 cores, where
        a map's task costs well under 1. As one batch they cost what a chunk
        of a map does. The worker sends their results ahead between calls every
        P.CALLS_PIECE_S (see _worker._Stream): a call that turns out long holds
        the results of those just before it, as it holds those after it (the
        evidence rule bounds both, _burst_limit). Only plain calls of the same
        function and options, in the order they came; not timed, retried or
        seeded ones (their bookkeeping is per call), nor ones with arguments in
        shared memory.
        """
        room = self._burst_limit(worker, batch) - self._held_calls(worker) - 1
        if self._max_tasks:  # and no more than the worker may run before it retires
            room = min(room, self._max_tasks - worker.tasks_done - self._held_items(worker) - 1)
        pending = self._pending
        parts = [batch]
        joined = batch.named  # a map's chunks (Joined), else single calls
        # What the worker's pipe may hold at most: see _fits_pipe.
        size = batch.size + worker.inflight.nbytes
        if batch.fn.id not in worker.fns:
            size += len(batch.fn.data)
        while room > 0 and pending:
            nxt = pending[0]
            if not (nxt.fn is batch.fn and nxt.policy is batch.policy):
                break
            if joined:
                # The next task of the same map only: a Joined batch is a run of
                # the map's tasks, delivered to its sink by their place in it.
                last = parts[-1]
                if not (
                    _joinable(nxt)
                    and nxt.sink is batch.sink
                    and nxt.star == batch.star
                    and nxt.first_index == last.first_index + len(last.items)
                ):
                    break
            elif not _mergeable(nxt):
                break
            size += nxt.size  # and a few bytes of framing each, well within the margin
            if size > PREFETCH_BYTES:
                break
            pending.popleft()
            if nxt.on_start is not None:
                on_start, nxt.on_start = nxt.on_start, None
                if not on_start():
                    nxt.release()
                    continue
            parts.append(nxt)
            room -= 1
        if len(parts) == 1:
            return batch
        return Joined(parts) if joined else Calls(parts)

    @staticmethod
    def _held_calls(worker: Worker) -> int:
        return worker.inflight.calls

    def _pick_worker(self, batch: Batch) -> tuple[Worker | None, bool]:
        """The worker to send ``batch`` to now, if any: an idle one that is ready,
        else a busy one it may wait behind (see _ahead), or take as an offer
        (see _offer_pays: then True with it), else one still booting.

        A booting worker comes last, and gets nothing while a ready worker holds
        only work measured short (see _prefetch_pays): a batch in its pipe waits
        for its start (4-5 ms from a zygote on 2 cores), and the ready worker
        comes back for it sooner. The seed's 1,000 squares used to end on a
        worker started mid-map: 7-18 ms for the map where its first worker
        alone took 3-4.

        Nor does a booting worker get anything while another idle one boots
        too: the first started is not always the first ready (two spawned
        interpreters share 2 cores), and a batch in its pipe would wait for it
        while the other sat idle (in cold 2-worker pools here the second was
        first in 9 of 12 with forkserver, 4 with fork, 2 with spawn).
        The batch waits here instead, for whichever reports ready first, as it
        would in the standard library's shared queue. The same holds for the
        first worker of a staggered pool, which the others may overtake (see
        _end_stagger).
        """
        best: Worker | None = None
        booting: Worker | None = None
        idle_booting = 0
        for worker in self._workers.values():
            if worker.retiring or worker.timed_out:
                continue
            held = len(worker.inflight)
            if held == 0:
                if worker.ready:
                    return worker, False
                idle_booting += 1
                # Only a small batch: one too large for the pipe could block this
                # thread's write to a worker stuck in its start.
                if booting is None and self._fits_pipe(worker, batch):
                    booting = worker
                continue
            limit = self._burst_limit(worker, batch)
            if limit > WINDOW:
                held = self._held_calls(worker)
            if held < limit and (best is None or held < len(best.inflight)):
                best = worker
        if best is not None:
            if self._ahead(best, batch):
                return best, False
            for worker in self._workers.values():
                if self._offer_pays(worker, batch):
                    return worker, True
        if idle_booting > 1 or self._staggered:
            return None, False
        if booting is not None and any(
            w.ready and w.inflight and self._prefetch_pays(w) for w in self._workers.values()
        ):
            return None, False
        return booting, False

    def _ahead(self, worker: Worker, batch: Batch) -> bool:
        """Whether ``batch`` may wait in busy ``worker``'s pipe."""
        if not self._fits_pipe(worker, batch):
            return False  # only an idle, started worker may take a large batch
        if len(worker.inflight) >= WINDOW and not self._fits_pipe(worker, batch, with_held=True):
            return False
        if not self._prefetch_pays(worker):
            return False
        if not self._prefetch and any(b.sink is not self._answered() for b in worker.inflight):
            return False  # a pool that may grow: only on this map's own evidence
        return not self._max_tasks or worker.tasks_done + self._held_items(worker) < self._max_tasks

    def _offer_pays(self, worker: Worker, batch: Batch) -> bool:
        """Whether ``batch`` may wait in busy ``worker``'s pipe as an offer (P.OFFER),
        behind work that may be long, since it can be taken back (_take_back_offers).

        Each batch of work measured long, sent only as its worker replied, left
        the worker idle for the round trip through this thread: 0.5-0.7 ms here,
        where the thread wakes with cold caches (200 sleeps of 10 ms on 2
        workers: 1.040 -> 1.030 x the ideal time). An offer waits in the pipe
        instead, but unlike a prefetch behind short work (_prefetch_pays) it
        never keeps a task waiting behind a long one while another worker has
        nothing to do: that worker gets it back first. (Where the tasks keep
        every core busy, the worker that replies waits for this thread's core
        anyway: level there, see docs/performance-journal.md, "Offers".)

        Only a plain batch that another worker could take as it is: no task
        timeout (its clock is the slot's), no shared-memory segment sent with
        it, not a recycled worker's (max_tasks_per_child counts what it holds).
        And behind one batch: a worker holds at most WINDOW.
        """
        return (
            len(worker.inflight) == 1
            and type(batch) is Batch
            and type(batch.payload) is bytes
            and batch.policy.timeout is None
            and not self._max_tasks
            and self._prefetch
            and not (worker.lent or worker.direct_at or worker.retiring or worker.timed_out)
            and (not self._on_demand or self._active() >= self._size)
            and self._fits_pipe(worker, batch)
        )

    def _take_back_offers(self) -> bool:
        """Give idle workers the batches offered to busy ones and not started;
        whether any was taken back (then they wait first in ``pending``).

        A worker's slot holds a token per batch offered, in order (see _slot.py).
        The first one left is that of the next batch the worker would run; taking
        it means the worker never will. None left: it started them all.
        """
        idle = sum(
            1
            for w in self._workers.values()
            if not w.inflight and w.ready and not (w.retiring or w.timed_out or w.lent)
        )
        taken: list[Batch] = []
        for wid in list(self._offered):
            if not idle:
                break
            worker = self._workers.get(wid)
            token = None
            if worker is not None and any(b.offered for b in worker.inflight):
                token = worker.slot.take()
            if token is None:  # no token left: it started them all
                self._offered.discard(wid)
                continue
            assert worker is not None
            # Still held: the worker answers only what it ran, and it never will.
            batch = next(b for b in worker.inflight if b.id == token)
            worker.inflight.remove(batch)
            taken.append(batch)
            idle -= 1
        self._pending.extendleft(reversed(taken))
        return bool(taken)

    def _prefetch_pays(self, worker: Worker) -> bool:
        """Whether a batch may wait in ``worker``'s pipe behind the work it holds.

        A prefetched batch spares the worker one round trip to this thread
        between batches: tens of microseconds. It can cost the map up to all
        the work it waits behind, when another worker falls idle meanwhile (one
        long task among short ones, a slower core): there it would have run at
        once. So only behind work known to be short: the held batches'
        callables have been measured at most PREFETCH_AHEAD_S for as many
        tasks, and the task running now has not run longer than that.
        """
        ahead = 0.0
        for held in worker.inflight:
            per_item = self._fn_item_s.get(held.fn.id)
            if per_item is None:
                return False  # not measured yet: a first map balances first
            ahead += per_item * len(held.items)
        if ahead > PREFETCH_AHEAD_S:
            return False
        batch_id, item, started = worker.read_slot()
        running = batch_id == worker.inflight[0].id and item >= 0
        return not (running and time.monotonic() - started > PREFETCH_AHEAD_S)

    def seconds_per_task(self, fn_id: int) -> float | None:
        """A task's seconds, run and transfer, for the callable ``fn_id`` so far
        (see _measure: it leans towards the slower figures)."""
        return self._fn_item_s.get(fn_id)

    def _measure(self, batch: Batch, seconds: float) -> None:
        """Remember the seconds per task of ``batch``'s callable (for _prefetch_pays).

        The larger of this batch's figure and the mean of it with the last:
        a slow batch counts at once and a fast one halves the gap, so that
        a few short calls do not make a function's long tasks look short.
        """
        fns = self._fn_item_s
        per_item = seconds / len(batch.items)
        last = fns.pop(batch.fn.id, None)
        if last is not None:
            per_item = max(per_item, (last + per_item) / 2)
        fns[batch.fn.id] = per_item
        if len(fns) > MEASURED_FNS:
            del fns[next(iter(fns))]

    def _burst_limit(self, worker: Worker, batch: Batch) -> int:
        """How many batches ``worker`` may hold, ``batch`` included.

        WINDOW, but for single calls (``apply_async``, ``submit``: batches of one
        task, not a map's chunks) to a worker that held fewer than WINDOW as
        this round of sending began: one more for each reply in a row that came
        back short, up to BURST. Sent one per reply, such calls found the
        worker's pipe empty each time, and the worker slept and woke once per
        task (1.2-1.7 context switches a task on 2 cores, against 0.01 for the
        standard library's pool, whose task thread keeps the shared pipe full);
        in a burst it wakes once, and the burst goes as one batch (_merge), whose
        calls count one each here. Only on evidence, gathered afresh for each
        backlog (see _note_reply): calls queued behind one that turns out long
        wait for it, however short they were measured.

        A map's chunks that come back short get the same window: those of one
        task (``chunksize=1``, an ``imap`` that starts small), and those of
        several (an explicit small ``chunksize``: ten squares take a worker
        ~5 us, and two at a time it ran dry between every two). They go as one
        batch too (Joined), each chunk still unpickled, run and answered on
        its own, so a worker that dies in one loses no other's results
        (docs/faults.md). 2 workers on 2 cores: ``imap(f, xs, 1)`` of tiny
        tasks ~81 -> ~67 us a task; 20,000 squares with ``chunksize=1``,
        ``map`` 1.4 -> 0.7 s; 200,000 in chunks of 10, 1.75 -> 1.02 s.
        """
        if worker.id not in self._refilling:
            return WINDOW
        return min(BURST, WINDOW + worker.short_replies)

    def _note_reply(self, worker: Worker, batch: Batch, seconds: float) -> None:
        """Count ``worker``'s short replies in a row (see _burst_limit): a batch's is
        short if it took at most SHORT_CALL_S for each task that goes on its own
        (a single call, a one-task chunk), or in all (a chunk of several).

        The count starts again once the worker has run out of work with none
        waiting: the calls that come next may be another matter (a function
        that ran instantly in one loop, and takes its time in the next).
        """
        calls = _calls(batch) or 1
        short = seconds <= SHORT_CALL_S * calls
        if short and (worker.inflight or self._pending):
            worker.short_replies += calls
        else:
            worker.short_replies = 0

    @staticmethod
    def _fits_pipe(worker: Worker, batch: Batch, *, with_held: bool = False) -> bool:
        """Whether sending the batch (and its callable) to the worker can never block;
        ``with_held``: with every batch the worker holds still in its pipe too."""
        extra = 0 if batch.fn.id in worker.fns else len(batch.fn.data)
        if with_held:
            extra += worker.inflight.nbytes
        return batch.size + extra <= PREFETCH_BYTES

    @staticmethod
    def _held_items(worker: Worker) -> int:
        return worker.inflight.tasks

    def _send(
        self, worker: Worker, batch: Batch, linger: bool = False, *, offer: bool = False
    ) -> None:
        """Send ``batch`` to ``worker``; ``linger``: see P.BATCH (the direct path);
        ``offer``: as P.OFFER, to be run only if not taken back (_offer_pays)."""
        worker.inflight.append(batch)
        batch.offered = offer
        fn = batch.fn
        try:
            if worker.freed:
                freed = worker.freed
                self._post(worker, (P.FREED, [freed.popleft() for _ in range(len(freed))]))
            if fn.id in worker.fns:
                worker.fns.move_to_end(fn.id)
            else:
                self._post(worker, (P.FN, fn.id, fn.data))
                P.admit_callable(worker.fns, fn.id, len(fn.data))
            first = batch.first_index if batch.named else -1
            timed = batch.policy.timeout is not None
            seed = None if batch.policy.seed is None else (batch.policy.seed, batch.seed_base)
            if offer:
                worker.slot.offer(batch.id)  # first: the worker takes it as it reads the batch
                self._offered.add(worker.id)
            self._post(
                worker,
                (
                    P.OFFER if offer else P.BATCH,
                    batch.id,
                    fn.id,
                    batch.star,
                    timed,
                    first,
                    seed,
                    linger,
                    batch.payload,
                ),
            )
        except OSError:
            # The worker is gone; its sentinel will fire and this batch,
            # never started, goes back to the queue then.
            worker.retiring = True
        if self._max_tasks and worker.tasks_done + self._held_items(worker) >= self._max_tasks:
            worker.retiring = True

    def _post(self, worker: Worker, msg: tuple[Any, ...]) -> None:
        """Send ``msg`` to ``worker``; within _send_pending, with the others sent to it
        there, in one write (see _uncork)."""
        corked = self._corked
        if corked is not None:
            frame = P.framed(msg)
            if frame is not None:
                corked.setdefault(worker.id, (worker, []))[1].extend(frame)
                return
            self._uncork(worker, corked)  # what came before goes first
        P.send(worker.conn, msg)

    def _uncork(self, worker: Worker, corked: dict[int, tuple[Worker, list[bytes]]]) -> None:
        """Write what _post held back for ``worker``, all at once.

        A burst of one-task batches written one by one wakes the worker at
        the first, and each write after may find it asleep again; at once,
        it reads them all without sleeping.
        """
        entry = corked.pop(worker.id, None)
        if entry is None:
            return
        try:
            P.write(worker.conn, entry[1])
        except OSError:
            worker.retiring = True  # gone: its sentinel settles what it holds (_send)

    # ----------------------------------------------------------- receiving

    def _on_message(self, worker: Worker) -> None:
        """Read and handle ``worker``'s next message, and those queued behind it.

        A worker that holds several batches may have sent several replies by
        the time this thread reads the first: each reply went through a turn of
        the loop (a select(), the scheduling, the timers: most of what a
        one-task batch costs this thread), which is now paid once for up to
        DRAIN_MESSAGES. ``imap(f, xs, chunksize=1)`` of 20,000 squares: 2.2 s
        -> 1.7 s on 2 cores.
        """
        msg: tuple[Any, ...] | None
        handled = 0
        try:
            msg = P.recv(worker.conn)
        except (EOFError, OSError):
            msg = None
        while msg is not None:
            self._handle(worker, msg)
            handled += 1
            if handled == DRAIN_MESSAGES or not worker.inflight:
                return  # enough for one turn, or nothing more to come
            if worker.lent or worker.direct_at or worker.id not in self._workers:
                return  # left to _on_ready (_hold_for_waiter), or buried meanwhile
            try:
                msg = worker.waiter().recv_begun(worker.conn)
            except (EOFError, OSError):
                msg = None
            else:
                if msg is None:
                    return  # nothing more yet
        # The worker is exiting; its sentinel reports how. A call on the direct
        # path may have seen the end of file first and taken the pipe out of
        # select() as it gave it back (_take_back), after this select() had
        # returned it: then it is out already.
        try:
            self._sel.unregister(worker.conn)
        except (KeyError, ValueError):
            pass

    def _handle(self, worker: Worker, msg: tuple[Any, ...]) -> None:
        tag = msg[0]
        if tag == P.RESULTS:
            self._on_results(worker, msg)
        elif tag == P.PARTIAL:
            self._on_partial(worker, msg)
        elif tag == P.READY:
            worker.ready = True
            self._startup_deaths = 0
        elif tag == P.INIT_FAILED:
            self._on_init_failed(msg[1], msg[2])

    def _on_results(self, worker: Worker, msg: tuple[Any, ...]) -> None:
        _, batch_id, busy, transfer, recycle, let_go, payload = msg
        if self._broken is not None and (not worker.inflight or worker.inflight[0].id != batch_id):
            return  # the pool broke while this batch ran, and failed it then
        batch = worker.inflight.popleft()
        assert batch.id == batch_id, (batch.id, batch_id)
        if self._on_demand:  # only a pool that may grow needs it (_ahead)
            self._answered = _weak(batch.sink)
        worker.tasks_done += len(batch.items)
        self.tasks_completed += len(batch.items)
        worker.busy += busy
        worker.transfer += transfer
        # Seconds per task, for growing on-demand pools (see _shortfall): a faster
        # batch is believed at once, a slower one raises the estimate gradually.
        # One call's time (an apply, a first call) overstates a map's tasks by
        # 10-20x, and growth on an estimate should err towards fewer workers:
        # a batch that has run 2 ms starts more on its own evidence. So a
        # worker's first batch is believed only if faster: it pays the worker's
        # cold start (first call of the function, cold caches), 3-15x a square's
        # time here, and once raised the estimate enough to start a third
        # worker for 1,000 squares.
        per_item = busy / len(batch.items)
        self._measured += 1
        if self._item_s is None or per_item < self._item_s:
            self._item_s = per_item
        elif worker.tasks_done > len(batch.items):
            self._item_s = 0.7 * self._item_s + 0.3 * per_item
        self._measure(batch, busy + transfer)
        self._note_reply(worker, batch, busy + transfer)
        if recycle and not worker.retiring:
            # Over its memory limit: it finishes what it holds, then is replaced.
            worker.retiring = True
            self.recycled += 1
            self._replenish()
        if not worker.inflight and self._pending:
            # The worker waits: send its next batch before unpacking this one.
            self._send_pending()
        observe = getattr(batch.sink, "observe", None)
        if observe is not None:
            observe(len(batch.items), busy, batch.nbytes)
        batch.let_go = let_go
        batch.release()
        if let_go and threading.get_ident() != self._thread.ident:
            # On a caller's thread (the direct path): the dispatcher, maybe asleep
            # without a timeout, must time the expiry of the segment kept now.
            self._wake()
        self._unpack(worker, batch, payload, batch.done, len(batch.items))
        if worker.retiring and not worker.inflight:
            self._retire(worker)

    def _on_partial(self, worker: Worker, msg: tuple[Any, ...]) -> None:
        """The results of a running batch's next tasks, sent ahead of its reply."""
        _, batch_id, count, payload = msg
        if not worker.inflight or worker.inflight[0].id != batch_id:
            return  # the pool broke while this batch ran, and failed it then
        batch = worker.inflight[0]
        start = batch.done
        batch.done += count
        self._unpack(worker, batch, payload, start, start + count)

    def _unpack(self, worker: Worker, batch: Batch, payload: Any, start: int, stop: int) -> None:
        """Deliver the results of tasks ``start .. stop-1`` of ``batch`` from ``payload``."""
        try:
            values, errors = shm.unpack(payload, worker.freed.append)
        except BaseException as exc:
            first = batch.first_index + start
            which = (
                batch.task_name(start)
                if stop - start == 1
                else f"tasks {first}..{first + stop - start - 1}"
            )
            err = SerializationError(
                f"cannot unpickle the result of {which} in the parent: {type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            batch.fail(start, stop, err)
        else:
            if values is None:
                self._on_unpickle_failure(batch, errors, start)
            else:
                self._deliver(batch, values, errors, start)

    def _deliver(
        self,
        batch: Batch,
        values: list[Any],
        errors: dict[int, BaseException] | None,
        start: int = 0,
    ) -> None:
        """Deliver ``values`` (and ``errors``), the outcomes of tasks from ``start`` on."""
        first = batch.first_index + start
        retry = set()
        if errors:
            self.tasks_failed += len(errors)
        if errors and batch.policy.retries:
            retry = {i for i, e in errors.items() if batch.policy.should_retry(e, batch.attempts)}
        if not retry:
            batch.sink.deliver(first, values, errors)
            return
        assert errors is not None
        self.tasks_failed -= len(retry)
        self.retried += len(retry)
        for i in sorted(retry, reverse=True):
            self._pending.appendleft(
                batch.subset(start + i, start + i + 1, attempts=batch.attempts + 1)
            )
        for i, value in enumerate(values):  # the others, one by one around the gaps
            if i not in retry:
                error = {0: errors[i]} if i in errors else None
                batch.sink.deliver(first + i, [value], error)

    def _on_unpickle_failure(self, batch: Batch, error: BaseException, start: int = 0) -> None:
        """``batch``'s arguments would not unpickle in the worker, from task ``start``
        on (0, except for a Joined batch: its chunk at ``start`` would not, and the
        chunks before it were answered)."""
        if isinstance(batch, Joined):
            end = batch.chunk_end(start)
            if end < len(batch.items):
                self._pending.appendleft(batch.subset(end, len(batch.items)))  # never ran
            batch = batch.subset(start, end)  # the chunk itself
        if len(batch.items) > 1:
            # Nothing in it ran: try each item on its own, so only the bad one fails.
            for i in reversed(range(len(batch.items))):
                self._pending.appendleft(batch.subset(i, i + 1))
        else:
            batch.fail(0, 1, error)

    def _on_init_failed(self, name: str, error: BaseException) -> None:
        from .._exceptions_stdlib import InitializerError

        err = InitializerError(
            f"the pool's initializer {name!r} raised "
            f"{type(error).__name__}: {error}; no task can run"
        )
        err.__cause__ = error
        self._break(err)

    def _break(self, err: BaseException) -> None:
        if self._broken is None:
            self._broken = err
        self._fail_everything(self._broken)

    # ------------------------------------------------------- worker death

    def _on_exit(self, worker: Worker) -> None:
        self._drain_messages(worker)
        exitcode = self._bury(worker)
        if worker.slot[P.SLOT_SHM]:  # a listing of /dev/shm, only if it may help
            shm.remove_matching(f"{self._shm_prefix}.{worker.id}-")
        if worker.inflight:
            self.crashes += 1
            self._settle_inflight(worker, exitcode)
        elif not worker.retiring and not self._closing:
            self.crashes += 1
        if worker.alive() and not worker.ready and self._init_bytes is not None:
            # Started, then died before it was ready: in the initializer.
            if not worker.retiring:
                from .._exceptions_stdlib import InitializerError

                self._break(
                    InitializerError(
                        f"a worker died while running the pool's initializer: "
                        f"{describe_exitcode(exitcode)}; no task can run"
                    )
                )
        elif not worker.ready and not worker.retiring:
            self._startup_deaths += 1
            if self._startup_deaths >= MAX_STARTUP_DEATHS and self._broken is None:
                how = (
                    f"did not start within {START_TIMEOUT:g} s and were killed (a child "
                    "forked while another thread held a lock waits for it forever; "
                    "the forkserver start method avoids that)"
                    if worker.start_timed_out
                    else f"died while starting ({describe_exitcode(exitcode)})"
                )
                from .._exceptions_stdlib import WorkerCrashedError

                self._break(
                    WorkerCrashedError(
                        f"{self._startup_deaths} workers in a row {how}; giving up",
                        exitcode=exitcode,
                    )
                )
        self._replenish()

    def _drain_messages(self, worker: Worker) -> None:
        """Handle what a worker that exited sent and the pool had not read yet.

        Every kind of message, READY too: a worker that reported ready and then
        died in its first task, before the pool read that report, was taken for
        one that died in the initializer, and the whole pool broke with
        InitializerError (seen under random crashes in small chunks).
        """
        while True:
            try:
                if not worker.conn.poll():
                    return
                msg = P.recv(worker.conn)
            except (EOFError, OSError):
                return
            self._handle(worker, msg)

    def _bury(self, worker: Worker) -> int | None:
        """Forget a worker that has exited, reap it, and return its exit code."""
        for obj in (worker.conn, worker.process.sentinel):
            try:
                self._sel.unregister(obj)
            except (KeyError, ValueError):
                pass
        worker.process.join(1.0)
        worker.conn.close()
        if worker.pipe_wait is not None:
            worker.pipe_wait.close()
        exitcode: int | None = worker.process.exitcode
        gone = record(worker, time.monotonic(), exitcode)  # reads the pid: before close()
        if exitcode is not None:
            worker.process.close()
        self._shm_used = self._shm_used or bool(worker.slot[P.SLOT_SHM])
        worker.slot.close()
        self._offered.discard(worker.id)
        self._forget_direct(worker)
        with self._stats_lock:  # from live to gone in one step, for statistics()
            del self._workers[worker.id]
            self._remember(gone)
        return exitcode

    def _settle_inflight(self, worker: Worker, exitcode: int | None) -> None:
        """Fail what the dead worker was running; re-queue what it had not started."""
        head = worker.inflight.popleft()
        requeue = list(worker.inflight)
        slot_batch, item, _ = worker.read_slot()
        if slot_batch == head.id:
            self._settle_started(worker, head, item, exitcode, requeue)
        else:
            requeue.insert(0, head)
        self._pending.extendleft(reversed(requeue))
        worker.inflight.clear()

    def _settle_started(
        self, worker: Worker, head: Batch, item: int, exitcode: int | None, requeue: list[Batch]
    ) -> None:
        from .._exceptions_stdlib import WorkerCrashedError

        n = len(head.items)
        done = head.done  # tasks whose results came ahead (P.PARTIAL): settled already
        how = describe_exitcode(exitcode)
        who = f"worker {worker.id} (pid {worker.pid})"

        def crashed(message: Callable[[int], str], **extra: Any) -> Callable[[int], BaseException]:
            return lambda i: WorkerCrashedError(
                message(i),
                exitcode=exitcode,
                pid=worker.pid,
                task_index=head.first_index + i,
                **extra,
            )

        if 0 <= item < n and worker.sending_ahead():
            # Sending the results of tasks done .. item-1 ahead (P.PARTIAL): the
            # piece never arrived (or it did, and done == item). Later ones had
            # not started.
            self._fail_or_retry(
                head,
                done,
                item,
                crashed(
                    lambda i: f"{who} died while sending the results of {head.task_name(i)}: {how}"
                ),
            )
            requeue.insert(0, head.tail(item))
            return
        if item == P.ITEM_UNPICKLING or item >= n:
            stage = "unpickling the arguments of" if item < 0 else "sending the results of"
            self._fail_or_retry(
                head,
                done,  # 0 while unpickling: nothing can have been sent ahead
                n,
                crashed(lambda i: f"{who} died while {stage} {head.task_name(i)}: {how}"),
            )
            return
        span = min(worker.running_span(), n - item)
        end = item + span
        if worker.timed_out == (head.id, item):
            timeout = head.policy.timeout
            self._fail_or_retry(
                head,
                item,
                item + 1,
                lambda i: TaskTimeoutError(
                    f"{head.task_name(i)} ran longer than its task_timeout of {timeout} s; "
                    f"{who} was killed and replaced",
                    timeout=timeout,
                    task_index=head.first_index + i,
                ),
            )
        else:
            # In the fast path for tiny tasks the worker publishes progress every
            # FAST_SPAN items: the one that crashed is somewhere in that span.
            running = (
                head.task_name(item)
                if span == 1
                else f"one of tasks {head.first_index + item}..{head.first_index + end - 1}"
            )
            self._fail_or_retry(
                head, item, end, crashed(lambda i: f"{who} died running {running}: {how}")
            )
        # Calls sent together (Calls, the only unnamed batches of several) are
        # not one batch to whoever made them.
        other = f"{head.task_name(item)} of the same batch" if head.named else "a call sent with it"
        self._fail_or_retry(
            head,
            done,
            item,
            crashed(
                lambda i: (
                    f"{who} died ({how}) after running {head.task_name(i)} but before "
                    f"returning its result; {other} was running"
                ),
                ran_to_completion=True,
            ),
        )
        if end < n:
            requeue.insert(0, head.tail(end))

    def _fail_or_retry(
        self, batch: Batch, start: int, stop: int, make: Callable[[int], BaseException]
    ) -> None:
        for i in range(start, stop):
            exc = make(i)
            if isinstance(exc, TaskTimeoutError):
                self.timeouts += 1
            if batch.policy.should_retry(exc, batch.attempts):
                self.retried += 1
                self._pending.appendleft(batch.subset(i, i + 1, attempts=batch.attempts + 1))
            else:
                self.tasks_failed += 1
                batch.fail(i, i + 1, exc)

    # --------------------------------------------------------- timeouts

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for worker in self._workers.values():
            late = now - worker.started > START_TIMEOUT
            if late and not worker.start_timed_out and not worker.alive():
                worker.start_timed_out = True
                kill(worker.pid, signal.SIGKILL)
                continue
            if not worker.inflight or worker.timed_out:
                continue
            head = worker.inflight[0]
            timeout = head.policy.timeout
            if timeout is None:
                continue
            # The span before and after: a worker sending results ahead moves the
            # item on first, and restarts the clock before it stops (see _worker).
            if worker.sending_ahead():
                continue
            batch_id, item, started = worker.read_slot()
            running = 0 <= item < len(head.items) and not worker.sending_ahead()
            if batch_id == head.id and running and now - started > timeout:
                worker.timed_out = (head.id, item)
                kill(worker.pid, signal.SIGKILL)

    # ------------------------------------------------------ worker set

    def _spawn(self) -> Worker:
        """Start a worker; it is watched (and its pid known) after _watch()."""
        wid = next(self._wids)
        with starting_a_process():
            parent_end, child_end = self._ctx.Pipe(duplex=True)
            slot = Slot(P.SLOT_SIZE)
            process = self._ctx.Process(  # type: ignore[attr-defined]
                target=run_worker,
                args=(
                    child_end,
                    slot,
                    self._init_bytes,
                    {
                        **self._worker_options,
                        "initargs": self._initargs,
                        "shm_prefix": f"{self._shm_prefix}.{wid}",
                        "worker_id": wid,
                    },
                ),
                name=f"procpool-worker-{wid}",
            )
            try:
                process.start()
            except BaseException:
                # e.g. initargs that the start method cannot pickle: free what we made.
                parent_end.close()
                child_end.close()
                slot.close()
                raise
            child_end.close()
            slot.close_fd()  # the child has its own descriptor (or mapping) now
        worker = Worker(wid, process, parent_end, slot)
        with self._stats_lock:
            self._workers[wid] = worker
        return worker

    def _watch(self, worker: Worker) -> None:
        self._sel.register(worker.conn, selectors.EVENT_READ, ("conn", worker))
        self._sel.register(worker.process.sentinel, selectors.EVENT_READ, ("exit", worker))

    def _has_exited(self, worker: Worker) -> bool:
        """A zygote's worker's sentinel fired: for its pid, or for its exit; which?

        Its status pipe carries the pid first, then the exit code. The pid is
        read when it comes (here, or by any thread that asks first), not when
        the worker was asked for, so that a pool is made without waiting for a
        fork, and a map's first batches go out while the zygote forks.
        """
        if worker.pid:
            return worker.process.exitcode is not None
        try:
            worker.process.pid  # noqa: B018 - raises the OSError that says why
        except OSError as exc:
            self._cannot_start(exc)
        self._bury(worker)
        return False

    def _end_stagger(self) -> bool:
        """Start the rest of a spawn pool's workers, once its first is ready
        and idle, or when work waits, or when the first is slow to start;
        return whether it did.

        A spawned worker's start is a new interpreter's (~70-150 ms here), and
        two starting at once on 2 cores each take longer than one alone: a
        cold pool of 2 took 84.0 ms to its first result, a pool of 1 78.3 ms
        (medians of 40 alternating processes). Started alone, the first is
        ready sooner (75.2 ms);
        the others start as soon as it has answered and has nothing to do, so
        a pool made ahead of its work is whole soon after. More waiting
        batches than idle workers (a map's second batch, a call behind a busy
        one) start them at once, and so does a first worker still not ready
        after STAGGER_S (a script that imports for seconds, a slow
        initializer): the pool is then whole at most that much later than if
        all had started together.
        """
        workers = self._workers.values()
        idle = sum(1 for w in workers if not w.inflight and not w.retiring)
        ready_idle = any(w.ready and not w.inflight for w in workers)
        now = time.monotonic()
        slow = any(not w.ready and now - w.started > STAGGER_S for w in workers)
        if not (ready_idle or len(self._pending) > idle or slow):
            return False
        self._replenish()
        return True

    def _replenish(self) -> None:
        """Replace workers that retired or died: up to the pool's size, or, on
        demand, up to as many as work has called for (see _grow).

        An on-demand pool used to leave that to the next work that waited: a
        pool recycling its workers (max_memory_per_worker) then had no worker
        ready between calls, every call waited for a start, and the direct path
        (which takes only a ready worker) was never used.
        """
        self._staggered = False
        if self._terminating or self._broken is not None:
            return
        if self._closing and not self._pending:
            return  # closing with nothing queued: let the pool shrink to zero
        for _ in range((self._grown_to if self._on_demand else self._size) - self._active()):
            if not self._start_one():
                return

    def _active(self) -> int:
        """Workers started or starting that will take more work."""
        return sum(1 for w in self._workers.values() if not w.retiring)

    def _grow(self) -> bool:
        """Start more workers, on demand (zygote pools); return whether it did.

        Under a zygote, starting a worker costs the parent a message, and the
        zygote forks one worker at a time anyway. So a pool starts its first
        worker when it is made, and more, up to its size, as waiting work
        warrants (see _shortfall). The seed's 1,000 squares then run on one or
        two workers, without paying for (or stopping) three more; a map of long
        tasks asks for all its workers at once, and the zygote forks them back
        to back.
        """
        if self._terminating or self._broken is not None:
            return False
        active = self._active()
        if active >= self._size:
            return False
        more = min(self._size - active, self._shortfall(active))
        started = False
        for _ in range(more):
            if not self._start_one():
                break
            started = True
        if started:
            self._grown_at = self._measured
            self._grown_to = max(self._grown_to, self._active())
        return started

    def _may_prefetch(self) -> bool:
        """Whether a busy worker may get a batch to keep for later on any evidence
        (on-demand pools; else only on its map's own, see _pick_worker).

        Not while the pool may still grow, nor while a worker it has started is
        still booting. A batch queued behind a task that waits for it (a Barrier
        across tasks) would wait until that task gives up, where a worker
        started for it would have run it at once. That held even for tasks known
        to be short: a pool that had learnt so from one map broke the Barrier of
        the next (and did, 1 run in 10, when the last worker was started but not
        yet ready as the next map began). Meanwhile a batch may wait behind batches
        of the map whose batch came back last, measured short (_prefetch_pays):
        the map has shown that its tasks do not wait for each other. Without
        that, the seed's 1,000 squares ran their 20 chunks one round trip at a
        time on the pool's first worker (0.3 ms each on 2 cores, while the zygote
        forked the second): the map took 3.4-10.5 ms, against 2.4-3.9 with it.
        """
        return self._active() >= self._size and all(
            w.ready for w in self._workers.values() if not (w.retiring or w.timed_out)
        )

    def _shortfall(self, active: int) -> int:
        """How many more workers the waiting work warrants (zero or less: none).

        A waiting batch warrants a worker of its own when batches are seen to
        be long: one has run longer than GROW_ALL_AFTER_S, or a worker has been
        in its initializer GROW_AFTER_START_S (since it reported itself alive:
        timed from its start, a fork slowed 10 ms by a busy machine read as a
        slow initializer, and started every worker for 1,000 squares), or the
        batch that has run longest has run GROW_AFTER_S asleep (waiting on
        I/O, a timer, a lock; see _blocked): there more workers than cores
        help, and a busy machine leaves a stalled process runnable, not asleep.
        Asked for one at a time, each after the last fork had ended, 8 workers
        for sleeping tasks were asked for over ~17 ms on 2 cores; now within
        ~2 ms. Workers already started that hold no batch take waiting ones
        first. Weaker evidence warrants one more worker, and not while a fork
        is under way: a batch that has run GROW_AFTER_S computing (a busy
        machine can stall a process that long), or queued work that, at the
        seconds per task measured so far, would keep each started worker busy
        GROW_AFTER_S. That estimate may come from few tasks, say an `apply`
        that included a first import, so it starts one worker and no more until
        a reply has updated it: an apply's 28 us (a square takes ~1 us) started
        a second worker for 1,000 squares, then a third once the second's fork
        was done.

        Where the started workers fill the cores, one still starting takes a
        core from those running: their batches then run long and measure slow
        (up to 46 us a square, ~1 us alone, in the growths logged on 2 cores).
        Weak evidence waits for it to be ready there.

        A batch whose reply already waits in its worker's pipe is not running:
        its age measures this thread's lateness, not the work. On a loaded
        2-core machine that was most of the evidence that grew a pool past two
        workers on 1,000 squares (the reply was there in 4 of the 5 growths
        logged). Nor is one whose worker has run its last task (the slot says
        so): the direct path's caller may have read its reply and not yet
        handled it, while its worker waits, asleep, for the next (that grew
        pools of 4 to 4 workers on 1,000 squares, 2 times in 75 on a loaded
        machine, once a sleeping batch warranted a worker per waiting one). Nor
        is a worker still booting evidence of anything but a busy machine,
        which one more process makes busier; it used to warrant one.
        """
        pending = self._pending
        if not pending:
            return 0
        if active == 0:
            return 1
        now = time.monotonic()
        free = 0
        slow_init = forking = starting = False
        longest = 0.0  # the longest a running batch has run
        oldest: Worker | None = None  # the worker that runs it
        for worker in self._workers.values():
            forking = forking or worker.forking
            if worker.retiring or worker.timed_out:
                continue
            if not worker.inflight:
                free += 1
            if not worker.ready:
                starting = True
                alive_at = worker.slot[P.SLOT_ALIVE]  # 0 while it boots
                if (
                    alive_at
                    and now - alive_at > GROW_AFTER_START_S
                    and not self._replied(worker)  # READY, unread
                ):
                    slow_init = True
            elif worker.inflight:
                batch_id, item, started = worker.read_slot()
                age = now - started
                if (
                    batch_id == worker.inflight[0].id
                    # Past its last task, a batch is done and being (or was) sent.
                    and item < len(worker.inflight[0].items)
                    and age > longest
                    and (age <= GROW_AFTER_S or not self._replied(worker))
                ):
                    longest, oldest = age, worker
        if (
            slow_init
            or longest > GROW_ALL_AFTER_S
            or (
                longest > GROW_AFTER_S
                and oldest is not None
                and _blocked(oldest.pid)
                and not self._replied(oldest)  # asleep because done, since looked at
            )
        ):
            return len(pending) - free
        if len(pending) <= free or forking or (starting and active >= self._cores):
            return 0
        if longest > GROW_AFTER_S:
            return 1
        if self._item_s is None or self._grown_at == self._measured:
            return 0  # no estimate, or one that has started a worker already
        items_ahead = GROW_AFTER_S * active / max(self._item_s, 1e-9)
        waiting = 0
        for batch in pending:
            waiting += len(batch.items)
            if waiting > items_ahead:
                return 1
        return 0

    @staticmethod
    def _replied(worker: Worker) -> bool:
        """Whether a reply waits unread in ``worker``'s pipe (one poll, no read)."""
        try:
            return bool(worker.conn.poll())
        except (OSError, ValueError):
            return False  # closed or broken: its death is handled elsewhere

    def _start_one(self) -> bool:
        try:
            self._watch(self._spawn())
        except Exception as exc:
            self._cannot_start(exc)
            return False
        return True

    def _cannot_start(self, exc: BaseException) -> None:
        # Out of processes or descriptors, or the zygote that forks workers was
        # killed: nothing can run any more; say why.
        from .._exceptions_stdlib import WorkerCrashedError

        self._break(WorkerCrashedError(f"cannot start a worker: {type(exc).__name__}: {exc}"))

    def _retire(self, worker: Worker) -> None:
        try:
            worker.conn.send_bytes(P.dumps((P.STOP,)))
        except OSError:
            pass
        self._replenish()

    def _stop_workers(self) -> None:
        for worker in list(self._workers.values()):
            worker.retiring = True
            if self._terminating:
                kill(worker.pid, signal.SIGTERM)
            else:
                try:
                    worker.conn.send_bytes(P.dumps((P.STOP,)))
                except OSError:
                    pass
        deadline = time.monotonic() + (TERMINATE_GRACE if self._terminating else CLOSE_GRACE_S)
        for worker in list(self._workers.values()):
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                if not self._terminating:
                    self._killed_at_close.append((worker.id, worker.pid))
                kill(worker.pid, signal.SIGKILL)
                worker.process.join(5.0)
            if not self._terminating:
                self._drain_messages(worker)
            self._bury(worker)
        if self._shm_used:
            shm.remove_matching(f"{self._shm_prefix}.")
        recycler = shm.current_recycler()
        if recycler is not None:
            recycler.clear()  # what it kept for this pool's batches (and others')
        mappings = shm.current_mappings()
        if mappings is not None:
            mappings.clear()  # this pool's workers' results (and others')
        self._close_context()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _reap_everything(self) -> None:
        for worker in list(self._workers.values()):  # only if the thread died early
            kill(worker.pid, signal.SIGKILL)
            worker.process.join(5.0)
        self._close_context()

    def _close_context(self) -> None:
        # A zygote (the default start method on Linux) exits once its children have.
        close = getattr(self._ctx, "close", None)
        if close is not None:
            close()

    def _fail_everything(self, exc: BaseException) -> None:
        """Fail every task not answered yet. Of a batch that sent results ahead
        (P.PARTIAL: large results, a Joined batch's chunks, calls sent together),
        only the tasks after them: failing those again delivered them twice, and a
        result counting down its tasks (MapResult) passed zero and never ended."""
        pending, self._pending = list(self._pending), deque()
        for batch in pending:
            batch.fail(batch.done, len(batch.items), exc)
        for worker in self._workers.values():
            while worker.inflight:
                batch = worker.inflight.popleft()
                batch.fail(batch.done, len(batch.items), exc)

    @staticmethod
    def _pickle_initializer(
        initializer: Callable[..., Any] | None,
        inherited_main: Mapping[str, Any] | None,
        script_rerun: bool,
    ) -> bytes | None:
        if initializer is None:
            return None
        try:
            return dumps_callable(initializer, inherited_main, script_rerun)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle the initializer {initializer!r}: {exc}"
            ) from exc
