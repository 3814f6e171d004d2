"""The errors that break a pool's promise to run a task, as concurrent.futures has them.

Both subclass :class:`concurrent.futures.process.BrokenProcessPool`, so that
``except BrokenExecutor`` clauses written for the standard library keep working.
They are a module of their own, imported on first use (``_exceptions`` and
``procpool`` re-export them lazily), because importing ``concurrent.futures``
and the ``logging`` it imports costs about 3 ms: worker processes, which never
raise them, would pay it at every start, and so would every first pool.
The exception tree is drawn in ``_exceptions.py``.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

from ._exceptions import ProcpoolError

__all__ = ["InitializerError", "WorkerCrashedError"]


class WorkerCrashedError(ProcpoolError, BrokenProcessPool):
    """The worker process running a task died before returning its result.

    Attributes:
        exitcode: The worker's exit code (negative: the signal that killed it).
        pid: The worker's process id.
        task_index: Position of the task in its map, or None for a single call.
        ran_to_completion: True when the task itself had finished and only its
            result died with the worker (another task of its batch was running);
            running it again is safe for work that may be repeated.
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        pid: int | None = None,
        task_index: int | None = None,
        ran_to_completion: bool = False,
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid
        self.task_index = task_index
        self.ran_to_completion = ran_to_completion


class InitializerError(ProcpoolError, BrokenProcessPool):
    """The pool's ``initializer`` raised; the pool cannot run tasks.

    The initializer's own exception is attached as ``__cause__``.
    """


for _cls in (WorkerCrashedError, InitializerError):
    _cls.__module__ = "procpool"
