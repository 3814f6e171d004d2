"""procpool against ``multiprocessing.Pool`` with an explicit small ``chunksize``.

    python benchmarks/chunks.py [--workers 2,16] [--rounds 3] [--only map1,imap1]

The harness times each library's default and its best chunksize; a user who passes
``chunksize=1`` (the standard library's ``imap`` default) or a small number is timed
here. Each measurement runs in a fresh process, the two pools alternating, so that a
machine that slows down slows both. Wall-clock figures, for comparing in one run, never
for assertions.

Shapes (the task is ``x*x`` unless said):

- ``map1``, ``imap1``, ``imapu1``: ``map``, ``imap`` and ``imap_unordered`` with
  ``chunksize=1`` over 20,000 tasks;
- ``map10``, ``imap10``, ``imapu10``: the same with ``chunksize=10`` over 200,000;
- ``imap1mix``: ``imap`` with ``chunksize=1`` over 10,000 tasks of which one in a
  hundred spins 2 ms (short chunks behind a long one).

Each figure is the best of three timed calls on a warm pool, in milliseconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE))  # bench.tasks, here and in workers that import this module
sys.path.append(str(HERE.parent / "src"))  # procpool from this checkout, unless one is installed
from bench import tasks  # noqa: E402
from bench.measure import figure_in_fresh_process  # noqa: E402

SHAPES = ("map1", "imap1", "imapu1", "map10", "imap10", "imapu10", "imap1mix")
POOLS = ("procpool", "mp.Pool")


def mixed(i: int) -> int:
    """One task in a hundred spins 2 ms; the rest are ``x*x``."""
    if i % 100 == 0:
        tasks.spin(0.002)
    return i * i


def call(pool: Any, shape: str, workers: int) -> Callable[[], object]:
    """The timed call for ``shape``."""
    if shape == "imap1mix":
        items = range(10_000)
        return lambda: list(pool.imap(mixed, items, 1))
    size = 1 if shape.endswith("1") else 10
    items = range(20_000 if size == 1 else 200_000)
    method = shape.rstrip("0123456789")
    if method == "map":
        return lambda: pool.map(tasks.square, items, size)
    if method == "imap":
        return lambda: list(pool.imap(tasks.square, items, size))
    return lambda: list(pool.imap_unordered(tasks.square, items, size))


def measure(pool_name: str, shape: str, workers: int) -> float:
    """Best of three, in milliseconds, in this process."""
    import procpool

    make = procpool.Pool if pool_name == "procpool" else multiprocessing.Pool
    with make(workers) as pool:
        pool.map(tasks.square, range(1_000 * workers))
        timed = call(pool, shape, workers)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            timed()
            best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(SHAPES))
    parser.add_argument("--one", nargs=3, metavar=("POOL", "SHAPE", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.one[0], args.one[1], int(args.one[2])))
        return
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    for workers in (int(w) for w in args.workers.split(",")):
        for shape in args.only.split(","):
            if shape not in SHAPES:
                raise SystemExit(f"unknown shape {shape!r}; the shapes are {', '.join(SHAPES)}")
            figures: dict[str, list[float]] = {name: [] for name in POOLS}
            for _ in range(args.rounds):
                for name in POOLS:
                    argv = [__file__, "--one", name, shape, str(workers)]
                    figures[name].append(figure_in_fresh_process(argv))
            medians = {name: statistics.median(values) for name, values in figures.items()}
            shown = "; ".join(
                f"{name} {medians[name]:.0f} ms ({' '.join(f'{v:.0f}' for v in values)})"
                for name, values in figures.items()
            )
            ratio = medians["procpool"] / medians["mp.Pool"]
            print(f"{shape:9} {workers:3}w {shown}; procpool/mp {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
