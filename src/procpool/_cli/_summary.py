"""Counting a run as it goes, and the summary printed at its end."""

from __future__ import annotations

from dataclasses import dataclass, field

from procpool import PoolStatistics

from .._progress import format_seconds

__all__ = ["RunStats", "WorkerTimes"]

# How many failures the summary quotes.
SAMPLE_FAILURES = 3


@dataclass
class WorkerTimes:
    """What one worker process did, as timed around the user's function (in the worker).

    Attributes:
        pid: The worker's process id.
        records: Records it finished.
        in_tasks: Seconds inside the user's function.
        encoding: Seconds turning results into JSON lines.
        between: Seconds between the end of one record and the start of the
            next: waiting for work plus transfer (used only if the pool's own
            figures are missing).
        bytes_out: Size of the output lines it produced.
    """

    pid: int
    records: int = 0
    in_tasks: float = 0.0
    encoding: float = 0.0
    between: float = 0.0
    bytes_out: int = 0

    @property
    def span(self) -> float:
        return self.in_tasks + self.encoding + self.between


@dataclass
class RunStats:
    """Counters for the summary. ``ok``/``failed`` count this run's records only."""

    ok: int = 0
    failed: int = 0
    skipped_ok: int = 0
    skipped_failed: int = 0
    unattributed: int = 0
    parent_io: float = 0.0
    workers: dict[int, WorkerTimes] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    pool: PoolStatistics | None = None  # the pool's own figures, taken at the end

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def skipped(self) -> int:
        return self.skipped_ok + self.skipped_failed

    def count(self, index: int, ok: bool, message: str | None = None) -> None:
        if ok:
            self.ok += 1
            return
        self.failed += 1
        if message is not None and len(self.failures) < SAMPLE_FAILURES:
            self.failures.append(f"#{index}: {message}")

    def time_worker(
        self, pid: int, in_task: float, encoding: float, between: float, size: int
    ) -> None:
        times = self.workers.get(pid)
        if times is None:
            times = self.workers[pid] = WorkerTimes(pid)
        times.records += 1
        times.in_tasks += in_task
        times.encoding += encoding
        times.between += between
        times.bytes_out += size

    def render(self, wall: float, *, interrupted: bool = False) -> str:
        """The end-of-run summary, several lines, no trailing newline."""
        rate = self.done / wall if wall > 0 else 0.0
        head = "interrupted" if interrupted else "finished"
        lines = [
            f"procpool run {head}: {self.done} records in {format_seconds(wall)} "
            f"({rate:.1f} records/s)",
            f"  ok {self.ok}, failed {self.failed}, skipped by resume {self.skipped}"
            + (f" ({self.skipped_failed} of them failed earlier)" if self.skipped_failed else ""),
        ]
        if self.unattributed:
            lines.append(
                f"  {self.unattributed} records came back as pool errors that name no record; "
                "they were not recorded and will run again with --resume"
            )
        for failure in self.failures:
            lines.append(f"  failed {failure}")
        if self.failed > len(self.failures):
            lines.append(
                f"  ... and {self.failed - len(self.failures)} more failures in the output"
            )
        lines += self._worker_table()
        return "\n".join(lines)

    def _worker_table(self) -> list[str]:
        engine = {w.pid: w for w in self.pool.per_worker} if self.pool is not None else {}
        pids = sorted(set(self.workers) | {pid for pid, w in engine.items() if w.tasks})
        if not pids:
            return []
        lines = [
            f"  {'worker':<16}{'records':>8}{'in function':>18}{'JSON':>16}"
            f"{'transfer':>16}{'waiting':>17}"
        ]
        for pid in pids:
            mine = self.workers.get(pid) or WorkerTimes(pid)
            theirs = engine.get(pid)
            if theirs is not None:
                name = f"w{theirs.worker_id} pid {pid}"
                life = theirs.busy_seconds + theirs.transfer_seconds + theirs.idle_seconds
                transfer, waiting = theirs.transfer_seconds, theirs.idle_seconds
            else:  # no pool figures: the gap between records is all we know
                name, life = f"pid {pid}", mine.span
                transfer, waiting = float("nan"), mine.between
            life = life or 1.0
            lines.append(
                f"  {name:<16}{mine.records:>8}{_secs(mine.in_tasks, life):>18}"
                f"{_secs(mine.encoding, life):>16}{_secs(transfer, life):>16}"
                f"{_secs(waiting, life):>17}"
            )
        lines.append(
            "  (% of each worker's life; 'transfer' is (un)pickling records and results, "
            "'waiting' includes start-up"
        )
        lines.append(
            f"   and time waiting for work; the parent spent {format_seconds(self.parent_io)} "
            "journalling and writing OUTPUT)"
        )
        if self.pool is not None and (self.pool.crashes or self.pool.timeouts or self.pool.retries):
            lines.append(
                f"  pool: {self.pool.crashes} worker crashes, {self.pool.timeouts} timeouts, "
                f"{self.pool.retries} retries"
            )
        return lines


def _secs(seconds: float, span: float) -> str:
    if seconds != seconds:  # NaN: not measured
        return "-"
    return f"{seconds:.2f}s ({100.0 * seconds / span:.0f}%)"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n}B"
