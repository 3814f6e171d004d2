"""Awkward but legal uses: big payloads, nested pools, many threads, exiting without close."""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import procpool
from procpool import (
    Pool,
    ProcessPoolExecutor,
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from procpool import testing as crash
from procpool._core import _dispatcher, _worker, _zygote
from procpool._core import _protocol as P
from procpool._core import _shm as shm
from procpool._core._slot import Slot
from tests.conftest import Sent
from tests.helpers import (
    SleepsWhenUnpickled,
    blob,
    count_onto_kept_queue,
    counted_fault,
    counted_square,
    counted_square_or_exit,
    echo_bytes,
    fail_on,
    fill_kept_queue,
    keep_barrier,
    kill_self,
    nested_map,
    outcomes_of,
    sleep_return,
    square,
    square_or_exit,
)


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


def test_tasks_may_use_pools_of_their_own(start_method: str) -> None:
    # Under fork the worker may have been forked while a thread of the parent
    # held the process-start lock: the child must get a fresh one.
    with Pool(2, context=start_method) as pool:
        assert pool.apply(nested_map, (5,)) == [0, 1, 4, 9, 16]


def test_workers_stuck_while_starting_are_killed_and_the_pool_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each worker blocks for good while unpickling its start-up arguments, as a
    # child forked mid-lock would: after START_TIMEOUT it is killed and replaced;
    # after three in a row the pool gives up with an error that says so.
    monkeypatch.setattr(_dispatcher, "START_TIMEOUT", 1.0)
    started = time.monotonic()
    with Pool(1, initializer=id, initargs=(SleepsWhenUnpickled(),)) as pool:
        (first,) = pool._runner.engine._workers.values()
        if isinstance(first.process._popen, _zygote._DirectPopen):
            # A default pool's first worker is forked from this process, with
            # nothing to unpickle; its replacements come from the zygote.
            with pytest.raises(WorkerCrashedError, match="SIGKILL"):
                pool.apply(kill_self)
        with pytest.raises(WorkerCrashedError, match="did not start within 1 s"):
            pool.map(square, range(4))
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("method", [None, "fork"])
def test_what_a_task_put_on_a_queue_all_arrives_after_close_and_join(method: str | None) -> None:
    # A worker flushes its Queues as it exits. On Python 3.13, where that step
    # moved out of Process._bootstrap, a worker started by the zygote (or forked
    # straight from the pool's process) skipped it: 14,815 of 15,000 items lost.
    queue = procpool.Queue()
    pool = Pool(1, initializer=keep_barrier, initargs=(queue,), context=method)
    try:
        assert pool.apply(count_onto_kept_queue, (1000,)) == 1000
        pool.close()
        pool.join()
        assert [queue.get(timeout=10) for _ in range(1000)] == list(range(1000))
    finally:
        pool.terminate()
        queue.close()
        queue.join_thread()


def test_a_worker_killed_at_close_because_it_could_not_exit_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its Queue's feeder thread cannot flush 4 MB into a pipe that nobody reads,
    # so the worker cannot exit (the standard library's pool hangs in join here).
    # It is killed after the grace period, and what it held is lost: join says so.
    monkeypatch.setattr(_dispatcher, "CLOSE_GRACE_S", 0.5)
    queue = procpool.Queue()
    pool = Pool(1, initializer=keep_barrier, initargs=(queue,))
    try:
        assert pool.apply(fill_kept_queue, (4000,)) == 4000
        pool.close()
        with pytest.warns(RuntimeWarning, match=r"did not exit within 0.5 s .* Queue"):
            pool.join()
    finally:
        pool.terminate()
        queue.close()
        queue.join_thread()


def test_terminate_returns_when_the_dispatcher_is_stuck_writing_to_a_stopped_worker() -> None:
    pool = Pool(1)
    try:
        assert pool.apply(square, (3,)) == 9
        (worker,) = [w for w in pool.statistics().per_worker if w.alive]
        os.kill(worker.pid, signal.SIGSTOP)  # it stops reading its pipe
        stuck = pool.apply_async(echo_bytes, (b"x" * (32 << 20),))  # more than a pipe holds
        time.sleep(0.5)
        assert not stuck.ready()
    finally:
        started = time.monotonic()
        pool.terminate()
    assert time.monotonic() - started < 30
    with pytest.raises(Exception):  # noqa: B017 - any error will do; it must not hang
        stuck.get(10)


@pytest.mark.parametrize("start_method", [None, "fork"])
def test_tasks_submitted_one_by_one_run_once_each_when_a_worker_dies_among_them(
    start_method: str | None, tmp_path: Path
) -> None:
    # Short tasks submitted one by one reach a worker up to _dispatcher.BURST at a
    # time, in one write. The worker that dies holds many it has not started:
    # each must run elsewhere, once, and every other result must arrive.
    runs = tmp_path / "runs"
    context = multiprocessing.get_context(start_method) if start_method else None
    with Pool(2, initializer=keep_barrier, initargs=(str(runs),), context=context) as pool:
        # Measured first: nothing is sent ahead of a callable never measured.
        assert pool.map(counted_square, range(64), chunksize=1) == [i * i for i in range(64)]
        results = [pool.apply_async(counted_square, (i,)) for i in range(300)]
        doomed = pool.apply_async(crash.exit_abruptly, (3,))
        results += [pool.apply_async(counted_square, (i,)) for i in range(300, 600)]
        assert [r.get(timeout=60) for r in results] == [i * i for i in range(600)]
        with pytest.raises(WorkerCrashedError):
            doomed.get(timeout=60)
        assert pool.apply(square, (7,)) == 49
    ran = sorted(int(line) for line in runs.read_text().split())
    assert ran == sorted([*range(64), *range(600)])


@pytest.mark.parametrize("start_method", [None, "fork"])
def test_a_worker_that_dies_among_calls_sent_together_loses_no_call_unannounced(
    start_method: str | None, tmp_path: Path, merged_calls: list[int]
) -> None:
    # Calls of one function queued together go to a worker as one batch (see
    # Dispatcher._merge). One of them ends the worker: it fails; the calls sent
    # with it that had not started run elsewhere, once; those that had run but
    # whose results had not yet gone ahead (at most P.CALLS_PIECE_S of work)
    # fail with WorkerCrashedError(ran_to_completion=True). No call runs twice,
    # and every other result arrives.
    runs = tmp_path / "runs"
    context = multiprocessing.get_context(start_method) if start_method else None
    arguments = [*range(500), -1, *range(500, 1000)]
    with Pool(2, initializer=keep_barrier, initargs=(str(runs),), context=context) as pool:
        assert pool.map(counted_square_or_exit, range(64), chunksize=1) == [
            i * i for i in range(64)
        ]
        outcomes = outcomes_of([pool.apply_async(counted_square_or_exit, (x,)) for x in arguments])
        assert pool.apply(square, (7,)) == 49
    ran_here = [int(line) for line in runs.read_text().split()][64:]  # after the map's
    assert len(ran_here) == len(set(ran_here)), "a call ran twice"
    doomed = outcomes[500]
    assert isinstance(doomed, WorkerCrashedError) and not doomed.ran_to_completion
    lost = [x for x, o in zip(arguments, outcomes) if isinstance(o, WorkerCrashedError) and x >= 0]
    for x, outcome in zip(arguments, outcomes):
        if x < 0:
            continue
        assert x in ran_here
        if isinstance(outcome, WorkerCrashedError):
            assert outcome.ran_to_completion, outcome
            assert "a call sent with it was running" in str(outcome)
            assert outcome.task_index == 0  # a call's own index, not its place in the batch
        else:
            assert outcome == x * x
    assert len(lost) < _dispatcher.BURST
    assert max(merged_calls) > 1, "no calls went together"


@pytest.mark.parametrize("ordered", [True, False])
def test_a_worker_that_dies_among_one_task_chunks_it_holds_fails_only_its_task(
    ordered: bool, tmp_path: Path, sent: Sent
) -> None:
    # chunksize=1 promises that a crash fails the task it happened in and no
    # other (docs/faults.md). A worker that answers such chunks quickly holds
    # several at once (Dispatcher._burst_limit), sent together as one batch
    # (Joined) but each still a task of its own: those it ran were answered,
    # those it had not started run elsewhere, once.
    runs = tmp_path / "runs"
    arguments = [*range(300), -1, *range(300, 600)]
    with Pool(2, initializer=keep_barrier, initargs=(str(runs),)) as pool:
        assert pool.map(counted_square, range(64), chunksize=1) == [i * i for i in range(64)]
        if ordered:
            outcomes = list(pool.imap(counted_square_or_exit, arguments, 1, return_exceptions=True))
        else:
            unordered = pool.imap_unordered(
                counted_square_or_exit, arguments, 1, return_exceptions=True
            )
            outcomes = sorted(unordered, key=lambda o: -1 if isinstance(o, BaseException) else o)
            arguments = [-1, *range(600)]
        assert pool.apply(square, (7,)) == 49
    failed = [x for x, o in zip(arguments, outcomes) if isinstance(o, BaseException)]
    assert failed == [-1]
    assert [o for x, o in zip(arguments, outcomes) if x >= 0] == [x * x for x in range(600)]
    ran = [int(line) for line in runs.read_text().split()][64:]
    assert sorted(ran) == sorted(arguments), "a task ran twice, or not at all"
    assert max(sent.tasks) > _dispatcher.WINDOW, "no worker held more than a window of tasks"
    assert any(sent.joined), "no one-task chunks went together"


def test_a_worker_holds_several_short_chunks_and_a_crash_costs_only_its_own(sent: Sent) -> None:
    # Chunks of a few tiny tasks (an explicit small chunksize) go several at a
    # time to a worker that answers them quickly (Dispatcher._burst_limit), as
    # one batch (Joined), as one-task chunks and single calls do: two at a
    # time, each worker slept and woke for every chunk. A crash still costs
    # only the chunk it happened in.
    arguments = [*range(300), -1, *range(300, 600)]  # -1 ends its worker
    with Pool(2) as pool:
        assert pool.map(square, range(64), chunksize=4) == [i * i for i in range(64)]
        outcomes = list(pool.imap(square_or_exit, arguments, 4, return_exceptions=True))
        assert pool.apply(square, (7,)) == 49
    crashed_chunk = set(range(300, 304))  # the positions of -1's chunk
    for position, (x, outcome) in enumerate(zip(arguments, outcomes)):
        if isinstance(outcome, BaseException):
            assert position in crashed_chunk, (position, outcome)
            assert isinstance(outcome, WorkerCrashedError)
        else:
            assert outcome == x * x
    assert isinstance(outcomes[300], WorkerCrashedError)
    assert max(sent.chunks) > _dispatcher.WINDOW, "no worker held more than a window of chunks"
    assert any(sent.joined), "no chunks went together"


def test_long_chunks_sent_together_run_at_c_speed_and_a_crash_costs_only_its_span(
    sent: Sent,
) -> None:
    # Chunks of FAST_MIN_ITEMS tasks or more sent as one batch run as a batch of
    # them alone would (map() in C, the slot set once a span): a per-task loop
    # with a slot write and a result size made chunks of 256 squares 1.4-2x
    # slower than the standard library's. A task that raises fails alone; a
    # crash fails the span of its chunk it happened in, and no other task.
    chunk = P.FAST_MIN_ITEMS + 36
    arguments = [*range(1000), -1, *range(1000, 3000)]  # -1 ends its worker
    crashed = 1000 // chunk * chunk
    with Pool(2) as pool:
        assert pool.map(square, range(4 * chunk), chunksize=chunk) == [
            i * i for i in range(4 * chunk)
        ]
        outcomes = list(pool.imap(square_or_exit, arguments, chunk, return_exceptions=True))
        raised = pool.map(fail_on, range(3 * chunk), chunk, return_exceptions=True)
    for position, (x, outcome) in enumerate(zip(arguments, outcomes)):
        if isinstance(outcome, BaseException):
            assert crashed <= position < crashed + chunk, (position, outcome)
            assert isinstance(outcome, WorkerCrashedError)
        else:
            assert outcome == x * x
    assert isinstance(outcomes[1000], WorkerCrashedError)
    assert isinstance(raised[3], ValueError)
    assert raised[:3] + raised[4:] == [x for x in range(3 * chunk) if x != 3]
    assert any(sent.joined), "no chunks went together"


@pytest.mark.parametrize("seed", range(16))
def test_random_faults_in_small_chunks_cost_each_chunk_only_its_own(
    seed: int, tmp_path: Path
) -> None:
    # Crashes (os._exit, SIGKILL), exceptions and 2 ms tasks scattered at random
    # among tiny ones, run as small chunks (which go to a worker several at a
    # time, see the tests above) or single calls, through map, imap,
    # imap_unordered and apply_async, with options that change the paths taken.
    # Every task runs exactly once (none is rerun: no retries=); a task that
    # did not fail itself fails only because a later task of its own chunk (or,
    # for calls, of the calls sent with it) took its result down with the worker.
    rng = random.Random(seed)
    n = rng.choice([300, 1_000, 2_000])
    chunksize = rng.choice([1, 2, 3, 7])
    method = ["map", "imap", "imap_unordered", "apply_async"][seed % 4]
    failing = rng.choice([0.003, 0.01])
    options = rng.choice([{}, {"maxtasksperchild": 50}, {"context": "fork"}, {"task_timeout": 30}])
    kinds = [
        rng.choices(["exit", "kill", "raise", "slow", "ok"], [failing] * 3 + [0.05, 1])[0]
        for _ in range(n)
    ]
    tasks = list(enumerate(kinds))
    runs = tmp_path / "runs"
    with Pool(
        rng.choice([1, 2, 3]), initializer=keep_barrier, initargs=(str(runs),), **options
    ) as pool:
        if method == "apply_async":
            chunksize = 1
            outcomes = outcomes_of([pool.apply_async(counted_fault, (t,)) for t in tasks])
        elif method == "map":
            outcomes = pool.map(counted_fault, tasks, chunksize, return_exceptions=True)
        else:
            call = getattr(pool, method)
            outcomes = list(call(counted_fault, tasks, chunksize, return_exceptions=True))
        assert pool.apply(square, (7,)) == 49
    ran = collections.Counter(int(line) for line in runs.read_text().split())
    assert all(ran[i] == 1 for i in range(n)), "a task ran twice, or not at all"
    assert len(outcomes) == n
    fatal = {"exit", "kill"}
    if method == "imap_unordered":
        # Outcomes come in any order: count them.
        values = sorted(o for o in outcomes if not isinstance(o, BaseException))
        assert set(values) <= {i * i for i, k in tasks if k in ("ok", "slow")}
        assert len(set(values)) == len(values)
        crashed = sum(isinstance(o, WorkerCrashedError) for o in outcomes)
        assert sum(isinstance(o, ValueError) for o in outcomes) <= kinds.count("raise")
        assert crashed >= sum(k in fatal for k in kinds)
        if chunksize == 1:
            assert crashed == sum(k in fatal for k in kinds)
        return
    taken_down = 0
    for i, (kind, outcome) in enumerate(zip(kinds, outcomes)):
        if kind in fatal:
            assert isinstance(outcome, WorkerCrashedError), (i, kind, outcome)
        elif isinstance(outcome, WorkerCrashedError):
            assert outcome.ran_to_completion, (i, kind, outcome)
            taken_down += 1
            if method != "apply_async":  # a later task of its chunk crashed
                end = (i // chunksize + 1) * chunksize
                assert any(k in fatal for k in kinds[i + 1 : end]), (i, kind, outcome)
            else:  # calls sent together are not always neighbours: count them
                assert "a call sent with it was running" in str(outcome), (i, outcome)
        elif kind == "raise":
            assert isinstance(outcome, ValueError), (i, kind, outcome)
        else:
            assert outcome == i * i, (i, kind, outcome)
    reach = _dispatcher.BURST if method == "apply_async" else chunksize
    assert taken_down <= (reach - 1) * sum(k in fatal for k in kinds)


def test_a_default_socket_timeout_does_not_cut_the_pools_pipes() -> None:
    # socket.setdefaulttimeout(), which network code sets, made the socket the
    # pool waits for a reply with (_pipewait.PipeWait) non-blocking, and with it
    # the worker's pipe: a reply that came after the timeout was lost, and get()
    # waited forever.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.2)
    try:
        with Pool(2) as pool:
            assert pool.apply(square, (3,)) == 9
            assert pool.apply_async(sleep_return, (0.6, 5)).get(timeout=10) == 5
            lengths = [len(b) for b in pool.map(blob, [300_000] * 8, chunksize=1)]
            assert lengths == [300_000] * 8
            assert list(pool.imap(square, range(2_000), 1)) == [x * x for x in range(2_000)]
            assert pool.apply_async(sleep_return, (0.6, 6)).get(timeout=10) == 6
    finally:
        socket.setdefaulttimeout(previous)


def test_a_worker_skips_an_offer_taken_back_and_runs_the_later_one_whose_token_it_took() -> None:
    # Batches 1 and 2 offered, then 1 taken back (the dispatcher took the first
    # token): reading batch 1, the worker finds batch 2's token instead. Batch
    # 2 is its own now; batch 1 runs elsewhere. With tokens that did not name
    # their batch, batch 1 ran here too (twice in all) and batch 2 never.
    import pickle

    slot = Slot(P.SLOT_SIZE)
    here, there = multiprocessing.Pipe()
    try:
        for batch_id in (1, 2):
            slot.offer(batch_id)
        assert slot.take() == 1
        P.send(here, (P.FN, 7, pickle.dumps(square)))
        for batch_id, x in ((1, 3), (2, 4)):
            P.send(here, (P.OFFER, batch_id, 7, P.CALL_ONE, False, 0, None, False, P.dumps([x])))
        P.send(here, (P.STOP,))
        _worker._serve(there, slot.view, None, None, slot.take)
        replies = []
        while here.poll():
            replies.append(P.recv(here))
    finally:
        here.close()
        there.close()
        slot.close()
    assert [(msg[0], msg[1]) for msg in replies] == [(P.RESULTS, 2)]
    assert pickle.loads(replies[0][-1]) == ([16], None)


def _run_in_this_process(msg: tuple[Any, ...], fn: Any) -> tuple[list[tuple[Any, ...]], Any]:
    """Run batch ``msg`` (callable id 1: ``fn``) as a worker would, in this process;
    return the messages it sent ahead and its reply's payload."""
    here, there = multiprocessing.Pipe()
    with here, there:
        fns = _worker._Callables()
        fns.add(1, pickle.dumps(fn))
        slot = [0.0] * P.SLOT_SIZE
        payload, _, _ = _worker._run_batch(msg, fns, slot, None, there)
        pieces = []
        while here.poll():
            pieces.append(P.recv(here))
    return pieces, payload


def test_calls_sent_together_send_their_results_ahead_every_millisecond() -> None:
    # Ten calls of 0.5 ms as one batch (P.CALLS): their results go ahead in
    # pieces (P.PARTIAL) between calls, once P.CALLS_PIECE_S has passed since the
    # last, not all at the end.
    calls = [P.dumps([((0.0005, i), {})]) for i in range(10)]
    msg = (P.BATCH, 1, 1, P.CALLS, False, -1, None, False, P.dumps(calls))
    pieces, payload = _run_in_this_process(msg, sleep_return)
    assert pieces and all(piece[:2] == (P.PARTIAL, 1) for piece in pieces)
    values: list[object] = []
    for piece in pieces:
        piece_values, errors = shm.unpack(piece[3])
        assert errors is None and len(piece_values) == piece[2]
        values += piece_values
    last, errors = shm.unpack(payload)
    assert errors is None
    assert values + last == list(range(10))


def test_chunks_sent_together_are_answered_each_on_its_own() -> None:
    # A map's chunks as one batch (P.JOINED): each chunk's own pickle, unpickled
    # just before its first task, and each chunk's results back (P.PARTIAL) as
    # its last task ends, so a worker that dies later loses none of them. A
    # chunk that will not unpickle ends the batch: the reply says so, as for a
    # batch that would not unpickle, and the pool takes it from there.
    import pickle

    def run(chunks: list[tuple[int, bytes]]) -> tuple[list[tuple[Any, ...]], Any]:
        msg = (P.BATCH, 1, 1, P.CALL_ONE | P.JOINED, False, 40, None, False, P.dumps(chunks))
        pieces, payload = _run_in_this_process(msg, square)
        return pieces, shm.unpack(payload)

    good = [(2, P.dumps([3, 4])), (1, P.dumps([5])), (3, P.dumps([6, 7, 8]))]
    pieces, reply = run(good)
    assert [piece[:3] for piece in pieces] == [(P.PARTIAL, 1, 2), (P.PARTIAL, 1, 1)]
    assert [shm.unpack(piece[3]) for piece in pieces] == [([9, 16], None), ([25], None)]
    assert reply == ([36, 49, 64], None)

    bad = pickle.dumps([crash.FailsOnUnpickle()])
    pieces, reply = run([(2, P.dumps([3, 4])), (1, bad), (1, P.dumps([6]))])
    assert [piece[:3] for piece in pieces] == [(P.PARTIAL, 1, 2)]
    values, error = reply
    assert values is None and isinstance(error, SerializationError)
    assert "cannot unpickle the task's arguments" in str(error)


def test_a_joined_batch_splits_at_any_task_and_keeps_its_chunks() -> None:
    # After a crash the tasks a worker had not run go back to the queue
    # (Joined.subset): whole chunks as they were, a chunk cut short pickled
    # again, still joined where more than one remains.
    from procpool._core._batch import DEFAULT_POLICY, Batch, CallableRef, Joined

    fn = CallableRef(square)
    sink = object()

    def chunk(first: int, items: list[int]) -> Batch:
        return Batch(fn, P.CALL_ONE, items, P.dumps(items), first, sink, DEFAULT_POLICY)  # type: ignore[arg-type]

    parts = [chunk(10, [10, 11]), chunk(12, [12, 13, 14]), chunk(15, [15])]
    joined = Joined(parts)
    assert joined.items == list(range(10, 16)) and joined.units() == 3
    assert [joined.chunk_end(i) for i in range(6)] == [2, 2, 5, 5, 5, 6]
    tail = joined.subset(1, 6)
    assert isinstance(tail, Joined) and tail.first_index == 11
    assert [p.items for p in tail.parts] == [[11], [12, 13, 14], [15]]
    assert tail.parts[1] is parts[1] and tail.parts[2] is parts[2]
    assert joined.subset(2, 5) is parts[1]
    middle = joined.subset(3, 4)
    assert type(middle) is Batch and middle.items == [13] and middle.first_index == 13
    assert middle.star == P.CALL_ONE


@pytest.mark.parametrize("chunksize", [1, 4])
@pytest.mark.parametrize("bad", ["raises", "crashes"])
def test_a_chunk_whose_argument_fails_to_unpickle_costs_what_it_would_alone(
    bad: str, chunksize: int, tmp_path: Path, sent: Sent
) -> None:
    # Chunks sent together (Joined), one of them with an argument that raises,
    # or ends the worker, as it is unpickled there. As for a chunk sent alone:
    # one that raises is tried task by task, so only the bad task fails; one
    # that crashes fails its own chunk (one of its tasks was being unpickled).
    # Every other task runs once and its result arrives.
    runs = tmp_path / "runs"
    poison = crash.FailsOnUnpickle() if bad == "raises" else crash.CrashesOnUnpickle(7)
    arguments: list[Any] = [*range(300), poison, *range(300, 599)]
    with Pool(2, initializer=keep_barrier, initargs=(str(runs),)) as pool:
        assert pool.map(counted_square, range(64), chunksize=chunksize) == [
            i * i for i in range(64)
        ]
        outcomes = list(pool.imap(counted_square, arguments, chunksize, return_exceptions=True))
        assert pool.apply(square, (7,)) == 49
    if bad == "raises":
        failed = {300}
        assert isinstance(outcomes[300], SerializationError), outcomes[300]
    else:
        failed = set(range(300, 300 + chunksize))  # the poison's chunk
        assert all(isinstance(outcomes[i], WorkerCrashedError) for i in failed), outcomes[300]
    assert all(outcomes[i].task_index == i for i in failed)  # type: ignore[union-attr]
    for i, (x, outcome) in enumerate(zip(arguments, outcomes)):
        if i not in failed:
            assert outcome == x * x, (i, outcome)
    ran = [int(line) for line in runs.read_text().split()][64:]
    expected_runs = [x for i, x in enumerate(arguments) if i not in failed]
    assert sorted(ran) == sorted(expected_runs), "a task ran twice, or not at all"
    assert any(sent.joined), "no chunks went together"


def test_messages_written_at_once_are_read_one_by_one() -> None:
    here, there = multiprocessing.Pipe()
    with here, there:
        messages = [
            (P.FREED, []),
            (P.FN, 1, b"callable"),
            (P.BATCH, 7, 1, 0, False, -1, None, False, b"x" * 1000),
            (P.BATCH, 8, 1, 0, True, -1, (5, 2), True, b"y"),
        ]
        buffers: list[bytes] = []
        for message in messages:
            frame = P.framed(message)
            assert frame is not None
            buffers.extend(frame)
        P.write(here, buffers)
        assert [P.recv(there) for _ in messages] == messages
        # More messages than one writev() call takes.
        many = [(P.FREED, [i]) for i in range(1000)]
        P.write(here, [b for m in many for b in P.framed(m) or ()])
        assert [P.recv(there) for _ in many] == many
    # A payload large enough for a frame of its own is sent by P.send, not framed.
    assert P.framed((P.BATCH, 9, 1, 0, False, -1, None, False, b"z" * P.FRAME_BYTES)) is None


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


def test_a_worker_that_crashes_while_the_interpreter_exits_is_reported_quietly() -> None:
    # An executor finishes its queued work at exit; here that work kills its
    # worker after threading's shutdown, when concurrent.futures.process can no
    # longer be imported (it registers a threading exit hook). Nothing loaded it
    # before (a pool loads it only for these errors): the error is still a
    # WorkerCrashedError, a BrokenExecutor, and the dispatcher thread does not
    # die with a traceback.
    script = textwrap.dedent(
        """
        import concurrent.futures, os, sys, time, procpool

        def crash_later():
            time.sleep(0.3)
            os._exit(3)

        def report(future):
            error = future.exception()
            print(type(error).__name__, isinstance(error, procpool.WorkerCrashedError),
                  isinstance(error, concurrent.futures.BrokenExecutor), "exit code 3" in str(error))

        if __name__ == "__main__":
            ex = procpool.ProcessPoolExecutor(1)
            future = ex.submit(crash_later)
            future.add_done_callback(report)
            print("concurrent.futures.process" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stderr == ""
    assert out.stdout == "False\nWorkerCrashedError True True True\n"


def test_a_worker_crash_is_a_broken_process_pool_for_the_standard_librarys_except_clauses() -> None:
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1) as ex, pytest.raises(BrokenProcessPool):
        ex.submit(os._exit, 3).result()


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
