"""The workloads W1-W9 and the throughput curve.

A workload is a set of *cases* (a start method, a task duration, default vs tuned chunking);
each contender x case runs in a fresh subprocess, where ``run(ctx)`` measures and ends by
calling ``ctx.finish(figures)``. Finishing inside the pool's ``with`` block skips the pool's
shutdown, which is not what these workloads time (W1 is the one that times it): the parent
then kills the subprocess's whole process group.

The columns say how the report shows each figure; ``ratio`` columns also get the figure
divided by procpool's figure for the same case.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import multiprocessing
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from bench import measure, tasks
from bench.contenders import ALL_METHODS, Contender, Reference, Session, Unsupported
from bench.sizes import DURATIONS, Sizes

Figures = dict[str, Any]


@dataclass
class Ctx:
    """What a workload gets in the benchmark subprocess."""

    contender: Contender
    case: str
    sizes: Sizes
    params: Mapping[str, Any]
    finish_cb: Callable[[Figures, list[str]], NoReturn]
    fail_cb: Callable[[BaseException], NoReturn]
    partial_cb: Callable[[Figures], None]

    def finish(self, figures: Figures, notes: list[str] | None = None) -> NoReturn:
        self.finish_cb(figures, notes or [])

    def partial(self, figures: Figures) -> None:
        """Record figures now, in case the subprocess is killed before it finishes."""
        self.partial_cb(figures)

    @contextlib.contextmanager
    def session(self, workers: int | None = None, method: str | None = None) -> Iterator[Session]:
        """The contender's pool; an error inside is recorded before the pool's shutdown
        gets a chance to hang."""
        with self.contender.session(workers or self.sizes.workers, method) as session:
            try:
                yield session
            except BaseException as exc:
                self.fail_cb(exc)


Run = Callable[[Ctx], None]


@dataclass(frozen=True)
class Column:
    case: str
    key: str
    label: str
    higher_is_better: bool | None = None  # None: a description, not a score
    fmt: str = "{:,.3g}"
    ratio: bool = True


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    measures: str
    run: Run
    columns: tuple[Column, ...]
    limit_s: float
    cases: Callable[[Contender, Sizes], tuple[str, ...]] = lambda c, s: ("default",)
    references: Mapping[str, Run] = field(default_factory=dict)
    repeats: Callable[[Sizes], int] = lambda s: 1
    headline: int | None = 0  # the column the summary table shows; None: not in it

    def runner(self, contender: Contender) -> Run:
        if isinstance(contender, Reference):
            if contender.name not in self.references:
                raise Unsupported(f"{contender.name} is no reference for {self.id}")
            return self.references[contender.name]
        return self.run

    def cases_for(self, contender: Contender, sizes: Sizes) -> tuple[str, ...]:
        """The cases this contender runs; a reference runs only where it is one."""
        if isinstance(contender, Reference) and contender.name not in self.references:
            return ()
        return self.cases(contender, sizes)


# How long each worker's warm-up task sleeps (see _warm).
WARM_NAP_S = 0.1


def _warm(session: Session, workers: int) -> None:
    """Start every worker before a timed section (some pools start them lazily).

    Tiny tasks alone do not: a pool that starts its workers on demand (procpool's
    default) ran the 4 x workers squares on its first worker, and then started
    the others inside the timed section. W3 took 814-826 ms that way on 2 cores,
    against 804-809 with both workers started first (and 806-812 for
    `multiprocessing.Pool`). So each worker also gets a task that sleeps
    WARM_NAP_S, one task per chunk: they end together only if they run at once.
    """
    session.map(tasks.square, list(range(4 * workers)))
    session.map(tasks.nap, [WARM_NAP_S] * workers, chunksize=1)


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(f"wrong results: {what}")


# --- W1 the seed ------------------------------------------------------------------------------


def seed(ctx: Ctx) -> None:
    rng = random.Random(0)
    numbers = [rng.randint(0, 100) for _ in range(ctx.sizes.seed_items)]
    samples = []
    for _ in range(ctx.sizes.seed_repeats):
        start = time.perf_counter()
        with ctx.session(ctx.sizes.seed_workers) as session:
            results = session.map(tasks.square, numbers)
        samples.append(time.perf_counter() - start)
        _check(results == [x * x for x in numbers], "squares")
    ctx.finish({"seconds": min(samples), "median_s": measure.median(samples)})


# --- W2 tiny tasks ----------------------------------------------------------------------------


def _prefixes(n: int, make: Callable[[int], list[Any]]) -> dict[int, list[Any]]:
    return {k: make(k) for k in {max(1, n // 100), max(1, n // 10), n}}


def _rate_figures(rate: measure.Rate) -> tuple[Figures, list[str]]:
    figures = {"tasks_per_s": rate.per_second, "seconds": rate.projected_seconds}
    notes = [f"timed on {rate.tasks:,} of {rate.requested:,} tasks"] if rate.scaled else []
    return figures, notes


def _map_squares(
    session: Session, inputs: dict[int, list[int]], chunksize: int | None
) -> Callable[[int], None]:
    def run(k: int) -> None:
        results = session.map(tasks.square, inputs[k], chunksize)
        _check(len(results) == k and results[-1] == (k - 1) ** 2, "squares")

    return run


def tiny(ctx: Ctx) -> None:
    n, budget = ctx.sizes.tiny_items, ctx.sizes.budget_s
    inputs = _prefixes(n, lambda k: list(range(k)))
    with ctx.session() as session:
        _warm(session, ctx.sizes.workers)
        if ctx.case == "default":
            # The best of two, as the chunked figure is the best of several: a process's
            # first map of 1M tasks pays the parent's allocator for ~28 MB of fresh result
            # objects (procpool: 0.150 s, then 0.110-0.125 s; the workers' busy and
            # transfer times are the same in both), which later maps reuse.
            run = _map_squares(session, inputs, None)
            rate = _best(measure.rate_within_budget(run, n, budget / 2) for _ in range(2))
            ctx.finish(*_rate_figures(rate))
        tries = {
            c: measure.rate_within_budget(
                _map_squares(session, inputs, c), n, budget / len(ctx.sizes.chunksizes)
            )
            for c in ctx.sizes.chunksizes
        }
        best = max(tries, key=lambda c: tries[c].per_second)
        figures, notes = _rate_figures(tries[best])
        tried = ", ".join(f"{c:,}: {r.per_second:,.0f}/s" for c, r in tries.items())
        ctx.finish({**figures, "chunksize": best}, [*notes, f"chunksizes tried: {tried}"])


def tiny_serial(ctx: Ctx) -> None:
    n = ctx.sizes.tiny_items
    inputs = _prefixes(n, lambda k: list(range(k)))

    def run(k: int) -> None:
        _check([x * x for x in inputs[k]][-1] == (k - 1) ** 2, "squares")

    budget = ctx.sizes.budget_s / 2
    ctx.finish(*_rate_figures(_best(measure.rate_within_budget(run, n, budget) for _ in range(2))))


def _best(rates: Iterable[measure.Rate]) -> measure.Rate:
    return max(rates, key=lambda rate: rate.per_second)


def tiny_cases(contender: Contender, sizes: Sizes) -> tuple[str, ...]:
    return ("default",) if isinstance(contender, Reference) else ("default", "chunked")


# --- W3 CPU-bound scaling ---------------------------------------------------------------------


def cpu(ctx: Ctx) -> None:
    jobs = [int(ctx.params["burn_iterations"])] * ctx.sizes.cpu_tasks
    expected = [tasks.burn(i) for i in jobs[:1]] * len(jobs)
    with ctx.session() as session:
        _warm(session, ctx.sizes.workers)
        serial, parallel = [], []
        # Serial and parallel runs alternate and the best of each counts: on a shared
        # machine, other load only ever adds time, and it must not favour either side.
        for _ in range(ctx.sizes.cpu_repeats):
            serial.append(measure.timed(lambda: [tasks.burn(i) for i in jobs])[0])
            seconds, results = measure.timed(lambda: session.map(tasks.burn, jobs))
            _check(results == expected, "burn")
            parallel.append(seconds)
        efficiency = min(serial) / (ctx.sizes.workers * min(parallel))
        ctx.finish({"efficiency": efficiency, "seconds": min(parallel), "serial_s": min(serial)})


# --- W4 NumPy arrays --------------------------------------------------------------------------


def arrays(ctx: Ctx) -> None:
    try:
        import numpy as np
    except ImportError as exc:
        raise Unsupported("numpy is not installed") from exc
    rng = np.random.default_rng(0)
    elements = ctx.sizes.array_mb * 1024 * 1024 // 8
    data = [rng.random(elements) for _ in range(ctx.sizes.arrays)]
    nbytes = sum(a.nbytes for a in data)
    with ctx.session() as session:
        session.map(tasks.total, data[:1])
        both = _best_of(
            ctx, lambda: session.map(tasks.double, data), lambda r: r[-1][7] == 2 * data[-1][7]
        )
        one = _best_of(
            ctx, lambda: session.map(tasks.total, data), lambda r: math.isclose(r[0], data[0].sum())
        )
        ctx.finish({"both_gb_s": 2 * nbytes / both / 1e9, "one_gb_s": nbytes / one / 1e9})


def _best_of(ctx: Ctx, fn: Callable[[], Any], ok: Callable[[Any], bool]) -> float:
    samples = []
    for _ in range(ctx.sizes.array_repeats):
        seconds, result = measure.timed(fn)
        _check(bool(ok(result)), "arrays")
        del result
        samples.append(seconds)
    return min(samples)


# --- W5 latency -------------------------------------------------------------------------------


def _latency_figures(call: Callable[[int], Any], trips: int) -> Figures:
    for i in range(50):
        call(i)
    samples = []
    for i in range(trips):
        start = time.perf_counter()
        _check(call(i) == i, "echo")
        samples.append(time.perf_counter() - start)
    return {
        "median_us": measure.median(samples) * 1e6,
        "p99_us": measure.percentile(samples, 0.99) * 1e6,
    }


def latency(ctx: Ctx) -> None:
    with ctx.session() as session:
        figures = _latency_figures(lambda i: session.call(tasks.noop, i), ctx.sizes.round_trips)
        ctx.finish(figures)


def latency_pipe(ctx: Ctx) -> None:
    mp = multiprocessing.get_context("fork")
    here, there = mp.Pipe()
    echo = mp.Process(target=tasks.echo, args=(there,), daemon=True)
    echo.start()

    def call(i: int) -> Any:
        here.send(i)
        return here.recv()

    ctx.finish(_latency_figures(call, ctx.sizes.round_trips))


# --- W6 start-up ------------------------------------------------------------------------------


def startup(ctx: Ctx) -> None:
    method = None if ctx.case == "default" else ctx.case
    start = time.perf_counter()
    with ctx.session(method=method) as session:
        session.call(tasks.noop, 0)
        seconds = time.perf_counter() - start
    # Finished after the pool's shutdown, which is not timed: finish() ends the
    # process at once (os._exit), and a spawn or forkserver pool left running then
    # leaves its named semaphores in /dev/shm when the harness kills the process
    # group (concurrent.futures: 5 a measurement). multiprocess's pool unlinks them
    # only when its locks are collected (6 a measurement).
    del session
    gc.collect()
    ctx.finish({"seconds": seconds, "method": method or ctx.contender.default_method})


def startup_cases(contender: Contender, sizes: Sizes) -> tuple[str, ...]:
    return tuple(m for m in sizes.startup_methods if m == "default" or m in contender.start_methods)


# --- W7 lazy streaming memory -----------------------------------------------------------------


def stream(ctx: Ctx) -> None:
    pulled = [0]

    def source() -> Iterator[int]:
        for i in range(ctx.sizes.stream_items):
            pulled[0] = i + 1
            yield i

    with ctx.session() as session:
        _warm(session, ctx.sizes.workers)
        baseline = measure.rss_bytes()
        measure.reset_peak_rss()
        ctx.partial({"baseline_rss": baseline})
        start = time.perf_counter()
        taken = _consume(session.imap(tasks.square, source()), ctx.sizes)
        growth = measure.rss_bytes("VmHWM") - baseline
        ctx.finish(
            {
                "growth_mb": max(0, growth) / 1e6,
                "pulled": pulled[0],
                "seconds": time.perf_counter() - start,
            },
            [] if taken == ctx.sizes.stream_take else [f"the stream ended after {taken:,} results"],
        )


def _consume(results: Iterator[int], sizes: Sizes) -> int:
    count = 0
    for count, value in enumerate(results, 1):
        _check(value == (count - 1) ** 2, "streamed squares")
        if count >= sizes.stream_take:
            break
        time.sleep(sizes.consumer_pause_s)
    return count


# --- W8 recovery ------------------------------------------------------------------------------


def recovery(ctx: Ctx) -> None:
    marker = Path.cwd() / "worker-died-at"
    crasher = functools.partial(tasks.die_at, victim=1, marker=str(marker), pause=0.01)
    items = list(range(ctx.sizes.crash_items))
    wait = ctx.sizes.crash_wait_s
    with ctx.session() as session:
        _warm(session, ctx.sizes.workers)
        failed = measure.call_with_timeout(lambda: session.map(crasher, items), wait)
        if not marker.exists():
            raise AssertionError("the task that kills its worker never ran")
        died_at = float(marker.read_text())
        figures: Figures = {"failed_map": failed.describe(), "next_map": "-"}
        notes = [f"failed map: {_brief(failed.value)}"] if failed.kind == "raised" else []
        if failed.kind == "hang":
            ctx.finish({**figures, "recovery_s": f"hang (>{wait:g} s)"}, notes)
        after = measure.call_with_timeout(lambda: session.map(tasks.square, items), wait)
        figures["next_map"] = after.describe()
        figures["recovery_s"] = _recovery(after, died_at, [x * x for x in items], wait)
        ctx.finish(figures, notes)


def _recovery(after: measure.Outcome, died_at: float, expected: list[int], wait: float) -> Any:
    if after.kind == "ok" and after.value == expected:
        return after.finished_at - died_at
    if after.kind == "hang":
        return f"hang (>{wait:g} s)"
    return "broken"


def _brief(exc: Any) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:100]}"


# --- W9 tasks submitted one by one ----------------------------------------------------------


def submitted(ctx: Ctx) -> None:
    """Not a target of the issue: how the libraries do where a caller submits tasks one
    by one (``apply_async``, ``submit``) instead of mapping, as much code does."""
    n = ctx.sizes.submit_items
    inputs = _prefixes(n, lambda k: list(range(k)))

    def run(k: int) -> None:
        results = session.submit_each(tasks.square, inputs[k])
        _check(len(results) == k and results[-1] == (k - 1) ** 2, "squares")

    with ctx.session() as session:
        _warm(session, ctx.sizes.workers)
        budget = ctx.sizes.budget_s / ctx.sizes.submit_repeats
        rates = [
            measure.rate_within_budget(run, n, budget) for _ in range(ctx.sizes.submit_repeats)
        ]
        ctx.finish(*_rate_figures(_best(rates)))


# --- throughput against task duration ---------------------------------------------------------


def _curve_tasks(ctx: Ctx) -> tuple[float, int]:
    duration = DURATIONS[ctx.case]
    wanted = round(ctx.sizes.workers * ctx.sizes.curve_target_s / duration)
    return duration, max(100, min(ctx.sizes.curve_max_tasks, wanted))


def curve(ctx: Ctx) -> None:
    duration, n = _curve_tasks(ctx)
    inputs = _prefixes(n, lambda k: [duration] * k)
    with ctx.session() as session:
        _warm(session, ctx.sizes.workers)
        rate = measure.rate_within_budget(
            lambda k: _check(len(session.map(tasks.spin, inputs[k])) == k, "spin"),
            n,
            ctx.sizes.budget_s,
        )
        ctx.finish(*_rate_figures(rate))


def curve_serial(ctx: Ctx) -> None:
    duration, n = _curve_tasks(ctx)
    rate = measure.rate_within_budget(
        lambda k: _check(len([tasks.spin(duration) for _ in range(k)]) == k, "spin"),
        n,
        ctx.sizes.budget_s,
    )
    ctx.finish(*_rate_figures(rate))


def curve_cases(contender: Contender, sizes: Sizes) -> tuple[str, ...]:
    return sizes.durations


# --- the registry -----------------------------------------------------------------------------


def _startup_columns() -> tuple[Column, ...]:
    methods = (*ALL_METHODS, "default")
    columns = [Column(m, "seconds", f"{m} (s)", False, "{:.3f}") for m in methods]
    return (*columns, Column("default", "method", "default method", ratio=False, fmt="{}"))


def _curve_columns() -> tuple[Column, ...]:
    return tuple(Column(d, "tasks_per_s", f"{d} tasks/s", True, "{:,.0f}") for d in DURATIONS)


WORKLOADS: dict[str, Workload] = {
    w.id: w
    for w in (
        Workload(
            "W1",
            "the seed: 1,000 squares, 5 workers, start-up and shutdown included",
            "`Pool(5)` as a context manager, `map(squared, numbers)` over 1,000 random ints, "
            "then shutdown; best of 5 fresh pools.",
            seed,
            (Column("default", "seconds", "time (s)", False, "{:.3f}"),),
            limit_s=180,
        ),
        Workload(
            "W2",
            "1,000,000 tiny tasks (`x*x`)",
            "`map` over 1,000,000 ints on a warm pool: with the library's default settings, then "
            "with the best of a few chunksizes; the serial list comprehension is the reference.",
            tiny,
            (
                Column("default", "tasks_per_s", "default: tasks/s", True, "{:,.0f}"),
                Column("chunked", "tasks_per_s", "best chunksize: tasks/s", True, "{:,.0f}"),
                Column("chunked", "chunksize", "best chunksize", ratio=False, fmt="{:,}"),
            ),
            limit_s=240,
            cases=tiny_cases,
            references={"serial": tiny_serial},
        ),
        Workload(
            "W3",
            "CPU-bound scaling: 64 tasks of ~25 ms",
            "`map` of a calibrated pure-Python loop; efficiency = serial time / (workers x time), "
            "each the best of 3 alternating runs.",
            cpu,
            (
                Column("default", "efficiency", "efficiency", True, "{:.3f}"),
                Column("default", "seconds", "time (s)", False, "{:.3f}", ratio=False),
            ),
            limit_s=120,
        ),
        Workload(
            "W4",
            "NumPy: 32 float64 arrays of 8 MB",
            "`map` returning each array doubled (data both ways) and summed (one way); GB/s of "
            "array data moved (both ways counts each array twice); best of 3.",
            arrays,
            (
                Column("default", "both_gb_s", "both ways GB/s", True, "{:.2f}"),
                Column("default", "one_gb_s", "one way GB/s", True, "{:.2f}"),
            ),
            limit_s=180,
        ),
        Workload(
            "W5",
            "latency: 2,000 sequential round trips of a no-op on a warm pool",
            "submit one no-op task, wait for its result, 2,000 times; a bare "
            "`multiprocessing.Pipe` round trip to an echo process is the reference.",
            latency,
            (
                Column("default", "median_us", "median (us)", False, "{:,.0f}"),
                Column("default", "p99_us", "p99 (us)", False, "{:,.0f}"),
            ),
            limit_s=120,
            references={"mp.Pipe": latency_pipe},
        ),
        Workload(
            "W6",
            "start-up: pool creation to first result, per start method",
            "create a 2-worker pool and get one no-op result, cold, in a fresh process; median of "
            "3 processes per start method. `default` is the method the library picks by itself.",
            startup,
            _startup_columns(),
            limit_s=90,
            cases=startup_cases,
            repeats=lambda s: s.startup_repeats,
            headline=3,
        ),
        Workload(
            "W7",
            "memory: a 5,000,000-item generator stopped after 1,000 results, slow consumer",
            "the library's lazy API over a generator; the consumer sleeps 2 ms per result and "
            "stops after 1,000; growth of the parent's peak RSS over its RSS before the call, "
            "and how many items the library pulled from the generator by then.",
            stream,
            (
                Column("default", "growth_mb", "peak RSS growth (MB)", False, "{:,.1f}"),
                Column("default", "pulled", "items pulled", False, "{:,}", ratio=False),
                Column("default", "seconds", "time (s)", False, "{:.2f}", ratio=False),
            ),
            limit_s=60,
        ),
        Workload(
            "W8",
            "recovery: a task kills its worker (`os._exit`)",
            "a `map` of 8 tasks where one calls `os._exit(1)`; what that map does, then the time "
            "from the worker's death to the result of the next `map` on the same pool.",
            recovery,
            (
                Column("default", "recovery_s", "recovery (s)", False, "{:.3f}"),
                Column("default", "failed_map", "the failing map", ratio=False, fmt="{}"),
                Column("default", "next_map", "the next map", ratio=False, fmt="{}"),
            ),
            limit_s=90,
        ),
        Workload(
            "W9",
            "10,000 tiny tasks submitted one by one (not a target)",
            "`apply_async` / `submit` of `x*x` for each of 10,000 ints, all before waiting for "
            "any, then every result in order, on a warm pool; tasks/s, the best of 3.",
            submitted,
            (Column("default", "tasks_per_s", "tasks/s", True, "{:,.0f}"),),
            limit_s=120,
            headline=None,
        ),
        Workload(
            "TP",
            "throughput against task duration (default settings)",
            "`map` of tasks that keep a core busy for 1 us to 10 ms, on a warm pool; tasks/s. "
            "The ideal is workers / duration.",
            curve,
            _curve_columns(),
            limit_s=120,
            cases=curve_cases,
            references={"serial": curve_serial},
            headline=None,
        ),
    )
}


def selected(ids: list[str] | None) -> list[Workload]:
    """The workloads named in ``ids`` (all when None), in the registry's order."""
    if not ids:
        return list(WORKLOADS.values())
    unknown = set(ids) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    return [w for w in WORKLOADS.values() if w.id in ids]


def burn_iterations(target_ms: float) -> int:
    """How many ``tasks.burn`` steps take ``target_ms`` on this interpreter (best of 5)."""
    probe = 200_000
    best = min(measure.timed(lambda: tasks.burn(probe))[0] for _ in range(5))
    return max(1, int(probe * target_ms / 1000 / best))
