"""Every backend passes the same conformance suite; the threads backend's own limits."""

from __future__ import annotations

import threading

import pytest

from procpool import InitializerError, Pool
from procpool.backends import Backend, BackendOptions, make_backend
from procpool.testing import check_backend
from tests.helpers import square


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_backend_conformance(backend: str) -> None:
    check_backend(backend)


def test_a_factory_is_a_backend_too() -> None:
    def factory(workers: int, options: BackendOptions) -> Backend:
        return make_backend("threads", workers, options)

    check_backend(factory)


def test_threads_run_in_this_process_without_pickling() -> None:
    lock = threading.Lock()  # unpicklable: fine, nothing is pickled
    with Pool(3, backend="threads") as pool:
        names = pool.map(lambda x: (lock is not None, threading.current_thread().name), range(30))
    assert all(ok for ok, _ in names)
    assert {n for _, n in names} <= {f"procpool-thread-{i}" for i in range(3)}


def test_threads_refuse_what_they_cannot_do() -> None:
    with pytest.raises(ValueError, match="task_timeout"):
        Pool(2, backend="threads", task_timeout=1)
    with pytest.raises(ValueError, match="seed"):
        Pool(2, backend="threads", seed=1)
    with pytest.raises(ValueError, match="memory"):
        Pool(2, backend="threads", max_memory_per_worker="1GB")
    with Pool(2, backend="threads") as pool, pytest.raises(ValueError, match="task_timeout"):
        pool.map(square, [1], task_timeout=1)
    with pytest.raises(ValueError, match="unknown backend"):
        Pool(2, backend="carrier-pigeons")


def test_threads_initializer_failure_breaks_the_pool_clearly() -> None:
    def bad() -> None:
        raise KeyError("missing")

    with Pool(2, backend="threads", initializer=bad) as pool, pytest.raises(InitializerError):
        pool.map(square, range(10))


def test_threads_run_each_task_once_and_retry_only_what_is_due() -> None:
    # A batch runs in C (map, starmap) up to a task that raises; that task's
    # exception is its first attempt, never a reason to run it again unasked.
    runs: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x: int, fail_first: bool) -> int:
        with lock:
            runs[x] = runs.get(x, 0) + 1
            attempt = runs[x]
        if x % 7 == 3 and (attempt == 1 or not fail_first):
            raise KeyError(x)
        return x * 2

    with Pool(2, backend="threads") as pool:
        out = pool.starmap(flaky, [(x, False) for x in range(100)], return_exceptions=True)
        assert runs == dict.fromkeys(range(100), 1)
        for x, got in enumerate(out):
            if x % 7 == 3:
                assert isinstance(got, KeyError) and got.args == (x,), (x, got)
            else:
                assert got == x * 2, (x, got)
        runs.clear()
        assert pool.starmap(
            flaky, [(x, True) for x in range(100)], retries=1, retry_on=(KeyError,)
        ) == [x * 2 for x in range(100)]
        assert runs == {x: 2 if x % 7 == 3 else 1 for x in range(100)}


def test_a_one_thread_pool_refuses_a_wait_for_itself_instead_of_hanging() -> None:
    # Its only thread runs the tasks and delivers the results: a task or a
    # callback there that waits for another result of the pool waited for ever.
    with Pool(1, backend="threads") as pool:
        with pytest.raises(RuntimeError, match="the pool's own thread"):
            pool.apply(lambda: pool.apply(square, (3,)))
        result = pool.apply_async(square, (2,), callback=lambda v: pool.apply(square, (v,)))
        with pytest.raises(RuntimeError, match="the pool's own thread"):
            result.get(timeout=30)
        assert pool.apply(square, (5,)) == 25  # and it serves on
    with Pool(2, backend="threads") as pool:  # another thread serves the wait
        assert pool.apply(lambda: pool.apply(square, (3,))) == 9
