"""The one abstract class every backend implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any, ClassVar

    from .._core._batch import Batch
    from .._statistics import PoolStatistics

__all__ = ["Backend", "BackendOptions"]


class BackendOptions:
    """What a pool asks of its backend; a backend rejects what it cannot honour.

    Read-only. A plain class rather than a dataclass or a ``NamedTuple``:
    defining either costs every cold pool's start-up time (a ``NamedTuple``
    ~0.2 ms; ``dataclasses``, with the ``inspect`` it imports, milliseconds).
    """

    __slots__ = (
        "context",
        "initargs",
        "initializer",
        "max_memory_per_worker",
        "max_tasks_per_worker",
        "tag_output",
    )
    context: Any  # start method / multiprocessing context (processes only)
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    max_tasks_per_worker: int | None
    max_memory_per_worker: int | None
    tag_output: bool

    def __init__(
        self,
        context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        tag_output: bool = False,
    ) -> None:
        values = (
            context,
            initargs,
            initializer,
            max_memory_per_worker,
            max_tasks_per_worker,
            tag_output,
        )
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"BackendOptions is read-only: cannot set {name!r}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"BackendOptions({fields})"


class Backend(abc.ABC):
    """Runs batches of tasks and hands their outcomes to each batch's sink.

    Contract (checked by :func:`procpool.testing.check_backend`):

    * ``submit`` is thread-safe and never blocks on task execution; after
      ``close``/``terminate`` it raises ``ValueError``;
    * every task of every submitted batch gets exactly one outcome through
      ``batch.sink.deliver`` (a value, or an exception in place), unless its
      ``on_start`` hook returned False; nothing waits forever, terminate included;
    * a backend that runs a batch calls ``batch.sink.observe(count, busy_seconds,
      nbytes)`` first where the sink has it, one call at a time: adaptive chunking
      (``imap``, ``Executor.map``) sizes the next batches from it, and without it
      stays at one task a batch;
    * ``join`` returns once every worker is gone.
    """

    #: Whether batches must carry pickled payloads (False: run ``batch.items`` as is).
    serializes: ClassVar[bool] = True
    #: Whether the backend can stop a running task (needed for ``task_timeout``).
    can_time_out: ClassVar[bool] = True
    #: Whether per-task seeds are honoured (needs one interpreter state per worker).
    can_seed: ClassVar[bool] = True
    #: Functions of ``__main__`` that every worker already has, by name (workers
    #: forked from a copy of this process); they are sent by name, not by value.
    inherited_main: Mapping[str, Any] | None = None
    #: Whether every worker imports the script again as it starts (spawn,
    #: forkserver): a function at its top level is sent by name and code alone.
    script_rerun: bool = False

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of workers."""

    @property
    @abc.abstractmethod
    def broken(self) -> BaseException | None:
        """Why no task can run any more (a failed initializer), or None."""

    @property
    @abc.abstractmethod
    def accepting(self) -> bool:
        """Whether ``submit`` still takes work (False after close or terminate)."""

    @abc.abstractmethod
    def submit(self, batches: list[Batch]) -> None:
        """Queue batches to run."""

    @abc.abstractmethod
    def close(self) -> None:
        """Accept no more work; what is queued still runs."""

    @abc.abstractmethod
    def terminate(self, wait: bool = True) -> None:
        """Stop as soon as possible; unfinished tasks fail instead of waiting."""

    @abc.abstractmethod
    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker to finish; return whether they have."""

    @abc.abstractmethod
    def statistics(self) -> PoolStatistics:
        """Task counts, faults and per-worker time use, as of now."""

    def on_own_thread(self) -> bool:
        """Whether the calling thread is the one that delivers this backend's
        outcomes and runs their callbacks: a wait there for one of them could
        never end, and raises instead. False where no single thread does."""
        return False

    def seconds_per_task(self, fn_id: int) -> float | None:
        """Seconds a task of the callable ``fn_id`` (a ``CallableRef.id``) has
        taken so far, or None where nothing was measured. ``Pool.map`` sizes
        chunks of long tasks by it; a backend that does not measure returns None."""
        return None
