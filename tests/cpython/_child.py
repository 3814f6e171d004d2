"""The test process: lists or runs CPython's pool tests with procpool substituted.

Started by ``run_cpython_suites.py`` under the interpreter being tested, with
``_site/`` on ``PYTHONPATH`` so that ``sitecustomize`` has already put procpool
in place of the stdlib pools (see ``_substitute.py``) before anything here
imports a test module. Reports go, one JSON object a line, to the file
descriptor named on the command line; stdout and stderr are the tests' own.

Usage: ``python _child.py SPEC.json EVENTS_FD`` where the spec is
``{"mode": "list", "start_methods": [...]}`` or
``{"mode": "run", "tests": [ids...], "hang_after": seconds}``.

This file is also imported as ``__mp_main__`` by multiprocessing's forkserver
(the tests preload ``__main__``), so it only defines things at import.
"""

from __future__ import annotations

import faulthandler
import importlib
import inspect
import json
import os
import sys
import traceback
import unittest
from collections.abc import Callable, Iterator
from typing import Any

START_METHODS = ("fork", "forkserver", "spawn")
OUTPUT_MARKER = "[cpython-suite-runner] start "

# The stdlib's Pool test classes (as installed for the 'processes' type).
POOL_CLASSES = (
    "WithProcessesTestPool",
    "WithProcessesTestPoolWorkerErrors",
    "WithProcessesTestPoolWorkerLifetime",
)
# Tests elsewhere in _test_multiprocessing that exercise multiprocessing.Pool.
POOL_MISC_TESTS = {
    "TestInitializers": ("test_pool_initializer",),
    "TestStdinBadfiledescriptor": ("test_pool_in_process",),
    "TestPoolNotLeakOnFailure": ("test_release_unused_processes",),
    "MiscTestCase": ("test_large_pool",),
}
CF_MODULES = (
    "test_process_pool",
    "test_as_completed",
    "test_wait",
    "test_shutdown",
    "test_deadlock",
    "test_init",
)

# Tests left out because they read or write attributes that are private to
# the stdlib's implementation: (suite, class-name fragment, test, attributes).
# Each entry is checked against the test's source, so a stale one shows.
PRIVATE_ATTRIBUTE_TESTS = (
    ("mp", "TestPool", "test_make_pool", ("_pool",)),
    ("mp", "TestPool", "test_resource_warning", ("_state",)),
    ("mp", "TestPoolWorkerLifetime", "test_pool_worker_lifetime", ("_pool", "_repopulate_pool")),
    ("cf", "ProcessPoolExecutor", "test_killed_child", ("_processes",)),
    ("cf", "ProcessPoolExecutor", "test_saturation", ("_processes",)),
    ("cf", "ProcessPoolExecutor", "test_idle_process_reuse_one", ("_processes",)),
    ("cf", "ProcessPoolExecutor", "test_idle_process_reuse_multiple", ("_processes",)),
    ("cf", "ProcessPoolExecutor", "test_max_tasks_per_child", ("_processes",)),
    (
        "cf",
        "ProcessPoolExecutor",
        "test_max_tasks_per_child_defaults_to_spawn_context",
        ("_mp_context",),
    ),
    ("cf", "ProcessPoolShutdown", "test_processes_terminate", ("_processes",)),
    ("cf", "ProcessPoolShutdown", "test_context_manager_shutdown", ("_processes",)),
    (
        "cf",
        "ProcessPoolShutdown",
        "test_del_shutdown",
        ("_executor_manager_thread", "_processes", "_call_queue"),
    ),
    (
        "cf",
        "ProcessPoolShutdown",
        "test_shutdown_no_wait",
        ("_executor_manager_thread", "_processes", "_call_queue"),
    ),
    ("cf", "ExecutorDeadlock", "test_shutdown_deadlock_pickle", ("_executor_manager_thread",)),
    ("cf", "FailingInitializer", "test_initializer", ("_broken",)),
)


# ------------------------------------------------------------------ selection


def _mp_modules(start_method: str) -> list[str]:
    package = f"test.test_multiprocessing_{start_method}"
    if sys.version_info >= (3, 12):
        return [f"{package}.test_processes", f"{package}.test_misc"]
    return [package]


def _cf_modules() -> list[str]:
    if sys.version_info >= (3, 12):
        return [f"test.test_concurrent_futures.{name}" for name in CF_MODULES]
    return ["test.test_concurrent_futures"]


def _mp_selected(cls: type, method: str, start_method: str) -> bool:
    del start_method  # the module already fixes it
    if cls.__name__ in POOL_CLASSES:
        return True
    return method in POOL_MISC_TESTS.get(cls.__name__, ())


def _cf_selected(cls: type, method: str, start_methods: tuple[str, ...]) -> bool:
    name = cls.__name__
    if name == "FailingInitializerResourcesTest":
        return method.removeprefix("test_") in start_methods
    if not name.startswith("ProcessPool"):
        return False
    return getattr(cls, "ctx", None) in start_methods


def _test_classes(module: Any) -> Iterator[type[unittest.TestCase]]:
    for name in dir(module):
        obj = getattr(module, name)
        is_test = isinstance(obj, type) and issubclass(obj, unittest.TestCase)
        if is_test and obj.__module__ == module.__name__:
            yield obj


def _private_attributes(suite: str, cls: type, method: str) -> tuple[tuple[str, ...], str]:
    """The private attributes a listed test touches; ('', note) when the entry is stale."""
    for entry_suite, fragment, name, attrs in PRIVATE_ATTRIBUTE_TESTS:
        if entry_suite == suite and name == method and fragment in cls.__name__:
            source = inspect.getsource(getattr(cls, method))
            missing = [a for a in attrs if f".{a}" not in source]
            if missing:
                return (), f"exclusion entry stale: {missing} not in the test's source"
            return attrs, ""
    return (), ""


def list_tests(start_methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every selected test, with where its module came from and why it is excluded, if it is."""
    out: list[dict[str, Any]] = []
    plan: list[tuple[str, str, Callable[[type, str], bool]]] = []
    for method in start_methods:
        plan += [
            ("mp", name, lambda c, m, sm=method: _mp_selected(c, m, sm))
            for name in _mp_modules(method)
        ]
    plan += [("cf", name, lambda c, m: _cf_selected(c, m, start_methods)) for name in _cf_modules()]
    loader = unittest.TestLoader()
    for suite, module_name, selected in plan:
        try:
            module = importlib.import_module(module_name)
        except unittest.SkipTest as exc:
            out.append({"suite": suite, "module": module_name, "missing": f"skipped: {exc}"})
            continue
        except ImportError as exc:
            out.append({"suite": suite, "module": module_name, "missing": repr(exc)})
            continue
        for cls in _test_classes(module):
            for method in loader.getTestCaseNames(cls):
                if not selected(cls, method):
                    continue
                attrs, note = _private_attributes(suite, cls, method)
                defined_in = sys.modules[getattr(cls, method).__module__]
                out.append(
                    {
                        "suite": suite,
                        "module": module_name,
                        "file": defined_in.__file__,
                        "id": f"{module_name}.{cls.__name__}.{method}",
                        "private": list(attrs),
                        "note": note,
                    }
                )
    return out


# ------------------------------------------------------------------ running


class Reporter(unittest.TestResult):
    """Sends each test's start and outcomes as JSON lines; arms a stack dump for hangs."""

    def __init__(self, emit: Callable[..., None], hang_after: float) -> None:
        super().__init__()
        self._emit = emit
        self._hang_after = hang_after

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self._emit("start", test.id())
        # A marker in the output, so the runner can show each failure's own output.
        print(f"\n{OUTPUT_MARKER}{test.id()}", file=sys.__stderr__, flush=True)
        faulthandler.dump_traceback_later(self._hang_after, file=sys.__stderr__)

    def stopTest(self, test: unittest.TestCase) -> None:
        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)
        self._emit("stop", test.id())

    def addSuccess(self, test: unittest.TestCase) -> None:
        self._emit("pass", test.id())

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        self._emit("fail", test.id(), self._exc_info_to_string(err, test))

    def addError(self, test: Any, err: Any) -> None:
        # Also called with a stand-in "test" for setUpClass/tearDownModule errors.
        self._emit("error", test.id(), self._exc_info_to_string(err, test))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        self._emit("skip", test.id(), reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        self._emit("pass", test.id(), "expected failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        self._emit("fail", test.id(), "unexpected success")

    def addSubTest(self, test: unittest.TestCase, subtest: Any, err: Any) -> None:
        if err is None:
            return
        kind = "fail" if issubclass(err[0], test.failureException) else "error"
        self._emit(kind, test.id(), f"{subtest.id()}\n{self._exc_info_to_string(err, test)}")


def run_tests(ids: list[str], emit: Callable[..., None], hang_after: float) -> None:
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for test_id in ids:
        try:
            suite.addTests(loader.loadTestsFromName(test_id))
        except Exception:
            emit("error", test_id, traceback.format_exc())
    suite.run(Reporter(emit, hang_after))


def _substituted() -> bool:
    import concurrent.futures
    import multiprocessing
    import multiprocessing.pool

    import _substitute  # the copy sitecustomize loaded, found again on sys.path

    from procpool._executor import ProcessPoolExecutor
    from procpool._pool import Pool

    return (
        _substitute.installed()
        and multiprocessing.pool.Pool is Pool
        and multiprocessing.Pool.__func__ is multiprocessing.context.BaseContext.Pool
        and concurrent.futures.ProcessPoolExecutor is ProcessPoolExecutor
        and concurrent.futures.process.ProcessPoolExecutor is ProcessPoolExecutor
    )


def main(argv: list[str]) -> int:
    spec_path, fd = argv[0], int(argv[1])
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    events = os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def emit(kind: str, test_id: str = "", detail: str = "") -> None:
        events.write(json.dumps({"event": kind, "id": test_id, "detail": detail}) + "\n")

    if not _substituted():
        emit("fatal", "", "procpool was not substituted: sitecustomize did not run")
        return 2
    faulthandler.enable(sys.__stderr__)
    if spec["mode"] == "list":
        tests = list_tests(tuple(spec["start_methods"]))
        emit("list", "", json.dumps({"tests": tests, "version": sys.version}))
    else:
        run_tests(spec["tests"], emit, spec["hang_after"])
    emit("done")
    events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
