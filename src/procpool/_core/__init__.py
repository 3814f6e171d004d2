"""procpool's engine: worker processes, the wire protocol, and the dispatcher.

Nothing here imports from the API modules above it; see ``_dispatcher`` for the
data-flow diagram.
"""


def run_worker(*args: object) -> None:
    """The target of every worker's Process: ``_worker.worker_main``, imported there.

    A spawned or forkserver child imports ``_worker`` as it unpickles its
    Process, as before, and the pool's process, which never runs a worker, does
    not import it at all (see import_worker_modules for forked workers).
    """
    from ._worker import worker_main

    worker_main(*args)  # type: ignore[arg-type]


def import_worker_modules() -> None:
    """Import what every worker runs first, in a process about to fork workers.

    Each forked child then finds the modules loaded instead of importing them
    after the fork, when a cold pool's first result waits for them: in one
    child on the critical path it costs ~1.7 ms, here ~0.7 ms (2 cores).
    """
    from . import _stdio, _worker  # noqa: F401
