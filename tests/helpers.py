"""Module-level task functions: importable by reference under every start method."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import weakref
from collections.abc import Callable
from typing import Any

from procpool.testing import Unpicklable


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def pid(_: object = None) -> int:
    return os.getpid()


def next_of_nothing_on(x: int, bad: int = 100) -> int:
    """Return x, but fail on ``bad`` as a task that calls next() on an exhausted
    iterator does: with StopIteration, which map() takes for its own end."""
    if x == bad:
        return int(next(iter(())))
    return x


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


def sleep_return(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


def sleep_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def blob(nbytes: int) -> bytes:
    return b"x" * nbytes


def stamped_blob(nbytes: int) -> tuple[float, bytes]:
    """Sleep 50 ms, then return when this task started and ``nbytes`` of bytes."""
    started = time.monotonic()
    time.sleep(0.05)
    return started, b"x" * nbytes


def blob_or_sleep(x: int) -> bytes:
    """``x`` bytes for a positive ``x``; else sleep ``-x`` seconds and return none."""
    if x > 0:
        return b"x" * x
    time.sleep(-x)
    return b""


class SlowToPickle:
    """Takes ``seconds`` to pickle; unpickles as the string "pickled"."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[object, tuple[str]]:
        time.sleep(self.seconds)
        return str, ("pickled",)


def big_then_slow_to_pickle(seconds: float) -> tuple[bytes, SlowToPickle]:
    """A result over a piece's 1 MB that takes ``seconds`` to pickle."""
    return b"x" * 1_100_000, SlowToPickle(seconds)


def references_to_first(item: tuple[object, int]) -> int:
    """How many references the worker's copy of ``item[0]`` has: one per task of
    the chunk that shares it, since a chunk is unpickled as one stream."""
    import sys

    return sys.getrefcount(item[0])


def length_plus_index(item: tuple[bytes, int]) -> int:
    return len(item[0]) + item[1]


def identity(x: object) -> object:
    return x


def set_env(name: str, value: str) -> None:
    os.environ[name] = value


def get_env(name: str) -> str | None:
    return os.environ.get(name)


def slow_square(x: int) -> int:
    """Square, sleeping 2 ms on every 100th input (the chaos test's workload)."""
    if x % 100 == 0:
        time.sleep(0.002)
    return x * x


def draw(_: object = None) -> float:
    import random

    return random.random()


def double(a: object) -> object:
    return a * 2  # type: ignore[operator]


def make_array(n: int) -> object:
    import numpy

    return numpy.arange(n, dtype="float64")


def crash_after_making_array(n: int) -> object:
    import numpy

    # Large result, then death while "sending" it: the segment must not leak.
    from procpool.testing import return_crashes_on_pickle

    return [numpy.arange(n, dtype="float64"), return_crashes_on_pickle()]


def total(a: object) -> float:
    return float(a.sum())  # type: ignore[attr-defined]


_KEPT_ARRAYS: list[object] = []


def keep_array(a: object) -> float:
    """Keep the argument (a view of its shared-memory segment) beyond the task."""
    _KEPT_ARRAYS.append(a)
    return total(a)


def kept_totals(_: object = None) -> list[float]:
    return [total(a) for a in _KEPT_ARRAYS]


def echo_bytes(data: bytes) -> bytes:
    return data[::-1]


def nested_map(n: int) -> list[int]:
    import procpool

    with procpool.Pool(2) as pool:
        return pool.map(square, range(n))


class Model:
    """An object with ``nbytes`` of state whose method is the task: each process
    counts the copies it unpickled and those still alive (in its callable cache)."""

    copies: weakref.WeakSet[Model] = weakref.WeakSet()
    unpickled = 0

    def __init__(self, nbytes: int, tag: int = 0) -> None:
        self.state = bytes(nbytes)
        self.tag = tag

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        Model.unpickled += 1
        Model.copies.add(self)

    def predict(self, x: int) -> tuple[int, int, int, int]:
        """(tag, x, copies unpickled so far, copies alive) in this process."""
        return self.tag, x, Model.unpickled, len(Model.copies)


class SleepsWhenUnpickled:
    """Unpickling it blocks for an hour: a process handed one as it starts gets stuck there."""

    def __reduce__(self) -> tuple[object, ...]:
        import time

        return (time.sleep, (3600,))


# A module global the zygote tests change around a pool's creation.
STATE = "unset"


def read_state(_: object = None) -> str:
    return STATE


def family(_: object = None) -> tuple[int, int | None]:
    """(parent pid, multiprocessing's idea of the parent pid) of this worker."""
    from multiprocessing import parent_process

    parent = parent_process()
    return os.getppid(), None if parent is None else parent.pid


def kill_self(_: object = None) -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def private_mb_after_collect(_: object = None) -> float:
    """This worker's private memory (MB, Linux) after a full garbage collection."""
    import gc

    gc.collect()
    with open("/proc/self/smaps_rollup") as f:
        kb = sum(int(line.split()[1]) for line in f if line.startswith("Private_"))
    return kb / 1024


_BARRIER: object = None


def keep_barrier(barrier: object) -> None:
    """An initializer: keep a Barrier passed in initargs."""
    global _BARRIER
    _BARRIER = barrier


def pid_after_barrier(_: object = None) -> int:
    """Wait until as many tasks as the barrier's parties run at once; return this pid."""
    _BARRIER.wait(timeout=30)  # type: ignore[attr-defined]
    return os.getpid()


def pid_after_barrier_unless_negative(x: int) -> int:
    """Return at once for a negative ``x``, else as pid_after_barrier (10 s at most)."""
    if x >= 0:
        _BARRIER.wait(timeout=10)  # type: ignore[attr-defined]
    return os.getpid()


def fill_kept_queue(n: int) -> int:
    """Put ``n`` items of 1 KB on the Queue that keep_barrier() kept; more than a pipe holds."""
    for _ in range(n):
        _BARRIER.put(b"x" * 1024)  # type: ignore[attr-defined]
    return n


def count_onto_kept_queue(n: int) -> int:
    """Put 0 .. n-1 on the Queue that keep_barrier() kept."""
    for i in range(n):
        _BARRIER.put(i)  # type: ignore[attr-defined]
    return n


def counted_square(x: int) -> int:
    """``x * x``, appending a line ``x`` to the file whose path keep_barrier() kept: one
    line per run, written at once (a worker that dies after it loses nothing)."""
    fd = os.open(_BARRIER, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # type: ignore[arg-type]
    try:
        os.write(fd, f"{x}\n".encode())
    finally:
        os.close(fd)
    return x * x


def pause_then(seconds: float, fn: Callable[[], object]) -> object:
    """Sleep ``seconds``, then return ``fn()``: a crash that comes once its caller waits."""
    time.sleep(seconds)
    return fn()


def counted_sleep(task: tuple[int, float]) -> tuple[int, int]:
    """Append ``x`` to the kept file (as counted_square), sleep ``seconds``, and return
    ``(x, pid)``; a negative ``seconds`` ends the worker (os._exit) after as long."""
    x, seconds = task
    counted_square(x)
    time.sleep(abs(seconds))
    if seconds < 0:
        os._exit(7)
    return x, os.getpid()


def square_or_exit(x: int) -> int:
    """``x * x``, except that a negative ``x`` ends the worker (os._exit)."""
    if x < 0:
        os._exit(7)
    return x * x


def counted_square_or_exit(x: int) -> int:
    """counted_square(x), except that a negative ``x`` ends the worker (os._exit)
    once its line is written."""
    result = counted_square(x)
    if x < 0:
        os._exit(7)
    return result


def counted_fault(task: tuple[int, str]) -> Any:
    """Run task ``(i, kind)`` after counted_square(i) wrote its line: ``"ok"`` gives
    ``i * i``, ``"slow"`` spins 2 ms first, ``"raise"`` raises ValueError, ``"exit"``
    ends the worker (os._exit), ``"kill"`` SIGKILLs it, ``"big"`` returns 700 KB,
    ``"unpicklable"`` a result that cannot be pickled, ``"hang"`` sleeps a minute."""
    i, kind = task
    result = counted_square(i)
    if kind == "exit":
        os._exit(3)
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "raise":
        raise ValueError(i)
    elif kind == "slow":
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
    elif kind == "big":
        return b"x" * 700_000
    elif kind == "unpicklable":
        return Unpicklable()
    elif kind == "hang":
        time.sleep(60)
    return result


def outcomes_of(results: list[Any], limit: float = 120.0) -> list[Any]:
    """Each result's value, or the exception its ``get()`` raised, all within
    ``limit`` seconds (a result still waiting then gives its TimeoutError)."""
    end = time.monotonic() + limit
    outcomes: list[Any] = []
    for result in results:
        try:
            outcomes.append(result.get(max(0.0, end - time.monotonic())))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def failing_initializer(log: str, failing_from: int) -> None:
    """keep_barrier(log); then raise in the ``failing_from``-th worker that starts,
    and in every later one (they count themselves in ``log + ".init"``)."""
    keep_barrier(log)
    with open(log + ".init", "a") as starts:
        starts.write("x")
    if os.path.getsize(log + ".init") >= failing_from:
        raise RuntimeError("the initializer fails from now on")


def family_after_barrier(_: object = None) -> tuple[int, int | None]:
    """family(), once as many tasks as the barrier's parties run at once."""
    _BARRIER.wait(timeout=30)  # type: ignore[attr-defined]
    return family()


def note_start_and_sleep(path: str, seconds: float) -> None:
    """An initializer: append this worker's start and end times to a file."""
    start = time.monotonic()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{start} {time.monotonic()}\n")


def nested_pool_report(n: int) -> tuple[list[int], list[str], str]:
    """In a worker: make a default pool; return its results, the warnings, its start method."""
    import warnings

    import procpool

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with procpool.Pool(2) as pool:
            results = pool.map(square, range(n))
            method = pool._runner.engine._ctx.get_start_method()
    return results, [str(w.message) for w in caught], method


def fork_holder_then_exit(pid_file: str) -> None:
    """Fork a child that keeps every inherited descriptor (the worker's pipe
    included) open for 30 s, write its pid to ``pid_file``, then die with exit
    code 5. The caller kills the child."""
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    with open(pid_file, "w") as f:
        f.write(str(child))
    os._exit(5)


def slow_start_for_the_first_worker(seconds: float) -> None:
    """An initializer: the pool's first-started worker is ready ``seconds`` late."""
    if multiprocessing.current_process().name == "procpool-worker-0":
        time.sleep(seconds)


def worker_name(_: object = None) -> str:
    return multiprocessing.current_process().name


def fail_at_3_mod_7(x: int) -> int:
    if x % 7 == 3:
        raise ValueError(f"bad input {x}")
    return x


def loaded(names: list[str]) -> list[str]:
    """Which of the modules ``names`` this process has imported."""
    import sys

    return [name for name in names if name in sys.modules]


def script_output(folder: os.PathLike[str], source: str, *args: str, **env: str) -> str:
    """Run ``source`` as a script file in a fresh interpreter (a spawned child
    imports it again, as it would a user's); return what it printed.

    Raises:
        AssertionError: if the script failed, with its stderr.
    """
    import subprocess
    import sys

    script = os.path.join(folder, "script.py")
    with open(script, "w") as f:
        f.write(source)
    out = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",  # bytes that are not UTF-8 come back as they were
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
