"""Queues, locks and get_context: the stdlib's objects, bound to the right start method."""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

import pytest

import procpool

FACTORIES = [
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "JoinableQueue",
    "Lock",
    "Queue",
    "RLock",
    "Semaphore",
    "SimpleQueue",
]


def put_square(x: int, queue: Any) -> None:
    queue.put(x * x)


def try_lock(lock: Any) -> bool:
    # The parent holds it: a second process must not get it.
    return bool(lock.acquire(timeout=0.05))


def set_event(event: Any) -> None:
    event.set()


def consume(queue: Any) -> int:
    total = 0
    while (item := queue.get()) is not None:
        total += item
        queue.task_done()
    queue.task_done()
    return total


def start_method_in_worker(_: object = None) -> str:
    return multiprocessing.get_start_method()


def run(ctx: procpool.Context, target: Any, *args: Any) -> Any:
    proc = ctx.Process(target=target, args=args)
    proc.start()
    proc.join()
    return proc.result()


def test_queue_through_a_child(start_method: str) -> None:
    ctx = procpool.get_context(start_method)
    queue = ctx.Queue()
    run(ctx, put_square, 12, queue)
    assert queue.get(timeout=10) == 144


def test_default_queue_and_lock_work_with_default_process() -> None:
    queue, lock = procpool.Queue(), procpool.Lock()
    ctx = procpool.get_context()
    run(ctx, put_square, 3, queue)
    assert queue.get(timeout=10) == 9
    with lock:
        assert run(ctx, try_lock, lock) is False
    assert run(ctx, try_lock, lock) is True


def test_event_set_in_child(start_method: str) -> None:
    ctx = procpool.get_context(start_method)
    event = ctx.Event()
    run(ctx, set_event, event)
    assert event.wait(10)


def test_joinable_and_simple_queue() -> None:
    ctx = procpool.get_context()
    jobs = procpool.JoinableQueue()
    for item in [1, 2, 3, None]:
        jobs.put(item)
    proc = ctx.Process(target=consume, args=(jobs,))
    proc.start()
    jobs.join()
    assert proc.result() == 6
    proc.join()
    simple = procpool.SimpleQueue()
    simple.put("x")
    assert simple.get() == "x"
    simple.close()


def test_other_primitives_construct() -> None:
    with procpool.RLock(), procpool.RLock():
        pass
    assert procpool.Semaphore(2).acquire(timeout=0)
    bounded = procpool.BoundedSemaphore(1)
    bounded.acquire()
    bounded.release()
    with pytest.raises(ValueError):
        bounded.release()
    cond = procpool.Condition()
    with cond:
        assert not cond.wait(0)
    assert procpool.Barrier(1).wait(1) == 0


@pytest.mark.parametrize("name", FACTORIES)
def test_factories_live_in_procpool(name: str) -> None:
    assert getattr(procpool, name).__module__ == "procpool"
    assert callable(getattr(procpool.get_context("spawn"), name))


def test_get_context() -> None:
    default = procpool.get_context()
    expected = "forkserver" if sys.platform.startswith("linux") else "spawn"
    assert default.get_start_method() == expected
    assert default is procpool.get_context(expected)
    spawn = procpool.get_context("spawn")
    assert spawn.mp_context is multiprocessing.get_context("spawn")
    assert issubclass(spawn.Process, procpool.Process)
    assert spawn.Process is not default.Process
    assert repr(spawn) == "<procpool.Context 'spawn'>"
    assert type(spawn).__module__ == "procpool"
    assert procpool.get_context.__module__ == "procpool"
    with pytest.raises(ValueError, match="start method"):
        procpool.get_context("teleport")


def test_cpu_count() -> None:
    count = procpool.cpu_count()
    assert count >= 1
    if hasattr(os, "sched_getaffinity"):
        assert count == len(os.sched_getaffinity(0))
    assert procpool.get_context().cpu_count() == count


def test_pipe() -> None:
    ctx = procpool.get_context("spawn")
    left, right = ctx.Pipe()
    left.send("hi")
    assert right.recv() == "hi"
    left.close()
    right.close()


def test_pool_from_context_uses_its_start_method(start_method: str) -> None:
    ctx = procpool.get_context(start_method)
    with ctx.Pool(2) as pool:
        assert isinstance(pool, procpool.Pool)
        assert pool.map(start_method_in_worker, range(2)) == [start_method] * 2


def test_executor_from_context_uses_its_start_method() -> None:
    ctx = procpool.get_context("spawn")
    with ctx.ProcessPoolExecutor(1) as ex:
        assert isinstance(ex, procpool.ProcessPoolExecutor)
        assert ex.submit(start_method_in_worker).result(timeout=30) == "spawn"
