"""Clocks, memory readings and budgets, shared by the workloads (child side)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` and return (seconds, its result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (``fraction`` in 0..1)."""
    ordered = sorted(samples)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[rank]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def rss_bytes(field: str = "VmRSS", status: Path = _STATUS) -> int:
    """A memory figure of a process from ``/proc/<pid>/status`` (VmRSS now, VmHWM peak)."""
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"{field} not in {status}")


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


@dataclass(frozen=True)
class Rate:
    """How many tasks ran in how long; ``tasks < requested`` when the budget forced a
    smaller run, whose rate then stands for the whole."""

    tasks: int
    seconds: float
    requested: int

    @property
    def per_second(self) -> float:
        return self.tasks / self.seconds

    @property
    def projected_seconds(self) -> float:
        return self.requested / self.per_second

    @property
    def scaled(self) -> bool:
        return self.tasks < self.requested


def rate_within_budget(run: Callable[[int], None], requested: int, budget_s: float) -> Rate:
    """Time ``run(n)`` for n = requested/100, /10, then requested, stopping before a size
    whose projected time exceeds ``budget_s``: a slow library is measured, not waited for."""
    sizes = sorted({max(1, requested // 100), max(1, requested // 10), requested})
    tasks, seconds = sizes[0], _time_run(run, sizes[0])
    for size in sizes[1:]:
        if seconds * size / tasks > budget_s:
            break
        tasks, seconds = size, _time_run(run, size)
    return Rate(tasks=tasks, seconds=max(seconds, 1e-9), requested=requested)


def _time_run(run: Callable[[int], None], size: int) -> float:
    return timed(lambda: run(size))[0]


@dataclass(frozen=True)
class Outcome:
    """What a call did within its time limit: 'ok', 'raised' or 'hang'."""

    kind: str
    value: Any = None
    finished_at: float = 0.0

    def describe(self) -> str:
        if self.kind == "raised":
            return f"raised {type(self.value).__name__}"
        return self.kind


def call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Outcome:
    """Run ``fn`` in a daemon thread; a call still running after ``timeout_s`` is a hang
    (its thread is abandoned: the benchmark process exits with ``os._exit``)."""
    box: list[Outcome] = []

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:
            box.append(Outcome("raised", exc, time.monotonic()))
        else:
            box.append(Outcome("ok", value, time.monotonic()))

    thread = threading.Thread(target=target, daemon=True, name="bench-call")
    thread.start()
    thread.join(timeout_s)
    return box[0] if box else Outcome("hang")


def figure_in_fresh_process(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Run ``python argv...`` and return the last number it printed; NaN (with its
    error output shown) if it failed. The side-by-side scripts' one measurement."""
    out = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return float("nan")
    return float(out.stdout.split()[-1])
