"""procpool: process pools that are fast, never hang, lose nothing, and show progress.

Layers (each imports only from the layers above it in this list; a test checks):

1. leaf modules: ``_exceptions``, ``_version``
2. ``_core``: the engine (protocol, worker loop, dispatcher, start methods)
3. ``backends``: where tasks run (local processes today)
4. API modules: ``_results``, ``_runner``, ``_pool``, ``_executor``, ``_process``,
   ``_sync``, ``_context``
5. the command line (``__main__``), which uses only this public namespace
"""

from __future__ import annotations

from ._context import Context, cpu_count, get_context
from ._exceptions import (
    InitializerError,
    ProcpoolError,
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
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
    "PoolStatistics",
    "Process",
    "ProcessPoolExecutor",
    "ProcpoolError",
    "Progress",
    "ProgressUpdate",
    "Queue",
    "RLock",
    "RemoteTraceback",
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

# Public objects say they live in `procpool`, so tracebacks and pickles show the
# public path rather than a private module.
for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, str):
        try:
            _obj.__module__ = __name__
        except (AttributeError, TypeError):
            pass
del _name, _obj
