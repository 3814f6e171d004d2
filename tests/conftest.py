"""Suite-wide guards: every test must leave no worker process and no procpool thread behind."""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

# Long-lived helpers the standard library starts once per interpreter and keeps
# on purpose; they are not leaks.
_SERVICE_MARKERS = ("forkserver", "resource_tracker")

# ./dev runs pytest under a watchdog. When a run outlives it, the watchdog sends
# SIGUSR1 (every thread's stack goes to stacks.txt, even while a thread holds
# the GIL) and then SIGKILL, and prints which test was running from
# last-test.txt. Files, not stderr: pytest's capture owns the descriptors.
_TRACE_DIR = os.environ.get("PROCPOOL_TEST_TRACE_DIR")
if _TRACE_DIR:
    _stacks = open(Path(_TRACE_DIR, "stacks.txt"), "w")  # noqa: SIM115 - lives as long as the run
    faulthandler.register(signal.SIGUSR1, file=_stacks, all_threads=True)


# tqdm's monitor thread outlives every bar; a pool made while it runs falls back
# from the zygote to forkserver (a threaded process must not fork), which would
# leave the zygote untested by every test that runs after the progress tests.
try:
    import tqdm

    tqdm.tqdm.monitor_interval = 0
except ImportError:
    pass


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    if _TRACE_DIR:
        Path(_TRACE_DIR, "last-test.txt").write_text(nodeid + "\n")


def _leftover_children() -> list[psutil.Process]:
    left = []
    for child in psutil.Process(os.getpid()).children(recursive=False):
        try:
            cmdline = " ".join(child.cmdline())
            service = any(marker in cmdline for marker in _SERVICE_MARKERS)
            if child.status() == psutil.STATUS_ZOMBIE or not service:
                left.append(child)
        except psutil.NoSuchProcess:
            continue
    return left


def _procpool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("procpool-")]


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> object:
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        children, threads = _leftover_children(), _procpool_threads()
        if not children and not threads:
            return
        time.sleep(0.05)
    for child in children:  # clean up so one leak does not fail every later test
        try:
            child.kill()
            child.wait(5)
        except psutil.NoSuchProcess:
            pass
    pytest.fail(
        f"{request.node.nodeid} left behind processes "
        f"{[(c.pid, c.name()) for c in children if c.is_running()]} and threads {threads}"
    )


@pytest.fixture
def merged_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of calls in each batch the dispatcher's _merge returns while the
    test runs (the real _merge runs: this only records)."""
    from procpool._core import _dispatcher

    sizes: list[int] = []
    merge = _dispatcher.Dispatcher._merge

    def recording(self: _dispatcher.Dispatcher, worker: object, batch: object) -> object:
        merged = merge(self, worker, batch)  # type: ignore[arg-type]
        sizes.append(len(merged.items))
        return merged

    monkeypatch.setattr(_dispatcher.Dispatcher, "_merge", recording)
    return sizes


class Sent:
    """What the dispatcher sent while a test ran (see the ``sent`` fixture)."""

    def __init__(self) -> None:
        # What the worker held just after each send: chunks (or calls, Batch.units)
        # and tasks.
        self.chunks: list[int] = []
        self.tasks: list[int] = []
        self.joined: list[bool] = []  # whether each batch sent was a Joined one


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """Records each batch the dispatcher sends, and what its worker then held
    (the real _send runs: this only records)."""
    from procpool._core import _dispatcher
    from procpool._core._batch import Joined

    record = Sent()
    send = _dispatcher.Dispatcher._send

    def recording(
        self: _dispatcher.Dispatcher, worker: Any, batch: Any, linger: bool = False, **options: Any
    ) -> None:
        send(self, worker, batch, linger, **options)
        record.chunks.append(sum(b.units() for b in worker.inflight))
        record.tasks.append(sum(len(b.items) for b in worker.inflight))
        record.joined.append(isinstance(batch, Joined))

    monkeypatch.setattr(_dispatcher.Dispatcher, "_send", recording)
    return record


START_METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The whole run must end with no worker left (the per-test guard may miss late ones)."""
    deadline = time.monotonic() + 5.0
    while _leftover_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _leftover_children()
    if left:
        session.exitstatus = 1
        print(f"\nERROR: the test run left child processes behind: {[c.pid for c in left]}")
