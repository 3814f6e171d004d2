"""The default backend: worker processes driven by procpool's engine (``_core``)."""

from __future__ import annotations

from multiprocessing.context import BaseContext

from .._core import import_worker_modules
from .._core._dispatcher import Dispatcher
from .._core._startmethod import resolve_context
from ._base import Backend, BackendOptions

__all__ = ["ProcessBackend"]


class ProcessBackend(Dispatcher, Backend):
    """Worker processes: crash containment, timeouts, recycling, shared memory."""

    def __init__(self, workers: int, options: BackendOptions) -> None:
        # A pool with the default start method, made in a single-threaded process,
        # forks its workers from a zygote (see _core/_zygote.py); else forkserver.
        ctx: BaseContext | None = None
        if options.context is None:
            from .._core import _zygote  # here: pools of other methods need none of it

            if _zygote.available():
                import_worker_modules()  # before the zygote forks, which inherits them
                try:
                    ctx = _zygote.ZygoteContext()
                except OSError:
                    pass  # cannot fork now (EAGAIN, ENOMEM): forkserver may still work
        if ctx is None:
            ctx = resolve_context(options.context)
            if ctx.get_start_method() == "fork":
                import_worker_modules()
        super().__init__(
            ctx,
            workers,
            initializer=options.initializer,
            initargs=tuple(options.initargs),
            max_tasks_per_worker=options.max_tasks_per_worker,
            max_memory_per_worker=options.max_memory_per_worker,
            tag_output=options.tag_output,
        )
