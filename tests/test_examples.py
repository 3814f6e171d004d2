"""The seed's four programs, in examples/, run on procpool and print what they should.

Each is the tutorial's program with only its import line changed. They run as
real scripts (``python examples/x.py``) through a small wrapper that, once the
program is done, also reports the main pid and procpool's fork server, so the
parent pid the children print can be checked exactly: under ``forkserver`` a
child's parent is the fork server, itself a child of the main process; under
``fork`` (procpool's default on Linux for a program that runs no other thread,
as these do) and ``spawn`` it is the main process.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

WRAPPER = """
import json, os, runpy, sys
import psutil
path = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(path, run_name="__main__")
from multiprocessing import forkserver
server = forkserver._forkserver._forkserver_pid
parent = psutil.Process(server).ppid() if server else None
sys.stderr.write(json.dumps({"main": os.getpid(), "server": server, "server_parent": parent}))
"""

# The start method process_example and locking_example get by default:
# single-threaded programs, so fork on Linux (see _core/_startmethod.py).
DEFAULT = "fork" if sys.platform.startswith("linux") else "spawn"
LINE = re.compile(r"module=(\S+) : parent=(\d+) : process=(\d+) : result=(\d+)")
SQUARES = {k * k for k in range(101)}


@dataclass
class Run:
    lines: list[str]
    main: int
    server: int | None
    server_parent: int | None

    def children(self) -> list[tuple[str, int, int, int]]:
        found = [LINE.fullmatch(line) for line in self.lines]
        return [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in found if m]

    def others(self) -> list[str]:
        return [line for line in self.lines if not LINE.fullmatch(line)]


def run_example(name: str) -> Run:
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stderr)  # the example itself writes nothing to stderr
    return Run(done.stdout.splitlines(), info["main"], info["server"], info["server_parent"])


def check_children(run: Run, count: int, method: str) -> list[int]:
    children = run.children()
    assert len(children) == count
    modules, parents, pids, results = zip(*children)
    assert set(modules) <= {"__main__", "__mp_main__"}
    assert len(set(pids)) == count and run.main not in pids  # all different processes
    if method != "forkserver":
        assert set(parents) == {run.main}
    else:  # the fork server, started by the main process
        assert set(parents) == {run.server} and run.server_parent == run.main
    assert set(parents).isdisjoint(pids)
    return list(results)


def test_examples_differ_from_the_stdlib_only_in_imports() -> None:
    for path in EXAMPLES.glob("*.py"):
        mentions = [line for line in path.read_text().splitlines() if "procpool" in line]
        assert mentions and all(
            line.startswith(("from procpool", "import procpool")) for line in mentions
        )


def test_process_example() -> None:
    run = run_example("process_example.py")
    results = check_children(run, 1000, DEFAULT)
    assert set(results) <= SQUARES
    assert run.others() == []


def test_pool_example() -> None:
    run = run_example("pool_example.py")
    [printed] = run.lines
    results = ast.literal_eval(printed)
    assert len(results) == 1000 and set(results) <= SQUARES


def test_multiprocessing_example() -> None:
    run = run_example("multiprocessing_example.py")
    results = check_children(run, 10, "spawn")
    assert set(results) <= SQUARES
    drained = [int(line) for line in run.others()]
    assert Counter(drained) == Counter(results)  # everything put was drained


def test_locking_example() -> None:
    run = run_example("locking_example.py")
    results = check_children(run, 10, DEFAULT)
    assert sorted(results) == [x * x for x in range(10)]
    drained = [int(line) for line in run.others()]
    assert sorted(drained) == [x * x for x in range(10)]
    assert run.lines[-10:] == [str(r) for r in drained]  # printed after every child line
