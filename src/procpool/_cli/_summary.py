"""Counting a run as it goes, and the summary printed at its end."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._progress import format_seconds

__all__ = ["RunStats", "WorkerTimes"]

# How many failures the summary quotes.
SAMPLE_FAILURES = 3


@dataclass
class WorkerTimes:
    """What one worker process did, as timed from inside its tasks.

    Attributes:
        pid: The worker's process id.
        records: Records it finished.
        in_tasks: Seconds inside the user's function.
        encoding: Seconds turning results into JSON lines.
        between: Seconds between the end of one record and the start of the
            next: waiting for work plus pipe transfer plus engine overhead.
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
        if not self.workers:
            return []
        lines = [
            f"  {'worker':<12}{'records':>9}{'in tasks':>18}{'encoding':>11}"
            f"{'between tasks':>20}{'output':>10}"
        ]
        for times in sorted(self.workers.values(), key=lambda t: t.pid):
            span = times.span or 1.0
            lines.append(
                f"  {'pid ' + str(times.pid):<12}{times.records:>9}"
                f"{_secs(times.in_tasks, span):>18}{_secs(times.encoding, span):>11}"
                f"{_secs(times.between, span):>20}{_size(times.bytes_out):>10}"
            )
        lines.append(
            f"  parent: {format_seconds(self.parent_io)} journalling and writing output. "
            "'between tasks' = waiting for the next record + moving data through the pipe"
        )
        lines.append(
            "  (timed inside each worker, which cannot tell those two apart; "
            "worker start-up is not counted)"
        )
        return lines


def _secs(seconds: float, span: float) -> str:
    return f"{seconds:.2f}s ({100.0 * seconds / span:.0f}%)"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n}B"
