"""What the dispatcher knows of each worker process, and what it reports of it.

A :class:`Worker` is the dispatcher's record of one live worker: its process,
its pipe, the shared slot it publishes progress in, the batches it holds, and
the time it spent. Once it exits, a :class:`WorkerRecord` keeps its figures for
``statistics()``.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque

from . import _protocol as P
from ._pipewait import PipeWait

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

    from .._statistics import WorkerStatistics
    from ._batch import Batch

__all__ = ["Held", "Worker", "WorkerRecord", "fold", "kill", "record", "worker_statistics"]


class Held(deque["Batch"]):
    """The batches a worker holds, oldest first, with running totals of them.

    The dispatcher weighs these totals for every batch it may send ahead
    (_pick_worker, _ahead, _merge); summed afresh over the up to BURST batches a
    worker may hold, they took ~190,000 ``Batch.size`` calls for 20,000
    one-task chunks. Only ``append``, ``popleft``, ``remove`` and ``clear``
    change it.
    """

    __slots__ = ("calls", "nbytes", "tasks")

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0  # bytes of their pickled arguments (Batch.size)
        self.tasks = 0  # tasks in them
        self.calls = 0  # batches they stand for (Batch.units, Dispatcher._held_calls)

    def append(self, batch: Batch) -> None:
        super().append(batch)
        self._count(batch, 1)

    def popleft(self) -> Batch:
        batch = super().popleft()
        self._count(batch, -1)
        return batch

    def remove(self, batch: Batch) -> None:
        super().remove(batch)
        self._count(batch, -1)

    def clear(self) -> None:
        super().clear()
        self.nbytes = self.tasks = self.calls = 0

    def _count(self, batch: Batch, sign: int) -> None:
        self.nbytes += sign * batch.size
        self.tasks += sign * len(batch.items)
        self.calls += sign * batch.units()


class Worker:
    """The dispatcher's record of one worker process."""

    __slots__ = (
        "_pid",
        "busy",
        "conn",
        "direct_at",
        "eof",
        "fd",
        "fns",
        "freed",
        "id",
        "inflight",
        "lent",
        "pipe_wait",
        "process",
        "ready",
        "retiring",
        "short_replies",
        "slot",
        "start_timed_out",
        "started",
        "tasks_done",
        "timed_out",
        "transfer",
        "unwaited",
    )

    def __init__(self, wid: int, process: Any, conn: Any, slot: Any) -> None:
        self.id = wid
        self.process = process
        self._pid: int | None = None
        self.conn = conn
        self.fd: int = conn.fileno()  # still known once conn is closed
        self.slot = slot
        self.inflight = Held()
        # Mirror of the worker's cache of callables: id -> pickled size (P.admit_callable).
        self.fns: OrderedDict[int, int] = OrderedDict()
        # Its result segments nothing maps here any more, to tell it (P.FREED);
        # appended to from whichever thread drops a result (see shm.unpack).
        self.freed: deque[str] = deque()
        self.tasks_done = 0
        self.ready = False
        self.retiring = False
        self.timed_out: tuple[int, int] | None = None  # (batch id, item) we killed it for
        # Replies in a row, to single calls, that came back short: how many more
        # calls it may hold beyond the usual window (see Dispatcher._burst_limit).
        self.short_replies = 0
        self.busy = 0.0  # seconds spent running tasks, as the worker measured
        self.transfer = 0.0  # seconds spent (un)pickling arguments and results
        self.started = time.monotonic()
        self.start_timed_out = False
        self.lent = False  # its pipe is lent to a caller's thread (see _direct.py)
        self.direct_at = 0.0  # when a call was sent to it on the direct path, not yet waited for
        self.unwaited = False  # and no thread will wait to read that call's reply (_not_coming)
        self.eof = False  # its pipe reported end of file to that thread
        self.pipe_wait: PipeWait | None = None  # how that thread waits (see waiter)

    @property
    def pid(self) -> int:
        """The worker's pid; 0 for one that never started (a zygote that could not fork)."""
        # Asked for lazily: under a zygote, reading it waits for the fork.
        if self._pid is None:
            try:
                self._pid = int(self.process.pid)
            except OSError:
                self._pid = 0
        return self._pid

    @property
    def forking(self) -> bool:
        """Under a zygote: asked for, and its pid not known yet (the fork may be under way)."""
        pid_pending = getattr(self.process._popen, "pid_pending", None)
        return pid_pending is not None and bool(pid_pending())

    def waiter(self) -> PipeWait:
        """What waits for its messages on a thread its pipe is lent to, and reads
        them without waiting on the dispatcher's (made at first use)."""
        if self.pipe_wait is None:
            self.pipe_wait = PipeWait(self.fd, self.process.sentinel)
        return self.pipe_wait

    def alive(self) -> bool:
        """Whether the worker got through start-up (it may still be in its initializer)."""
        return self.ready or self.slot[P.SLOT_ALIVE] > 0

    def read_slot(self) -> tuple[int, int, float]:
        # The doubles themselves, not Slot's __getitem__: the dispatcher reads
        # them for each batch it considers sending ahead (_prefetch_pays).
        view = self.slot.view
        for _ in range(100):  # the worker may be writing: read until stable
            batch = int(view[P.SLOT_BATCH])
            item = int(view[P.SLOT_ITEM])
            started = float(view[P.SLOT_STARTED])
            if int(view[P.SLOT_BATCH]) == batch and int(view[P.SLOT_ITEM]) == item:
                return batch, item, started
        return batch, item, started

    def running_span(self) -> int:
        """How many items from the slot's item on were running as one unit (read after death)."""
        return max(1, int(self.slot[P.SLOT_SPAN]))

    def sending_ahead(self) -> bool:
        """Whether the worker was sending results ahead, not running a task (read after death)."""
        return int(self.slot[P.SLOT_SPAN]) == P.SPAN_SENDING


class WorkerRecord:
    """What statistics() reports of a worker, live or exited; it becomes a
    WorkerStatistics only when asked for, so a pool that never asks never loads
    dataclasses. A plain class: a ``NamedTuple`` costs every cold pool ~0.2 ms
    to define."""

    __slots__ = (
        "busy_seconds",
        "exitcode",
        "idle_seconds",
        "pid",
        "tasks",
        "transfer_seconds",
        "worker_id",
    )

    def __init__(
        self,
        worker_id: int,
        pid: int,
        tasks: int,
        busy_seconds: float,
        transfer_seconds: float,
        idle_seconds: float,
        exitcode: int | None,
    ) -> None:
        self.worker_id = worker_id
        self.pid = pid
        self.tasks = tasks
        self.busy_seconds = busy_seconds
        self.transfer_seconds = transfer_seconds
        self.idle_seconds = idle_seconds
        self.exitcode = exitcode


def record(worker: Worker, now: float, exitcode: int | None) -> WorkerRecord:
    idle = max(0.0, now - worker.started - worker.busy - worker.transfer)
    return WorkerRecord(
        worker.id, worker.pid, worker.tasks_done, worker.busy, worker.transfer, idle, exitcode
    )


def worker_statistics(record: WorkerRecord, *, alive: bool) -> WorkerStatistics:
    from .._statistics import WorkerStatistics  # lazily: dataclasses cost start-up time

    fields = {name: getattr(record, name) for name in WorkerRecord.__slots__}
    return WorkerStatistics(**fields, alive=alive)


def fold(total: WorkerRecord, more: WorkerRecord | None = None) -> WorkerRecord:
    """Sum exited workers into one entry (worker_id -1, pid 0)."""
    if more is None:
        more = WorkerRecord(-1, 0, 0, 0.0, 0.0, 0.0, None)
    return WorkerRecord(
        -1,
        0,
        total.tasks + more.tasks,
        total.busy_seconds + more.busy_seconds,
        total.transfer_seconds + more.transfer_seconds,
        total.idle_seconds + more.idle_seconds,
        None,
    )


def kill(pid: int, sig: int) -> None:
    if pid <= 0:
        return  # never a process group by mistake (a worker that never started)
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
