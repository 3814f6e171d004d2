"""Wake-ups held back to the end of the dispatcher's turn (procpool._core._wakeups)."""

from __future__ import annotations

import threading
import time

import pytest

from procpool import Pool
from procpool._core._wakeups import begin_turn, end_turn, release, wake
from tests.helpers import square


class _Waiter:
    """A thread waiting on a condition until told that something is there."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.there = False
        self.woken = threading.Event()
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()
        while not self.cond._waiters:  # type: ignore[attr-defined]  # it is asleep
            time.sleep(0.001)

    def _wait(self) -> None:
        with self.cond:
            while not self.there:
                self.cond.wait(30)
        self.woken.set()

    def give(self) -> None:
        with self.cond:
            self.there = True
            wake(self.cond)

    def join(self) -> None:
        self._thread.join(10)


def test_outside_a_turn_a_wake_is_at_once() -> None:
    waiter = _Waiter()
    waiter.give()
    assert waiter.woken.wait(10)
    waiter.join()


def test_in_a_turn_the_wake_waits_for_its_end_and_happens_once() -> None:
    waiter = _Waiter()
    begin_turn()
    try:
        waiter.give()
        waiter.give()
        assert not waiter.woken.wait(0.2)
    finally:
        end_turn()
    assert waiter.woken.wait(10)
    waiter.join()


def test_a_turn_that_raises_still_wakes() -> None:
    waiter = _Waiter()
    with pytest.raises(KeyError):
        begin_turn()
        try:
            waiter.give()
            raise KeyError("the turn failed")
        finally:
            end_turn()
    assert waiter.woken.wait(10)
    waiter.join()


def test_a_turn_is_this_thread_s_only() -> None:
    # Another thread's wake (a backend's, a direct call's) is not held by a
    # turn that this thread has begun.
    waiter = _Waiter()
    begin_turn()
    try:
        other = threading.Thread(target=waiter.give)
        other.start()
        other.join(10)
        assert waiter.woken.wait(10)
    finally:
        end_turn()
    waiter.join()


def test_a_lock_released_in_a_turn_lets_its_waiter_go_as_the_turn_ends() -> None:
    lock = threading.Lock()
    lock.acquire()
    through = threading.Event()

    def wait() -> None:
        if lock.acquire(timeout=30):
            through.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    begin_turn()
    try:
        assert release(lock) is False
        assert not through.wait(0.2)
    finally:
        end_turn()
    assert through.wait(10)
    waiter.join(10)
    free = threading.Lock()  # outside a turn: released at once
    free.acquire()
    assert release(free) is True and free.acquire(blocking=False)


def test_results_waited_for_by_many_threads_all_arrive() -> None:
    # apply_async and map_async results, each waited for by its own thread, while
    # the dispatcher releases their waiters at the ends of its turns.
    with Pool(2) as pool:
        calls = [pool.apply_async(square, (i,)) for i in range(200)]
        maps = [pool.map_async(square, range(i, i + 5)) for i in range(50)]
        got: dict[int, object] = {}

        def get(i: int, result: object) -> None:
            got[i] = result.get(30)  # type: ignore[attr-defined]

        threads = [threading.Thread(target=get, args=(i, r)) for i, r in enumerate([*calls, *maps])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert [got[i] for i in range(200)] == [i * i for i in range(200)]
    expected = [[x * x for x in range(i, i + 5)] for i in range(50)]
    assert [got[200 + i] for i in range(50)] == expected


@pytest.mark.parametrize("chunksize", [1, 3, None])
def test_imap_consumers_get_every_result_with_wakes_held_to_the_turn_s_end(
    chunksize: int | None,
) -> None:
    # Two consumers on two threads, ordered and not, on one pool: every
    # result comes, none waits for a wake that was held back and never given.
    out: dict[str, list[int]] = {}
    with Pool(2) as pool:

        def consume(name: str, ordered: bool) -> None:
            method = pool.imap if ordered else pool.imap_unordered
            out[name] = list(method(square, range(3_000), chunksize))

        threads = [
            threading.Thread(target=consume, args=("ordered", True)),
            threading.Thread(target=consume, args=("unordered", False)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert out["ordered"] == [x * x for x in range(3_000)]
    assert sorted(out["unordered"]) == out["ordered"]
