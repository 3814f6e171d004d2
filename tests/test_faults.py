"""The crash matrix: failure kind x stage x start method, each with what the caller sees.

Every row runs a real failure (a real segfault, a real SIGKILL, a real
os._exit) and then checks that the pool still serves.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from procpool import (
    InitializerError,
    Pool,
    PoolClosedError,
    ResultSerializationError,
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from procpool import testing as crash
from tests.helpers import (
    big_then_slow_to_pickle,
    blob,
    blob_or_sleep,
    counted_sleep,
    keep_barrier,
    square,
)

# (id, function, args, pool options, expected type, message pattern)
TASK_ROWS: list[tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any], type, str]] = [
    ("exception/run", crash.raise_error, ("boom",), {}, crash.CrasherError, "boom"),
    ("sys.exit/run", crash.sys_exit, (3,), {}, SystemExit, "3"),
    (
        "os._exit/run",
        crash.exit_abruptly,
        (3,),
        {},
        WorkerCrashedError,
        r"died running the task: exit code 3",
    ),
    ("sigkill/run", crash.kill_self, (), {}, WorkerCrashedError, r"SIGKILL \(-9\).*out of memory"),
    ("segfault/run", crash.segfault, (), {}, WorkerCrashedError, r"SIGSEGV \(-11\)"),
    (
        "timeout/run",
        crash.sleep,
        (30,),
        {"task_timeout": 0.5},
        TaskTimeoutError,
        r"task_timeout of 0.5 s",
    ),
    (
        "exception/pickle-args",
        str,
        (crash.Unpicklable(),),
        {},
        SerializationError,
        r"cannot pickle the arguments of the task \(type procpool.testing.Unpicklable\)",
    ),
    (
        "exception/unpickle-args",
        str,
        (crash.FailsOnUnpickle(),),
        {},
        SerializationError,
        r"cannot unpickle the task's arguments in the worker",
    ),
    (
        "os._exit/unpickle-args",
        str,
        (crash.CrashesOnUnpickle(7),),
        {},
        WorkerCrashedError,
        r"while unpickling the arguments of the task: exit code 7",
    ),
    (
        "exception/pickle-result",
        crash.return_unpicklable,
        (),
        {},
        SerializationError,
        r"cannot pickle the result of the task \(type procpool.testing.Unpicklable\)",
    ),
    (
        "os._exit/pickle-result",
        crash.return_crashes_on_pickle,
        (),
        {},
        WorkerCrashedError,
        r"while sending the results of the task: exit code 9",
    ),
    (
        "exception/unpickle-result",
        crash.return_fails_on_unpickle,
        (),
        {},
        SerializationError,
        r"cannot unpickle the result of the task in the parent",
    ),
]


@pytest.mark.parametrize(
    ("fn", "args", "options", "expected", "pattern"),
    [pytest.param(*row[1:], id=row[0]) for row in TASK_ROWS],
)
def test_task_fault(
    start_method: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    options: dict[str, Any],
    expected: type,
    pattern: str,
) -> None:
    with Pool(2, context=start_method, **options) as pool:
        with pytest.raises(expected, match=pattern):
            pool.apply(fn, args)
        # The same failure inside a map fails that task only.
        out = pool.map(
            _call,
            [(square, (i,)) for i in range(4)] + [(fn, args)],
            chunksize=1,
            return_exceptions=True,
        )
        assert out[:4] == [0, 1, 4, 9]
        assert isinstance(out[4], expected)
        assert pool.apply(square, (7,)) == 49


def _call(spec: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    fn, args = spec
    return fn(*args)


INIT_ROWS = [
    (
        "exception/initializer",
        crash.raise_error,
        ("init failed",),
        r"initializer 'raise_error' raised CrasherError: init failed",
    ),
    (
        "os._exit/initializer",
        crash.exit_abruptly,
        (5,),
        r"died while running the pool's initializer: exit code 5",
    ),
    ("segfault/initializer", crash.segfault, (), r"SIGSEGV"),
]


@pytest.mark.parametrize(
    ("init", "initargs", "pattern"), [pytest.param(*r[1:], id=r[0]) for r in INIT_ROWS]
)
def test_initializer_fault(
    start_method: str, init: Callable[..., Any], initargs: tuple[Any, ...], pattern: str
) -> None:
    started = time.monotonic()
    with Pool(2, initializer=init, initargs=initargs, context=start_method) as pool:
        with pytest.raises(InitializerError, match=pattern):
            pool.map(square, range(10))
        with pytest.raises(InitializerError):
            pool.apply(square, (1,))
    assert time.monotonic() - started < 30  # no respawn loop


def test_crash_mid_batch_fails_the_running_task_and_reruns_the_unstarted(start_method: str) -> None:
    out = _one_batch_on_one_worker(
        [(square, (i,)) for i in range(3)]
        + [(crash.exit_abruptly, (4,))]
        + [(square, (i,)) for i in range(4, 8)],
        start_method,
    )
    # Tasks 0-2 ran, but their results died with the worker: they fail, saying so.
    for i in range(3):
        assert isinstance(out[i], WorkerCrashedError)
        assert "before returning its result" in str(out[i]) and out[i].task_index == i
    assert isinstance(out[3], WorkerCrashedError) and "died running task 3" in str(out[3])
    assert out[3].exitcode == 4
    # Tasks 4-7 had not started: they ran on the replacement worker.
    assert out[4:] == [16, 25, 36, 49]


def test_a_worker_that_dies_with_a_batch_offered_to_it_fails_only_its_task(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Task 3 waits as an offer behind task 1 (see test_pool's test of offers
    # taken back), which ends its worker at 0.1 s, before the other workers run
    # out of work: task 3 had not started, and runs on another worker, once.
    from procpool._core import _dispatcher

    offered: list[int] = []
    send = _dispatcher.Dispatcher._send

    def sending(self: Any, worker: Any, batch: Any, linger: bool = False, **options: Any) -> None:
        send(self, worker, batch, linger, **options)
        if options.get("offer"):
            offered.append(batch.first_index)

    monkeypatch.setattr(_dispatcher.Dispatcher, "_send", sending)
    runs = tmp_path / "runs"
    with Pool(3, initializer=keep_barrier, initargs=(str(runs),)) as pool:
        pool.map(counted_sleep, [(100 + i, 0.05) for i in range(12)], chunksize=1)
        tasks = [(0, 0.01), (1, -0.1), *((i, 0.03) for i in range(2, 21))]
        out = pool.map(counted_sleep, tasks, chunksize=1, return_exceptions=True)
    assert 3 in offered, offered
    assert isinstance(out[1], WorkerCrashedError) and out[1].task_index == 1
    assert [o[0] for i, o in enumerate(out) if i != 1] == [i for i in range(21) if i != 1]
    ran = [int(line) for line in runs.read_text().split()]
    assert sorted(x for x in ran if x < 100) == list(range(21)), "a task ran twice, or never"


def _one_batch_on_one_worker(specs: list[Any], start_method: str) -> list[Any]:
    with Pool(1, context=start_method) as pool:
        return pool.map(_call, specs, chunksize=len(specs), return_exceptions=True)


BIG = 600_000  # two results of this size make a piece sent ahead (P.PIECE_BYTES)


def test_results_sent_ahead_of_a_batch_outlive_its_worker(start_method: str) -> None:
    # Tasks 0-3 return 600 KB each, so their results travel in two pieces before
    # task 4 kills the worker: they were delivered, and must not fail with it.
    out = _one_batch_on_one_worker(
        [(blob, (BIG,)) for _ in range(4)]
        + [(crash.exit_abruptly, (4,))]
        + [(square, (i,)) for i in range(5, 8)],
        start_method,
    )
    assert out[:4] == [b"x" * BIG] * 4
    assert isinstance(out[4], WorkerCrashedError) and "died running task 4" in str(out[4])
    assert out[5:] == [25, 36, 49]


def test_a_death_while_sending_results_ahead_fails_only_what_was_sent(
    start_method: str,
) -> None:
    # Task 1's result ends the worker when pickled, in the piece that tasks 0-2
    # make: those three fail, saying so; task 3 had not started and runs again.
    out = _one_batch_on_one_worker(
        [(blob, (BIG,)), (crash.return_crashes_on_pickle, ()), (blob, (BIG,)), (square, (3,))],
        start_method,
    )
    for i in range(3):
        assert isinstance(out[i], WorkerCrashedError), out[i]
        assert f"died while sending the results of task {i}" in str(out[i])
    assert out[3] == 9


def test_sending_results_ahead_does_not_count_against_task_timeout() -> None:
    # Task 0 ends at once, but its result takes 0.8 s to pickle, in a piece sent
    # ahead of task 1: no task ran longer than 0.5 s, so nothing is killed.
    with Pool(1, task_timeout=0.5) as pool:
        out = pool.map(big_then_slow_to_pickle, [0.8, 0.0], chunksize=2)
    assert out == [(b"x" * 1_100_000, "pickled")] * 2


def test_results_sent_ahead_keep_errors_and_retries_in_place() -> None:
    flag = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"procpool-ahead-{os.getpid()}")
    if os.path.exists(flag):
        os.unlink(flag)
    specs = [
        (blob, (BIG,)),
        (crash.return_unpicklable, ()),  # in a piece sent ahead: fails alone
        (blob, (BIG,)),
        (crash.raise_error, ("task 3 says no",)),
        (blob, (BIG,)),
        (blob, (BIG,)),
        (_crash_first_time, (flag,)),  # after two pieces: retried, on its own
        (square, (7,)),
    ]
    try:
        with Pool(1, retries=1) as pool:
            out = pool.map(_call, specs, chunksize=8, return_exceptions=True)
    finally:
        if os.path.exists(flag):
            os.unlink(flag)
    assert out[0] == out[2] == out[4] == out[5] == b"x" * BIG
    assert isinstance(out[1], ResultSerializationError) and "result of task 1 " in str(out[1])
    assert isinstance(out[3], crash.CrasherError) and "task 3 says no" in str(out[3])
    assert out[6:] == ["second try", 49]


def test_terminate_fails_only_what_a_batch_had_not_sent_ahead() -> None:
    # Tasks 0 and 1 return 1.2 MB each: their results go ahead of their batch,
    # and both have reached the caller when the pool is terminated while task 2
    # sleeps. terminate() failed the whole batch again, results sent ahead
    # included: imap then waited forever for task 2, and a map's result (which
    # counts its tasks down) passed zero and was never ready. Both results are
    # taken before terminating: CI once terminated while task 1's was still on
    # its way, which (rightly) failed it too.
    pool = Pool(1)
    try:
        it = pool.imap(blob_or_sleep, [1_200_000, 1_200_000, -30], chunksize=3)
        assert it.next(timeout=30) == b"x" * 1_200_000
        assert it.next(timeout=30) == b"x" * 1_200_000
    finally:
        pool.terminate()
    with pytest.raises(PoolClosedError, match="terminated"):
        it.next(timeout=10)
    with pytest.raises(StopIteration):
        it.next(timeout=10)


def test_sigkill_from_outside_fails_only_that_worker_s_task(tmp_path: Any) -> None:
    pidfile = tmp_path / "pid"
    with Pool(2) as pool:
        victim = pool.apply_async(_write_pid_and_sleep, (str(pidfile),))
        survivor = pool.apply_async(crash.sleep, (0.5, "alive"))
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match=r"SIGKILL \(-9\)") as info:
            victim.get(10)
        assert info.value.exitcode == -signal.SIGKILL
        assert survivor.get(5) == "alive"
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


def _write_pid_and_sleep(path: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(30)


def test_retries_rerun_crashed_tasks_on_fresh_workers() -> None:
    with Pool(2, retries=2) as pool:
        flag = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"procpool-retry-{os.getpid()}")
        if os.path.exists(flag):
            os.unlink(flag)
        assert pool.apply(_crash_first_time, (flag,)) == "second try"
        os.unlink(flag)
        with pytest.raises(WorkerCrashedError):
            pool.apply(crash.exit_abruptly, (1,))


def _crash_first_time(flag: str) -> str:
    if not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(1)
    return "second try"


def test_timeout_does_not_fail_tasks_queued_behind() -> None:
    with Pool(1, task_timeout=0.5) as pool:
        slow = pool.apply_async(crash.sleep, (30,))
        queued = [pool.apply_async(square, (i,)) for i in range(5)]
        with pytest.raises(TaskTimeoutError):
            slow.get(10)
        assert [r.get(10) for r in queued] == [0, 1, 4, 9, 16]


def test_nothing_hangs_when_workers_die_in_parallel() -> None:
    with Pool(2) as pool:
        results = pool.map(
            _call,
            [(crash.exit_abruptly, (1,))] * 20 + [(square, (2,))] * 20,
            chunksize=1,
            return_exceptions=True,
        )
    assert all(isinstance(r, WorkerCrashedError) for r in results[:20])
    assert results[20:] == [4] * 20


def test_every_error_in_place_names_its_task() -> None:
    specs = [(square, (0,)), (crash.exit_abruptly, (2,)), (square, (2,))]
    with Pool(1) as pool:
        out = pool.map(_call, specs, chunksize=3, return_exceptions=True)
        assert out[0].task_index == 0 and out[0].ran_to_completion
        assert out[1].task_index == 1 and not out[1].ran_to_completion
        assert out[2] == 4
        # A batch-level failure is copied per task, each with its own index.
        res = pool.map(
            crash.return_fails_on_unpickle, range(3), chunksize=3, return_exceptions=True
        )
        assert [e.task_index for e in res] == [0, 1, 2]
        assert all(isinstance(e, SerializationError) for e in res)


def test_unpicklable_result_is_also_the_stdlib_s_maybe_encoding_error() -> None:
    from multiprocessing.pool import MaybeEncodingError

    from procpool import ResultSerializationError

    with Pool(1) as pool, pytest.raises(MaybeEncodingError) as info:
        pool.apply(crash.return_unpicklable)
    assert isinstance(info.value, ResultSerializationError)
    assert "Unpicklable" in info.value.value


def test_initargs_may_carry_a_queue_and_a_lock(start_method: str) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context(start_method)
    queue, lock = ctx.Queue(), ctx.Lock()
    with Pool(2, context=ctx, initializer=_announce, initargs=(queue, lock)) as pool:
        pool.map(square, range(4))
        got = {queue.get(timeout=10) for _ in range(2)}
    assert got == {"ready"}
    queue.close()
    queue.join_thread()


def _announce(queue: Any, lock: Any) -> None:
    with lock:
        queue.put("ready")


def test_closing_still_replaces_workers_while_work_is_queued() -> None:
    with Pool(1, maxtasksperchild=1) as pool:
        result = pool.map_async(square, range(10), chunksize=1)
        pool.close()
        pool.join()  # used to hang: retired workers were not replaced once closing
        assert result.get(0) == [x * x for x in range(10)]


def test_callables_are_not_kept_alive() -> None:
    import gc
    import weakref

    class Holder:
        def method(self, x: int) -> int:
            return x

    with Pool(1) as pool:
        holder = Holder()
        ref = weakref.ref(holder)
        assert pool.apply(holder.method, (3,)) == 3
        del holder
        gc.collect()
        assert ref() is None


def test_fast_path_for_tiny_tasks_isolates_errors_and_bounds_crash_damage() -> None:
    n = 3000
    with Pool(1) as pool:
        # Exceptions: exactly the failing items, even inside one large batch.
        out = pool.map(_fail_on_multiples_of_700, range(n), chunksize=n, return_exceptions=True)
        assert [i for i, r in enumerate(out) if isinstance(r, ValueError)] == [
            0,
            700,
            1400,
            2100,
            2800,
        ]
        assert all(out[i] == i for i in range(n) if i % 700)
        # A crash in a large batch fails at most one span of FAST_SPAN tasks; the
        # ones before it ran (ran_to_completion), the ones after run again.
        out = pool.map(_exit_on_1000, range(n), chunksize=n, return_exceptions=True)
    crashed = [i for i, r in enumerate(out) if isinstance(r, WorkerCrashedError)]
    ran = [i for i in crashed if out[i].ran_to_completion]
    in_span = [i for i in crashed if not out[i].ran_to_completion]
    assert 1000 in in_span and len(in_span) <= 256
    assert ran == list(range(in_span[0]))
    assert all(out[i] == i for i in range(in_span[-1] + 1, n))
    assert "one of tasks" in str(out[1000])


def _fail_on_multiples_of_700(x: int) -> int:
    if x % 700 == 0:
        raise ValueError(x)
    return x


def _exit_on_1000(x: int) -> int:
    if x == 1000:
        os._exit(5)
    return x
