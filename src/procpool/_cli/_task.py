"""The worker side of ``procpool run``: call the user's function on one record.

:func:`run_record` is what the pool actually runs. It is module-level so that
it pickles by reference; the user's function never crosses a pipe (each worker
imports it by name, see ``_target``). It returns the finished output line, so
JSON encoding happens in the workers, in parallel, and a result that is not
JSON-serialisable becomes an error row right where it was produced.

It also times itself: the call, the JSON encoding, and the gap since this
worker's previous record ended (waiting for work plus moving data through the
pipe; from inside a task the two cannot be told apart).

This module is imported in every worker: it must stay light (no sqlite3,
argparse or tqdm here).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass

from ._target import Target, TargetError, load_target

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Outcome", "TaskContext", "derive_seed", "error_line", "result_line", "run_record"]

# (index, ok, line, worker pid, seconds in the call, seconds encoding, seconds since
# this worker's previous record ended). A plain tuple: it is pickled per record.
Outcome = tuple[int, bool, str, int, float, float, float]


@dataclass(frozen=True)
class TaskContext:
    """Everything a worker needs besides the record; pickled once per worker.

    Attributes:
        target: The user's function, by name.
        seed: Base seed, or None to leave random state alone.
        retries: Extra attempts for a record whose call raises.
        prefix: Tag worker output lines with ``[w<pid> #<index>] ``.
        clear_line: Start each worker output line with "erase this terminal line",
            so a line lands over the progress bar instead of after it.
        stdout_to_stderr: Send worker prints to stderr (the output is on stdout).
    """

    target: Target
    seed: int | None = None
    retries: int = 0
    prefix: bool = True
    clear_line: bool = False
    stdout_to_stderr: bool = False


def derive_seed(seed: int, index: int) -> int:
    """The 64-bit seed of record ``index`` in a run seeded with ``seed``.

    A hash, not ``seed + index``: runs with neighbouring seeds must not share
    streams shifted by one record. The same formula as ``Pool(seed=...)``, so
    ``procpool run --seed S`` and ``Pool(seed=S).map`` give the same results.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def result_line(index: int, value: Any) -> tuple[bool, str]:
    """The output line for a result, or an error line if it is not JSON-serialisable."""
    try:
        return True, json.dumps({"index": index, "result": value}, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        message = f"result is not JSON-serialisable: {exc}"
        return False, error_line(index, type(exc).__name__, message, None)


def error_line(index: int, kind: str, message: str, tb: str | None, **extra: Any) -> str:
    """The output line for a record that failed."""
    return json.dumps(
        {"index": index, "error": {"type": kind, "message": message, "traceback": tb, **extra}}
    )


def type_name(exc: BaseException) -> str:
    """``ValueError`` for builtins, ``module.Class`` for everything else."""
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


# Per worker process.
_last_end: float | None = None
_numpy_random: Any = None
_prepared: set[TaskContext] = set()


def run_record(ctx: TaskContext, item: tuple[int, Any]) -> Outcome:
    """Run the user's function on one ``(index, record)`` and return its :data:`Outcome`."""
    global _last_end
    index, record = item
    start = time.perf_counter()
    gap = 0.0 if _last_end is None else start - _last_end
    if ctx not in _prepared:
        _prepare(ctx)
    _tag_output(ctx, index)
    ok, line, call_time = _call(ctx, index, record)
    encoded = time.perf_counter()
    if ok:
        ok, line = result_line(index, line)
    _last_end = end = time.perf_counter()
    return index, ok, line, os.getpid(), call_time, end - encoded, gap


def _call(ctx: TaskContext, index: int, record: Any) -> tuple[bool, Any, float]:
    """Call the function (with in-place retries); returns (ok, value-or-error-line, seconds)."""
    elapsed = 0.0
    for attempt in range(ctx.retries + 1):
        if ctx.seed is not None:
            _seed(derive_seed(ctx.seed, index))
        began = time.perf_counter()
        try:
            fn = load_target(ctx.target)
            value = fn(record)
        except TargetError as exc:
            return False, error_line(index, "TargetError", str(exc), None), elapsed
        except BaseException as exc:  # even sys.exit() in a record is its outcome
            elapsed += time.perf_counter() - began
            if attempt == ctx.retries:
                # Leave out this wrapper's own frame: the traceback starts in the user's code.
                frames = exc.__traceback__.tb_next if exc.__traceback__ else None
                tb = "".join(traceback.format_exception(type(exc), exc, frames))
                extra = {"attempts": attempt + 1} if ctx.retries else {}
                line = error_line(index, type_name(exc), str(exc), tb, **extra)
                return False, line, elapsed
            continue
        elapsed += time.perf_counter() - began
        return True, value, elapsed
    raise AssertionError("unreachable")


def _prepare(ctx: TaskContext) -> None:
    global _numpy_random
    if ctx.stdout_to_stderr:
        sys.stdout.flush()
        os.dup2(2, 1)
    if ctx.seed is not None and _numpy_random is None:
        try:
            import numpy.random  # type: ignore[import-not-found]
        except ImportError:
            _numpy_random = False
        else:
            _numpy_random = numpy.random
    _prepared.add(ctx)


def _seed(seed: int) -> None:
    random.seed(seed)
    if _numpy_random:
        _numpy_random.seed(seed % (2**32))


def _tag_output(ctx: TaskContext, index: int) -> None:
    if not (ctx.prefix or ctx.clear_line):
        return
    tag = f"[w{os.getpid()} #{index}] " if ctx.prefix else ""
    if ctx.clear_line:
        tag = "\r\x1b[2K" + tag
    for stream in (sys.stdout, sys.stderr):
        # procpool's line writers (installed in every worker) take a prefix;
        # any other stream (a user's replacement) is left alone.
        if hasattr(stream, "prefix"):
            stream.prefix = tag
