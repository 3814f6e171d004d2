"""procpool.Pool: the multiprocessing.pool.Pool surface, under every start method."""

from __future__ import annotations

import collections
import functools
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import procpool
from procpool import Pool, ProcessPoolExecutor, RemoteTraceback, SerializationError
from procpool._core import _dispatcher
from procpool._core import _protocol as P
from procpool._core._batch import CallableCache
from procpool._core._slot import Slot
from procpool.testing import Unpicklable, return_unpicklable
from tests.helpers import (
    Model,
    add,
    counted_sleep,
    fail_at_3_mod_7,
    fail_on,
    get_env,
    keep_barrier,
    length_plus_index,
    loaded,
    next_of_nothing_on,
    pid,
    pid_after_barrier,
    references_to_first,
    set_env,
    sleep_pid,
    sleep_return,
    slow_start_for_the_first_worker,
    square,
    stamped_blob,
    worker_name,
)


def test_every_method_gives_the_stdlib_answer(start_method: str) -> None:
    with Pool(2, context=start_method) as pool:
        assert pool.map(square, range(100)) == [x * x for x in range(100)]
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.apply(add, (2, 3)) == 5
        assert pool.apply_async(add, (2,), {"b": 5}).get(10) == 7
        assert list(pool.imap(square, range(20))) == [x * x for x in range(20)]
        assert sorted(pool.imap_unordered(square, range(20))) == [x * x for x in range(20)]
        assert pool.map_async(square, [1, 2]).get(10) == [1, 4]
        assert pool.starmap_async(add, [(1, 1)]).get(10) == [2]


@pytest.mark.parametrize("stop", ["close", "terminate"])
def test_work_given_to_a_stopped_pool_raises_pool_closed_error(stop: str) -> None:
    # The standard library's ValueError("Pool not running"), under a name that
    # can be caught on its own, the one a terminated pool's pending results raise.
    pool = Pool(1)
    getattr(pool, stop)()
    for call in (
        lambda: pool.apply(abs, (-1,)),
        lambda: pool.map(abs, [-1]),
        lambda: pool.imap_unordered(abs, [-1]),
        lambda: pool.starmap_async(pow, [(2, 3)]),
    ):
        with pytest.raises(procpool.PoolClosedError, match="Pool not running") as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, procpool.ProcpoolError)
    pool.join()


def test_a_call_made_while_workers_start_goes_to_the_first_one_ready(start_method: str) -> None:
    # The first worker started is not always the first ready; a call sent to
    # it ahead waited for its start while the other sat idle.
    with Pool(
        2, context=start_method, initializer=slow_start_for_the_first_worker, initargs=(2.0,)
    ) as pool:
        assert pool.apply(worker_name) == "procpool-worker-1"


def test_a_spawn_pool_starts_its_first_worker_alone_and_the_rest_by_itself() -> None:
    # Two interpreters starting at once on 2 cores each take longer than one
    # alone; the rest start once the first has answered, with no work waiting.
    with Pool(3, context="spawn") as pool:
        assert len(pool.statistics().per_worker) == 1
        assert pool.apply(square, (3,)) == 9
        deadline = time.monotonic() + 30
        while len(pool.statistics().per_worker) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(pool.statistics().per_worker) == 3


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_work_that_needs_every_worker_starts_them_all_at_once(method: str) -> None:
    barrier = multiprocessing.get_context(method).Barrier(3)
    with Pool(3, context=method, initializer=keep_barrier, initargs=(barrier,)) as pool:
        assert len(set(pool.map(pid_after_barrier, range(3), chunksize=1))) == 3


def test_any_callable_under_any_start_method(start_method: str) -> None:
    offset = 10

    def closure(x: int) -> int:
        return x + offset

    class Scaler:
        def __init__(self, k: int) -> None:
            self.k = k

        def scale(self, x: int) -> int:
            return x * self.k

    with Pool(2, context=start_method) as pool:
        assert pool.map(lambda x: x + 1, [1, 2, 3]) == [2, 3, 4]
        assert pool.map(closure, [1, 2]) == [11, 12]
        assert pool.map(Scaler(3).scale, [1, 2]) == [3, 6]


def test_functions_defined_in_main_run_under_spawn_and_forkserver(tmp_path: object) -> None:
    script = textwrap.dedent(
        """
        import procpool

        def cube(x):
            return x ** 3

        if __name__ == "__main__":
            for method in ("spawn", "forkserver", "fork"):
                with procpool.Pool(2, context=method) as pool:
                    assert pool.map(cube, range(5)) == [0, 1, 8, 27, 64], method
                    assert pool.apply(lambda: cube(2)) == 8
            print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "ok"


def test_tasks_run_in_other_processes() -> None:
    with Pool(2) as pool:
        pids = set(pool.map(pid, range(50), chunksize=1))
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


@pytest.mark.parametrize("start_method", [None, "fork"])
def test_no_task_waits_behind_a_long_one_while_another_worker_runs_out_of_work(
    start_method: str | None,
) -> None:
    # A batch sent ahead to a busy worker (prefetched) waits behind what that
    # worker runs. Behind a long task, the other worker would run out of work
    # and the map would end one short task late at best, and at worst one
    # batch late. Each map here: the other worker runs all ten short tasks
    # (~0.1 s) while the first runs the long one (1 s). The first map's
    # callable is not measured yet; the second's is, and found long.
    context = multiprocessing.get_context(start_method) if start_method else None
    with Pool(2, context=context) as pool:
        for _ in range(2):
            pids = pool.map(sleep_pid, [1.0] + [0.01] * 10, chunksize=1)
            assert pids[0] not in pids[1:]


@pytest.mark.parametrize("start_method", [None, "fork"])
def test_a_map_of_tasks_known_to_be_long_is_cut_into_small_chunks(start_method: str | None) -> None:
    # The standard library's rule, four chunks per worker, puts 32 tasks in
    # chunks of 4 on 2 workers: the three short tasks after the long first one
    # waited in its chunk while the other worker ran out of work. Once the
    # function is measured at 10 ms a task, a chunk holds one.
    context = multiprocessing.get_context(start_method) if start_method else None
    with Pool(2, context=context) as pool:
        pool.map(sleep_pid, [0.01] * 4)
        pids = pool.map(sleep_pid, [0.5] + [0.01] * 31)
    assert pids[0] not in pids[1:4]


def _record_offers(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """The first task of each batch sent as an offer, and of each taken back."""
    offered: list[int] = []
    taken: list[int] = []
    send = _dispatcher.Dispatcher._send
    take_back = _dispatcher.Dispatcher._take_back_offers

    def sending(
        self: _dispatcher.Dispatcher,
        worker: Any,
        batch: Any,
        linger: bool = False,
        *,
        offer: bool = False,
    ) -> None:
        send(self, worker, batch, linger, offer=offer)
        if offer:
            offered.append(batch.first_index)

    def taking_back(self: _dispatcher.Dispatcher) -> bool:
        waiting = {id(b) for b in self._pending}
        found = take_back(self)
        taken.extend(b.first_index for b in self._pending if id(b) not in waiting)
        return found

    monkeypatch.setattr(_dispatcher.Dispatcher, "_send", sending)
    monkeypatch.setattr(_dispatcher.Dispatcher, "_take_back_offers", taking_back)
    return offered, taken


@pytest.mark.parametrize("start_method", [None, "fork", "spawn"])
def test_a_batch_offered_behind_a_long_one_is_taken_back_for_an_idle_worker(
    start_method: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Behind work measured long, the next batch waits in a busy worker's pipe as
    # an offer: the worker starts it without a round trip through the
    # dispatcher. Here task 0 goes by the direct path, task 1 (long) and task 2
    # to the other two workers, and task 3 is offered to the first of those,
    # behind task 1. The others run out of work long before task 1 ends; one
    # takes task 3 back and runs it. Every task runs once.
    offered, taken = _record_offers(monkeypatch)
    runs = tmp_path / "runs"
    context = multiprocessing.get_context(start_method) if start_method else None
    with Pool(3, context=context, initializer=keep_barrier, initargs=(str(runs),)) as pool:
        pool.map(counted_sleep, [(100 + i, 0.05) for i in range(12)], chunksize=1)
        tasks = [(0, 0.01), (1, 1.0), *((i, 0.01) for i in range(2, 21))]
        outcomes = pool.map(counted_sleep, tasks, chunksize=1)
    assert [x for x, _ in outcomes] == list(range(21))
    assert outcomes[1][1] not in [pid for x, pid in outcomes if x != 1]
    assert 3 in offered and 3 in taken, (offered, taken)
    ran = [int(line) for line in runs.read_text().split()]
    assert sorted(x for x in ran if x < 100) == list(range(21)), "a task ran twice, or never"


def test_offered_batches_run_once_whoever_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offers made and taken back under maps, imap's growing chunks and
    # imap_unordered, with durations drawn from 0 to 20 ms and outliers of
    # 150 ms: each task runs once. Which races occur is up to the timing; the
    # one where a worker finds a later batch's token in place of its own is
    # made to happen in test_robustness.
    import random

    offered, taken = _record_offers(monkeypatch)
    rng = random.Random(5)
    runs = tmp_path / "runs"
    expected: list[int] = []
    with Pool(3, initializer=keep_barrier, initargs=(str(runs),)) as pool:
        for round_ in range(6):
            durations = [0.15 if rng.random() < 0.08 else rng.random() * 0.02 for _ in range(40)]
            tasks = [(1000 * round_ + i, d) for i, d in enumerate(durations)]
            expected += [x for x, _ in tasks]
            if round_ % 3 == 0:
                got = [x for x, _ in pool.map(counted_sleep, tasks, chunksize=1)]
            elif round_ % 3 == 1:
                got = [x for x, _ in pool.imap(counted_sleep, tasks)]
            else:
                got = sorted(x for x, _ in pool.imap_unordered(counted_sleep, tasks))
            assert got == [x for x, _ in tasks]
    ran = [int(line) for line in runs.read_text().split()]
    assert sorted(ran) == sorted(expected), "a task ran twice, or never"
    assert offered and taken, (len(offered), len(taken))


def test_offer_tokens_go_to_one_reader_each_in_order() -> None:
    # Both ends take the first token left (see _slot.py); a token is the batch's id.
    slot = Slot(1)
    try:
        assert slot.take() is None
        for batch_id in (7, 8, 9):
            slot.offer(batch_id)
        assert [slot.take(), slot.take()] == [7, 8]
        slot.offer(10)
        assert [slot.take(), slot.take(), slot.take()] == [9, 10, None]
    finally:
        slot.close()


def test_map_chunks_of_long_tasks_are_small_but_bounded_in_number() -> None:
    from procpool._runner import map_chunksize

    assert map_chunksize(64, 8) == 2  # the standard library's rule
    assert map_chunksize(64, 8, seconds_per_task=0.025) == 1
    assert map_chunksize(64, 2, seconds_per_task=0.025) == 1  # instead of 8
    assert map_chunksize(64, 2, seconds_per_task=0.002) == 2  # ~5 ms of work a chunk
    # Below a millisecond a task, a batch's own cost would weigh: the rule holds.
    assert map_chunksize(10_000, 2, seconds_per_task=0.0005) == 1250
    # At most 32 chunks per worker, for an estimate that no longer holds
    # (a function that was slow on earlier inputs).
    assert map_chunksize(10_000, 2, seconds_per_task=0.001) == 157
    assert map_chunksize(1_000_000, 16, seconds_per_task=0.01) == 1954
    assert map_chunksize(1_000_000, 2, seconds_per_task=0.01) == 8192  # the cap, as before


def test_a_small_map_of_a_function_known_to_be_short_gets_one_chunk_per_worker() -> None:
    from procpool._runner import map_chunksize

    assert map_chunksize(20, 2) == 3  # unmeasured: the standard library's rule
    assert map_chunksize(20, 2, seconds_per_task=1e-6) == 10
    assert map_chunksize(200, 2, seconds_per_task=1e-6) == 100
    assert map_chunksize(2000, 2, seconds_per_task=1e-6) == 250  # 2 ms of work: the rule
    assert map_chunksize(3, 8, seconds_per_task=1e-6) == 1
    # Measured short, then run long: the map still spreads over every worker.
    with Pool(2) as pool:
        assert len(pool.map(sleep_pid, [0] * 20)) == 20
        assert len(set(pool.map(sleep_pid, [0.2] * 4))) == 2


def test_an_object_every_item_shares_does_not_make_map_chunks_small() -> None:
    # Chunks carry about a megabyte, as what each item adds counts: a large
    # object all items share is pickled once per chunk (the standard library's
    # chunks did it 40x faster when this pool sent such a map item by item).
    from procpool._runner import map_chunksize

    table = b"t" * 1_000_000
    assert map_chunksize(200, 2, table, other=b"u" * 1_000_000) == 1  # all different
    assert map_chunksize(200, 2, table) == 1  # nothing else to compare
    assert map_chunksize(200, 2, table, other=table) == 25  # [table] * 200
    assert map_chunksize(200, 2, (table, 0), other=(table, 100)) == 25
    items = [(table, i) for i in range(200)]
    with Pool(2) as pool:
        references = pool.map(references_to_first, items)
        # Each worker got the table once per chunk of 25, not once per task.
        assert min(references) >= 25
        assert pool.map(length_plus_index, items) == [1_000_000 + i for i in range(200)]
        distinct = [(bytes([i]) * 400_000, i) for i in range(20)]
        assert max(pool.map(references_to_first, distinct)) < 25


@pytest.mark.parametrize("start_method", [None, "fork"])
def test_calls_submitted_after_a_run_of_instant_ones_do_not_wait_behind_a_long_one(
    start_method: str | None,
) -> None:
    # A worker that answers single calls quickly may be sent many at once (a
    # burst), and a call queued behind one that turns out long waits for it.
    # The evidence is gathered again for each backlog: after 200 instant calls,
    # a long call and 20 short ones, submitted one by one, leave at most one
    # short call behind the long one, while the other worker runs the rest.
    context = multiprocessing.get_context(start_method) if start_method else None
    with Pool(2, context=context) as pool:
        for _ in range(2):
            instant = [pool.apply_async(sleep_pid, (0.0,)) for _ in range(200)]
            assert all(r.get(timeout=30) for r in instant)
            calls = [pool.apply_async(sleep_pid, (s,)) for s in [1.0] + [0.02] * 20]
            long_pid, *short_pids = (r.get(timeout=30) for r in calls)
            assert short_pids.count(long_pid) <= 1


def test_calls_queued_together_go_as_one_batch_and_each_keeps_its_own_outcome(
    merged_calls: list[int],
) -> None:
    # Single calls queued behind a busy worker go to it several at once, as one
    # batch; each still gets its own value or exception, callback or error
    # callback, in the order the calls were made.
    merged = merged_calls
    values: list[int] = []
    failures: list[BaseException] = []
    with Pool(2) as pool:
        pool.map(fail_on, range(10, 74), chunksize=1)  # measured: bursts need evidence
        for _ in range(3):
            values.clear()
            failures.clear()
            calls = [
                pool.apply_async(
                    fail_on,
                    (i,),
                    {"bad": i if i % 7 == 0 else -1},
                    callback=values.append,
                    error_callback=failures.append,
                )
                for i in range(2000)
            ]
            for i, call in enumerate(calls):
                if i % 7:
                    assert call.get(timeout=30) == i
                    continue
                with pytest.raises(ValueError, match=f"^bad input {i}$") as info:
                    call.get(timeout=30)
                assert isinstance(info.value.__cause__, RemoteTraceback)
            if max(merged, default=1) > 1:
                break
    assert max(merged) > 1, "no calls went together"
    assert sorted(values) == [i for i in range(2000) if i % 7]
    assert sorted(str(e) for e in failures) == sorted(f"bad input {i}" for i in range(0, 2000, 7))
    assert len({id(e) for e in failures}) == len(failures)  # each call its own


def test_calls_sent_together_see_their_arguments_as_they_were_when_submitted(
    merged_calls: list[int],
) -> None:
    # Each call is pickled when it is made; a batch of calls carries those
    # pickles, so a list changed after the call does not change what it sees.
    merged = merged_calls
    with Pool(2) as pool:
        pool.map(sum, [[i] for i in range(64)], chunksize=1)
        for _ in range(3):
            arg = [0]
            calls = []
            for i in range(1000):
                arg[0] = i
                calls.append(pool.apply_async(sum, (arg,)))
            arg[0] = -1
            assert [c.get(timeout=30) for c in calls] == list(range(1000))
            if max(merged, default=1) > 1:
                break
    assert max(merged) > 1, "no calls went together"


def test_error_keeps_its_type_and_the_worker_traceback() -> None:
    with Pool(2) as pool:
        with pytest.raises(ValueError, match="bad input 3") as info:
            pool.apply(fail_on, (3,))
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "fail_on" in str(cause) and "raise ValueError" in str(cause)
        # The pool serves on after a task error.
        assert pool.apply(square, (4,)) == 16


def test_tasks_failing_at_one_place_each_keep_their_own_traceback_text() -> None:
    # The stack part of a traceback is formatted once per place (code and
    # instruction of each frame); each text must still be format_exception's
    # own, with its task's message, and chained errors keep their chain.
    import traceback

    from procpool._core import _protocol as P

    def texts(fail: Callable[[int], object]) -> list[tuple[str, str]]:
        out = []
        for i in range(3):
            try:
                fail(i)
            except Exception as exc:
                want = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                out.append((P._traceback_text(exc), want))
        return out

    def chained(i: int) -> None:
        try:
            fail_on(i, bad=i)
        except ValueError as exc:
            raise KeyError(i) from exc

    for fail in (lambda i: fail_on(i, bad=i), chained, _fails_deeper):
        got = texts(fail)
        assert [text for text, _ in got] == [want for _, want in got]
        assert len({text for text, _ in got}) == 3  # each with its own message
    with Pool(2) as pool:
        errors = pool.map(_fails_deeper, range(40), return_exceptions=True)
    for i, error in enumerate(errors):
        assert isinstance(error, ValueError) and str(error) == f"bad input {i}"
        text = str(error.__cause__)
        assert f"ValueError: bad input {i}\n" in text and "_fails_deeper" in text
        assert text.count("ValueError: bad input") == 1


def _fails_deeper(i: int) -> int:
    return fail_on(i, bad=i) + 1


def test_a_callable_larger_than_the_socket_buffer_arrives_whole(start_method: str) -> None:
    # The callable travels in a message's own frame, which the worker reads
    # in pieces as the socket's buffer (~200 KiB) lets them through.
    big = bytes(range(256)) * 40_000  # 10 MB captured by a closure

    def pick(i: int) -> tuple[int, int]:
        return len(big), big[i]

    with Pool(2, context=start_method) as pool:
        assert pool.map(pick, range(300), chunksize=1) == [(len(big), i % 256) for i in range(300)]


def test_a_method_called_again_on_an_unchanged_object_is_not_sent_again() -> None:
    # obj.method is a new bound method at each lookup, pickled with its object
    # each time (the object may have changed); the same bytes are not sent to the
    # worker again, whose copy serves.
    model = Model(1_000_000)
    with Pool(1) as pool:
        outs = [pool.apply(model.predict, (i,)) for i in range(5)]
        pending = [pool.apply_async(model.predict, (i,)) for i in range(5, 10)]
        outs += [result.get(timeout=60) for result in pending]
        assert outs == [(0, i, 1, 1) for i in range(10)]
        model.tag = 7  # changed here: the next call carries the change
        assert pool.apply(model.predict, (10,)) == (7, 10, 2, 2)
        assert pool.map(model.predict, range(3)) == [(7, i, 2, 2) for i in range(3)]
        with ProcessPoolExecutor(1) as executor:
            results = [executor.submit(model.predict, i).result(timeout=60) for i in range(3)]
            assert results == [(7, i, 1, 1) for i in range(3)]
        # The comparison does not keep the object alive.
        alive = weakref.ref(model)
        del model
        assert alive() is None


class _Offset:
    """A callable object: what it adds is its state."""

    def __init__(self, by: int) -> None:
        self.by = by

    def __call__(self, x: int) -> int:
        return x + self.by


def _sum_plus(numbers: list[int], x: int) -> int:
    return sum(numbers) + x


def test_a_callable_bound_to_data_goes_with_its_data_as_it_is_at_each_call() -> None:
    # A partial, a bound method or a callable object held and used again: its
    # first pickle was sent again and again, whatever the program changed since;
    # the standard library's pools pickle it at each call.
    numbers = [1]
    partial = functools.partial(_sum_plus, numbers)
    model = Model(10)
    method = model.predict
    offset = _Offset(1)
    with Pool(1) as pool, ProcessPoolExecutor(1) as executor:
        assert pool.apply(partial, (0,)) == 1 and pool.apply(method, (0,))[0] == 0
        assert pool.apply(offset, (0,)) == 1
        numbers.append(10)
        model.tag = 5
        offset.by = 2
        assert pool.apply(partial, (0,)) == 11 and pool.apply(method, (0,))[0] == 5
        assert pool.apply(offset, (0,)) == 2
        assert pool.map(partial, [0, 1]) == [11, 12] and pool.map(offset, [0]) == [2]
        assert executor.submit(partial, 0).result(timeout=60) == 11
        numbers.append(100)
        assert pool.apply_async(partial, (0,)).get(timeout=60) == 111
        assert list(executor.map(partial, [0])) == [111]


def test_a_worker_keeps_callables_bound_to_large_objects_within_a_byte_bound() -> None:
    # A new object per call, each method pickled with 4 MB: a worker kept the
    # last 64 callables whatever their size (all 24 here, 96 MB; up to ~3 GB of
    # a 50 MB model).
    size = 4 * 1024 * 1024
    calls = 3 * P.FN_CACHE_BYTES // size
    with Pool(1) as pool:
        outs = [pool.apply(Model(size, tag=i).predict, (i,)) for i in range(calls)]
    assert [out[:3] for out in outs] == [(i, i, i + 1) for i in range(calls)]
    assert max(out[3] for out in outs) <= P.FN_CACHE_BYTES // size + 1


def test_callables_evicted_for_their_bytes_are_sent_again() -> None:
    # The dispatcher mirrors each worker's cache: what the worker let go (for
    # count or bytes, the newest kept whatever its size) is sent with its next call.
    third = P.FN_CACHE_BYTES // 3 + 1
    models = [Model(third, tag=i) for i in range(3)] + [Model(P.FN_CACHE_BYTES + 1, tag=3)]
    order = [0, 1, 2, 0, 3, 1, 3, 2, 2, 0]
    with Pool(1) as pool:
        for round_ in range(2):
            for i in order:
                assert pool.apply(models[i].predict, (round_,))[:2] == (i, round_)
                assert pool.apply(square, (i,)) == i * i
        assert pool.map(square, range(100)) == [i * i for i in range(100)]


def test_the_callable_ledger_evicts_the_oldest_used_by_count_and_bytes() -> None:
    ledger: collections.OrderedDict[int, int] = collections.OrderedDict()
    assert P.admit_callable(ledger, 1, P.FN_CACHE_BYTES) == []  # the newest stays alone
    assert P.admit_callable(ledger, 2, 10) == [1]
    for fn_id in range(3, 3 + P.FN_CACHE_SIZE - 1):
        assert P.admit_callable(ledger, fn_id, 10) == []
    ledger.move_to_end(2)  # used again: the oldest used is now 3
    assert P.admit_callable(ledger, 100, 10) == [3]
    assert P.admit_callable(ledger, 101, P.FN_CACHE_BYTES - 10 * (P.FN_CACHE_SIZE - 1)) == [4]
    assert len(ledger) == P.FN_CACHE_SIZE and sum(ledger.values()) <= P.FN_CACHE_BYTES


def test_a_method_asked_for_again_keeps_its_measure() -> None:
    model = Model(10)
    cache = CallableCache()
    ref = cache.get(model.predict)
    assert cache.known(model.predict) is ref
    assert cache.get(model.predict) is ref  # the same bytes
    model.tag = 1
    assert cache.get(model.predict) is not ref
    # A small pickle is found by its bytes, whatever object made it.
    assert cache.get(Model(10).predict) is ref
    assert cache.get(functools.partial(square)) is cache.get(functools.partial(square))
    big = Model(P.FN_CACHE_BYTES // 256)
    assert cache.get(big.predict) is cache.get(big.predict)
    assert cache.get(Model(P.FN_CACHE_BYTES // 256).predict) is not cache.get(big.predict)


def test_a_copy_of_a_function_is_unpickled_once_per_process() -> None:
    import cloudpickle

    from procpool._core import load_copy

    blob = cloudpickle.dumps(lambda x: x + 1)
    assert load_copy(blob) is load_copy(blob)
    assert load_copy(blob)(1) == 2


def test_a_spawned_worker_loads_traceback_only_for_an_error() -> None:
    # With textwrap and tokenize it costs a spawned worker's start ~3-5 ms.
    with Pool(1, context="spawn") as pool:
        assert pool.apply(loaded, (["traceback"],)) == []
        with pytest.raises(ValueError, match="bad input 3") as info:
            pool.apply(fail_on, (3,))
        assert "raise ValueError" in str(info.value.__cause__)
        assert pool.apply(loaded, (["traceback"],)) == ["traceback"]


def test_map_raises_the_lowest_indexed_error_after_all_finished() -> None:
    with Pool(2) as pool, pytest.raises(ValueError, match="bad input 3"):
        pool.map(fail_on, range(10), chunksize=1)


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_task_raising_stop_iteration_in_a_long_map_fails_alone(backend: str) -> None:
    # Long maps run their tasks through map() in C, which takes a StopIteration
    # raised by a task for its own end: the batch came back short, and the map
    # waited for the missing results for ever.
    with Pool(2, backend=backend) as pool:
        with pytest.raises(StopIteration):
            pool.map(next_of_nothing_on, range(1000))
        out = pool.map(next_of_nothing_on, range(1000), return_exceptions=True)
        assert isinstance(out[100], StopIteration), out[100]
        assert out[:100] == list(range(100)) and out[101:] == list(range(101, 1000))
        got = list(pool.imap(next_of_nothing_on, range(1000), return_exceptions=True))
        assert isinstance(got[100], StopIteration) and got[101:] == list(range(101, 1000))


def test_a_callback_that_waits_for_its_own_pool_gets_an_error_not_a_hang() -> None:
    # Callbacks run on the thread that delivers the pool's results: waiting
    # there for another of them (apply, get, imap) could never end, and hung.
    with Pool(2) as pool:
        for wait in (
            lambda v: pool.apply(square, (v,)),
            lambda v: pool.map(square, [v] * 100),
            lambda v: list(pool.imap(square, range(v))),
        ):
            result = pool.apply_async(square, (3,), callback=wait)
            with pytest.raises(RuntimeError, match="the pool's own thread"):
                result.get(timeout=30)
        # Chaining without waiting still works, and so does waiting for another pool.
        chained: list[int] = []
        done = threading.Event()

        def then(v: int) -> None:
            pool.apply_async(square, (v,), callback=lambda w: (chained.append(w), done.set()))

        pool.apply_async(square, (2,), callback=then)
        assert done.wait(30) and chained == [16]
        with Pool(1) as other:
            got: list[int] = []
            pool.apply_async(square, (5,), callback=lambda v: got.append(other.apply(square, (v,))))
            pool.apply(square, (0,))  # a call after it: its callback has run by then
            deadline = time.monotonic() + 30
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)
            assert got == [625]


def test_return_exceptions_puts_errors_in_place() -> None:
    with Pool(2) as pool:
        out = pool.map(fail_on, range(6), return_exceptions=True)
        assert out[:3] == [0, 1, 2] and out[4:] == [4, 5]
        assert isinstance(out[3], ValueError)
        items = list(pool.imap(fail_on, range(6), return_exceptions=True))
        assert isinstance(items[3], ValueError) and items[5] == 5


def test_imap_raises_at_the_failing_item_and_goes_on() -> None:
    with Pool(2) as pool:
        it = pool.imap(fail_on, range(6))
        assert [next(it), next(it), next(it)] == [0, 1, 2]
        with pytest.raises(ValueError):
            next(it)
        assert list(it) == [4, 5]


@pytest.mark.parametrize("chunksize", [1, 4, 9, None])
def test_imap_results_and_errors_come_in_order_however_they_are_pulled(
    chunksize: int | None,
) -> None:
    # Chunks with and without errors, pulled by for-loops, next() and
    # next(timeout) in turn: every result once, each error at its place.
    expected: list[object] = [ValueError if x % 7 == 3 else x for x in range(60)]
    with Pool(2) as pool:
        got: list[object] = list(
            type(r) if isinstance(r, Exception) else r
            for r in pool.imap(fail_at_3_mod_7, range(60), chunksize, return_exceptions=True)
        )
        assert got == expected
        it = pool.imap(fail_at_3_mod_7, range(60), chunksize)
        pulled: list[object] = []
        pullers = [lambda: next(it), lambda: it.next(timeout=10)]
        while True:
            try:
                pulled.append(pullers[len(pulled) % 2]())
            except StopIteration:
                break
            except ValueError:
                pulled.append(ValueError)
        assert pulled == expected


def test_a_loop_over_imap_can_stop_and_the_rest_comes_by_next_or_another_loop() -> None:
    # for-loops get a generator over the iterator's state (IMapIterator.__iter__):
    # leaving one, then next(), next(timeout) or a second loop, loses nothing.
    with Pool(2) as pool:
        it = pool.imap(square, range(5000), chunksize=64)
        head = []
        for x in it:
            head.append(x)
            if len(head) == 100:
                break
        middle = [next(it), it.next(timeout=10)]
        rest = list(it)
        assert head + middle + rest == [x * x for x in range(5000)]
        assert list(it) == [] and list(iter(it)) == []


def test_a_paused_loop_over_imap_resumes_after_next_took_later_chunks() -> None:
    # A loop's generator paused mid-chunk while next(it) pulls past that chunk's
    # end (into the next chunks, errors among them): when the loop resumes it
    # carries on from where next() stopped, losing and repeating nothing.
    with Pool(2) as pool:
        for chunksize in (1, 7, 64):
            it = pool.imap(fail_at_3_mod_7, range(300), chunksize, return_exceptions=True)
            loop, other = iter(it), iter(it)
            got = [next(loop) for _ in range(5)]
            got += [next(it) for _ in range(70)]
            got += [next(other) for _ in range(3)]
            got += [it.next(timeout=10)]
            got += list(loop)
            assert [type(r) if isinstance(r, Exception) else r for r in got] == [
                ValueError if x % 7 == 3 else x for x in range(300)
            ]


@pytest.mark.parametrize(("chunksize", "before"), [(1, 37), (4, 36), (None, 37)])
def test_an_input_that_raises_ends_imap_where_the_standard_library_s_does(
    chunksize: int | None, before: int
) -> None:
    # Items 0..36 come, then the input itself raises. With chunksize=1 the
    # error takes item 37's place; with chunks of 4 it takes the place of the
    # chunk being read (36..), whose items do not run, as CPython's own
    # test_imap_handle_iterable_exception requires. With the adaptive chunk size
    # every item read runs (what the standard library's default of 1 does),
    # though chunks are larger than one item by then.
    def items() -> Iterator[int]:
        yield from range(37)
        raise KeyError("input broke")

    expected = [x * x for x in range(before)]
    with Pool(2) as pool:
        got = []
        with pytest.raises(KeyError, match="input broke"):
            for r in pool.imap(square, items(), chunksize):
                got.append(r)
        assert got == expected
        out = list(pool.imap(square, items(), chunksize, return_exceptions=True))
        assert out[:before] == expected and isinstance(out[before], KeyError)
        assert len(out) == before + 1
        unordered = list(pool.imap_unordered(square, items(), chunksize, return_exceptions=True))
        assert sorted(r for r in unordered if not isinstance(r, KeyError)) == expected
        assert sum(isinstance(r, KeyError) for r in unordered) == 1
        assert len(unordered) == before + 1
        assert pool.map(square, range(3)) == [0, 1, 4]
    with ProcessPoolExecutor(2) as executor:
        got = []
        with pytest.raises(KeyError, match="input broke"):
            for r in executor.map(square, items(), chunksize=chunksize):
                got.append(r)
        assert got == expected


def test_an_ordered_imap_yields_large_results_while_their_batch_runs() -> None:
    # Twelve 50 ms tasks in one batch, 600 KB of result each: their results go
    # ahead in pieces of two, so the first is here long before the last starts.
    with Pool(1) as pool:
        results = pool.imap(stamped_blob, [600_000] * 12, chunksize=12)
        _, first = next(results)
        received = time.monotonic()
        rest = list(results)
    assert first == b"x" * 600_000 and [r[1] for r in rest] == [first] * 11
    last_started = rest[-1][0]
    assert received < last_started


def test_imap_next_timeout() -> None:
    with Pool(1) as pool:
        it = pool.imap(sleep_return, [1.0])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.05)


def test_callbacks_run_and_their_errors_propagate() -> None:
    seen: list[object] = []
    done = threading.Event()
    with Pool(2) as pool:
        r = pool.apply_async(square, (3,), callback=seen.append)
        assert r.get(10) == 9 and seen == [9]
        e = pool.apply_async(fail_on, (3,), error_callback=lambda exc: done.set())
        with pytest.raises(ValueError):
            e.get(10)
        assert done.is_set()

        def bad_callback(_: object) -> None:
            raise RuntimeError("callback failed")

        with pytest.raises(RuntimeError, match="callback failed"):
            pool.apply_async(square, (2,), callback=bad_callback).get(10)


def test_async_result_states() -> None:
    with Pool(1) as pool:
        r = pool.apply_async(sleep_return, (0.3, "x"))
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.01)
        r.wait()
        assert r.ready() and r.successful() and r.get() == "x"


def test_closed_and_invalid_calls_raise_value_error() -> None:
    with pytest.raises(ValueError):
        Pool(0)
    with pytest.raises(ValueError):
        Pool(-1)
    pool = Pool(1)
    with pytest.raises(ValueError):
        pool.map(square, [1], chunksize=-1)
    with pytest.raises(ValueError):
        list(pool.imap(square, [1], chunksize=0))
    with pytest.raises(ValueError):
        pool.join()  # still running
    pool.close()
    with pytest.raises(ValueError):
        pool.map(square, [1])
    with pytest.raises(ValueError):
        pool.apply_async(square, (1,))
    pool.join()
    pool.terminate()  # twice is fine


def test_close_lets_queued_work_finish() -> None:
    pool = Pool(2)
    result = pool.map_async(sleep_return, [(0.01)] * 20)
    it = pool.imap(square, range(50))
    pool.close()
    pool.join()
    assert result.get(0) == [None] * 20
    assert list(it) == [x * x for x in range(50)]


def test_terminate_fails_unfinished_work_instead_of_hanging() -> None:
    pool = Pool(1)
    result = pool.apply_async(sleep_return, (30,))
    pool.terminate()
    pool.join()
    with pytest.raises(ValueError):
        result.get(5)


def test_a_global_set_by_an_initializer_in_main_is_seen_by_tasks_under_every_method(
    tmp_path: Path,
) -> None:
    # The standard library pickles __main__'s functions by name, so a worker
    # runs its own copy with the module's globals. procpool sends them by value
    # where a worker may lack them, and a function rebuilt from a pickle had
    # globals of its own: STATE stayed None under fork, forkserver and spawn
    # (and under the default, in a program that runs threads). A function
    # defined after the pool started still goes by value and still runs.
    script = tmp_path / "main_globals.py"
    script.write_text(
        textwrap.dedent(
            """
            import threading, procpool

            STATE = None

            def init(value):
                global STATE
                STATE = value

            def read(_):
                return STATE

            def run(method, label):
                with procpool.Pool(1, initializer=init, initargs=(label,), context=method) as pool:
                    def later(_):
                        return "later"
                    return pool.apply(read, (0,)), pool.apply(later, (0,))

            if __name__ == "__main__":
                out = [run(m, m) for m in ("fork", "forkserver", "spawn")]
                out.append(run(None, "default"))
                stop = threading.Event()
                busy = threading.Thread(target=stop.wait)  # the default is forkserver now
                busy.start()
                try:
                    out.append(run(None, "threads"))
                finally:
                    stop.set()
                    busy.join()
                print(out)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    labels = ("fork", "forkserver", "spawn", "default", "threads")
    assert out.stdout.strip() == repr([(label, "later") for label in labels]), out.stderr


def test_initializer_runs_in_each_worker() -> None:
    with Pool(2, initializer=set_env, initargs=("PROCPOOL_T", "set")) as pool:
        assert set(pool.map(get_env, ["PROCPOOL_T"] * 4)) == {"set"}


def test_maxtasksperchild_replaces_workers() -> None:
    with Pool(1, maxtasksperchild=2) as pool:
        pids = [pool.apply(pid) for _ in range(6)]
    assert len(set(pids)) == 3


def test_unpicklable_argument_fails_only_its_task() -> None:
    with Pool(2) as pool:
        out = pool.map(str, [1, Unpicklable(), 3], chunksize=3, return_exceptions=True)
        assert out[0] == "1" and out[2] == "3"
        assert isinstance(out[1], SerializationError)
        assert "task 1" in str(out[1]) and "Unpicklable" in str(out[1])
        with pytest.raises(SerializationError, match="Unpicklable"):
            pool.apply(str, (Unpicklable(),))
        assert pool.apply(square, (5,)) == 25


def test_unpicklable_result_fails_only_its_task() -> None:
    with Pool(2) as pool:
        with pytest.raises(SerializationError, match="cannot pickle the result"):
            pool.apply(return_unpicklable)
        assert pool.map(square, [1, 2]) == [1, 4]


def test_pool_cannot_be_pickled() -> None:
    import pickle

    with Pool(1) as pool, pytest.raises(NotImplementedError):
        pickle.dumps(pool)


def test_a_pool_freed_while_another_registers_does_not_deadlock() -> None:
    # An engine's weakref callback runs wherever the collector frees it: here,
    # on a thread that holds the at-exit registry's lock (as a collection
    # triggered inside the registration of a new pool would). It once waited
    # for that lock forever.
    from procpool import _runner

    pool = Pool(1, backend="threads")
    pool.terminate()
    done = threading.Event()

    def free_it_under_the_lock() -> None:
        nonlocal pool
        with _runner._engines_lock:
            del pool  # the engine goes with it; its callback runs here
        done.set()

    thread = threading.Thread(target=free_it_under_the_lock, name="test-free", daemon=True)
    thread.start()
    thread.join(10)
    assert done.is_set(), "the engine's weakref callback deadlocked on the registry lock"
