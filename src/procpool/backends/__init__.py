"""Where a pool's tasks run: one abstract class, one module per backend, loaded lazily.

``Pool`` and ``ProcessPoolExecutor`` talk only to :class:`Backend`. Built in:

* ``"processes"`` (the default): worker processes driven by procpool's engine,
  with crash containment, timeouts, recycling and shared memory;
* ``"threads"``: threads of the calling process, for I/O-bound work and, on a
  free-threaded Python, real parallelism. Threads share memory and cannot be
  killed, so there is no pickling, and no ``task_timeout``, memory limit or seed.

A backend is picked by name, ``Pool(backend="threads")``, or by passing a
factory (any callable with the :func:`make_backend` signature) for backends of
your own; :func:`procpool.testing.check_backend` is the conformance suite every
backend passes.
"""

from __future__ import annotations

import importlib

from .._core import collector_held
from ._base import Backend, BackendOptions

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["BUILTIN", "Backend", "BackendOptions", "make_backend"]

# name -> "module:class", imported only when asked for.
BUILTIN = {
    "processes": "procpool.backends._processes:ProcessBackend",
    "threads": "procpool.backends._threads:ThreadBackend",
}


def make_backend(name_or_factory: Any, workers: int, options: BackendOptions) -> Backend:
    """Start the backend called ``name_or_factory`` (or built by it) with ``workers``.

    Raises:
        ValueError: for an unknown backend name, or options it cannot honour.
    """
    if callable(name_or_factory):
        backend = name_or_factory(workers, options)
    else:
        target = BUILTIN.get(name_or_factory)
        if target is None:
            raise ValueError(
                f"unknown backend {name_or_factory!r}; choose one of {sorted(BUILTIN)} "
                f"or pass a factory"
            )
        module, cls = target.split(":")
        with collector_held():  # the engine's modules load, its first workers start
            backend = getattr(importlib.import_module(module), cls)(workers, options)
    if not isinstance(backend, Backend):
        raise TypeError(f"a backend factory must return a procpool Backend, not {backend!r}")
    return backend
