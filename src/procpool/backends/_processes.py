"""The default backend: worker processes driven by procpool's engine (``_core``)."""

from __future__ import annotations

from .._core._dispatcher import Dispatcher
from .._core._startmethod import resolve_context
from ._base import Backend, BackendOptions

__all__ = ["ProcessBackend"]


class ProcessBackend(Dispatcher, Backend):
    """Worker processes: crash containment, timeouts, recycling, shared memory."""

    def __init__(self, workers: int, options: BackendOptions) -> None:
        super().__init__(
            resolve_context(options.context),
            workers,
            initializer=options.initializer,
            initargs=tuple(options.initargs),
            max_tasks_per_worker=options.max_tasks_per_worker,
            max_memory_per_worker=options.max_memory_per_worker,
            tag_output=options.tag_output,
        )
