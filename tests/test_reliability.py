"""Interrupts, parent death, bounded memory, failures in place, leaks, recycling, chaos."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import psutil
import pytest

from procpool import (
    IMapIterator,
    Pool,
    PoolClosedError,
    ProcessPoolExecutor,
    TaskTimeoutError,
    WorkerCrashedError,
)
from procpool import testing as crash
from tests.helpers import fail_on, pid, slow_square, square

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CALLS = {
    "map": "pool.map(time.sleep, [30] * 4, chunksize=1)",
    "imap": "list(pool.imap(time.sleep, [30] * 4))",
    "apply": "pool.apply(time.sleep, (30,))",
    "submit": "ex.submit(time.sleep, 30).result()",
}


def _script(call: str) -> str:
    return textwrap.dedent(
        f"""
        import multiprocessing, os, sys, time
        import procpool

        if __name__ == "__main__":
            pool = procpool.Pool(2)
            ex = procpool.ProcessPoolExecutor(2)
            pool.apply(os.getpid); ex.submit(os.getpid).result()
            zygote = getattr(pool._runner.engine._ctx, "zygote", None)  # the default on Linux
            pids = [p.pid for p in multiprocessing.active_children()]
            pids += [zygote.pid] if zygote else []
            print(" ".join(map(str, pids)), flush=True)
            try:
                with pool, ex:
                    {call}
            except KeyboardInterrupt:
                print("interrupted", flush=True)
        """
    )


def _start(call: str) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _script(call)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) >= 4, pids
    time.sleep(0.5)  # let the call start
    return proc, pids


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return True
        time.sleep(0.02)
    return False


def _alive(pid_: int) -> bool:
    try:
        return psutil.Process(pid_).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("call", sorted(CALLS))
def test_ctrl_c_interrupts_within_a_second_and_leaves_no_worker(call: str) -> None:
    proc, pids = _start(CALLS[call])
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "interrupted"
    assert time.monotonic() - sent < 1.0
    proc.wait(5)
    proc.stdout.close()
    assert _gone_within(pids, 2.0)


def test_sigterm_is_a_clean_shutdown() -> None:
    proc, pids = _start(CALLS["map"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 128 + signal.SIGTERM
    proc.stdout.close()  # type: ignore[union-attr]
    assert _gone_within(pids, 2.0)


def test_workers_exit_by_themselves_when_the_parent_is_killed() -> None:
    proc, pids = _start(CALLS["map"])
    proc.kill()
    proc.wait(5)
    proc.stdout.close()  # type: ignore[union-attr]
    assert _gone_within(pids, 2.0)


class _Counted:
    """An iterator over ``range(n)`` that counts the items pulled from it."""

    def __init__(self, n: int) -> None:
        self._items = iter(range(n))
        self.pulled = 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> int:
        item = next(self._items)
        self.pulled += 1
        return item


def test_imap_reads_its_input_lazily_and_stopping_early_is_cheap() -> None:
    numbers = _Counted(10_000_000)

    with Pool(2) as pool:
        started = time.monotonic()
        for n, _ in enumerate(pool.imap(square, numbers)):
            if n == 999:
                break
        assert time.monotonic() - started < 5
        # Bounded by the buffer: at most 4 adaptive chunks (<= 8192 tasks) per worker.
        assert numbers.pulled <= 1_000 + 4 * 2 * 8192
        # A slow consumer holds the workers back instead of piling up results.
        more = _Counted(10_000_000)
        it = pool.imap_unordered(square, more, buffersize=100)
        next(it)
        before = more.pulled
        time.sleep(0.5)
        assert more.pulled - before <= 100
        assert pool.map(square, [3]) == [9]  # still usable


def test_imap_with_a_small_fixed_chunksize_keeps_more_short_chunks_ahead() -> None:
    # Four chunks of ten tiny tasks per worker do not cover a round trip through
    # the dispatcher: the buffer of a fixed chunksize deepens once its chunks
    # are measured short (IMapIterator._deepen), and stays bounded.
    from procpool._results import FIXED_AHEAD_CHUNKS, IMapIterator

    numbers = _Counted(10_000_000)

    with Pool(2) as pool:
        it = pool.imap(square, numbers, 10)
        assert isinstance(it, IMapIterator)
        for n, value in enumerate(it):
            assert value == n * n
            if n == 20_000:
                break
        assert it._buffersize > 4 * 2 * 10
        assert numbers.pulled <= 20_001 + 2 * FIXED_AHEAD_CHUNKS * 10
        assert it._chunksize == 10  # the chunks themselves stay as asked


def test_a_fixed_chunksize_buffer_deepens_only_for_short_small_chunks() -> None:
    from procpool._core._batch import CHUNK_BYTES
    from procpool._results import FIXED_AHEAD_CHUNKS, FIXED_AHEAD_TASKS

    def make(buffersize: int | None = None, chunksize: int = 10) -> IMapIterator[int]:
        return IMapIterator(
            lambda items, first, sink: [],
            iter(range(10**6)),
            chunksize,
            buffersize,
            workers=2,
            ordered=True,
        )

    it = make()
    assert it._buffersize == 4 * 2 * 10
    it.observe(10, 10e-6, 40)  # 1 us tasks of 4 bytes: as deep as allowed
    assert it._buffersize == 2 * FIXED_AHEAD_CHUNKS * 10
    it = make()
    it.observe(10, 0.1, 40)  # 10 ms tasks: a chunk covers any round trip
    assert it._buffersize == 4 * 2 * 10
    it = make()
    it.observe(10, 10e-6, 10 * CHUNK_BYTES // 4)  # big items: no more arguments held
    assert it._buffersize == 4 * 2 * 10
    it = make(buffersize=30)  # the caller's own buffer is kept
    it.observe(10, 10e-6, 40)
    assert it._buffersize == 30
    it = make(chunksize=1)  # one-task chunks: up to FIXED_AHEAD_TASKS a worker
    it.observe(1, 1e-6, 4)
    assert it._buffersize == 2 * FIXED_AHEAD_TASKS
    it.observe(1, 0.01, 4)  # a 10 ms task: back to the floor, 8 tasks a worker
    assert it._buffersize == 2 * 8


def _recording_iterator(
    calls: list[tuple[int, list[int]]],
    items: Iterable[int],
    buffersize: int | None = None,
    fail_from_call: int | None = None,
) -> IMapIterator[int]:
    """An imap iterator over ``items`` in chunks of 1 whose submits are recorded
    in ``calls`` as (first task, chunk lengths); from call ``fail_from_call`` on
    they raise, as a pool's submit does once the pool is closed."""

    def submit(chunks: list[list[int]], first: int, sink: object) -> list[Any]:
        calls.append((first, [len(c) for c in chunks]))
        if fail_from_call is not None and len(calls) >= fail_from_call:
            raise PoolClosedError("Pool not running")
        return []

    return IMapIterator(submit, items, 1, buffersize, workers=2, ordered=True)


def test_a_fixed_chunksize_refills_its_buffer_in_bursts() -> None:
    # The first chunk goes at once (the workers wait for it), the rest of the
    # buffer (16 chunks of 1 for 2 workers) in one submit; then nothing until
    # half the buffer has come back, and again one submit to fill it.
    calls: list[tuple[int, list[int]]] = []
    it = _recording_iterator(calls, iter(range(1000)))
    assert calls == [(0, [1]), (1, [1] * 15)]
    for i in range(16):
        it.deliver(i, [i * i], None)
    assert [next(it) for _ in range(8)] == [i * i for i in range(8)]
    assert len(calls) == 2  # 8 still out of 16: no refill yet
    assert next(it) == 64
    assert calls[2] == (16, [1] * 8)


def test_a_burst_does_not_wait_for_a_slow_input() -> None:
    # Each item takes 3 ms to read, past BURST_WAIT_S: every chunk is sent as
    # soon as it is read, not held for the rest of its burst.
    from procpool._results import BURST_WAIT_S

    def slow() -> Iterator[int]:
        for i in range(12):
            time.sleep(3 * BURST_WAIT_S)
            yield i

    calls: list[tuple[int, list[int]]] = []
    it = _recording_iterator(calls, slow(), buffersize=4)
    for i in range(4):
        it.deliver(i, [i], None)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    assert calls and all(lengths == [1] for _, lengths in calls), calls


def test_a_burst_that_cannot_be_submitted_fails_its_tasks_and_ends_the_input() -> None:
    calls: list[tuple[int, list[int]]] = []
    it = _recording_iterator(calls, iter(range(1000)), fail_from_call=2)
    assert calls == [(0, [1]), (1, [1] * 15)]
    it.deliver(0, [0], None)
    outcomes: list[object] = []
    for _ in range(17):
        try:
            outcomes.append(next(it))
        except PoolClosedError as exc:
            outcomes.append(exc)
        except StopIteration:
            break
    assert outcomes[0] == 0
    assert len(outcomes) == 16 and all(isinstance(o, PoolClosedError) for o in outcomes[1:])


MEMORY_SCRIPT = """
import resource, sys, time
import multiprocessing, procpool

def square(x):
    return x * x

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6

if __name__ == "__main__":
    kind, chunksize = sys.argv[1], int(sys.argv[2])  # 0: the pool's default
    pool = procpool.Pool(2) if kind == "procpool" else multiprocessing.Pool(2)
    base = rss_mb()
    options = {"chunksize": chunksize} if chunksize else {}
    it = pool.imap(square, range(5_000_000), **options)
    for n, _ in enumerate(it):
        if n == 1000:
            break
        time.sleep(0.001)  # a slow consumer
    time.sleep(1.0)
    print(rss_mb() - base)
    pool.terminate()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_slow_consumer_memory_growth_is_bounded_unlike_the_stdlib() -> None:
    # The standard library's imap piles results up as fast as its workers make
    # them. With its default chunksize of 1 that is ~25k a second here, a few MB
    # in the second this waits, about what procpool's bounded buffer holds, so
    # the two compare with chunks of 100, where it piles up tens of MB.
    growth = {}
    for kind, chunksize in (("procpool", 0), ("procpool", 100), ("stdlib", 100)):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, kind, str(chunksize)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=ROOT,
        )
        growth[kind, chunksize] = float(out.stdout.strip())
    assert growth["procpool", 0] < 20, growth  # MB
    assert growth["procpool", 100] < 20, growth
    assert growth["stdlib", 100] > growth["procpool", 100], growth


def test_a_million_tasks_with_three_failures_in_place() -> None:
    bad = {12, 500_000, 999_999}
    with Pool(2) as pool:
        out = pool.map(_fail_if_bad, range(1_000_000), return_exceptions=True)
    errors = [i for i, r in enumerate(out) if isinstance(r, ValueError)]
    assert errors == sorted(bad)
    assert sum(1 for r in out if not isinstance(r, ValueError)) == 999_997
    assert out[13] == 13 and out[999_998] == 999_998


def _fail_if_bad(x: int) -> int:
    if x in (12, 500_000, 999_999):
        raise ValueError(x)
    return x


def test_max_memory_per_worker_recycles_the_worker() -> None:
    with Pool(1, max_memory_per_worker="60MB") as pool:
        first = pool.apply(pid)
        pool.apply(crash.allocate, (100_000_000,))
        assert pool.apply(pid) != first  # replaced before its next task
        second = pool.apply(pid)
        assert pool.apply(pid) == second  # not replaced without cause
    with pytest.raises(ValueError, match="max_memory_per_worker"):
        Pool(1, max_memory_per_worker="lots")


def _count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("method", "rounds"), [("fork", 1000), ("forkserver", 100), ("spawn", 10)])
def test_pools_and_executors_leave_nothing_behind(method: str, rounds: int) -> None:
    Pool(1, context=method).terminate()  # warm up the start method's helpers
    fds, threads = _count_fds(), threading.active_count()
    children = {c.pid for c in psutil.Process().children()}
    for i in range(rounds):
        if i % 2:
            with Pool(1, context=method) as pool:
                pool.apply(square, (i,))
        else:
            with ProcessPoolExecutor(1, mp_context=method) as ex:
                ex.submit(square, i).result()
    assert _count_fds() <= fds
    assert threading.active_count() <= threads
    assert {c.pid for c in psutil.Process().children()} <= children


def test_a_dropped_pool_does_not_leave_workers_running() -> None:
    pool = Pool(2)
    pool.apply(square, (1,))
    workers = [p.pid for p in __import__("multiprocessing").active_children()]
    with pytest.warns(ResourceWarning):
        del pool
        import gc

        gc.collect()
    assert _gone_within([p for p in workers if p], 3.0)


def test_chaos_every_task_ends_exactly_once_and_retries_make_them_right() -> None:
    import multiprocessing

    stop = threading.Event()

    def killer() -> None:
        rng = random.Random(1)
        while not stop.wait(0.05):
            victims = [
                p.pid
                for p in multiprocessing.active_children()
                if p.name.startswith("procpool-worker")
            ]
            if victims:
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    n = 20_000
    with Pool(2) as pool:
        thread = threading.Thread(target=killer)
        thread.start()
        try:
            plain = pool.map(slow_square, range(n), chunksize=20, return_exceptions=True)
            retried = pool.map(slow_square, range(n), chunksize=20, retries=3)
        finally:
            stop.set()
            thread.join()
    assert len(plain) == n
    assert all(r == i * i or isinstance(r, WorkerCrashedError) for i, r in enumerate(plain))
    assert any(isinstance(r, WorkerCrashedError) for r in plain)
    assert retried == [i * i for i in range(n)]


def test_per_call_timeout_and_retry_options() -> None:
    with Pool(2) as pool:
        out = pool.map(
            crash.sleep, [0.0, 5.0, 0.0], chunksize=1, task_timeout=0.3, return_exceptions=True
        )
        assert out[0] is None and out[2] is None
        assert isinstance(out[1], TaskTimeoutError) and out[1].task_index == 1
        with pytest.raises(TaskTimeoutError):
            pool.apply(crash.sleep, (5.0,), task_timeout=0.2)
        with pytest.raises(ValueError, match="task_timeout"):
            pool.map(square, [1], task_timeout=-1)
        with pytest.raises(ValueError):
            pool.map(fail_on, [3], retries=2, retry_on=(ValueError,))
