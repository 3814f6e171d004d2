"""procpool.ProcessPoolExecutor: the concurrent.futures surface."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
from pathlib import Path

import pytest

from procpool import ProcessPoolExecutor, WorkerCrashedError
from procpool import testing as crash
from tests.helpers import (
    add,
    counted_square,
    fail_at_3_mod_7,
    fail_on,
    identity,
    keep_barrier,
    sleep_return,
    square,
)


def test_submit_and_map(start_method: str) -> None:
    with ProcessPoolExecutor(2, mp_context=start_method) as ex:
        assert ex.submit(add, 1, b=2).result(10) == 3
        assert ex.submit(lambda: "lambda").result(10) == "lambda"
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
        assert list(ex.map(add, range(5), range(5), chunksize=2)) == [0, 2, 4, 6, 8]


def test_futures_work_with_as_completed_wait_and_asyncio() -> None:
    with ProcessPoolExecutor(2) as ex:
        futures = [ex.submit(square, i) for i in range(10)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=10)) == [
            x * x for x in range(10)
        ]
        done, not_done = cf.wait(futures, timeout=10)
        assert len(done) == 10 and not not_done
        assert all(isinstance(f, cf.Future) for f in futures)

        async def main() -> list[int]:
            loop = asyncio.get_running_loop()
            return list(
                await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(4)))
            )

        assert asyncio.run(main()) == [0, 1, 4, 9]


def test_exception_reaches_the_future() -> None:
    with ProcessPoolExecutor(1) as ex:
        fut = ex.submit(fail_on, 3)
        with pytest.raises(ValueError, match="bad input 3"):
            fut.result(10)
        assert "fail_on" in str(fut.exception().__cause__)


def test_map_raises_at_the_failing_item() -> None:
    with ProcessPoolExecutor(2) as ex:
        it = ex.map(fail_on, range(6))
        assert [next(it), next(it), next(it)] == [0, 1, 2]
        with pytest.raises(ValueError):
            next(it)


def test_map_over_one_iterable_passes_each_item_whole() -> None:
    # One iterable goes without zip's 1-tuples; a tuple item must still reach
    # fn as one argument, and several iterables still zip.
    with ProcessPoolExecutor(2) as ex:
        pairs = [(i, i + 1) for i in range(50)]
        assert list(ex.map(identity, pairs)) == pairs
        assert list(ex.map(add, range(50), range(50))) == [2 * i for i in range(50)]
        assert list(ex.map(square, iter(range(3000)))) == [i * i for i in range(3000)]
        it = ex.map(fail_at_3_mod_7, range(30))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad input 3"):
            next(it)


def test_map_timeout() -> None:
    with ProcessPoolExecutor(1) as ex:
        it = ex.map(sleep_return, [2.0])
        with pytest.raises(cf.TimeoutError):
            list(ex.map(sleep_return, [2.0], timeout=0.1))
        del it


def test_a_crash_fails_only_its_own_future() -> None:
    with ProcessPoolExecutor(2) as ex:
        futures = [ex.submit(square, i) for i in range(5)]
        doomed = ex.submit(crash.exit_abruptly, 3)
        more = [ex.submit(square, i) for i in range(5, 10)]
        with pytest.raises(WorkerCrashedError, match="exit code 3"):
            doomed.result(10)
        assert isinstance(doomed.exception(), cf.process.BrokenProcessPool)
        assert [f.result(10) for f in futures + more] == [x * x for x in range(10)]
        assert ex.submit(square, 11).result(10) == 121  # still serving


def test_futures_cancelled_while_queued_never_run_when_calls_go_together(
    tmp_path: Path, merged_calls: list[int]
) -> None:
    # Queued calls go to a busy worker several at once (Dispatcher._merge), and
    # each future turns RUNNING as its call is taken into such a batch: one
    # cancelled before that never runs, and the others run once each.
    runs = tmp_path / "runs"
    with ProcessPoolExecutor(2, initializer=keep_barrier, initargs=(str(runs),)) as executor:
        assert list(executor.map(counted_square, range(64))) == [i * i for i in range(64)]
        futures = [executor.submit(counted_square, i) for i in range(1000, 3000)]
        cancelled = {i for i, f in enumerate(futures) if i % 3 == 0 and f.cancel()}
        for i, future in enumerate(futures):
            if i in cancelled:
                assert future.cancelled()
            else:
                assert future.result(timeout=30) == (1000 + i) ** 2
    ran = [int(line) for line in runs.read_text().split()][64:]
    assert len(ran) == len(set(ran))
    assert set(ran) == {1000 + i for i in range(2000)} - {1000 + i for i in cancelled}
    assert cancelled, "no future was cancelled in time"
    assert max(merged_calls) > 1, "no calls went together"


def test_shutdown_cancels_pending_futures() -> None:
    ex = ProcessPoolExecutor(1)
    running = ex.submit(sleep_return, 0.5, "done")
    time.sleep(0.1)
    queued = [ex.submit(square, i) for i in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "done"
    assert any(f.cancelled() for f in queued)
    assert all(f.done() for f in queued)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)
    ex.shutdown()  # twice is fine


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        ProcessPoolExecutor(0)
    with pytest.raises(TypeError):
        ProcessPoolExecutor(1, initializer=42)  # type: ignore[arg-type]
    with ProcessPoolExecutor(1) as ex, pytest.raises(ValueError):
        ex.map(square, [1], chunksize=0)


def test_a_done_callback_that_waits_for_its_own_executor_gets_an_error_not_a_hang() -> None:
    # Done callbacks run on the thread that settles the executor's futures: a
    # wait there for another of its futures could never end, and hung.
    with ProcessPoolExecutor(2) as ex:
        errors: list[BaseException] = []

        def wait_inside(future: cf.Future[int]) -> None:
            try:
                ex.submit(square, future.result()).result(timeout=30)
            except RuntimeError as exc:
                errors.append(exc)

        ex.submit(square, 3).add_done_callback(wait_inside)
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert errors and "the pool's own thread" in str(errors[0])
        assert ex.submit(square, 4).result(timeout=30) == 16  # and it serves on
