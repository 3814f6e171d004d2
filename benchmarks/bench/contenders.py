"""The contenders: procpool and its peers behind one small interface.

Each contender opens a *session* (a pool with N workers, started by one start method) that
can ``map`` eagerly, ``imap`` lazily, ``call`` one task and submit many one by one
(``submit_each``). Every adapter uses the library's own idiomatic API and its default
settings unless a workload asks for a chunksize; the library is imported only inside the
benchmark subprocess, so the parent needs none of them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

from bench import tasks

Fn = Callable[[Any], Any]
ALL_METHODS = ("fork", "spawn", "forkserver")


class Unsupported(Exception):
    """The library has no API for what a workload asks; recorded as 'n/a' with the reason."""


class Session(ABC):
    """A started pool, as the workloads use it."""

    @abstractmethod
    def map(self, fn: Fn, items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        """Run ``fn`` over ``items`` and return the results in order (library default chunking
        when ``chunksize`` is None)."""

    @abstractmethod
    def imap(self, fn: Fn, items: Iterable[Any]) -> Iterator[Any]:
        """The library's lazy API: results in order, input pulled as the library sees fit."""

    @abstractmethod
    def call(self, fn: Fn, arg: Any) -> Any:
        """Submit one task and wait for its result."""

    @abstractmethod
    def submit_each(self, fn: Fn, items: Sequence[Any]) -> list[Any]:
        """Submit one task per item through the library's per-task API (``apply_async``,
        ``submit``), all before waiting for any, then collect the results in order."""


class Contender(ABC):
    """A library under test. Class attributes describe it without importing it."""

    name: ClassVar[str]
    start_methods: ClassVar[tuple[str, ...]] = ALL_METHODS
    default_method: ClassVar[str] = "fork"

    @abstractmethod
    def session(
        self, workers: int, method: str | None = None
    ) -> contextlib.AbstractContextManager[Session]:
        """Open a pool of ``workers`` processes; ``method=None`` is the library's default.
        Leaving the context shuts the pool down the library's idiomatic way."""


class Reference(Contender):
    """A physical reference (serial loop, raw pipe), not a pool: workloads special-case it."""

    start_methods = ()
    default_method = "-"

    def session(
        self, workers: int, method: str | None = None
    ) -> contextlib.AbstractContextManager[Session]:
        raise Unsupported(f"{self.name} is a reference, not a pool")


# --- multiprocessing.Pool and its look-alikes -------------------------------------------------


class _PoolSession(Session):
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def map(self, fn: Fn, items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        return list(self._pool.map(fn, items, chunksize))

    def imap(self, fn: Fn, items: Iterable[Any]) -> Iterator[Any]:
        return iter(self._pool.imap(fn, items))

    def call(self, fn: Fn, arg: Any) -> Any:
        return self._pool.apply_async(fn, (arg,)).get()

    def submit_each(self, fn: Fn, items: Sequence[Any]) -> list[Any]:
        pending = [self._pool.apply_async(fn, (x,)) for x in items]
        return [result.get() for result in pending]


class StdlibPool(Contender):
    name = "mp.Pool"
    default_method = multiprocessing.get_start_method(allow_none=False)

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        with multiprocessing.get_context(method).Pool(workers) as pool:
            yield _PoolSession(pool)


class Multiprocess(Contender):
    name = "multiprocess"

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        import multiprocess

        with multiprocess.get_context(method).Pool(workers) as pool:
            yield _PoolSession(pool)


class ProcpoolPool(Contender):
    name = "procpool"
    default_method = "zygote"  # forkserver if the process runs other Python threads

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        import procpool

        context = multiprocessing.get_context(method) if method else None
        with procpool.Pool(workers, context=context) as pool:
            yield _PoolSession(pool)


# --- concurrent.futures executors -------------------------------------------------------------


class _ExecutorSession(Session):
    def __init__(self, executor: Callable[[], Any]) -> None:
        self._executor = executor

    def map(self, fn: Fn, items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        options = {} if chunksize is None else {"chunksize": chunksize}
        return list(self._executor().map(fn, items, **options))

    def imap(self, fn: Fn, items: Iterable[Any]) -> Iterator[Any]:
        return iter(self._executor().map(fn, items))

    def call(self, fn: Fn, arg: Any) -> Any:
        return self._executor().submit(fn, arg).result()

    def submit_each(self, fn: Fn, items: Sequence[Any]) -> list[Any]:
        executor = self._executor()
        futures = [executor.submit(fn, x) for x in items]
        return [future.result() for future in futures]


class StdlibExecutor(Contender):
    name = "cf.PPE"
    default_method = StdlibPool.default_method

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context(method) if method else None
        with ProcessPoolExecutor(workers, mp_context=context) as executor:
            yield _ExecutorSession(lambda: executor)


class ProcpoolExecutor(Contender):
    name = "procpool.PPE"
    default_method = "zygote"  # forkserver if the process runs other Python threads

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        import procpool

        context = multiprocessing.get_context(method) if method else None
        with procpool.ProcessPoolExecutor(workers, mp_context=context) as executor:
            yield _ExecutorSession(lambda: executor)


class Loky(Contender):
    name = "loky"
    start_methods = ("spawn", "forkserver")  # its reusable executor refuses fork
    default_method = "loky"

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        import loky

        # loky's idiom: ask for the reusable executor before each use; it is the running
        # one, or a new one when the last one broke.
        def executor() -> Any:
            return loky.get_reusable_executor(max_workers=workers, context=method)

        try:
            yield _ExecutorSession(executor)
        finally:
            executor().shutdown(wait=True)


# --- joblib -----------------------------------------------------------------------------------


class _JoblibSession(Session):
    def __init__(self, parallel: Any, workers: int) -> None:
        self._parallel = parallel
        self._workers = workers

    def map(self, fn: Fn, items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        from joblib import Parallel, delayed

        task = delayed(fn)
        if chunksize is None:
            return list(self._parallel(task(x) for x in items))
        # batch_size is fixed per Parallel object; the loky executor underneath is reused.
        return list(Parallel(n_jobs=self._workers, batch_size=chunksize)(task(x) for x in items))

    def imap(self, fn: Fn, items: Iterable[Any]) -> Iterator[Any]:
        from joblib import Parallel, delayed

        task = delayed(fn)
        lazy = Parallel(n_jobs=self._workers, return_as="generator")
        return iter(lazy(task(x) for x in items))

    def call(self, fn: Fn, arg: Any) -> Any:
        from joblib import delayed

        return self._parallel([delayed(fn)(arg)])[0]

    def submit_each(self, fn: Fn, items: Sequence[Any]) -> list[Any]:
        raise Unsupported("no per-task API: Parallel runs a whole batch of calls")


class Joblib(Contender):
    name = "joblib"
    start_methods = ()
    default_method = "loky"

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        from joblib import Parallel

        with Parallel(n_jobs=workers) as parallel:
            yield _JoblibSession(parallel, workers)
            # joblib keeps loky's workers for the next call and stops them at exit; stop
            # them here so that a timed start-up-to-shutdown run pays that cost too.
            executor = getattr(parallel._backend, "_workers", None)
            if executor is not None:
                executor.shutdown(wait=True)


# --- mpire and pebble -------------------------------------------------------------------------


class _MpireSession(Session):
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def map(self, fn: Fn, items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        # mpire glues NumPy results into one array by default; keep map's meaning (a list).
        options: dict[str, Any] = {"concatenate_numpy_output": False}
        if chunksize is not None:
            options["chunk_size"] = chunksize
        return list(self._pool.map(fn, items, **options))

    def imap(self, fn: Fn, items: Iterable[Any]) -> Iterator[Any]:
        return iter(self._pool.imap(fn, items))

    def call(self, fn: Fn, arg: Any) -> Any:
        return self._pool.apply(fn, args=(arg,))

    def submit_each(self, fn: Fn, items: Sequence[Any]) -> list[Any]:
        pending = [self._pool.apply_async(fn, args=(x,)) for x in items]
        return [result.get() for result in pending]


class Mpire(Contender):
    name = "mpire"

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        from mpire import WorkerPool

        with WorkerPool(n_jobs=workers, start_method=method or "fork") as pool:
            yield _MpireSession(pool)


class _PebbleSession(Session):
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def map(self, fn: Fn, items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        return list(self._pool.map(fn, items, chunksize=chunksize or 1).result())

    def imap(self, fn: Fn, items: Iterable[Any]) -> Iterator[Any]:
        return iter(self._pool.map(fn, items).result())

    def call(self, fn: Fn, arg: Any) -> Any:
        return self._pool.schedule(fn, args=(arg,)).result()

    def submit_each(self, fn: Fn, items: Sequence[Any]) -> list[Any]:
        futures = [self._pool.schedule(fn, args=(x,)) for x in items]
        return [future.result() for future in futures]


class Pebble(Contender):
    name = "pebble"

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        from pebble import ProcessPool

        context = multiprocessing.get_context(method)
        with ProcessPool(max_workers=workers, context=context) as pool:
            yield _PebbleSession(pool)


# --- cluster engines --------------------------------------------------------------------------


class _DaskSession(Session):
    def __init__(self, client: Any) -> None:
        self._client = client

    def map(self, fn: Fn, items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        # pure=False: no result caching by argument hash, so every task really runs.
        if chunksize is None:
            return list(self._client.gather(self._client.map(fn, items, pure=False)))
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        per_chunk = functools.partial(tasks.apply_chunk, fn)
        done = self._client.gather(self._client.map(per_chunk, chunks, pure=False))
        return [result for chunk in done for result in chunk]

    def imap(self, fn: Fn, items: Iterable[Any]) -> Iterator[Any]:
        raise Unsupported("no lazy map: Client.map refuses iterators")

    def call(self, fn: Fn, arg: Any) -> Any:
        return self._client.submit(fn, arg, pure=False).result()

    def submit_each(self, fn: Fn, items: Sequence[Any]) -> list[Any]:
        futures = [self._client.submit(fn, x, pure=False) for x in items]
        return list(self._client.gather(futures))


class Dask(Contender):
    name = "dask"
    default_method = "spawn"

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        import dask
        from distributed import Client, LocalCluster

        config = {"distributed.worker.multiprocessing-method": method or self.default_method}
        with (
            dask.config.set(config),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield _DaskSession(client)


class Ray(Contender):
    name = "ray"
    start_methods = ()
    default_method = "ray"

    @contextlib.contextmanager
    def session(self, workers: int, method: str | None = None) -> Iterator[Session]:
        import ray
        from ray.util.multiprocessing import Pool

        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=2 * 1024**3,
        )
        try:
            with Pool(processes=workers) as pool:
                yield _RaySession(pool)
        finally:
            ray.shutdown()


class _RaySession(_PoolSession):
    def call(self, fn: Fn, arg: Any) -> Any:
        return self._pool.apply(fn, (arg,))


# --- references -------------------------------------------------------------------------------


class Serial(Reference):
    """The work done in line, in the parent: what parallelism has to beat."""

    name = "serial"


class RawPipe(Reference):
    """A bare ``multiprocessing.Pipe`` to one echo process: the floor for a round trip."""

    name = "mp.Pipe"


CONTENDERS: dict[str, type[Contender]] = {
    cls.name: cls
    for cls in (
        ProcpoolPool,
        ProcpoolExecutor,
        StdlibPool,
        StdlibExecutor,
        Joblib,
        Loky,
        Mpire,
        Pebble,
        Multiprocess,
        Dask,
        Ray,
        Serial,
        RawPipe,
    )
}
BASELINE = ProcpoolPool.name
SMOKE_CONTENDERS = (ProcpoolPool.name, ProcpoolExecutor.name, StdlibPool.name, StdlibExecutor.name)


def get(name: str) -> Contender:
    """Return the contender called ``name``."""
    return CONTENDERS[name]()
