"""The public surface is exact, and the layers import only downwards."""

from __future__ import annotations

import ast
import pathlib
from pathlib import Path

import pytest

import procpool
from tests import helpers

SRC = pathlib.Path(procpool.__file__).parent


def test_all_is_sorted_and_complete() -> None:
    assert procpool.__all__ == sorted(procpool.__all__)
    public = {name for name in dir(procpool) if not name.startswith("_")}
    subpackages = {"testing", "backends"}  # public, imported by name
    assert public - subpackages <= set(procpool.__all__) | {"annotations"}


def test_exported_objects_say_they_live_in_procpool() -> None:
    for name in procpool.__all__:
        obj = getattr(procpool, name)
        if isinstance(obj, str):
            continue
        assert obj.__module__ == "procpool", name


# Layer of each private module; a module may import only from lower-or-equal layers.
LAYERS = {
    "_exceptions": 0,
    "_exceptions_stdlib": 0,
    "_version": 0,
    "_core": 1,
    "backends": 2,
    "_results": 3,
    "_runner": 3,
    "_pool": 3,
    "_executor": 3,
    "_process": 3,
    "_sync": 3,
    "_context": 3,
    "_progress": 3,
    "testing": 3,
    "_cli": 4,
    "__main__": 4,
}


def _layer_of(module: str) -> int | None:
    head = module.split(".")[0]
    return LAYERS.get(head)


def test_layers_import_only_downwards() -> None:
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = rel.parts
        own = _layer_of(parts[0]) if parts[0] != "__init__" else None
        if own is None:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = list(parts[: len(parts) - node.level])
                target = ".".join([*base, node.module or ""]).strip(".")
                if not target:
                    continue
                layer = _layer_of(target)
                assert layer is None or layer <= own, (
                    f"{rel} imports {target} (layer {layer} > {own})"
                )
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("procpool.")
            ):
                layer = _layer_of(node.module.split(".", 1)[1])  # type: ignore[union-attr]
                assert layer is None or layer <= own, f"{rel} imports {node.module}"


def test_a_pool_of_importable_functions_loads_no_more_than_it_needs() -> None:
    # Start-up time is import time: a pool running a module's functions sends
    # them by name, without loading cloudpickle; nor does it load dataclasses
    # unless statistics are asked for. Neither a worker nor the parent loads
    # concurrent.futures, logging and multiprocessing.pool (~2.5-4 ms) for the
    # errors that subclass theirs, until one is raised or asked for (see
    # _exceptions_stdlib.py). Nor does either load _script, which only a
    # function sent by value needs. A lambda still goes by value.
    script = (
        "import sys, procpool, operator\n"
        "costly = ('cloudpickle', 'dataclasses', 'concurrent.futures', 'logging',\n"
        "          'multiprocessing.pool', 'procpool._core._script')\n"
        "check = 'sorted(m for m in %r if m in __import__(\"sys\").modules)' % (costly,)\n"
        "if __name__ == '__main__':\n"
        "    with procpool.Pool(2, context='spawn') as pool:\n"
        "        print(pool.apply(eval, (check,)))\n"
        "    with procpool.Pool(2) as pool:\n"
        "        assert pool.map(operator.neg, [1, 2]) == [-1, -2]\n"
        "        assert pool.apply(abs, (-3,)) == 3\n"
        "        print(eval(check))\n"
        "        assert pool.apply(lambda: 7) == 7\n"
        "        print('cloudpickle' in sys.modules)\n"
    )
    assert _run_script(script)[:3] == ["[]", "[]", "True"]


def test_a_fork_pool_sends_the_scripts_functions_by_name() -> None:
    # Its workers are forked from this process, so a function __main__ had
    # when the pool was made, they have too: it goes by name, as under the
    # zygote. By value, it cost this process and each worker the import of
    # cloudpickle (~13 ms of a ~15 ms start to the first result). A function
    # defined after the workers were forked still goes by value.
    script = (
        "import sys, procpool\n"
        "def loaded(_):\n"
        "    return 'cloudpickle' in sys.modules\n"
        "if __name__ == '__main__':\n"
        "    with procpool.Pool(2, context='fork') as pool:\n"
        "        print(pool.map(loaded, [1, 2], chunksize=1), 'cloudpickle' in sys.modules)\n"
        "        exec('def later(x):\\n    return x * 2', globals())\n"
        "        print(pool.map(later, [1, 2]))\n"
    )
    assert _run_script(script)[:2] == ["[False, False] False", "[2, 4]"]


@pytest.mark.parametrize("context", ["None", "'fork'"])
def test_methods_and_partials_of_the_scripts_classes_and_functions_go_by_name(
    context: str,
) -> None:
    # A bound method of a class the workers inherited, or a partial of such a
    # function, goes through plain pickle: the class and the function by name,
    # the object's data by value, and no cloudpickle on either side. cloudpickle
    # copied the class at each call (a 10,000-call loop of apply_async: 430-490
    # us a call, against 77-90 now and the standard library's 90-190). A class
    # defined after the workers were forked still goes by value.
    script = (
        "import functools, sys, procpool\n"
        "class Scale:\n"
        "    def __init__(self, k):\n"
        "        self.k = k\n"
        "    def times(self, x):\n"
        "        return x * self.k, 'cloudpickle' in sys.modules\n"
        "def mul(a, b):\n"
        "    return a * b\n"
        "if __name__ == '__main__':\n"
        f"    with procpool.Pool(2, context={context}) as pool:\n"
        "        four = functools.partial(mul, 4)\n"
        "        print(pool.apply(Scale(3).times, (2,)), pool.map(four, [1]))\n"
        "        print('cloudpickle' in sys.modules)\n"
        "        exec('class Later(Scale):\\n    pass', globals())\n"
        "        print(pool.apply(Later(5).times, (2,))[0])\n"
    )
    assert _run_script(script)[:3] == ["(6, False) [4]", "False", "10"]


SCRIPT_FUNCTIONS = """
import sys, procpool

def loaded(_):
    return 'cloudpickle' in sys.modules

def init():
    global READY
    READY = True

def ready(_):
    return READY

if __name__ == '__main__':
    def guarded(x):  # not in the script as spawn imports it again
        return x * 3

    with procpool.Pool(2, context=sys.argv[1], initializer=init) as pool:
        print(pool.map(loaded, [1, 2], chunksize=1), pool.map(ready, [1]))
        print('cloudpickle' in sys.modules)
        print(pool.map(guarded, [1, 2]))
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_worker_that_imported_the_script_runs_its_functions_without_cloudpickle(
    method: str, tmp_path: Path
) -> None:
    # A worker that has a function of the script (spawn and the fork server
    # import the script again) runs its own and never unpickles a copy by
    # value, which would import cloudpickle (~13-20 ms of its way to its first
    # task). A function at the top of the script (an initializer too) goes
    # with its name and code alone, so the pool's process does not import it
    # either. A function the worker lacks goes with a copy, and runs from it.
    lines = helpers.script_output(tmp_path, SCRIPT_FUNCTIONS, method).splitlines()
    assert lines == ["[False, False] [True]", "False", "[3, 6]"]


SCRIPT_CLASSES = """
import functools, sys, procpool

class Scale:
    def __init__(self, k):
        self.k = k

    def times(self, x):
        return x * self.k, 'cloudpickle' in sys.modules

def mul(a, b):
    return a * b

if __name__ == '__main__':
    class Guarded(Scale):  # not in the script as spawn imports it again
        pass

    with procpool.Pool(2, context=sys.argv[1]) as pool:
        print(pool.apply(Scale(3).times, (2,)), pool.map(functools.partial(mul, 4), [1]))
        print('cloudpickle' in sys.modules)
        print([pool.apply(Guarded(k).times, (2,))[0] for k in (5, 6)])
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_methods_and_partials_of_the_scripts_top_level_go_by_name_to_a_child_that_reran_it(
    method: str, tmp_path: Path
) -> None:
    # A class or function at the top of the script, inside a bound method or a
    # partial, goes by name (and its code, which the child checks): neither the
    # pool's process nor a worker imports cloudpickle for it (~26 and ~13 ms of
    # their way to a first result). A class the child lacks goes as a copy.
    lines = helpers.script_output(tmp_path, SCRIPT_CLASSES, method).splitlines()
    assert lines == ["(6, False) [4]", "False", "[10, 12]"]


def test_procpool_does_not_import_typing_at_run_time() -> None:
    # typing costs a program ~3.5 ms to import (2 cores) and one more shared
    # library that every fork copies; the standard library's pools and
    # processes do not load it. procpool's annotations import it only for
    # mypy; its generic classes use stand-ins (_core/_generic.py).
    script = (
        "import sys, procpool, operator\n"
        "if __name__ == '__main__':\n"
        "    with procpool.Pool(2) as pool:\n"
        "        assert pool.map(operator.neg, [1, 2]) == [-1, -2]\n"
        "    with procpool.ProcessPoolExecutor(1) as ex:\n"
        "        assert ex.submit(abs, -1).result() == 1\n"
        "    proc = procpool.Process(target=abs, args=(-1,))\n"
        "    proc.start()\n"
        "    proc.join()\n"
        "    print(procpool.AsyncResult[int], 'typing' in sys.modules)\n"
    )
    assert _run_script(script)[0] == "procpool.AsyncResult[int] False"


def test_only_a_process_that_forks_workers_loads_what_they_run() -> None:
    # A spawn pool's process never runs a worker: it loads neither the worker
    # loop nor whole-line stdio. A pool that forks its workers (by default,
    # through the zygote) loads both before it forks, so that no worker
    # imports them on its way to its first task (~1.7 ms of a cold start).
    script = (
        "import sys, procpool\n"
        "mods = ('procpool._core._worker', 'procpool._core._stdio')\n"
        "if __name__ == '__main__':\n"
        "    with procpool.Pool(1, context='spawn') as pool:\n"
        "        assert pool.apply(abs, (-1,)) == 1\n"
        "        print([m for m in mods if m in sys.modules])\n"
        "    with procpool.Pool(1) as pool:\n"
        "        print([m for m in mods if m in sys.modules])\n"
    )
    loaded = ["procpool._core._worker", "procpool._core._stdio"]
    assert _run_script(script)[:2] == ["[]", str(loaded)]


def test_making_a_pool_holds_the_collector_back_while_the_engine_loads() -> None:
    # Loading the engine makes thousands of long-lived objects; collected as
    # they come, they set off a dozen young collections and a wider one in a
    # cold process (~2-4 ms of W6's start-up). Held back, they cost at most one
    # young collection per block (the lazy import, then the backend's start).
    # A context made for a pool does not load Process and its modules either.
    # A parent that turned the collector off keeps it off, in its workers too.
    script = (
        "import gc, sys, procpool\n"
        "seen = []\n"
        "def note(phase, info):\n"
        "    if phase == 'start':\n"
        "        seen.append(info['generation'])\n"
        "gc.callbacks.append(note)\n"
        "fork_pool = lambda: procpool.get_context('fork').Pool(2)\n"
        "for make in (fork_pool, procpool.ProcessPoolExecutor):\n"
        "    del seen[:]\n"
        "    with make() as pool:\n"
        "        print(seen, gc.isenabled())\n"
        "        if hasattr(pool, 'submit'):\n"
        "            print([pool.submit(gc.isenabled).result() for _ in range(4)])\n"
        "        else:\n"
        "            print(pool.map(eval, ['__import__(\"gc\").isenabled()'] * 4, chunksize=1))\n"
        "print('procpool._process' in sys.modules)\n"
        "gc.disable()\n"
        "with procpool.Pool(1) as pool:\n"
        "    print(gc.isenabled(), pool.apply(gc.isenabled))\n"
    )
    lines = _run_script(script)
    for line in lines[0:4:2]:
        collections, enabled = line.rsplit(" ", 1)
        assert enabled == "True", line
        # The held objects went to the oldest generation unvisited: no young
        # collection walked them (and, after the fork, copied their pages).
        assert eval(collections) == [], line
    # Workers forked while the collector was held (the fork pool's, the zygote
    # and its children) collect as the parent did before the hold.
    assert lines[1:4:2] == ["[True, True, True, True]"] * 2
    assert lines[4:6] == ["False", "False False"]


def test_workers_forked_while_the_collector_was_held_froze_what_they_inherited() -> None:
    # Turned back on in a worker forked inside the hold, the collector would
    # visit the thousands of objects the hold kept young, and write to every
    # one (up to ~3.5 ms of each worker's CPU, its pages copied). Frozen, they are
    # never visited there; the parent froze nothing of its own, and a program
    # that froze its own objects finds them frozen still.
    script = (
        "import gc, procpool\n"
        "count = lambda _: gc.get_freeze_count()\n"
        "if __name__ == '__main__':\n"
        "    for make in (lambda: procpool.get_context('fork').Pool(2), procpool.Pool):\n"
        "        with make() as pool:\n"
        "            print(min(pool.map(count, range(4), chunksize=1)) > 1000)\n"
        "        print(gc.get_freeze_count())\n"
        "    keep = [[i] for i in range(5000)]\n"
        "    gc.freeze()\n"
        "    with procpool.ProcessPoolExecutor(2) as pool:\n"
        "        thawed = any(o is keep for o in gc.get_objects())  # frozen: in no generation\n"
        "        print(pool.submit(gc.isenabled).result(), thawed)\n"
    )
    assert _run_script(script)[:5] == ["True", "0", "True", "0", "True False"]


def test_garbage_made_while_the_collector_was_held_is_still_collected() -> None:
    import gc
    import weakref

    from procpool._core import collector_held

    class Node:
        pass

    with collector_held():
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        gone = weakref.ref(node)
        del node
    assert gone() is not None  # promoted, not collected young
    gc.collect()
    assert gone() is None


def test_collector_held_is_reentrant_and_keeps_the_callers_choice() -> None:
    import gc

    from procpool._core import collector_held

    assert gc.isenabled()
    try:
        with collector_held():
            assert not gc.isenabled()
            with collector_held():
                assert not gc.isenabled()
            assert not gc.isenabled()
            raise KeyError("inside")
    except KeyError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_held():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def _run_script(script: str) -> list[str]:
    """Run ``script`` in a fresh interpreter; return its output's lines."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")
