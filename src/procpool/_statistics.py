"""The insight figures a pool reports: ``Pool.statistics()`` returns these, frozen."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PoolStatistics", "WorkerStatistics"]


@dataclass(frozen=True)
class WorkerStatistics:
    """How one worker process spent its life so far.

    ``busy_seconds`` is time inside tasks, ``transfer_seconds`` time unpickling
    arguments and pickling results, ``idle_seconds`` the rest of its life
    (waiting for work, or for the parent to read its results).
    """

    worker_id: int
    pid: int
    alive: bool
    tasks: int
    busy_seconds: float
    transfer_seconds: float
    idle_seconds: float
    exitcode: int | None = None


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a pool: task counts, fault counts, and per-worker time use."""

    workers: int
    tasks_completed: int
    tasks_failed: int
    crashes: int
    timeouts: int
    retries: int
    recycled: int
    per_worker: tuple[WorkerStatistics, ...]

    @property
    def busy_seconds(self) -> float:
        """Seconds all workers spent inside tasks."""
        return sum(w.busy_seconds for w in self.per_worker)

    @property
    def transfer_seconds(self) -> float:
        """Seconds all workers spent (un)pickling arguments and results."""
        return sum(w.transfer_seconds for w in self.per_worker)

    @property
    def idle_seconds(self) -> float:
        """Seconds all workers spent waiting."""
        return sum(w.idle_seconds for w in self.per_worker)


# Public classes say they live in `procpool` (tracebacks, pickles, repr).
for _cls in (PoolStatistics, WorkerStatistics):
    _cls.__module__ = "procpool"
del _cls
