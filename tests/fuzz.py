"""Random faults against the promises of docs/faults.md, one seeded scenario at a time.

    python tests/fuzz.py [--seeds 0:200] [--workers 1,2,3] [--only map,terminate]

Not collected by pytest (its name has no ``test_``): it runs for as long as it is
given, and prints one line per scenario, ``ok`` or ``BAD`` with what broke, then
exits 1 if any scenario broke. A scenario's seed reproduces it. tests/test_robustness.py
keeps a few seeds of the first kind below in the suite.

Scenarios (each in a fresh pool, its tasks logging every run to a file):

- ``map``, ``imap``, ``imap_unordered``, ``apply_async``, ``submit``, ``executor_map``:
  tiny tasks among which some end their worker (``os._exit``, SIGKILL), raise, spin
  2 ms, return 700 KB (sent ahead of their batch), return what cannot be pickled,
  or sleep past a ``task_timeout``; small chunks or adaptive ones; fork, spawn,
  forkserver or the default. Every task runs exactly once; each outcome is its own
  (a value, its exception, ``WorkerCrashedError``, ``TaskTimeoutError``,
  ``SerializationError``), or ``WorkerCrashedError(ran_to_completion=True)`` for a
  task whose result died with a later task of its chunk (or of the calls sent
  with it).
- ``terminate``: ``terminate()`` at a random moment of calls and a map: every
  result is ready at once after it, and nothing ran twice.
- ``close``: ``close()`` and ``join()`` with work and faults queued: every result
  is ready, nothing ran twice.
- ``leave``: leaving a ``with`` block in the middle of an ``imap``: the iterator
  ends or raises at once, it never waits.
- ``input``: the input of ``imap`` raises at a random item: every item before it
  (before its chunk, for an explicit ``chunksize``, as in the standard library)
  gives its result, then the error comes, and the pool serves on.
- ``cancel``: an executor's futures, a third cancelled, then ``shutdown`` with or
  without ``cancel_futures``: every future is done, nothing ran twice.
- ``initializer``: an initializer that starts failing in a later worker: every
  result is ready (``InitializerError`` or a value), nothing waits.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "src"),
]

import procpool  # noqa: E402
from procpool import SerializationError, TaskTimeoutError, WorkerCrashedError  # noqa: E402
from procpool._core import _dispatcher  # noqa: E402
from tests.helpers import (  # noqa: E402
    counted_fault,
    failing_initializer,
    keep_barrier,
    outcomes_of,
)

FATAL = {"exit", "kill", "hang"}
RUNS_TASKS = ("map", "imap", "imap_unordered", "apply_async", "submit", "executor_map")
SCENARIOS = (*RUNS_TASKS, "terminate", "close", "leave", "input", "cancel", "initializer")


def _kinds(rng: random.Random, n: int, timeout: float | None, gentle: bool) -> list[str]:
    p = 0.0 if gentle else rng.choice([0.002, 0.01])
    kinds = ["exit", "kill", "raise", "slow", "big", "unpicklable", "hang", "ok"]
    weights = [p, p, p, 0.05, 0.02, p, p if timeout else 0.0, 1.0]
    return rng.choices(kinds, weights, k=n)


def _runs(log: Path) -> collections.Counter[int]:
    if not log.exists():
        return collections.Counter()
    return collections.Counter(int(line) for line in log.read_text().split())


def _check_outcomes(kinds: list[str], out: list[Any], chunksize: int, calls: bool) -> list[Any]:
    """What broke the promises, in order-preserving outcomes (see the module docstring)."""
    bad: list[Any] = []
    taken_down = 0
    for i, (kind, outcome) in enumerate(zip(kinds, out)):
        if kind in ("exit", "kill"):
            ok = isinstance(outcome, WorkerCrashedError)
        elif kind == "hang":
            ok = isinstance(outcome, TaskTimeoutError)
        elif isinstance(outcome, (WorkerCrashedError, TaskTimeoutError)):
            # Its result died with the worker: a later task of its chunk (or, for
            # calls, one sent with it) ended that worker.
            taken_down += 1
            end = (i // chunksize + 1) * chunksize
            ok = bool(getattr(outcome, "ran_to_completion", False)) and (
                calls or any(k in FATAL for k in kinds[i + 1 : end])
            )
        elif kind == "raise":
            ok = isinstance(outcome, ValueError)
        elif kind == "unpicklable":
            ok = isinstance(outcome, SerializationError)
        elif kind == "big":
            ok = outcome == b"x" * 700_000
        else:
            ok = outcome == i * i
        if not ok:
            bad.append((i, kind, repr(outcome)[:120]))
    reach = _dispatcher.BURST if calls else chunksize
    if taken_down > (reach - 1) * sum(k in FATAL for k in kinds):
        bad.append(("more tasks failed with a crash than its chunks hold", taken_down))
    return bad


def run_tasks(rng: random.Random, scenario: str, log: Path, workers: int) -> list[Any]:
    n = rng.choice([100, 400, 1500])
    chunksize = rng.choice([1, 1, 2, 3, 5])
    context = rng.choice([None, None, "fork", "forkserver", "spawn"])
    executor = scenario in ("submit", "executor_map")
    timeout = None if executor else rng.choice([None, 1.0])
    kinds = _kinds(rng, n, timeout, gentle=scenario == "executor_map")
    tasks = list(enumerate(kinds))
    options: dict[str, Any] = {"initializer": keep_barrier, "initargs": (str(log),)}
    if executor:
        with procpool.ProcessPoolExecutor(workers, mp_context=context, **options) as ex:
            if scenario == "executor_map":
                out = list(ex.map(counted_fault, tasks, chunksize=chunksize))
            else:
                futures = [ex.submit(counted_fault, t) for t in tasks]
                cf.wait(futures, timeout=120)
                out = [f.exception(timeout=0) or f.result(timeout=0) for f in futures]
            assert ex.submit(abs, -3).result(timeout=60) == 3
    else:
        if timeout:
            options["task_timeout"] = timeout
        with procpool.Pool(workers, context=context, **options) as pool:
            if scenario == "map":
                out = pool.map(counted_fault, tasks, chunksize, return_exceptions=True)
            elif scenario == "apply_async":
                out = outcomes_of([pool.apply_async(counted_fault, (t,)) for t in tasks])
            else:
                call = getattr(pool, scenario)
                out = list(call(counted_fault, tasks, chunksize, return_exceptions=True))
            assert pool.apply(abs, (-3,)) == 3
    bad: list[Any] = [(i, "ran", c) for i, c in sorted(_runs(log).items()) if c != 1]
    bad += [("never ran", i) for i in range(n) if i not in _runs(log)]
    if len(out) != n:
        return [*bad, ("outcomes", len(out), n)]
    if scenario == "imap_unordered":
        given = {i * i for i, k in tasks if k in ("ok", "slow")}
        values = [o for o in out if isinstance(o, int)]
        if len(set(values)) != len(values) or not set(values) <= given:
            bad.append("a value twice, or one no task gave")
        if sum(isinstance(o, WorkerCrashedError) for o in out) < sum(
            k in ("exit", "kill") for k in kinds
        ):
            bad.append("fewer crashes than crashing tasks")
        return bad
    calls = scenario in ("apply_async", "submit")
    return bad + _check_outcomes(kinds, out, 1 if calls else chunksize, calls)


def _ready_soon(results: list[Any], seconds: float) -> list[int]:
    outcomes_of(results, seconds)
    return [i for i, r in enumerate(results) if not r.ready()]


def run_lifecycle(rng: random.Random, scenario: str, log: Path, workers: int) -> list[Any]:
    n = rng.choice([60, 300, 1000])
    kinds = _kinds(rng, n, None, gentle=scenario in ("input", "leave"))
    tasks = list(enumerate(kinds))
    later = [(i + n, k) for i, k in tasks]  # a second set of indices: each runs once
    chunksize = rng.choice([1, 2, 4, None])
    options: dict[str, Any] = {"initializer": keep_barrier, "initargs": (str(log),)}
    bad: list[Any] = []
    if scenario in ("terminate", "close"):
        pool = procpool.Pool(workers, **options)
        results = [pool.apply_async(counted_fault, (t,)) for t in tasks]
        results.append(pool.map_async(counted_fault, later, chunksize))
        if scenario == "terminate":
            time.sleep(rng.random() * 0.1)
            pool.terminate()
        else:
            pool.close()
        pool.join()
        stuck = _ready_soon(results, 10 if scenario == "terminate" else 0)
        if stuck:
            bad.append((f"not ready after {scenario}", stuck[:5]))
    elif scenario == "leave":
        with procpool.Pool(workers, **options) as pool:
            it = pool.imap(counted_fault, tasks, chunksize, return_exceptions=True)
            for _ in range(rng.randrange(1, n)):
                next(it)
        try:
            while True:
                it.next(timeout=10)
        except (StopIteration, procpool.ProcpoolError):
            pass
        except Exception as exc:
            bad.append(("after leaving the with block", repr(exc)))
    elif scenario == "input":
        k = rng.randrange(n)

        def items() -> Iterator[tuple[int, str]]:
            for i in range(n):
                if i == k:
                    raise KeyError("the input broke")
                yield (i, "ok")

        got: list[Any] = []
        with procpool.Pool(workers, **options) as pool:
            try:
                got.extend(pool.imap(counted_fault, items(), chunksize))
                bad.append("no KeyError")
            except KeyError:
                pass
            if pool.map(abs, [-1, -2]) != [1, 2]:
                bad.append("the pool after the input's error")
        # An explicit chunksize loses the chunk being read, as the standard library does.
        before = k if chunksize in (1, None) else k // chunksize * chunksize
        if got != [i * i for i in range(before)]:
            bad.append(("results before the input's error", len(got), before))
    elif scenario == "cancel":
        ex = procpool.ProcessPoolExecutor(workers, **options)
        futures = [ex.submit(counted_fault, t) for t in tasks]
        for future in rng.sample(futures, n // 3):
            future.cancel()
        cancel = rng.random() < 0.5
        time.sleep(rng.random() * 0.05)
        ex.shutdown(wait=True, cancel_futures=cancel)
        bad += [("not done", i) for i, f in enumerate(futures) if not f.done()]
    else:  # initializer
        failing_from = rng.choice([1, 2, 3, 5])
        pool = procpool.Pool(
            workers, initializer=failing_initializer, initargs=(str(log), failing_from)
        )
        results = [pool.apply_async(counted_fault, (t,)) for t in tasks]
        results.append(pool.map_async(counted_fault, later, chunksize))
        stuck = _ready_soon(results, 60)
        if stuck:
            bad.append(("not ready with a failing initializer", stuck[:5]))
        pool.terminate()
        pool.join()
    bad += [(i, "ran", c) for i, c in sorted(_runs(log).items()) if c > 1]
    return bad


def run(seed: int, workers: list[int], only: list[str]) -> tuple[str, list[Any]]:
    rng = random.Random(seed)
    scenario = rng.choice(only)
    with tempfile.TemporaryDirectory(prefix="procpool-fuzz-") as tmp:
        log = Path(tmp) / "runs"
        go: Callable[..., list[Any]] = run_tasks if scenario in RUNS_TASKS else run_lifecycle
        try:
            return scenario, go(rng, scenario, log, rng.choice(workers))
        except Exception:
            return scenario, [traceback.format_exc()[-1500:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:200", help="FIRST:END, END excluded")
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    args = parser.parse_args()
    first, end = (int(x) for x in args.seeds.split(":"))
    only = args.only.split(",")
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; they are {', '.join(SCENARIOS)}")
    workers = [int(w) for w in args.workers.split(",")]
    broken = 0
    for seed in range(first, end):
        started = time.monotonic()
        scenario, bad = run(seed, workers, only)
        took = time.monotonic() - started
        if bad:
            broken += 1
            print(f"BAD {seed} {scenario} {took:.1f}s {bad[:4]}", flush=True)
        else:
            print(f"ok  {seed} {scenario} {took:.1f}s", flush=True)
    print(f"{end - first - broken} ok, {broken} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
