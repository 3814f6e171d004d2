"""A fast handful of CPython's own pool tests, run against procpool.

The full suites run with ``python tests/cpython/run_cpython_suites.py`` (about
ten minutes per interpreter); these are the stdlib tests that pin down the
drop-in promise most directly, under procpool's default start method. They all
run in one child process tree (the runner's), and each becomes a pytest test
here. A stdlib test that skips itself fails here: a skip would hide a lost check.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# Class.method of each stdlib test (the module differs between Python versions).
STDLIB_TESTS = [
    # Lib/test/_test_multiprocessing.py, the 'processes' mixin
    "WithProcessesTestPool.test_apply",
    "WithProcessesTestPool.test_map",
    "WithProcessesTestPool.test_starmap",
    "WithProcessesTestPool.test_map_async_callbacks",
    "WithProcessesTestPool.test_map_handle_iterable_exception",
    "WithProcessesTestPool.test_imap",
    "WithProcessesTestPool.test_imap_handle_iterable_exception",
    "WithProcessesTestPool.test_imap_unordered",
    "WithProcessesTestPool.test_empty_iterable",
    "WithProcessesTestPool.test_context",
    "WithProcessesTestPool.test_enter",
    "WithProcessesTestPool.test_terminate",
    "WithProcessesTestPool.test_map_no_failfast",
    "WithProcessesTestPool.test_release_task_refs",
    "WithProcessesTestPoolWorkerErrors.test_async_error_callback",
    "WithProcessesTestPoolWorkerLifetime.test_pool_maxtasksperchild_invalid",
    "TestInitializers.test_pool_initializer",
    # Lib/test/test_concurrent_futures, the forkserver mixin
    "ProcessPoolForkserverProcessPoolExecutorTest.test_submit",
    "ProcessPoolForkserverProcessPoolExecutorTest.test_submit_keyword",
    "ProcessPoolForkserverProcessPoolExecutorTest.test_map",
    "ProcessPoolForkserverProcessPoolExecutorTest.test_map_exception",
    "ProcessPoolForkserverProcessPoolExecutorTest.test_map_chunksize",
    "ProcessPoolForkserverProcessPoolExecutorTest.test_free_reference",
    "ProcessPoolForkserverProcessPoolExecutorTest.test_max_workers_negative",
    "ProcessPoolForkserverExecutorDeadlockTest.test_crash_during_func_exec_on_worker",
    "ProcessPoolForkserverExecutorDeadlockTest.test_error_at_task_pickle",
    "ProcessPoolForkserverExecutorDeadlockTest.test_exit_during_func_exec_on_worker",
    "ProcessPoolForkserverExecutorDeadlockTest.test_crash_at_task_unpickle",
    "ProcessPoolForkserverExecutorDeadlockTest.test_shutdown_deadlock",
    "ProcessPoolForkserverProcessPoolShutdownTest.test_run_after_shutdown",
    "ProcessPoolForkserverProcessPoolShutdownTest.test_cancel_futures",
    "ProcessPoolForkserverProcessPoolShutdownTest.test_submit_after_interpreter_shutdown",
    "ProcessPoolForkserverProcessPoolShutdownTest.test_interpreter_shutdown",
    "ProcessPoolForkserverProcessPoolShutdownTest.test_hang_issue12364",
    "ProcessPoolForkserverAsCompletedTest.test_no_timeout",
    "ProcessPoolForkserverWaitTest.test_all_completed",
    "ProcessPoolForkserverWaitTest.test_first_completed",
    "ProcessPoolForkserverAsCompletedTest.test_correct_timeout_exception_msg",
    "ProcessPoolForkserverInitializerTest.test_initializer",
]


def _load_runner() -> ModuleType:
    path = os.path.join(HERE, "cpython", "run_cpython_suites.py")
    spec = importlib.util.spec_from_file_location("run_cpython_suites", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> Any:
    runner = _load_runner()
    patterns = [rf"\.{re.escape(name)}$" for name in STDLIB_TESTS]
    return runner.run(start_methods=["forkserver"], patterns=patterns, test_timeout=60, timeout=100)


@pytest.mark.parametrize("name", STDLIB_TESTS)
def test_stdlib(report: Any, name: str) -> None:
    found = [r for r in report.results if r.id.endswith("." + name)]
    if not found and report.missing:
        # Said out loud (pytest -ra), never silent: some Pythons ship without it.
        pytest.skip(f"CPython's test package lacks suite modules: {report.missing}")
    assert len(found) == 1, f"{name} ran {len(found)} times; the stdlib suite changed?"
    result = found[0]
    assert result.outcome == "pass", f"{result.id}: {result.outcome}\n{result.detail}"
