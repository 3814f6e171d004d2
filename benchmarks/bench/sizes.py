"""How big each workload is in each mode: full (the published run), quick, and smoke (CI)."""

from __future__ import annotations

from dataclasses import dataclass, replace

DURATIONS: dict[str, float] = {
    "1us": 1e-6,
    "10us": 1e-5,
    "100us": 1e-4,
    "1ms": 1e-3,
    "10ms": 1e-2,
}


@dataclass(frozen=True)
class Sizes:
    """Every size and time budget of one mode. Workers are 2 unless a workload says."""

    workers: int = 2
    # W1 the seed
    seed_items: int = 1000
    seed_workers: int = 5
    seed_repeats: int = 5
    # W2 tiny tasks (a library too slow for the budget is timed on 1/10 or 1/100 of the tasks)
    tiny_items: int = 1_000_000
    chunksizes: tuple[int, ...] = (100, 1_000, 10_000, 100_000)
    budget_s: float = 30.0
    # W3 CPU-bound scaling
    cpu_tasks: int = 64
    cpu_task_ms: float = 25.0
    cpu_repeats: int = 3
    # W4 NumPy arrays
    arrays: int = 32
    array_mb: int = 8
    array_repeats: int = 3
    # W5 latency
    round_trips: int = 2000
    # W6 start-up: each start method is timed cold, in this many fresh processes
    startup_repeats: int = 3
    startup_methods: tuple[str, ...] = ("fork", "spawn", "forkserver", "default")
    # W7 lazy streaming memory
    stream_items: int = 5_000_000
    stream_take: int = 1000
    consumer_pause_s: float = 0.002
    # W8 recovery from a worker's death
    crash_items: int = 8
    crash_wait_s: float = 20.0
    # W9 tasks submitted one by one (a library too slow for the budget: 1/10 or 1/100)
    submit_items: int = 10_000
    submit_repeats: int = 3
    # Throughput against task duration (the plot)
    durations: tuple[str, ...] = tuple(DURATIONS)
    curve_target_s: float = 1.0
    curve_max_tasks: int = 200_000
    # Time limit of one benchmark subprocess, as a multiple of each workload's own limit
    limit_scale: float = 1.0


FULL = Sizes()

QUICK = replace(
    FULL,
    seed_repeats=3,
    tiny_items=100_000,
    chunksizes=(100, 1_000, 10_000),
    budget_s=10.0,
    cpu_tasks=32,
    cpu_task_ms=10.0,
    cpu_repeats=1,
    arrays=8,
    array_repeats=1,
    round_trips=500,
    startup_repeats=1,
    stream_items=1_000_000,
    stream_take=300,
    crash_wait_s=10.0,
    submit_items=2_000,
    curve_target_s=0.3,
    curve_max_tasks=50_000,
    limit_scale=0.5,
)

SMOKE = replace(
    QUICK,
    seed_items=100,
    seed_workers=2,
    seed_repeats=1,
    tiny_items=2_000,
    chunksizes=(10, 100),
    budget_s=2.0,
    cpu_tasks=4,
    cpu_task_ms=2.0,
    arrays=2,
    array_mb=1,
    round_trips=50,
    stream_items=20_000,
    stream_take=50,
    consumer_pause_s=0.0,
    crash_items=4,
    crash_wait_s=5.0,
    submit_items=200,
    submit_repeats=1,
    durations=("10us", "1ms"),
    curve_target_s=0.05,
    curve_max_tasks=2_000,
    startup_methods=("default", "spawn"),
    limit_scale=0.25,
)

MODES: dict[str, Sizes] = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
