"""procpool's errors that are also the standard library pools' errors.

``WorkerCrashedError`` and ``InitializerError`` subclass
:class:`concurrent.futures.process.BrokenProcessPool`, and
``ResultSerializationError`` subclasses
:class:`multiprocessing.pool.MaybeEncodingError`, so that ``except`` clauses
written for the standard library keep working. They are a module of their own,
imported where they are raised (``procpool`` exports them lazily), because
importing ``concurrent.futures`` (with the ``logging`` it imports) and
``multiprocessing.pool`` costs 2.5-4 ms here: every worker's start would pay
it, and every program's first pool (on its first result's path: the parent
imported it while its first worker started, and on 2 cores that import took
5-8 ms against the worker's start), for errors most runs never raise. The
exception tree is drawn in ``_exceptions.py``.
"""

from __future__ import annotations

import threading
from multiprocessing.pool import MaybeEncodingError  # type: ignore[attr-defined]

from ._exceptions import ProcpoolError, SerializationError

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from concurrent.futures.process import BrokenProcessPool
else:
    try:
        from concurrent.futures.process import BrokenProcessPool
    except RuntimeError:
        # concurrent.futures.process registers a threading exit hook as it is
        # imported, which fails once the interpreter has begun to exit. A pool
        # whose worker crashes then (an executor finishing its work at exit)
        # still needs the class, and no code can catch BrokenProcessPool by
        # then if that module was never imported: its nearest importable base
        # keeps every except clause that could run working. This is what lets
        # a pool import this module lazily, off its first call's path.
        if not getattr(threading, "_SHUTTING_DOWN", False):
            raise
        from concurrent.futures import BrokenExecutor as BrokenProcessPool

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
