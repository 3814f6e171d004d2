"""procpool: process pools that are fast, never hang, lose nothing, and show progress.

Layers (each imports only from the layers above it in this list; a test checks):

1. leaf modules: ``_exceptions`` (and ``_exceptions_stdlib``, its costly members), ``_version``
2. ``_core``: the engine (protocol, worker loop, dispatcher, start methods)
3. ``backends``: where tasks run (local processes today)
4. API modules: ``_results``, ``_runner``, ``_pool``, ``_executor``, ``_process``,
   ``_sync``, ``_context``
5. the command line (``__main__``), which uses only this public namespace
"""

from __future__ import annotations

import importlib as _importlib

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

    from ._context import Context, cpu_count, get_context
    from ._exceptions import (
        PoolClosedError,
        ProcpoolError,
        RemoteTraceback,
        SerializationError,
        TaskTimeoutError,
    )
    from ._exceptions_stdlib import (
        InitializerError,
        ResultSerializationError,
        WorkerCrashedError,
    )
    from ._executor import ProcessPoolExecutor
    from ._pool import Pool
    from ._process import Process
    from ._progress import Progress, ProgressUpdate
    from ._results import AsyncResult, IMapIterator
    from ._statistics import PoolStatistics, WorkerStatistics
    from ._sync import (
        Barrier,
        BoundedSemaphore,
        Condition,
        Event,
        JoinableQueue,
        Lock,
        Queue,
        RLock,
        Semaphore,
        SimpleQueue,
    )
    from ._version import __version__
del TYPE_CHECKING  # not part of the package's namespace

__all__ = [
    "AsyncResult",
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Context",
    "Event",
    "IMapIterator",
    "InitializerError",
    "JoinableQueue",
    "Lock",
    "Pool",
    "PoolClosedError",
    "PoolStatistics",
    "Process",
    "ProcessPoolExecutor",
    "ProcpoolError",
    "Progress",
    "ProgressUpdate",
    "Queue",
    "RLock",
    "RemoteTraceback",
    "ResultSerializationError",
    "Semaphore",
    "SerializationError",
    "SimpleQueue",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerStatistics",
    "__version__",
    "cpu_count",
    "get_context",
]

# Where each public name lives. The package imports its modules lazily: a worker
# process needs only the engine, and `import procpool` stays cheap (it is also
# what the fork server preloads). Each object is re-labelled `procpool.<name>`
# as it is first fetched, so tracebacks and pickles show the public path.
_WHERE = {
    "AsyncResult": "_results",
    "Barrier": "_sync",
    "BoundedSemaphore": "_sync",
    "Condition": "_sync",
    "Context": "_context",
    "Event": "_sync",
    "IMapIterator": "_results",
    "InitializerError": "_exceptions_stdlib",
    "JoinableQueue": "_sync",
    "Lock": "_sync",
    "Pool": "_pool",
    "PoolClosedError": "_exceptions",
    "PoolStatistics": "_statistics",
    "Process": "_process",
    "ProcessPoolExecutor": "_executor",
    "ProcpoolError": "_exceptions",
    "Progress": "_progress",
    "ProgressUpdate": "_progress",
    "Queue": "_sync",
    "RLock": "_sync",
    "RemoteTraceback": "_exceptions",
    "ResultSerializationError": "_exceptions_stdlib",
    "Semaphore": "_sync",
    "SerializationError": "_exceptions",
    "SimpleQueue": "_sync",
    "TaskTimeoutError": "_exceptions",
    "WorkerCrashedError": "_exceptions_stdlib",
    "WorkerStatistics": "_statistics",
    "__version__": "_version",
    "cpu_count": "_context",
    "get_context": "_context",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'procpool' has no attribute {name!r}")
    from ._core import collector_held

    with collector_held():
        obj = getattr(_importlib.import_module(f"procpool.{module}"), name)
    if not isinstance(obj, str):
        try:
            obj.__module__ = __name__
        except (AttributeError, TypeError):
            pass
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
