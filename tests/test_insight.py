"""Reproducible randomness and pool.statistics()."""

from __future__ import annotations

import pytest

from procpool import Pool, PoolStatistics, ProcessPoolExecutor, ProgressUpdate, WorkerCrashedError
from procpool import testing as crash
from tests.helpers import draw, fail_on, square


def test_a_seed_makes_results_independent_of_workers_and_chunking() -> None:
    with Pool(1, seed=7) as one, Pool(3, seed=7) as three:
        a = one.map(draw, range(60), chunksize=60)
        b = three.map(draw, range(60), chunksize=1)
        c = list(three.imap_unordered(draw, range(60)))
        assert a == b
        assert sorted(a) == sorted(c)
        assert len(set(a)) == 60  # every task has its own stream
        assert [one.apply(draw) for _ in range(3)] == [three.apply(draw) for _ in range(3)]
    with Pool(2, seed=8) as other:
        assert other.map(draw, range(60)) != a


def test_without_a_seed_forked_workers_do_not_share_random_state() -> None:
    with Pool(2, context="fork") as pool:
        draws = pool.map(draw, range(40), chunksize=1)
    assert len(set(draws)) == 40


def test_numpy_streams_are_seeded_too() -> None:
    np = pytest.importorskip("numpy")
    del np

    def numpy_draw(_: object) -> float:
        import numpy

        return float(numpy.random.random())

    with Pool(1, seed=3) as one, Pool(2, seed=3) as two:
        assert one.map(numpy_draw, range(10)) == two.map(numpy_draw, range(10), chunksize=1)


def test_statistics_report_tasks_faults_and_time() -> None:
    with Pool(2) as pool:
        pool.map(square, range(100))
        pool.map(crash.raise_error, ["x"] * 3, return_exceptions=True)
        with pytest.raises(WorkerCrashedError):
            pool.apply(crash.exit_abruptly, (1,))
        stats = pool.statistics()
    assert isinstance(stats, PoolStatistics)
    assert stats.workers == 2
    assert stats.tasks_completed == 103
    assert stats.tasks_failed == 4
    assert stats.crashes == 1
    # The crashed worker is still accounted for (its replacement may still be starting).
    assert [w.exitcode for w in stats.per_worker if not w.alive] == [1]
    assert sum(w.tasks for w in stats.per_worker) == 103
    assert stats.busy_seconds >= 0 and stats.idle_seconds > 0
    with pytest.raises(AttributeError):
        stats.workers = 3  # type: ignore[misc]  # frozen


def test_executor_statistics_count_timeouts_and_retries() -> None:
    with ProcessPoolExecutor(1, task_timeout=0.3, retries=1) as ex:
        fut = ex.submit(crash.sleep, 5)
        with pytest.raises(TimeoutError):
            fut.result(10)
        stats = ex.statistics()
    assert stats.timeouts == 2 and stats.retries == 1 and stats.tasks_failed == 1


def test_progress_callback_on_map_and_imap() -> None:
    updates: list[tuple[int, int, int | None]] = []

    def listener(update: ProgressUpdate) -> None:
        updates.append((update.done, update.failed, update.total))

    with Pool(2, progress=listener) as pool:
        pool.map(fail_on, range(50), return_exceptions=True)
        assert updates[-1] == (50, 1, 50)
        updates.clear()
        assert len(list(pool.imap(square, iter(range(30))))) == 30
        assert updates[-1] == (30, 0, None)
        updates.clear()
        pool.map(square, range(10), progress=False)  # per-call override
        assert updates == []


def test_an_error_in_a_progress_listener_reaches_the_caller() -> None:
    def broken(update: ProgressUpdate) -> None:
        raise RuntimeError("listener failed")

    with Pool(2) as pool:
        with pytest.raises(RuntimeError, match="listener failed"):
            pool.map(square, range(10), progress=broken)
        with pytest.raises(RuntimeError, match="listener failed"):
            list(pool.imap(square, range(10), progress=broken))
        assert pool.map(square, [2]) == [4]  # the pool is fine


def test_progress_true_prints_plain_lines_when_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Pool(2, progress=True) as pool:
        pool.map(square, range(20))
    err = capsys.readouterr().err
    assert "20" in err


OUTPUT_SCRIPT = """
import logging, sys
import procpool

def chatty(i):
    print(f"hello {i}")
    logging.getLogger("t").warning("warned %d", i)
    return i

if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    tag = sys.argv[1] == "tag"
    with procpool.Pool(2, tag_output=tag) as pool:
        pool.map(chatty, range(6), chunksize=1)
"""


@pytest.mark.parametrize("mode", ["plain", "tag"])
def test_worker_output_is_whole_lines_optionally_tagged(mode: str) -> None:
    import re
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", OUTPUT_SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 6
    if mode == "plain":
        assert sorted(lines) == [f"hello {i}" for i in range(6)]
    else:
        for line in lines:
            assert re.fullmatch(r"\[worker \d+ task (\d)\] hello \1", line), line
        assert all(
            re.fullmatch(r"\[worker \d+ task (\d)\] warned \1", e) for e in out.stderr.splitlines()
        )


def test_statistics_stay_bounded_when_workers_are_recycled() -> None:
    with Pool(1, maxtasksperchild=1, context="fork") as pool:
        for i in range(300):
            pool.apply(square, (i,))
        stats = pool.statistics()
    gone = [w for w in stats.per_worker if not w.alive]
    assert len(gone) <= 1 + 256  # summed, kept
    # Live: the new worker, and retired ones that have not finished exiting yet
    # (the next task does not wait for them).
    assert len(stats.per_worker) - len(gone) <= 10
    assert stats.per_worker[0].worker_id == -1  # the oldest, summed
    assert sum(w.tasks for w in stats.per_worker) == 300


def test_statistics_snapshots_are_whole_while_workers_come_and_go() -> None:
    # A worker moves from the live list to the exited ones in one step: a
    # snapshot never counts it twice, or not at all.
    with Pool(2, maxtasksperchild=1, context="fork") as pool:
        result = pool.map_async(square, range(200), chunksize=1)
        seen = []
        while not result.ready():
            seen.append(sum(w.tasks for w in pool.statistics().per_worker))
        result.get(60)
        final = sum(w.tasks for w in pool.statistics().per_worker)
    assert seen == sorted(seen)
    assert final == 200
