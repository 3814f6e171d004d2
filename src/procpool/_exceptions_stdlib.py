"""procpool's errors that are also the standard library pools' errors.

``WorkerCrashedError`` and ``InitializerError`` subclass
:class:`concurrent.futures.process.BrokenProcessPool`, and
``ResultSerializationError`` subclasses
:class:`multiprocessing.pool.MaybeEncodingError`, so that ``except`` clauses
written for the standard library keep working. They are a module of their own,
imported where they are raised (``procpool`` exports them lazily), because
importing ``concurrent.futures`` (with the ``logging`` it imports) and
``multiprocessing.pool`` costs about 4 ms here: every worker's start would pay
it, and every first pool, for errors most runs never raise. The exception tree
is drawn in ``_exceptions.py``.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool
from multiprocessing.pool import MaybeEncodingError  # type: ignore[attr-defined]

from ._exceptions import ProcpoolError, SerializationError

__all__ = ["InitializerError", "ResultSerializationError", "WorkerCrashedError"]


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


class ResultSerializationError(SerializationError, MaybeEncodingError):  # type: ignore[misc]
    """A task's result could not be pickled in the worker to be sent back.

    Also a :class:`multiprocessing.pool.MaybeEncodingError`, what the standard
    library's Pool raises in this case.

    Attributes:
        exc: ``repr`` of the pickling error.
        value: ``repr`` of the result that would not pickle.
    """

    def __init__(self, message: str, *, exc: object = None, value: object = None) -> None:
        Exception.__init__(self, message)
        self.exc = repr(exc)
        self.value = _safe_repr(value)

    def __str__(self) -> str:
        return str(self.args[0])


def _safe_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= 200 else text[:197] + "..."


for _cls in (WorkerCrashedError, InitializerError, ResultSerializationError):
    _cls.__module__ = "procpool"
