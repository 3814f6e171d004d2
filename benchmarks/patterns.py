"""Two procpool engines side by side on patterns the harness does not time alone.

    python benchmarks/patterns.py OLD_SRC NEW_SRC [--workers 2,8] [--rounds 3] [--only a,b]

OLD_SRC and NEW_SRC are ``src`` folders of two checkouts (``git archive REV src``).
Each measurement runs in a fresh process, the two engines alternating, so that a
machine that slows down slows both; the report gives each engine's figures and their
medians. Wall-clock figures, for comparing engines in one run, never for assertions.

Patterns (``x ideal``: the map's time over the work divided by the workers):

- ``burn25``: 32 tasks per worker of a fixed pure-Python loop (W3's shape: ~25 ms
  each on the 2-core machine), in seconds: a serial reference timed in one process
  moved by more than the engines differ;
- ``sleep10``: 20 tasks per worker of ``time.sleep(0.01)``;
- ``spin1``: 1,000 tasks per worker spinning 1 ms (the throughput curve's 1 ms point);
- ``tiny``: 1,000,000 ``x*x`` (W2 by default), in tasks per second.

Each map is timed after two that measure the function, best of three.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench.measure import figure_in_fresh_process

HERE = Path(__file__).resolve().parent
PATTERNS = ("burn25", "sleep10", "spin1", "tiny")


def measure(pattern: str, workers: int) -> float:
    """One figure for ``pattern`` (x ideal, or tasks/s for ``tiny``), in this process."""
    sys.path.insert(0, str(HERE))
    from bench import tasks

    import procpool

    if pattern == "burn25":
        fn, args, ideal = tasks.burn, [400_000] * (32 * workers), 1.0
    elif pattern == "sleep10":
        fn, args, ideal = time.sleep, [0.01] * (20 * workers), 20 * 0.01
    elif pattern == "spin1":
        fn, args, ideal = tasks.spin, [0.001] * (1000 * workers), 1000 * 0.001
    elif pattern == "tiny":
        fn, args, ideal = tasks.square, list(range(1_000_000)), 0.0
    else:
        raise SystemExit(f"unknown pattern {pattern!r}")
    with procpool.Pool(workers) as pool:
        pool.map(tasks.square, range(4 * workers))
        pool.map(fn, args[: max(workers, len(args) // 100)])
        pool.map(fn, args[: max(workers, len(args) // 10)])
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            pool.map(fn, args)
            best = min(best, time.perf_counter() - start)
    return len(args) / best if pattern == "tiny" else best / ideal  # burn25: seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", nargs="?")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(PATTERNS))
    parser.add_argument("--one", nargs=2, metavar=("PATTERN", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.one[0], int(args.one[1])))
        return
    if not (args.old and args.new):
        parser.error("OLD_SRC and NEW_SRC are required")
    engines = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    for workers in (int(w) for w in args.workers.split(",")):
        for pattern in args.only.split(","):
            figures: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.rounds):
                for name, src in engines.items():
                    path = [src, *filter(None, [os.environ.get("PYTHONPATH")])]
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
                    argv = [__file__, "--one", pattern, str(workers)]
                    figures[name].append(figure_in_fresh_process(argv, env))
            unit = {"tiny": "tasks/s", "burn25": "s"}.get(pattern, "x ideal")
            for name, values in figures.items():
                shown = " ".join(f"{v:.4g}" for v in values)
                print(
                    f"{pattern:8} {workers:3}w {name}: median {statistics.median(values):.4g}"
                    f" {unit} ({shown})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
