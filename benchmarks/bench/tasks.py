"""The functions the workers run.

They live in a module of their own, with no third-party import, so that every library pickles
them by reference and every start method imports them in a few milliseconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any


def square(x: int) -> int:
    """The seed's task, and the tiny task of W2 and W7."""
    return x * x


def noop(x: Any) -> Any:
    """A task that does nothing, for round-trip latency and start-up."""
    return x


def burn(iterations: int) -> int:
    """CPU-bound work that holds the GIL: a pure-Python loop of ``iterations`` steps."""
    total = 0
    for i in range(iterations):
        total += i
    return total


def spin(seconds: float) -> float:
    """Keep a core busy for ``seconds``; ``time.sleep`` cannot wait a microsecond."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def nap(seconds: float) -> float:
    """Sleep ``seconds``: a task that holds its worker without holding a core."""
    time.sleep(seconds)
    return seconds


def double(array: Any) -> Any:
    """Return a NumPy array twice as large: the array travels both ways."""
    return array * 2


def total(array: Any) -> float:
    """Return an array's sum: the array travels one way only."""
    return float(array.sum())


def apply_chunk(fn: Callable[[Any], Any], chunk: Sequence[Any]) -> list[Any]:
    """Run ``fn`` over a chunk: hand-made chunking for libraries that have none (Dask)."""
    return [fn(x) for x in chunk]


def die_at(x: int, *, victim: int, marker: str, pause: float) -> int:
    """Square ``x`` after ``pause`` seconds; for ``x == victim``, kill the worker instead.

    The first death writes the monotonic clock (system-wide on Linux) to ``marker`` so the
    benchmark can time recovery from the moment the worker died.
    """
    if x == victim:
        _record_death(marker)
        os._exit(1)
    time.sleep(pause)
    return x * x


def _record_death(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return  # a retried task dies again; the first death is the one we time
    with os.fdopen(fd, "w") as f:
        f.write(repr(time.monotonic()))


def echo(conn: Connection) -> None:
    """Send back whatever arrives until ``None``: the raw ``Pipe`` round-trip reference."""
    while (item := conn.recv()) is not None:
        conn.send(item)
