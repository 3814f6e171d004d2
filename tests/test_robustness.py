"""Awkward but legal uses: big payloads, nested pools, many threads, exiting without close."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from procpool import Pool, ProcessPoolExecutor, SerializationError, TaskTimeoutError
from procpool import testing as crash
from tests.helpers import echo_bytes, nested_map, square


def test_large_payloads_both_ways_never_deadlock() -> None:
    # bytes travel in-band (not through shared memory): 8 MB each way, more
    # than any pipe buffer, with prefetch and two workers busy at once.
    blobs = [bytes([i]) * (8 << 20) for i in range(8)]
    with Pool(2) as pool:
        out = pool.map(echo_bytes, blobs, chunksize=1)
    assert out == [b[::-1] for b in blobs]


def test_an_unpicklable_callable_is_named_and_nothing_is_lost() -> None:
    lock = threading.Lock()
    with Pool(2) as pool:
        done = pool.map_async(square, range(100))
        with pytest.raises(SerializationError, match="cannot pickle the callable"):
            pool.map(lambda x: (lock, x), range(3))
        assert done.get(10) == [x * x for x in range(100)]


def test_tasks_may_use_pools_of_their_own() -> None:
    with Pool(2) as pool:
        assert pool.apply(nested_map, (5,)) == [0, 1, 4, 9, 16]


def test_many_threads_share_one_pool() -> None:
    results: dict[int, list[int]] = {}
    with Pool(2) as pool:

        def work(k: int) -> None:
            results[k] = pool.map(square, range(k, k + 200), chunksize=7)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == {k: [x * x for x in range(k, k + 200)] for k in range(8)}


def test_a_timeout_in_a_default_map_fails_only_the_slow_task() -> None:
    with Pool(2, task_timeout=0.5) as pool:
        out = pool.map(crash.sleep, [0.01] * 20 + [10.0] + [0.01] * 20, return_exceptions=True)
    assert [i for i, r in enumerate(out) if r is not None] == [20]
    assert isinstance(out[20], TaskTimeoutError)


@pytest.mark.parametrize("kind", ["Pool", "ProcessPoolExecutor"])
def test_exiting_without_close_neither_hangs_nor_leaves_workers(kind: str) -> None:
    script = textwrap.dedent(
        f"""
        import multiprocessing, time, procpool
        if __name__ == "__main__":
            pool = procpool.{kind}(2)
            if {kind == "Pool"}:
                pool.apply_async(time.sleep, (30,))  # dropped at exit: terminated
            else:
                pool.submit(time.sleep, 0.2)  # an executor finishes its work at exit
            print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        """
    )
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert time.monotonic() - started < 10
    import psutil

    pids = [int(p) for p in out.stdout.split()]
    deadline = time.monotonic() + 3
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if psutil.pid_exists(p)]


def test_executor_map_stops_reading_input_when_abandoned() -> None:
    pulled = 0

    def numbers():
        nonlocal pulled
        for i in range(10**9):
            pulled += 1
            yield i

    with ProcessPoolExecutor(2) as ex:
        it = ex.map(square, numbers())
        assert [next(it) for _ in range(10)] == [x * x for x in range(10)]
        it.close()
        seen = pulled
        time.sleep(0.2)
        assert pulled == seen
