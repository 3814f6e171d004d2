"""``procpool.get_context(method)``: everything procpool makes, bound to one start method.

Like ``multiprocessing.get_context``, but its ``Process``, ``Pool`` and
``ProcessPoolExecutor`` are procpool's. The default method is ``forkserver``
on Linux and ``spawn`` elsewhere; ``_core/_startmethod.py`` says why ``fork``
is never the default.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable

from ._core import collector_held
from ._core._startmethod import default_start_method, resolve_context

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    # For annotations only: multiprocessing.managers alone costs ~10 ms to
    # import, in every program and in the fork server.
    import multiprocessing.connection
    import multiprocessing.context
    import multiprocessing.managers
    import multiprocessing.queues
    import multiprocessing.synchronize
    from typing import Any

    from ._executor import ProcessPoolExecutor
    from ._pool import Pool
    from ._process import Process

__all__ = ["Context", "cpu_count", "get_context"]


def cpu_count() -> int:
    """The number of CPUs this process may use: the default size of a pool.

    Unlike ``multiprocessing.cpu_count()`` it honours CPU affinity (``taskset``,
    container CPU sets) and never raises: it is at least 1.
    """
    from ._runner import default_workers

    return default_workers()


class Context:
    """Procpool's processes, pools, queues and locks for one start method.

    Get one with :func:`get_context`; it mirrors a ``multiprocessing`` context
    (``ctx.Process``, ``ctx.Queue()``, ``ctx.Lock()``, ...) and adds ``ctx.Pool``
    and ``ctx.ProcessPoolExecutor``.

    Args:
        method: ``"fork"``, ``"spawn"`` or ``"forkserver"``.

    Raises:
        ValueError: if ``method`` is not available on this platform.
    """

    def __init__(self, method: str) -> None:
        self._mp = resolve_context(method)
        self._method = method

    def __repr__(self) -> str:
        return f"<procpool.Context {self._method!r}>"

    @property
    def mp_context(self) -> multiprocessing.context.BaseContext:
        """The ``multiprocessing`` context underneath, for APIs that want one."""
        return self._mp

    @property
    def Process(self) -> type[Process]:
        """The :class:`procpool.Process` class for this start method."""
        # Imported here: a context made for a pool never loads Process (~0.9 ms
        # with the `resource` module it needs).
        from ._process import process_class

        return process_class(self._method)

    def get_start_method(self) -> str:
        """The start method's name."""
        return self._method

    def cpu_count(self) -> int:
        """See :func:`procpool.cpu_count`."""
        return cpu_count()

    def Pool(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        **options: Any,
    ) -> Pool:
        """A :class:`procpool.Pool` whose workers use this start method.

        Args:
            processes: Number of workers; :func:`cpu_count` if None.
            initializer: Called as ``initializer(*initargs)`` in each worker.
            initargs: Arguments for ``initializer``.
            maxtasksperchild: Tasks a worker runs before it is replaced.
            **options: procpool's own options (``task_timeout``, ``retries``, ...).

        Raises:
            ValueError: for an invalid option (see :class:`procpool.Pool`).
        """
        with collector_held():
            from ._pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild, context=self._mp, **options)

    def ProcessPoolExecutor(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        **options: Any,
    ) -> ProcessPoolExecutor:
        """A :class:`procpool.ProcessPoolExecutor` whose workers use this start method.

        Args:
            max_workers: Number of workers; :func:`cpu_count` if None.
            initializer: Called as ``initializer(*initargs)`` in each worker.
            initargs: Arguments for ``initializer``.
            **options: Further keyword options (``max_tasks_per_child``, ...).

        Raises:
            ValueError: for an invalid option (see :class:`procpool.ProcessPoolExecutor`).
        """
        with collector_held():
            from ._executor import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers, self._mp, initializer, initargs, **options)

    # The sync primitives are the standard library's, from this context.

    def Queue(self, maxsize: int = 0) -> multiprocessing.queues.Queue[Any]:
        """See :func:`procpool.Queue`."""
        return self._mp.Queue(maxsize)

    def SimpleQueue(self) -> multiprocessing.queues.SimpleQueue[Any]:
        """See :func:`procpool.SimpleQueue`."""
        return self._mp.SimpleQueue()

    def JoinableQueue(self, maxsize: int = 0) -> multiprocessing.queues.JoinableQueue[Any]:
        """See :func:`procpool.JoinableQueue`."""
        return self._mp.JoinableQueue(maxsize)

    def Lock(self) -> multiprocessing.synchronize.Lock:
        """See :func:`procpool.Lock`."""
        return self._mp.Lock()

    def RLock(self) -> multiprocessing.synchronize.RLock:
        """See :func:`procpool.RLock`."""
        return self._mp.RLock()

    def Semaphore(self, value: int = 1) -> multiprocessing.synchronize.Semaphore:
        """See :func:`procpool.Semaphore`."""
        return self._mp.Semaphore(value)

    def BoundedSemaphore(self, value: int = 1) -> multiprocessing.synchronize.BoundedSemaphore:
        """See :func:`procpool.BoundedSemaphore`."""
        return self._mp.BoundedSemaphore(value)

    def Event(self) -> multiprocessing.synchronize.Event:
        """See :func:`procpool.Event`."""
        return self._mp.Event()

    def Condition(
        self,
        lock: multiprocessing.synchronize.Lock | multiprocessing.synchronize.RLock | None = None,
    ) -> multiprocessing.synchronize.Condition:
        """See :func:`procpool.Condition`."""
        return self._mp.Condition(lock)

    def Barrier(
        self,
        parties: int,
        action: Callable[[], object] | None = None,
        timeout: float | None = None,
    ) -> multiprocessing.synchronize.Barrier:
        """See :func:`procpool.Barrier`."""
        return self._mp.Barrier(parties, action, timeout)

    def Pipe(
        self, duplex: bool = True
    ) -> tuple[multiprocessing.connection.Connection, multiprocessing.connection.Connection]:
        """A pair of connected ``Connection`` objects (``multiprocessing.Pipe``)."""
        return multiprocessing.Pipe(duplex)

    def Manager(self) -> multiprocessing.managers.SyncManager:
        """A started ``SyncManager`` whose server process uses this start method."""
        return self._mp.Manager()


Context.__module__ = "procpool"

_CONTEXTS: dict[str, Context] = {}


def get_context(method: str | None = None) -> Context:
    """Return the :class:`Context` for a start method.

    Args:
        method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; None for procpool's
            default (``forkserver`` on Linux, ``spawn`` elsewhere).

    Raises:
        ValueError: if ``method`` is not available on this platform.
    """
    name = default_start_method() if method is None else method
    ctx = _CONTEXTS.get(name)
    if ctx is None:
        ctx = _CONTEXTS[name] = Context(name)
    return ctx


for _public in (cpu_count, get_context):
    _public.__module__ = "procpool"
del _public
