"""The direct path: a lone call on an idle pool goes straight to a worker from
the caller's thread, and the thread that waits reads the reply itself.

Each test first checks (white-box, through the dispatcher's count of lent
pipes) that the path it means to test was taken, so that none of them passes
by falling back to the dispatcher thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procpool import Pool, ProcessPoolExecutor, WorkerCrashedError
from procpool import testing as crash
from tests.helpers import fork_holder_then_exit, pause_then, sleep_return, square


def _lendings(pool: Any) -> int:
    engine = pool._runner.engine
    return int(engine._lendings)


def _warm(pool: Any) -> None:
    """Make sure every worker that will take work is up and has reported ready
    (an on-demand pool starts its second worker for tasks seen to be long).

    Retiring workers (max_memory_per_worker, maxtasksperchild) are left out:
    one retires with its last reply, so the round that starts the pool's
    workers always ends with one, and its replacement starting.
    """
    engine = pool._runner.engine
    deadline = time.monotonic() + 30
    rounds = 0
    while True:
        pool.starmap(sleep_return, [(0.03, i) for i in range(4)], chunksize=1)
        rounds += 1
        settled = time.monotonic() + 1.0
        while True:
            live = [w for w in list(engine._workers.values()) if not w.retiring]
            if len(live) == engine.size and all(w.ready for w in live):
                return
            now = time.monotonic()
            if now > settled:
                break
            time.sleep(0.005)
        assert now < deadline, f"workers did not start in {rounds} rounds: " + ", ".join(
            f"{w.id}: pid {w.pid} ready={w.ready} retiring={w.retiring} "
            f"alive={w.alive()} age={now - w.started:.2f}s holds={len(w.inflight)}"
            for w in list(engine._workers.values())
        )


def test_round_trips_on_an_idle_pool_take_the_direct_path(start_method: str) -> None:
    with Pool(2, context=start_method) as pool:
        _warm(pool)
        before = _lendings(pool)
        assert [pool.apply(square, (i,)) for i in range(50)] == [i * i for i in range(50)]
        assert [pool.apply_async(square, (i,)).get(10) for i in range(50)] == [
            i * i for i in range(50)
        ]
        # Lent and given back once per call; a call that finds the dispatcher
        # still busy for over DIRECT_LOCK_WAIT_S goes its way, by design.
        assert _lendings(pool) - before >= 2 * 90
        assert pool.statistics().tasks_completed >= 100


@pytest.mark.parametrize(
    ("fn", "pattern"),
    [
        (crash.exit_abruptly, r"died running the task: exit code 3"),
        (crash.kill_self, r"SIGKILL"),
        (crash.segfault, r"SIGSEGV"),
    ],
    ids=["os._exit", "sigkill", "segfault"],
)
def test_a_worker_that_dies_while_its_pipe_is_lent_fails_only_that_call(
    start_method: str, fn: Any, pattern: str
) -> None:
    with Pool(2, context=start_method) as pool:
        _warm(pool)
        before = _lendings(pool)
        with pytest.raises(WorkerCrashedError, match=pattern):
            # After a pause: a worker that died at once was, 1 run in ~20, seen
            # dead by the dispatcher before the caller's thread had borrowed its
            # pipe, and the call was settled without being lent.
            pool.apply(pause_then, (0.05, fn))
        assert _lendings(pool) > before
        assert [pool.apply(square, (i,)) for i in range(10)] == [i * i for i in range(10)]
        assert pool.statistics().crashes == 1


def test_a_death_is_seen_even_while_a_grandchild_holds_the_pipe_open(tmp_path: Path) -> None:
    # The worker's end of the pipe outlives the worker in a process it forked:
    # no end of file comes, and only the worker's sentinel says it died.
    holder = tmp_path / "holder.pid"
    with Pool(2) as pool:
        _warm(pool)
        before = _lendings(pool)
        started = time.monotonic()
        try:
            with pytest.raises(WorkerCrashedError, match="exit code 5"):
                pool.apply(fork_holder_then_exit, (str(holder),))
        finally:
            _kill_holder(holder)
        assert time.monotonic() - started < 5  # the holder would have slept 30 s
        assert _lendings(pool) > before
        assert pool.apply(square, (3,)) == 9


def _kill_holder(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    try:
        os.kill(int(path.read_text()), signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_get_with_a_timeout_gives_the_pipe_back_and_the_result_still_arrives() -> None:
    with Pool(2) as pool:
        _warm(pool)
        result = pool.apply_async(sleep_return, (0.5, "late"))
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.05)
        # Meanwhile the dispatcher serves the other worker, and the lent pipe came back.
        assert pool.apply(square, (4,)) == 16
        before = _lendings(pool)
        assert result.get(timeout=10) == "late"
        assert _lendings(pool) - before == 2  # the next wait read it directly again
        assert result.successful()
        assert result._waiter is None  # nor does the result keep the batch alive


def test_results_nobody_waits_for_still_arrive() -> None:
    # Sent directly, then never asked for: the dispatcher reads the replies.
    with Pool(2) as pool:
        _warm(pool)
        results = []
        for i in range(20):
            results.append(pool.apply_async(square, (i,)))
            time.sleep(0.002)  # a worker idles again between calls
        pool.close()
        pool.join()
        assert [r.get(0) for r in results] == [i * i for i in range(20)]


def test_many_threads_waiting_at_once_each_get_their_own_result() -> None:
    errors: list[BaseException] = []
    with Pool(2) as pool:
        _warm(pool)
        before = _lendings(pool)

        def calls(k: int) -> None:
            try:
                for i in range(200):
                    assert pool.apply(square, (k * 1000 + i,)) == (k * 1000 + i) ** 2
            except BaseException as exc:  # reported below, from the main thread
                errors.append(exc)

        threads = [threading.Thread(target=calls, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert _lendings(pool) > before  # some went the direct way, the rest did not


def test_terminate_releases_a_thread_waiting_on_a_lent_pipe() -> None:
    pool = Pool(2)
    try:
        _warm(pool)
        result = pool.apply_async(sleep_return, (30, None))
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                result.get(20)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)  # the waiter has the pipe now
        started = time.monotonic()
        pool.terminate()
        waiter.join(10)
        assert not waiter.is_alive()
        assert time.monotonic() - started < 5
        assert outcome and not isinstance(outcome[0], multiprocessing.TimeoutError)
    finally:
        pool.terminate()
        pool.join()


def test_close_and_join_wait_for_a_call_read_on_the_direct_path() -> None:
    with Pool(2) as pool:
        _warm(pool)
        result = pool.apply_async(sleep_return, (0.3, "done"))
        waiter = threading.Thread(target=result.wait)
        waiter.start()
        time.sleep(0.05)
        pool.close()
        pool.join()  # must not hang: the waiter tells the dispatcher it is done
        waiter.join(10)
        assert result.get(0) == "done"


def test_retries_of_a_crashed_direct_call_run_on_a_fresh_worker(tmp_path: Path) -> None:
    flag = tmp_path / "crashed-once"
    with Pool(2, retries=1) as pool:
        _warm(pool)
        before = _lendings(pool)
        assert pool.apply(_crash_first_time, (str(flag),)) == "second try"
        assert _lendings(pool) > before
        assert pool.statistics().retries == 1


def _crash_first_time(flag: str) -> str:
    if not os.path.exists(flag):
        Path(flag).write_text("x")
        os._exit(9)
    return "second try"


def test_callbacks_still_run_on_the_dispatcher_thread() -> None:
    with Pool(2) as pool:
        _warm(pool)
        seen: list[str] = []
        result = pool.apply_async(square, (5,), callback=lambda _: seen.append(_thread_name()))
        assert result.get(10) == 25
        assert seen == ["procpool-dispatcher"]


def _thread_name() -> str:
    return threading.current_thread().name


def test_executor_futures_take_the_direct_path_and_keep_their_contract() -> None:
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(sleep_return, [0.03] * 4))  # both workers up
        for i in range(20):  # until the dispatcher has settled down after the map
            ex.submit(square, i).result()
        before = _lendings(ex)
        assert [ex.submit(square, i).result() for i in range(20)] == [i * i for i in range(20)]
        assert _lendings(ex) - before >= 2 * 15  # see the first test

        slow = ex.submit(sleep_return, 0.5, "late")
        with pytest.raises(cf.TimeoutError):
            slow.result(timeout=0.05)
        assert slow.exception(timeout=10) is None
        assert slow.result() == "late"

        failing = ex.submit(crash.raise_error, "boom")
        assert isinstance(failing.exception(timeout=10), crash.CrasherError)

        # Futures nobody calls result() on are settled by the dispatcher.
        futures = [ex.submit(square, i) for i in range(10)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=10)) == sorted(
            i * i for i in range(10)
        )


def _by_callback(future: cf.Future[int]) -> int:
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    assert done.wait(10)
    return future.result(0)


def _by_wait(future: cf.Future[int]) -> int:
    done, _ = cf.wait([future], timeout=10)
    assert done
    return future.result(0)


def _by_as_completed(future: cf.Future[int]) -> int:
    return next(cf.as_completed([future], timeout=10)).result(0)


@pytest.mark.parametrize("how", ["callback", "wait", "as_completed", "asyncio"])
def test_a_future_awaited_without_result_gets_its_reply_at_once(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A direct call's reply that comes before any thread waits for it is left
    # for that thread, for up to HOLD_FOR_WAITER_S. Held a minute here: a
    # future awaited by a done callback (asyncio's run_in_executor), by
    # concurrent.futures.wait or by as_completed, which no thread reads through
    # result(), would take that minute. Its reply must be read as it comes.
    import asyncio

    from procpool._core import _direct

    monkeypatch.setattr(_direct, "HOLD_FOR_WAITER_S", 60.0)
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(sleep_return, [0.03] * 4))  # both workers up
        for i in range(20):  # until the dispatcher has settled down after the map
            ex.submit(square, i).result()
        direct = 0

        def sent(i: int) -> cf.Future[int]:
            nonlocal direct
            future = ex.submit(square, i)
            direct += future._waiter is not None  # type: ignore[attr-defined]
            return future

        if how == "asyncio":

            async def awaited() -> list[int]:
                loop = asyncio.get_running_loop()
                out = []
                for i in range(20):
                    future = asyncio.wrap_future(sent(i), loop=loop)  # as run_in_executor does
                    out.append(await asyncio.wait_for(future, 10))
                for i in range(20, 30):  # and run_in_executor itself
                    out.append(await asyncio.wait_for(loop.run_in_executor(ex, square, i), 10))
                return out

            assert asyncio.run(awaited()) == [i * i for i in range(30)]
        else:
            wait = {"callback": _by_callback, "wait": _by_wait, "as_completed": _by_as_completed}
            assert [wait[how](sent(i)) for i in range(20)] == [i * i for i in range(20)]
        assert direct >= 15  # went the direct path (see the first test)


def test_futures_are_freed_without_the_cyclic_collector() -> None:
    # A future and what it holds (its result, perhaps on shared memory) go as
    # soon as the caller drops it, however it was waited for: nothing of the
    # direct path's bookkeeping may tie it into a reference cycle.
    import weakref

    with ProcessPoolExecutor(2) as ex:
        list(ex.map(square, range(8)))
        gc.collect()
        gc.disable()
        try:
            refs = []
            for i in range(20):
                future = ex.submit(square, i)
                if i % 4 == 1:
                    future.add_done_callback(lambda f: None)
                if i % 4 == 2:
                    assert next(cf.as_completed([future], timeout=10)) is future
                if i % 4 == 3:
                    cf.wait([future], timeout=10)
                assert future.result(timeout=10) == i * i
                refs.append(weakref.ref(future))
                del future
            deadline = time.monotonic() + 10  # the dispatcher lets go of each as it delivers
            while any(r() is not None for r in refs) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [i for i, r in enumerate(refs) if r() is not None] == []
        finally:
            gc.enable()


def test_a_done_callback_that_submits_more_work_does_not_deadlock() -> None:
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(square, range(8)))
        chained: list[cf.Future[int]] = []
        first = ex.submit(square, 3)
        first.add_done_callback(lambda f: chained.append(ex.submit(square, f.result())))
        assert first.result(timeout=10) == 9
        deadline = time.monotonic() + 10
        while not chained and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chained[0].result(timeout=10) == 81


class _Interrupted(BaseException):  # as KeyboardInterrupt
    pass


def _interrupt(signum: int, frame: Any) -> None:
    raise _Interrupted


def _storm(step: Callable[[int], None], quantum: float, seconds: float = 3.0) -> int:
    """Call ``step(1)``, ``step(2)``, ... for ``seconds``, a SIGALRM handler
    raising (as Ctrl-C's does) 1 to 7 ``quantum`` into each; return how many
    were cut short. The handler may run at any bytecode of a step.

    Earlier tests' garbage is collected first and gc stays off meanwhile: a
    handler that raises inside a __del__ is an unraisable exception, not ours.
    """
    interrupted = 0
    gc.collect()
    gc.disable()
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        deadline = time.monotonic() + seconds
        i = 0
        while True:
            try:
                if time.monotonic() > deadline:
                    break
                i += 1
                signal.setitimer(signal.ITIMER_REAL, quantum * (1 + i % 7))
                try:
                    step(i)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _Interrupted:
                interrupted += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        gc.enable()
    return interrupted


def test_signals_that_raise_at_any_moment_never_tear_a_message_or_lose_a_result() -> None:
    # On the direct path, the handler may also run between the reads of one
    # message and in the middle of handling it. The pool must stay whole.
    ctrl_c = signal.getsignal(signal.SIGINT)
    with Pool(2) as pool:
        _warm(pool)

        def step(i: int) -> None:
            assert pool.apply(square, (i,)) == i * i

        assert _storm(step, 20e-6) > 10
        # Whatever was cut short, the pool still answers every call.
        assert [pool.apply(square, (k,)) for k in range(50)] == [k * k for k in range(50)]
        assert pool.map(square, range(100)) == [k * k for k in range(100)]
    # And every handler held back during a section is back in place.
    assert signal.getsignal(signal.SIGINT) is ctrl_c


def test_signals_that_raise_during_queued_bursts_never_leave_the_dispatcher_asleep() -> None:
    # Calls with a callback go through the queue (not the direct path), and a
    # burst wakes the dispatcher with one byte (Dispatcher._queue). A handler
    # that raises anywhere in submit() may cost a spare byte, never the wake:
    # every call that returned a result object gets its result.
    results: list[Any] = []
    with Pool(2) as pool:

        def step(i: int) -> None:
            burst = [
                pool.apply_async(square, (i * 100 + k,), callback=_ignore) for k in range(1 + i % 5)
            ]
            results.extend(burst)
            burst[-1].get(10)  # the dispatcher goes back to sleep

        assert _storm(step, 25e-6) > 10
        assert len(results) > 100
        assert all(r.get(10) is not None for r in results)
        # A queued call after the storm still wakes the dispatcher.
        assert pool.apply_async(square, (7,), callback=_ignore).get(10) == 49


def _ignore(_: object) -> None:
    pass


def test_ctrl_c_interrupts_a_long_direct_wait_and_the_pool_goes_on() -> None:
    # A real SIGINT, from another thread, while the main thread waits on a lent pipe.
    with Pool(2) as pool:
        _warm(pool)
        result = pool.apply_async(sleep_return, (1.0, "late"))
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                result.get(timeout=10)
        finally:
            timer.join()
        assert time.monotonic() - started < 0.6  # within a tick of the wait, not at the reply
        assert result.get(timeout=10) == "late"
        assert pool.apply(square, (6,)) == 36


@pytest.mark.parametrize(
    ("options", "recycled"),
    [({"maxtasksperchild": 3}, False), ({"max_memory_per_worker": 1}, True)],
    ids=["maxtasksperchild", "max_memory_per_worker"],
)
def test_workers_recycled_after_direct_calls_are_replaced(
    options: dict[str, Any], recycled: bool
) -> None:
    # The reply that retires a worker may be handled on the caller's thread, which
    # then sends the worker its stop and starts its replacement. (A worker that
    # has not reported ready takes no direct call: those go the dispatcher's way.)
    with Pool(2, **options) as pool:
        _warm(pool)
        before = _lendings(pool)
        assert [pool.apply(square, (i,)) for i in range(30)] == [i * i for i in range(30)]
        # A default pool replaces a retired worker at once, as it retires: the
        # next calls find one ready (it used to wait for the next call to start it).
        assert _lendings(pool) > before
        stats = pool.statistics()
        assert len({w.pid for w in stats.per_worker}) >= 10
        assert stats.recycled >= 10 or not recycled
        assert pool.map(square, range(20)) == [i * i for i in range(20)]
    if not recycled:
        with Pool(2, maxtasksperchild=3) as pool:
            _warm(pool)
            before = _lendings(pool)
            for i in range(30):
                assert pool.apply(square, (i,)) == i * i
                time.sleep(0.01)  # the replacement gets ready meanwhile
            assert _lendings(pool) > before


def test_a_worker_spins_for_a_lone_callers_next_call_and_then_sleeps() -> None:
    # After answering a call on the direct path, a worker spins up to SPIN_S
    # (100 us) for the next one before it sleeps (see _worker._Spinner). A pool
    # left idle after a run of such calls must then cost no CPU: a spin that
    # never ended would show here as a busy core.
    import psutil

    with Pool(2) as pool:
        _warm(pool)
        before = _lendings(pool)
        assert [pool.apply(square, (i,)) for i in range(300)] == [i * i for i in range(300)]
        assert _lendings(pool) - before >= 250
        workers = [psutil.Process(w.pid) for w in pool.statistics().per_worker]
        time.sleep(0.1)
        cpu = [sum(p.cpu_times()[:2]) for p in workers]
        time.sleep(1.0)
        spent = [sum(p.cpu_times()[:2]) - c for p, c in zip(workers, cpu, strict=True)]
        assert max(spent) < 0.1, spent


def test_a_pipe_a_direct_call_took_out_at_its_end_of_file_is_read_to_its_end_once() -> None:
    # A race the killed-zygote test hit once in CI-like runs: the dispatcher's
    # select() returned a worker's pipe as readable; before it read it, a call on
    # the direct path saw the worker's end of file and, giving the pipe back, took
    # it out of select() for good. The dispatcher then read the same end of file
    # and took the pipe out again: KeyError, and the pool broke ("procpool's
    # dispatcher failed"). The interleaving is forced here, under the engine's
    # lock as the dispatcher's own turn holds it.
    import selectors

    with Pool(1) as pool:
        _warm(pool)
        engine = pool._runner.engine
        with engine._engine_lock:
            (worker,) = engine._workers.values()
            key = engine._sel.get_key(worker.conn)
            os.kill(worker.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not worker.conn.poll() and time.monotonic() < deadline:
                time.sleep(0.01)
            engine._sel.unregister(worker.conn)  # what _take_back does at end of file
            engine._on_ready(selectors.SelectorKey(*key), True)
        assert pool.apply(square, (4,)) == 16  # a new worker; the pool goes on
        assert pool.map(square, range(10)) == [i * i for i in range(10)]
