"""procpool.Process: a drop-in multiprocessing.Process that also returns results."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import procpool
from procpool import testing
from procpool._core import _startmethod
from tests import helpers
from tests.helpers import square

BIG = 50_000_000


def big_bytes() -> bytes:
    return bytes(BIG)


def stdout_type() -> str:
    return type(sys.stdout).__name__


def start_method_inside() -> str:
    return multiprocessing.get_start_method()


class Returning(procpool.Process):
    """A subclass overriding run(), the stdlib way; its return value is the result."""

    def __init__(self, value: int) -> None:
        super().__init__()
        self.value = value

    def run(self) -> int:
        return self.value * 2


def started(method: str, target: Any, *args: Any) -> procpool.Process:
    proc = procpool.get_context(method).Process(target=target, args=args)
    proc.start()
    return proc


def finished(method: str, target: Any, *args: Any) -> procpool.Process:
    proc = started(method, target, *args)
    proc.join()
    return proc


# -- results ---------------------------------------------------------------


def test_lambda_closure_result(start_method: str) -> None:
    factor = 3
    proc = finished(start_method, lambda x, y=1: x * factor + y, 4)
    assert proc.result() == 13
    assert proc.exitcode == 0


def test_result_waits_for_the_process(start_method: str) -> None:
    proc = started(start_method, testing.sleep, 0.2, "late")
    assert proc.result(timeout=10) == "late"
    proc.join()


def test_subclass_run_return_value_is_the_result(start_method: str) -> None:
    proc = procpool.get_context(start_method).Process
    assert issubclass(proc, procpool.Process)
    child = Returning(21)  # procpool's default start method
    child.start()
    assert child.result() == 42
    child.join()


def test_child_runs_the_method_it_was_started_with(start_method: str) -> None:
    # The child's own default matches, so processes it starts use it too.
    assert finished(start_method, start_method_inside).result() == start_method


def test_child_stdout_writes_whole_lines(start_method: str) -> None:
    assert finished(start_method, stdout_type).result() == "LineWriter"


def test_default_start_method_and_drop_in_types() -> None:
    proc = procpool.Process(target=square, args=(7,))
    assert isinstance(proc, multiprocessing.Process)
    assert type(proc).__module__ == "procpool"
    assert re.fullmatch(r"Process-\d+(:\d+)*", proc.name)
    assert proc.pid is None and proc.exitcode is None and not proc.is_alive()
    single = _startmethod.single_threaded()
    proc.start()
    assert proc.result() == 49
    proc.join()
    # fork where nothing else runs (on Linux), else forkserver; spawn elsewhere.
    if not sys.platform.startswith("linux"):
        assert proc._start_method == "spawn"
    else:
        assert proc._start_method == ("fork" if single else "forkserver")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is Linux's default only")
def test_the_default_forks_only_while_no_other_thread_runs() -> None:
    script = (
        "import threading, procpool\n"
        "from tests.helpers import square\n"
        "def method():\n"
        "    p = procpool.Process(target=square, args=(3,)); p.start()\n"
        "    assert p.result() == 9; p.join(); return p._start_method\n"
        "if __name__ == '__main__':\n"
        "    alone = method()\n"
        "    stop = threading.Event(); t = threading.Thread(target=stop.wait); t.start()\n"
        "    try:\n"
        "        beside_a_thread = method()\n"
        "    finally:\n"
        "        stop.set(); t.join()\n"
        "    print(alone, beside_a_thread, method())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.stdout.split() == ["fork", "forkserver", "fork"]


# -- errors ----------------------------------------------------------------


def test_exception_keeps_type_and_remote_traceback(start_method: str) -> None:
    proc = finished(start_method, testing.raise_error, "kaput")
    with pytest.raises(testing.CrasherError, match="kaput") as info:
        proc.result()
    cause = info.value.__cause__
    assert isinstance(cause, procpool.RemoteTraceback)
    assert "raise_error" in str(cause) and "CrasherError: kaput" in str(cause)
    assert proc.exitcode == 1  # as with multiprocessing: the child printed it and failed


def test_traceback_of_code_sent_by_value_names_its_file(start_method: str) -> None:
    # A lambda cannot be imported in the child: cloudpickle sends its code.
    proc = finished(start_method, lambda: {}["missing key"])
    with pytest.raises(KeyError) as info:
        proc.result()
    text = str(info.value.__cause__)
    assert f'File "{__file__}"' in text
    assert '{}["missing key"]' in text  # the source line, found from the real file


CRASHES = [
    pytest.param(testing.exit_abruptly, (3,), 3, "exit code 3", id="os._exit"),
    pytest.param(testing.sys_exit, (4,), 4, "exit code 4", id="sys.exit"),
    pytest.param(testing.kill_self, (signal.SIGKILL,), -9, "SIGKILL", id="SIGKILL"),
    pytest.param(testing.segfault, (), -11, "SIGSEGV", id="segfault"),
]


@pytest.mark.parametrize(("target", "args", "exitcode", "words"), CRASHES)
def test_crash_names_exit_code_or_signal(
    start_method: str, target: Any, args: tuple[Any, ...], exitcode: int, words: str
) -> None:
    proc = finished(start_method, target, *args)
    assert proc.exitcode == exitcode
    with pytest.raises(procpool.WorkerCrashedError, match=words) as info:
        proc.result()
    assert info.value.exitcode == exitcode
    assert info.value.pid == proc.pid


def test_result_of_a_process_that_dies_unjoined() -> None:
    proc = started("forkserver", testing.exit_abruptly, 5)
    with pytest.raises(procpool.WorkerCrashedError, match="exit code 5"):
        proc.result()
    assert proc.exitcode == 5 and not proc.is_alive()


def test_killed_from_outside() -> None:
    proc = started("forkserver", testing.sleep, 30)
    with pytest.raises(TimeoutError):
        proc.result(timeout=0.1)
    proc.kill()
    with pytest.raises(procpool.WorkerCrashedError, match="SIGKILL"):
        proc.result()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_unpicklable_argument_fails_at_start(method: str) -> None:
    proc = procpool.get_context(method).Process(target=print, args=(testing.Unpicklable(),))
    with pytest.raises(procpool.SerializationError, match="cannot send"):
        proc.start()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_argument_failing_to_unpickle_in_child(method: str) -> None:
    proc = finished(method, print, testing.FailsOnUnpickle())
    with pytest.raises(procpool.SerializationError, match="could not unpickle its target"):
        proc.result()


def test_a_spawned_child_imports_only_what_it_uses() -> None:
    # It writes one message: the modules behind Connection and tracebacks
    # cost it ~7 and ~5.6 ms of its start (cloudpickle, not needed for a
    # target importable by name, brings traceback with it).
    heavy = ["multiprocessing.connection", "tempfile", "traceback", "cloudpickle"]
    assert finished("spawn", helpers.loaded, heavy).result() == []
    ours = ["procpool._process"]
    assert finished("spawn", helpers.loaded, ours).result() == ours


PARENT_MODULES = """
import sys
import procpool

if __name__ == "__main__":
    proc = procpool.Process(target=abs, args=(-3,))
    proc.start()
    proc.join()
    assert proc.result() == 3 and proc._start_method == "fork"
    print([name for name in sys.argv[1:] if name in sys.modules])
"""


def test_a_forking_parent_loads_only_what_its_processes_need() -> None:
    # Every shared library and module in the parent is copied at each fork
    # and torn down at each child's exit: multiprocessing.connection brings
    # tempfile, shutil, random and the compression libraries (60 more
    # mappings, ~0.3 ms a process on 2 cores), typing and resource one each.
    heavy = ["multiprocessing.connection", "tempfile", "typing", "resource"]
    out = subprocess.run(
        [sys.executable, "-c", PARENT_MODULES, *heavy],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]"


SCRIPT_TARGETS = """
import sys
import procpool

WHERE = "the script as imported"

def show():
    return __name__, WHERE, "cloudpickle" in sys.modules

if __name__ == "__main__":
    WHERE = "the running program"

    def guarded():  # not in the script as the child imports it again
        return __name__, WHERE, "cloudpickle" in sys.modules

    ctx = procpool.get_context(sys.argv[1])
    for target in (show, guarded):
        proc = ctx.Process(target=target)
        proc.start()
        proc.join()
        print(proc.result())
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_child_runs_its_own_copy_of_a_script_function_as_the_stdlib_does(
    method: str, tmp_path: Path
) -> None:
    # A child that imported the script again has the target itself: it runs
    # its own, with the module's globals, as the standard library's child
    # does, and never loads cloudpickle (~20 ms of its start). A target it
    # lacks (defined under the __main__ guard) runs from its copy by value.
    assert helpers.script_output(tmp_path, SCRIPT_TARGETS, method).splitlines() == [
        "('__mp_main__', 'the script as imported', False)",
        "('__main__', 'the running program', True)",
    ]


SCRIPT_BY_NAME = """
import sys
import procpool

def show(queue, lock):
    with lock:
        queue.put(("cloudpickle" in sys.modules, __name__))
    return ["not", "a", "plain", "value"]

if __name__ == "__main__":
    ctx = procpool.get_context(sys.argv[1])
    queue, lock = ctx.Queue(), ctx.Lock()
    proc = ctx.Process(target=show, args=(queue, lock))
    proc.start()
    print(queue.get(timeout=30))
    proc.join()
    print(proc.result(), "cloudpickle" in sys.modules)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_top_level_target_and_plain_arguments_need_no_cloudpickle(
    method: str, tmp_path: Path
) -> None:
    # The child will define a function at the top of the script itself, so it
    # goes by name and code alone; the queue, the lock and the list the child
    # returns pickle as multiprocessing pickles them. Neither side imports
    # cloudpickle: ~30 ms of the parent's first start before.
    assert helpers.script_output(tmp_path, SCRIPT_BY_NAME, method).splitlines() == [
        "(False, '__mp_main__')",
        "['not', 'a', 'plain', 'value'] False",
    ]


SCRIPT_BY_VALUE_PARTS = """
import json
import sys
import procpool

def call(fn, queue, module):
    queue.put((fn(2), module.__name__, "cloudpickle" in sys.modules))

if __name__ == "__main__":
    ctx = procpool.get_context(sys.argv[1])
    queue = ctx.Queue()
    for module in (None, json):
        proc = ctx.Process(target=call, args=(lambda x: x * 21, queue, module or sys))
        proc.start()
        print(queue.get(timeout=30))
        proc.join()
        print(proc.exitcode)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_only_what_needs_cloudpickle_goes_by_value(method: str, tmp_path: Path) -> None:
    # The lambda goes by value (so the child loads cloudpickle to rebuild it),
    # the rest as multiprocessing sends it. A module only cloudpickle can send:
    # the whole payload is pickled again with it, and the queue's pipes, which
    # the first try had handed to the child already, are handed over once
    # (twice, spawn refuses to start the child).
    assert helpers.script_output(tmp_path, SCRIPT_BY_VALUE_PARTS, method).splitlines() == [
        "(42, 'sys', True)",
        "0",
        "(42, 'json', True)",
        "0",
    ]


SCRIPT_CLASSES = """
import sys
import procpool

class Point:
    def __init__(self, x):
        self.x = x

class Doubler(procpool.get_context(sys.argv[1]).Process):
    def __init__(self, point):
        super().__init__()
        self.point = point

    def run(self):
        return Point(self.point.x * 2)

if __name__ == "__main__":
    proc = Doubler(Point(21))
    proc.start()
    proc.join()
    print(proc.result().x, type(proc.result()).__name__)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_subclass_and_a_class_of_the_script_travel_by_value(method: str, tmp_path: Path) -> None:
    # The script's classes are not importable by name in the child: each goes
    # as a cloudpickle copy of its own, inside a payload pickled plainly; the
    # value the child returns is an instance of such a class too.
    assert helpers.script_output(tmp_path, SCRIPT_CLASSES, method).splitlines() == ["42 Point"]


SCRIPT_CHANGED = """
import sys
import procpool

def target():
    return "as the program started"

if __name__ == "__main__":
    with open(__file__) as f:
        source = f.read()
    with open(__file__, "w") as f:
        f.write(source.replace('"as the program started"', '"edited since"'))
    ctx = procpool.get_context(sys.argv[1])
    proc = ctx.Process(target=target)
    proc.start()
    proc.join()
    try:
        proc.result()
    except procpool.SerializationError as exc:
        print("SerializationError:", exc)
    with procpool.Pool(1, context=ctx) as pool:
        try:
            pool.apply(target)
        except procpool.SerializationError as exc:
            print("SerializationError:", exc)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_child_whose_script_changed_says_so_instead_of_running_the_new_code(
    method: str, tmp_path: Path
) -> None:
    # Sent by name, the function is the child's own only if its code is the
    # same: the child of an edited script fails, and says why.
    lines = helpers.script_output(tmp_path, SCRIPT_CHANGED, method).splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("SerializationError:")
        assert "'target' was sent by name" in line
        assert "another version of it" in line
        assert "was the file changed" in line


SCRIPT_CLASS_CHANGED = """
import sys
import procpool

class Target:
    def run(self):
        return "as the program started"

if __name__ == "__main__":
    with open(__file__) as f:
        source = f.read()
    with open(__file__, "w") as f:
        f.write(source.replace('"as the program started"', '"edited since"'))
    with procpool.Pool(1, context=sys.argv[1]) as pool:
        try:
            pool.apply(Target().run)
        except procpool.SerializationError as exc:
            print("SerializationError:", exc)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_pool_child_whose_scripts_class_changed_says_so(method: str, tmp_path: Path) -> None:
    # A class of the script inside a pool's callable goes by name and the code
    # of its functions, which the child compares with its own class's.
    lines = helpers.script_output(tmp_path, SCRIPT_CLASS_CHANGED, method).splitlines()
    assert len(lines) == 1 and lines[0].startswith("SerializationError:"), lines
    assert "class 'Target' was sent by name" in lines[0]
    assert "another version of it" in lines[0]


SCRIPT_RERUN = """
import functools
import sys
from procpool._core._script import rerun_by_children

def plain(): pass
async def coroutine(): pass
def  spaced (): pass
@functools.lru_cache
def decorated(): pass
def twice(): return 1
first = twice
def twice(): return 2
lam = lambda: 0

if __name__ == "__main__":
    def guarded(): pass
    checks = [plain, coroutine, spaced, guarded, decorated.__wrapped__, first, twice, lam]
    print([rerun_by_children(fn) for fn in checks])
"""


def test_which_functions_a_child_defines_again(tmp_path: Path) -> None:
    # Only a def at the start of a line of the script that is still the
    # module's binding of its name: the child's import defines that one.
    out = helpers.script_output(tmp_path, SCRIPT_RERUN).strip()
    assert out == "[True, True, True, False, False, False, True, False]"


def sized(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


@pytest.mark.parametrize("size", [0, 507, 508, 509, 65_536, 70_000])
def test_results_of_every_size_arrive_whole(start_method: str, size: int) -> None:
    # The parent reads a small result in one read of 512 bytes, frame
    # included (4 of them); a longer one is read on into a buffer of its size.
    assert finished(start_method, sized, size).result() == sized(size)


def test_unpicklable_return_value(start_method: str) -> None:
    proc = finished(start_method, testing.return_unpicklable)
    with pytest.raises(procpool.SerializationError, match="could not pickle the return value"):
        proc.result()


def test_return_value_failing_to_unpickle_in_parent() -> None:
    proc = finished("forkserver", testing.return_fails_on_unpickle)
    with pytest.raises(procpool.SerializationError, match="return value"):
        proc.result()


# -- waiting, draining, resources -----------------------------------------


def test_join_timeout_returns_while_running() -> None:
    proc = started("forkserver", testing.sleep, 30)
    begin = time.monotonic()
    proc.join(0.2)
    assert time.monotonic() - begin < 5
    assert proc.is_alive() and proc.exitcode is None
    proc.terminate()
    proc.join()
    assert proc.exitcode == -signal.SIGTERM
    with pytest.raises(procpool.WorkerCrashedError, match="SIGTERM"):
        proc.result()


def test_big_return_value_does_not_deadlock_join(start_method: str) -> None:
    proc = finished(start_method, big_bytes)  # the pipe holds 64 KiB; join reads it
    assert proc.exitcode == 0
    assert len(proc.result()) == BIG


@pytest.mark.parametrize("poll", ["is_alive", "exitcode"])
def test_polling_drains_a_big_return_value(poll: str) -> None:
    proc = started("forkserver", big_bytes)
    deadline = time.monotonic() + 30
    while proc.is_alive() if poll == "is_alive" else proc.exitcode is None:
        assert time.monotonic() < deadline, "the child never finished: nobody read its result"
        time.sleep(0.01)
    assert len(proc.result()) == BIG
    proc.join()


def test_result_twice_and_after_close() -> None:
    proc = finished("forkserver", square, 9)
    proc.close()
    assert proc.result() == 81
    assert proc.result() == 81
    with pytest.raises(ValueError, match="closed"):
        proc.is_alive()


def test_misuse_errors_match_the_stdlib() -> None:
    proc = procpool.Process(target=testing.sleep, args=(30,))
    with pytest.raises(ValueError, match="not started"):
        proc.result()
    with pytest.raises(AssertionError):
        proc.join()
    proc.start()
    with pytest.raises(AssertionError):
        proc.start()
    with pytest.raises(ValueError, match="still running"):
        proc.close()
    proc.kill()
    proc.join()
    proc.close()


def _open_fds() -> int:
    return psutil.Process().num_fds()


def test_many_processes_started_then_joined_release_descriptors() -> None:
    before = _open_fds()
    procs = [procpool.Process(target=square, args=(i,)) for i in range(300)]
    for proc in procs:
        proc.start()
    # At most the stdlib's two descriptors per live process, plus our reader.
    assert _open_fds() - before <= 3 * len(procs) + 10
    for proc in procs:
        proc.join()
    assert [p.result() for p in procs] == [i * i for i in range(300)]
    assert [p.exitcode for p in procs] == [0] * 300
    # Our readers are closed; the stdlib keeps its own until close() or GC.
    for proc in procs:
        proc.close()
    assert _open_fds() - before <= 5


def test_daemon_flag_and_identity() -> None:
    proc = procpool.Process(target=os.getpid, daemon=True, name="worker-x")
    assert proc.daemon and proc.name == "worker-x"
    proc.start()
    assert proc.result() == proc.pid == proc.ident
    assert isinstance(proc.sentinel, int)
    proc.join()
    assert "worker-x" in repr(proc)


LOW_LIMIT = """
import resource, sys
import procpool

if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    procs = [procpool.Process(target=abs, args=(-i,)) for i in range(200)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.result() for p in procs] == list(range(200))
    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptor limits")
def test_soft_descriptor_limit_is_raised_when_short(tmp_path: Any) -> None:
    # 200 processes at once need ~600 descriptors; the stdlib fails at 256.
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024:
        pytest.skip("hard descriptor limit too low to raise")
    script = tmp_path / "low_limit.py"
    script.write_text(LOW_LIMIT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 256
