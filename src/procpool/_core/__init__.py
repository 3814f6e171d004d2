"""procpool's engine: worker processes, the wire protocol, and the dispatcher.

Nothing here imports from the API modules above it; see ``_dispatcher`` for the
data-flow diagram.
"""

from __future__ import annotations

import gc
import os
import sys

TYPE_CHECKING = False  # not typing's (see _generic.py)
if TYPE_CHECKING:
    from typing import Any


class collector_held:  # lower case: it reads as a statement, ``with collector_held():``
    """Hold the cyclic garbage collector back for a burst of imports and forks.

    Loading procpool's engine makes ~20,000 objects that all survive (its
    functions, classes, and the tuples of their code), and each 700 of them
    set off a young collection, the fourth a wider one; in a cold pool those
    came to ~2-4 ms of the ~17 ms to a first result (2 cores, W6), some of it
    paid again as copy-on-write faults once workers were forked.

    At the end of the block they go straight to the oldest generation, where
    a young collection would have put them: ``gc.freeze()`` then
    ``gc.unfreeze()``, two list splices. A young collection instead would
    visit every one of them and write to its header; right after the block
    forked workers, that copies every page they sit on, 2.5-5 ms in a cold
    fork pool's process. Garbage among them (or made just before the block)
    waits for the next full collection. Not done where the program has frozen
    objects already: that would thaw them (see ``gc.freeze``).

    A process forked inside the block (a worker, the zygote) starts with the
    collector on again, as it was before the block, and everything it
    inherited frozen (``_turn_back_on_in_child``): its collections never visit
    the parent's objects, which would copy their pages into the child. Turned
    on without that, the held objects cost each forked worker a collection
    at its first allocations: up to ~3.5 ms of its CPU, by the parent's
    counters at the fork, and ~60 page faults more in every layout.

    Re-entrant, and a no-op where the collector is already off (the caller's
    choice is left as it was). A program that calls ``gc.disable()`` from
    another thread while a pool is being made would find it on again after.
    """

    __slots__ = ("_held",)

    def __enter__(self) -> None:
        global _held_here
        self._held = gc.isenabled()
        if self._held:
            gc.disable()
            _held_here = True

    def __exit__(self, *exc_info: object) -> None:
        global _held_here
        if self._held:
            _held_here = False
            _promote_young()
            gc.enable()


_held_here = False  # a collector_held block in this process turned the collector off
# Objects are frozen in this process: the program's own, or, in a child forked
# inside a block, everything it inherited. Either way they must stay frozen.
_frozen_here = False
# Fewer frozen objects than this are the interpreter's, not the program's: Python
# 3.12 starts with the tuples of its static types' bases in the permanent
# generation (375 in 3.12.1; 3.11 and 3.13 start with none), while a program's
# gc.freeze() freezes every tracked object, over 4,000 in a bare interpreter.
# Taking 3.12's own for the program's would leave every cold pool there to its
# young collections (test_making_a_pool_holds_the_collector_back...).
_INTERPRETERS_OWN_FROZEN = 1000


def _promote_young() -> None:
    """Move the young generations to the oldest without visiting them (O(1))."""
    global _frozen_here
    if _frozen_here:
        return
    # get_freeze_count walks the frozen objects (~15 ms a million), so it is
    # asked until the answer is yes, then never again.
    if gc.get_freeze_count() >= _INTERPRETERS_OWN_FROZEN:
        _frozen_here = True
        return
    gc.freeze()
    gc.unfreeze()


def _turn_back_on_in_child() -> None:
    global _held_here, _frozen_here
    if _held_here:
        _held_here = False
        _frozen_here = True
        gc.freeze()
        gc.enable()


os.register_at_fork(after_in_child=_turn_back_on_in_child)


def importable_by_name(obj: Any) -> bool:
    """Whether another process finds ``obj`` (a function or class) by its
    module and qualified name, which is how plain pickle sends it."""
    name = getattr(obj, "__module__", None)
    if name is None or name in ("__main__", "__mp_main__"):
        return False
    module = sys.modules.get(name)
    if module is None or getattr(module, "__spec__", None) is None:
        return False  # made at run time: another process could not import it
    found: Any = module
    for part in obj.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is obj


# Functions and classes sent as cloudpickle copies (see _batch._ByName), by the
# copy's bytes: what load_copy made of each, in this process.
_COPIES: dict[bytes, Any] = {}
_COPIES_KEPT = 256  # at most, each of at most _COPY_KEPT_BYTES
_COPY_KEPT_BYTES = 1024 * 1024


def load_copy(blob: bytes) -> Any:
    """Unpickle a function's or class's cloudpickle copy, once per process.

    Each call of a method of an object whose class a worker lacks (a class
    of the script, under spawn) carries the class's copy, and cloudpickle
    takes ~200 us to build a class again from one; a copy seen before
    returns what it made then (cloudpickle would return that same class
    anyway, by the id it tracks classes with).
    """
    try:
        return _COPIES[blob]
    except KeyError:
        pass
    import pickle

    made = pickle.loads(blob)
    if len(blob) <= _COPY_KEPT_BYTES:
        if len(_COPIES) >= _COPIES_KEPT:
            _COPIES.pop(next(iter(_COPIES)), None)
        _COPIES[blob] = made
    return made


def usable_cpus() -> int:
    """The CPUs this process may run on (``os.cpu_count()`` where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_worker(*args: object) -> None:
    """The target of every worker's Process: ``_worker.worker_main``, imported there.

    A spawned or forkserver child imports ``_worker`` as it unpickles its
    Process, as before, and the pool's process, which never runs a worker, does
    not import it at all (see import_worker_modules for forked workers).
    """
    with collector_held():
        from ._worker import worker_main

    worker_main(*args)  # type: ignore[arg-type]


def import_worker_modules() -> None:
    """Import what every worker runs first, in a process about to fork workers,
    and make the line writers each will put in place of its stdout and stderr.

    Each forked child then finds the modules loaded instead of importing them
    after the fork, when a cold pool's first result waits for them: in one
    child on the critical path it costs ~1.7 ms, here ~0.7 ms (2 cores). The
    writers, made in the child, would cost it ~0.2 ms more (see _stdio).
    """
    from . import _stdio, _worker  # noqa: F401

    _stdio.make_line_writers_ahead()
